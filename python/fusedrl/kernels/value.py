"""Triton kernel of the clipped value loss (``fusedrl::value_objective``): the twin of
csrc/cpu/value.cpp; ``_token_loss`` mirrors ``token_loss`` of csrc/include/fusedrl/value.h.

Mapping (as python/fusedrl/kernels/policy.py): one program per row i, its span
``[start_i, start_i + len_i)`` (packed: from ``cu_seqlens``; padded: ``[0, T)``), walked in blocks
of BLOCK tokens. Every load is upcast to the accumulation type (float32; float64 for float64
values) and cleaned to 0 where the mask is 0; lanes past the row's end are excluded from every sum.
Per-row sums are ``tl.sum`` of float64 values (each product formed in the accumulation type, then
widened, as the CPU kernel's ``double(...)``), blocks added in row order.

Runtime vs compile time: T, the strides, the clip (+inf when absent) and the tie flag are runtime
arguments; only BLOCK, the presence of old_values and of the gradient, and the layout are
``tl.constexpr``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .policy import _load, _load_mask, _row_span, _store_as

BLOCK_T = 1024  # tokens per block (module-level so that tests can shrink it); read at call time
NUM_OUTPUTS = tl.constexpr(4)


@triton.jit
def _token_loss(v, old, ret, c, ties):
    """value.h token_loss: (l, dl/dv, clipped) of cleaned operands; c = +inf without a clip."""
    lo = old - c
    hi = old + c
    vc = tl.where(v < lo, lo, tl.where(v > hi, hi, v))
    mn = tl.where(v < hi, v, hi)
    dmin = tl.where(v < hi, 1.0, tl.where(v == hi, 0.5, 0.0))
    dmax = tl.where(mn > lo, 1.0, tl.where(mn == lo, 0.5, 0.0))
    inside = tl.where((v >= lo) & (v <= hi), 1.0, 0.0)
    pass_ = ties * (dmin * dmax) + (1.0 - ties) * inside
    d1 = v - ret
    d2 = vc - ret
    l1 = d1 * d1
    l2 = d2 * d2
    f = tl.where(l1 > l2, 1.0, tl.where(l1 == l2, 0.5, 0.0))
    dv = f * d1 + (1.0 - f) * d2 * pass_
    clipped = tl.where(l2 > l1, 1.0, 0.0)
    return 0.5 * tl.where(l1 > l2, l1, l2), dv, clipped


@triton.jit
def _value_kernel(
    v_ptr, old_ptr, ret_ptr, mask_ptr, g_ptr, cu_ptr, coef_ptr, rows_ptr,
    T, s_v_row, s_v_tok, s_o_row, s_o_tok, s_r_row, s_r_tok, s_m_row, s_m_tok, s_g_row, s_g_tok,
    verl_ties, clip: tl.float64,
    HAS_OLD: tl.constexpr, HAS_G: tl.constexpr, PACKED: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    ACC: tl.constexpr = tl.float64 if v_ptr.dtype.element_ty == tl.float64 else tl.float32
    c = tl.full((), clip, ACC)  # +inf without a clip (the host resolves it, as Options::resolve)
    ties = tl.where(verl_ties != 0, 1.0, 0.0).to(ACC)
    start, length = _row_span(cu_ptr, i, T, PACKED)
    g = tl.load(coef_ptr + i).to(ACC)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    s_loss = tl.zeros((), tl.float64)
    cnt = tl.zeros((), tl.float64)
    c_clip = tl.zeros((), tl.float64)
    s_v = tl.zeros((), tl.float64)
    for t0 in range(0, length, BLOCK):
        offs = t0 + lanes
        inb = offs < length
        pos = start + offs
        m, ok = _load_mask(mask_ptr, i, s_m_row, s_m_tok, pos, inb, ACC)
        v = _load(v_ptr, i, s_v_row, s_v_tok, pos, inb, ok, ACC)
        if HAS_OLD:
            old = _load(old_ptr, i, s_o_row, s_o_tok, pos, inb, ok, ACC)
        else:
            old = v
        ret = _load(ret_ptr, i, s_r_row, s_r_tok, pos, inb, ok, ACC)
        l, dv, clipped = _token_loss(v, old, ret, c, ties)
        s_loss += tl.sum(tl.where(ok, (m * l).to(tl.float64), 0.0), axis=0)
        cnt += tl.sum(m.to(tl.float64), axis=0)
        c_clip += tl.sum(tl.where(ok, (m * clipped).to(tl.float64), 0.0), axis=0)
        s_v += tl.sum(tl.where(ok, (m * v).to(tl.float64), 0.0), axis=0)
        if HAS_G:
            _store_as(g_ptr, i * s_g_row + pos * s_g_tok, tl.where(ok, g * m * dv, 0.0), inb)
    out = rows_ptr + i * NUM_OUTPUTS
    tl.store(out + 0, g.to(tl.float64) * s_loss)
    tl.store(out + 1, cnt)
    tl.store(out + 2, c_clip)
    tl.store(out + 3, s_v)


def value_loss(o) -> None:
    """Fills ``o.rows`` [B, 4] (float64) and the gradient (when present) as csrc/cpu/value.cpp."""
    from .policy import _cu, _operand  # noqa: PLC0415

    dummy = o.rows
    v, svr, svt, _ = _operand(o, "values", dummy)
    old, sor, sot, has_old = _operand(o, "old_values", dummy)
    ret, srr, srt, _ = _operand(o, "returns", dummy)
    mask, smr, smt, _ = _operand(o, "mask", dummy)
    g, sgr, sgt, has_g = _operand(o, "grad", dummy)
    cu, packed = _cu(o, dummy)
    block = min(BLOCK_T, max(16, triton.next_power_of_2(max(int(o.T), 1))))
    opts = o.options
    clip = opts["clip"] if opts["has_clip"] else float("inf")  # as Options::resolve
    _value_kernel[(o.B,)](
        v, old, ret, mask, g, cu, o.coef, o.rows,
        o.T, svr, svt, sor, sot, srr, srt, smr, smt, sgr, sgt,
        opts["verl_ties"], clip,
        HAS_OLD=has_old, HAS_G=has_g, PACKED=packed, BLOCK=block,
    )
