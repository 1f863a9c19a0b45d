"""Triton kernels for token log-probs and entropy (``fusedrl::token_logprobs`` and its backward).

The per-element math mirrors ``csrc/include/fusedrl/logprobs.h`` line for line:

==========================  ===================================================================
here                        logprobs.h / csrc/cpu/logprobs.cpp
==========================  ===================================================================
``_clamp_shift``            ``clamp_shift``: shifts clamped below at -128 (a -inf logit gives 0,
                            never 0 * inf); a NaN passes
``_exp_nonpos``             ``exp_nonpos`` (``tl.exp``)
``_lse_rebase``             ``lse_rebase``: re-express (m, s, t) at a new max; an empty state
                            (``not s > 0``) keeps its s and t (a NaN stays)
``_log_norm_value``,        ``log_norm_value``, ``entropy_value``, ``logprob_value``
``_entropy_value``,
``_logprob_value``
``_expm1``                  ``expm1_acc`` (no libdevice in the interpreter: a Taylor polynomial
                            where exp(x) - 1 would cancel, exp(x) - 1 elsewhere)
``_forward_kernel``         ``row_stats`` + ``fwd_rows``: one program per row walks V in BLOCK_V
                            blocks; a block whose max is -inf adds nothing (the ``continue``);
                            otherwise the running state is rebased to the new max and the block's
                            sums of e = exp(clamp_shift(x - m)) and e * d are added. A NaN seen
                            anywhere makes lse and entropy NaN (``finite`` in fwd_rows).
``_logprob_grad``           ``logprob_grad``
``_backward_kernel``        ``bwd_rows``: ignored rows and rows with zero upstream gradients are
                            written as zeros without reading the logits
``_to_output``              ``from_float<bf16_t>`` of common.h (bfloat16 gradient stores)
==========================  ===================================================================

Every load is upcast at once to the accumulation type (float32, float64 for float64 logits) and
every store is converted to the output's dtype. The running state (m, s, t) is kept in the
accumulation type across blocks (the C++ CPU kernel adds its chunk sums in double). V, the
strides, the temperature and the ignore index are runtime arguments; only the block sizes and the
presence flags are ``tl.constexpr``.
The inverse temperature is passed as a float64 scalar and converted to the accumulation type in
the kernel, so float64 logits see the full-precision 1/T (as the C++ kernel does) and float32
logits see float(1/T).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Block sizes along V (powers of two). Module-level so tests can shrink them to exercise the
# block merge on small V; read at call time.
FWD_BLOCK_V = 4096
BWD_BLOCK_V = 4096


@triton.jit
def _to_output(x, out_ty: tl.constexpr):
    """The store conversion: ``from_float<bf16_t>`` of common.h (round to nearest even, NaN kept)
    for bfloat16, written with bit operations because the interpreter's float32 -> bfloat16 cast
    truncates; a plain cast (round to nearest even) otherwise."""
    if out_ty == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        bits = tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)
        return bits.to(tl.bfloat16, bitcast=True)
    else:
        return x.to(out_ty)


@triton.jit
def _clamp_shift(d):
    return tl.where(d < -128.0, -128.0, d)  # d < lo ? lo : d  (keeps a NaN)


@triton.jit
def _exp_nonpos(x):
    return tl.exp(x)


@triton.jit
def _lse_rebase(m, s, t, m_new):
    """lse_rebase: the state (m, s, t) re-expressed relative to m_new >= m."""
    shift = _clamp_shift(m - m_new)  # <= 0
    a = _exp_nonpos(shift)
    nonempty = s > 0  # an empty state (or a NaN in s) is kept as is
    s_new = tl.where(nonempty, s * a, s)
    t_new = tl.where(nonempty, a * (t + shift * s), t)
    return m_new, s_new, t_new


@triton.jit
def _log_norm_value(s):
    return tl.log(s)


@triton.jit
def _entropy_value(s, t):
    return tl.log(s) - t / s


@triton.jit
def _logprob_value(x, m, log_norm):
    return (x - m) - log_norm


@triton.jit
def _expm1(x):
    poly = x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0)))))
    return tl.where(tl.abs(x) < 0.01, poly, tl.exp(x) - 1.0)  # poly error < x^6/720


@triton.jit
def _logprob_grad(x, m, log_norm, entropy, is_label, g_lp, g_h, inv_temp):
    lp = _clamp_shift(_logprob_value(x, m, log_norm))  # p = 0 multiplies a finite value
    p = _exp_nonpos(lp)
    onehot_minus_p = tl.where(is_label, -_expm1(lp), -p)
    return inv_temp * (g_lp * onehot_minus_p - g_h * p * (lp + entropy))


@triton.jit
def _forward_kernel(
    logits_ptr, labels_ptr, logp_ptr, entropy_ptr, max_ptr, norm_ptr,
    V, stride_row, inv_temp: tl.float64, ignore_index,
    HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ACC: tl.constexpr = tl.float64 if logits_ptr.dtype.element_ty == tl.float64 else tl.float32
    inv_t = tl.full([], inv_temp, ACC)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    z_row = logits_ptr + row * stride_row

    # LseState (lse_empty), plus the NaN flag of row_stats.
    m = tl.full([], float("-inf"), ACC)
    s = tl.zeros([], ACC)
    t = tl.zeros([], ACC)
    nan_seen = tl.zeros([], tl.int32)
    cols0 = tl.arange(0, BLOCK_V)
    n_cols = tl.where(valid, V, 0)  # an ignored row reads nothing
    for start in range(0, n_cols, BLOCK_V):
        cols = start + cols0
        in_row = cols < V
        x = tl.load(z_row + cols, mask=in_row, other=float("-inf")).to(ACC) * inv_t
        nan_seen = nan_seen | tl.max((x != x).to(tl.int32), axis=0)
        cmax = tl.max(x, axis=0)
        live = cmax > float("-inf")  # an all -inf block adds nothing (and leaves m alone)
        m, s, t = _lse_rebase(m, s, t, tl.where(live, tl.maximum(m, cmax), m))
        d = _clamp_shift(x - m)
        e = tl.where(in_row, _exp_nonpos(d), 0.0)  # lanes past V add exactly 0 (also in float64)
        s += tl.where(live, tl.sum(e, axis=0), 0.0)
        if HAS_ENTROPY:
            t += tl.where(live, tl.sum(e * d, axis=0), 0.0)

    finite = nan_seen == 0
    log_norm = tl.where(finite, _log_norm_value(s), float("nan"))
    z_label = tl.load(z_row + label, mask=valid, other=0.0).to(ACC)
    logp = _logprob_value(z_label * inv_t, m, log_norm)
    out_ty = norm_ptr.dtype.element_ty
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0).to(out_ty))
    tl.store(max_ptr + row, tl.where(valid, m, 0.0).to(out_ty))
    tl.store(norm_ptr + row, tl.where(valid, log_norm, 0.0).to(out_ty))
    if HAS_ENTROPY:
        h = tl.where(finite, _entropy_value(s, t), float("nan"))
        tl.store(entropy_ptr + row, tl.where(valid, h, 0.0).to(out_ty))


# The backward is elementwise once a row's lse, entropy and upstream gradients are known, so it
# runs on a 2-D grid (rows, V blocks) with no state carried between blocks: full parallelism even
# for few rows, each program reads its BLOCK_V logits once and writes its BLOCK_V gradients once.
# Rows go on grid axis 0 (up to 2^31 - 1), V blocks on axis 1 (up to 65535 blocks).
@triton.jit
def _backward_kernel(
    logits_ptr, labels_ptr, max_ptr, norm_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, grad_ptr,
    V, stride_row, grad_stride_row, inv_temp: tl.float64, ignore_index,
    HAS_ENTROPY: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = cols < V
    ACC: tl.constexpr = tl.float64 if logits_ptr.dtype.element_ty == tl.float64 else tl.float32
    inv_t = tl.full([], inv_temp, ACC)
    label = tl.load(labels_ptr + row)
    m = tl.load(max_ptr + row).to(ACC)
    log_norm = tl.load(norm_ptr + row).to(ACC)
    h = tl.zeros([], ACC)
    g_lp = tl.zeros([], ACC)
    g_h = tl.zeros([], ACC)
    if HAS_ENTROPY:
        h = tl.load(entropy_ptr + row).to(ACC)
    if HAS_GRAD_LOGP:
        g_lp = tl.load(grad_logp_ptr + row).to(ACC)
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + row).to(ACC)
    active = (label != ignore_index) & ((g_lp != 0.0) | (g_h != 0.0))

    n_read = tl.where(active, V, 0)  # (a scalar & block mask trips the interpreter)
    z = tl.load(logits_ptr + row * stride_row + cols, mask=cols < n_read, other=0.0).to(ACC)
    g = _logprob_grad(z * inv_t, m, log_norm, h, cols == label, g_lp, g_h, inv_t)
    g = tl.where(active, g, 0.0)
    tl.store(grad_ptr + row * grad_stride_row + cols, _to_output(g, grad_ptr.dtype.element_ty), mask=in_row)


def _block(V: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(V)))


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def forward(logits, labels, temperature, ignore_index, logp, entropy, row_max, log_norm):
    """logp, entropy (when not None), row max and log-normalizer of each row of ``logits`` [N, V]."""
    N, V = logits.shape
    block = _block(V, FWD_BLOCK_V)
    _forward_kernel[(N,)](
        logits, labels, logp, log_norm if entropy is None else entropy, row_max, log_norm,
        V, logits.stride(0), 1.0 / temperature, ignore_index,
        HAS_ENTROPY=entropy is not None, BLOCK_V=block, num_warps=_num_warps(block),
    )


def backward(logits, labels, temperature, ignore_index, row_max, log_norm, entropy, grad_logp, grad_entropy, grad):
    """d(sum g_lp * logp + g_h * entropy)/d logits into ``grad`` [N, V] (every element written)."""
    N, V = logits.shape
    block = _block(V, BWD_BLOCK_V)
    _backward_kernel[(N, triton.cdiv(V, block))](
        logits, labels, row_max, log_norm,
        log_norm if entropy is None else entropy,
        log_norm if grad_logp is None else grad_logp,
        log_norm if grad_entropy is None else grad_entropy,
        grad,
        V, logits.stride(0), grad.stride(0), 1.0 / temperature, ignore_index,
        HAS_ENTROPY=entropy is not None, HAS_GRAD_LOGP=grad_logp is not None,
        HAS_GRAD_ENTROPY=grad_entropy is not None, BLOCK_V=block, num_warps=_num_warps(block),
    )
