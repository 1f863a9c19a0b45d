"""Triton kernels for the masked scans along T (``fusedrl::gae``, ``fusedrl::discounted_returns``,
``fusedrl::masked_prefix_sum``).

The per-step math mirrors ``csrc/include/fusedrl/scan.h``:

========================  =====================================================================
here                      scan.h / csrc/cpu/scan.cpp
========================  =====================================================================
``_gae_delta``            ``gae_delta``: (r + gamma V_next) - V
``_scan_step``            ``scan_step``: x + decay * carry
``_reverse_kernel``       ``reverse_block``: one program walks BLOCK_B rows from t = T-1 to 0
                          with their carries (c, V_next) in registers; masked tokens write 0 and
                          leave the carries alone (selects only: NaN padding never leaks); with
                          WHITEN, each row's valid advantages are summed in float64 shifted by
                          its first scanned one (n, k, s1, s2)
``_moments_from_shifted`` ``moments_from_shifted_sums``: a row's (count, mean, M2), written to
``_sums``                 the workspace
``_prefix_kernel``        ``prefix_block``: the same walk from t = 0, s = s + x at valid tokens
``_merge_kernel``         ``moments_merge`` in row order (one program), then ``whiten_coeffs``:
                          mean and whiten_scale(unbiased_var(M2, n)) (kernels/moments.py)
``_whiten_kernel``        ``whiten_row`` with ``whiten_value`` in float64
========================  =====================================================================

Every load is upcast at once to the accumulation type (float32; float64 for float64 inputs). T,
the strides, gamma and lambda are runtime arguments; only the block sizes and the presence flags
are ``tl.constexpr``. The row merge is sequential in row order, so the whitening statistics do not
depend on the launch shape.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fusedrl.kernels.moments import WHITEN_EPS, unbiased_var, whiten_scale

BLOCK_B = 16  # rows per program of the scans
BLOCK_T = 1024  # tokens per block of the moment and whitening passes


@triton.jit
def _moments_from_shifted_sums(n, k, s1, s2):
    """moments_from_shifted_sums: mean = k + s1 / n, M2 = s2 - s1^2 / n clamped at 0 (NaN kept)."""
    safe_n = tl.where(n > 0, n, 1.0)
    mean = tl.where(n > 0, k + s1 / safe_n, 0.0)
    m2 = s2 - s1 * (s1 / safe_n)
    m2 = tl.where(m2 > 0, m2, tl.where(m2 == m2, 0.0, m2))
    return n, mean, tl.where(n > 0, m2, 0.0)


@triton.jit
def _gae_delta(r, v, v_next, gamma):
    return (r + gamma * v_next) - v


@triton.jit
def _scan_step(x, carry, decay):
    return x + decay * carry


@triton.jit
def _reverse_kernel(
    x_ptr, v_ptr, m_ptr, boot_ptr, out_ptr, ret_ptr,
    ws_ptr, B, T, x_stride, v_stride, m_stride, gamma: tl.float64, decay: tl.float64,
    HAS_V: tl.constexpr, HAS_BOOT: tl.constexpr, WHITEN: tl.constexpr, BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    live = rows < B
    ACC: tl.constexpr = tl.float64 if out_ptr.dtype.element_ty == tl.float64 else tl.float32
    g = tl.full([], gamma, ACC)
    dec = tl.full([], decay, ACC)
    c = tl.zeros([BLOCK_B], ACC)
    vn = tl.zeros([BLOCK_B], ACC)
    if HAS_BOOT:
        vn = tl.load(boot_ptr + rows, mask=live, other=0.0).to(ACC)
    n = tl.zeros([BLOCK_B], tl.float64)  # whitening: shifted sums (scan.h)
    k = tl.zeros([BLOCK_B], tl.float64)
    s1 = tl.zeros([BLOCK_B], tl.float64)
    s2 = tl.zeros([BLOCK_B], tl.float64)
    for i in range(0, T):
        t = T - 1 - i
        ok = (tl.load(m_ptr + rows * m_stride + t, mask=live, other=0) != 0) & live
        r = tl.load(x_ptr + rows * x_stride + t, mask=live, other=0.0).to(ACC)
        if HAS_V:
            val = tl.load(v_ptr + rows * v_stride + t, mask=live, other=0.0).to(ACC)
            s = _scan_step(_gae_delta(r, val, vn, g), c, dec)
            tl.store(out_ptr + rows * T + t, tl.where(ok, s, 0.0).to(ACC), mask=live)
            tl.store(ret_ptr + rows * T + t, tl.where(ok, s + val, 0.0).to(ACC), mask=live)
            vn = tl.where(ok, val, vn)
            if WHITEN:
                sd = s.to(tl.float64)
                k = tl.where(ok & (n == 0), sd, k)
                d = tl.where(ok, sd - k, 0.0)
                s1 += d
                s2 += d * d
                n += tl.where(ok, 1.0, 0.0)
        else:
            s = _scan_step(r, c, dec)
            tl.store(out_ptr + rows * T + t, tl.where(ok, s, 0.0).to(ACC), mask=live)
        c = tl.where(ok, s, c)
    if WHITEN:
        st_n, st_mean, st_m2 = _moments_from_shifted_sums(n, k, s1, s2)
        tl.store(ws_ptr + 3 * rows, st_n, mask=live)
        tl.store(ws_ptr + 3 * rows + 1, st_mean, mask=live)
        tl.store(ws_ptr + 3 * rows + 2, st_m2, mask=live)


@triton.jit
def _prefix_kernel(x_ptr, m_ptr, out_ptr, B, T, x_stride, m_stride, BLOCK_B: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    live = rows < B
    ACC: tl.constexpr = tl.float64 if out_ptr.dtype.element_ty == tl.float64 else tl.float32
    s = tl.zeros([BLOCK_B], ACC)
    for t in range(0, T):
        ok = (tl.load(m_ptr + rows * m_stride + t, mask=live, other=0) != 0) & live
        n = s + tl.load(x_ptr + rows * x_stride + t, mask=live, other=0.0).to(ACC)
        tl.store(out_ptr + rows * T + t, tl.where(ok, n, 0.0).to(ACC), mask=live)
        s = tl.where(ok, n, s)


@triton.jit
def _moments_merge(an, amean, am2, bn, bmean, bm2):
    """moments_merge (Chan et al.): a first, then b; an empty side returns the other."""
    n = an + bn
    d = bmean - amean
    safe_n = tl.where(n > 0, n, 1.0)
    mean = amean + d * (bn / safe_n)
    m2 = am2 + bm2 + d * d * (an * bn / safe_n)
    mean = tl.where(bn == 0, amean, tl.where(an == 0, bmean, mean))
    m2 = tl.where(bn == 0, am2, tl.where(an == 0, bm2, m2))
    return n, mean, m2


@triton.jit
def _merge_kernel(ws_ptr, B, eps: tl.float64):
    n = tl.zeros([], tl.float64)
    mean = tl.zeros([], tl.float64)
    m2 = tl.zeros([], tl.float64)
    for b in range(0, B):
        bn = tl.load(ws_ptr + 3 * b)
        bmean = tl.load(ws_ptr + 3 * b + 1)
        bm2 = tl.load(ws_ptr + 3 * b + 2)
        n, mean, m2 = _moments_merge(n, mean, m2, bn, bmean, bm2)
    # whiten_coeffs
    tl.store(ws_ptr + 3 * B, mean)
    tl.store(ws_ptr + 3 * B + 1, whiten_scale(unbiased_var(m2, n), eps))


@triton.jit
def _whiten_value(x, mean, scale):
    return (x - mean) * scale


@triton.jit
def _whiten_kernel(out_ptr, m_ptr, ws_ptr, B, T, m_stride, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    inside = cols < T
    mean = tl.load(ws_ptr + 3 * B)
    scale = tl.load(ws_ptr + 3 * B + 1)
    ok = (tl.load(m_ptr + row * m_stride + cols, mask=inside, other=0) != 0) & inside
    o = tl.load(out_ptr + row * T + cols, mask=inside, other=0.0)
    w = _whiten_value(o.to(tl.float64), mean, scale).to(o.dtype)
    tl.store(out_ptr + row * T + cols, tl.where(ok, w, o), mask=inside)


def _stride(t):
    return t.stride(0) if t.shape[0] > 1 else t.shape[-1]


def reverse_scan(x, values, mask, bootstrap, gamma, lam, out, returns, whiten, workspace):
    """GAE (values given) or discounted returns (values None) of ``x [B, T]`` into ``out``
    (and ``returns``); whitens ``out`` over the valid tokens when ``whiten``."""
    B, T = x.shape
    _reverse_kernel[(triton.cdiv(B, BLOCK_B),)](
        x, x if values is None else values, mask, out if bootstrap is None else bootstrap, out,
        out if returns is None else returns,
        out if workspace is None else workspace,
        B, T, _stride(x), 0 if values is None else _stride(values), _stride(mask), float(gamma),
        float(gamma * lam),
        HAS_V=values is not None, HAS_BOOT=bootstrap is not None, WHITEN=bool(whiten and values is not None),
        BLOCK_B=BLOCK_B,
    )
    if whiten:
        block = max(16, min(BLOCK_T, triton.next_power_of_2(T)))
        _merge_kernel[(1,)](workspace, B, WHITEN_EPS)
        _whiten_kernel[(B, triton.cdiv(T, block))](out, mask, workspace, B, T, _stride(mask), BLOCK_T=block)


def prefix_sum(x, mask, out):
    """Masked prefix sum of ``x [B, T]`` along T into ``out``."""
    B, T = x.shape
    _prefix_kernel[(triton.cdiv(B, BLOCK_B),)](x, mask, out, B, T, _stride(x), _stride(mask), BLOCK_B=BLOCK_B)
