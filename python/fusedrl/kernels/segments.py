"""Triton kernel for the segment statistics (``fusedrl::segment_stats``).

Mirrors ``csrc/include/fusedrl/segments.h`` (and the group loop of csrc/cpu/segments.cpp):

=====================  ===========================================================================
here                   segments.h / csrc/cpu/segments.cpp
=====================  ===========================================================================
``_max_nan``           ``max_nan`` (a NaN wins)
``_segment_kernel``    ``group_rows``: one program per group walks its rows (the CSR ``order``
                       slice, or the contiguous run of ``group_size`` rows) in blocks of BLOCK
                       rows, per column: pass 1 the max; pass 2 the first max row (argmax), the
                       second max, the shifted sum sum(x - max) and the weighted sums; pass 3 the
                       squared deviations from the mean; pass 4 the leave-one-out means
                       (``segment_mean``, ``segment_var``, ``segment_loo``, ``segment_wmean``,
                       ``segment_result`` and ``segment_loo_value`` with the singleton rule;
                       an empty group gives zeros)
=====================  ===========================================================================

Every load is upcast at once to float64 (the header keeps its sums in double) and each result is
rounded once to the output dtype (float32, float64 for float64 values). Sums inside a block are
Triton tree reductions of a fixed shape and blocks are added in row order, so the results do not
depend on anything but the inputs and BLOCK. M, C, strides, the group size and the singleton rule
are runtime arguments; only BLOCK and the presence flags are ``tl.constexpr``. The CSR layout
(rows of each group in increasing row order) is built by the caller with a stable sort.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedrl.kernels.moments import unbiased_var


@triton.jit
def _max_nan(m, x):
    return tl.where((x > m) | (x != x), x, m)


@triton.jit
def _group_rows(order_ptr, col, base, k, ok, stride_row, other, HAS_INDEX: tl.constexpr):
    """Rows k of the group starting at ``base`` (through the CSR order, or contiguous) and their
    values of column ``col`` upcast to float64 (``other`` on lanes past the group)."""
    if HAS_INDEX:
        rows = tl.load(order_ptr + base + k, mask=ok, other=0)
    else:
        rows = base + k
    x = tl.load(col + rows * stride_row, mask=ok, other=other).to(tl.float64)
    return rows, x


@triton.jit
def _segment_kernel(
    values_ptr, offsets_ptr, order_ptr, weight_ptr,
    count_ptr, mean_ptr, var_ptr, std_ptr, loo_ptr, max_ptr, second_ptr, argmax_ptr, wmean_ptr,
    M, C, stride_row, stride_col, group_size, singleton,
    HAS_INDEX: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_LOO: tl.constexpr, BLOCK: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    if HAS_INDEX:
        base = tl.load(offsets_ptr + g)
        n = tl.load(offsets_ptr + g + 1) - base
    else:
        base = g * group_size
        n = group_size + 0 * g
    out_ty = mean_ptr.dtype.element_ty
    tl.store(count_ptr + g, n.to(out_ty))
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    nf = n.to(tl.float64)
    for c in range(0, C):
        col = values_ptr + c * stride_col
        # pass 1: the max
        m = tl.full((), float("-inf"), tl.float64)
        for k0 in range(0, n, BLOCK):
            k = k0 + lanes
            ok = k < n
            rows, x = _group_rows(order_ptr, col, base, k, ok, stride_row, float("-inf"), HAS_INDEX)
            m = _max_nan(m, tl.max(tl.where(x != x, float("inf"), x), axis=0))
            m = tl.where(tl.sum((x != x).to(tl.int32), axis=0) > 0, float("nan"), m)
        # pass 2: argmax (the first row holding the max), second max, shifted and weighted sums
        am = tl.full((), -1, tl.int64)
        for k0 in range(0, n, BLOCK):
            k = k0 + lanes
            ok = k < n
            rows, x = _group_rows(order_ptr, col, base, k, ok, stride_row, 0.0, HAS_INDEX)
            first = tl.min(tl.where(ok & (x == m), rows, M), axis=0)
            am = tl.where((am < 0) & (first < M), first, am)
        sec = tl.full((), float("-inf"), tl.float64)
        shifted = tl.zeros((), tl.float64)
        wsum = tl.zeros((), tl.float64)
        wx = tl.zeros((), tl.float64)
        for k0 in range(0, n, BLOCK):
            k = k0 + lanes
            ok = k < n
            rows, x = _group_rows(order_ptr, col, base, k, ok, stride_row, 0.0, HAS_INDEX)
            rest = tl.where(ok & (rows != am), x, float("-inf"))
            sec = _max_nan(sec, tl.max(tl.where(rest != rest, float("inf"), rest), axis=0))
            sec = tl.where(tl.sum((rest != rest).to(tl.int32), axis=0) > 0, float("nan"), sec)
            shifted += tl.sum(tl.where(ok, x - m, 0.0), axis=0)
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + rows, mask=ok, other=0.0).to(tl.float64)
                wsum += tl.sum(w, axis=0)
                wx += tl.sum(tl.where(ok, w * (x - m), 0.0), axis=0)
        mean = m + shifted / tl.where(nf > 1, nf, 1.0)  # segment_mean
        # pass 3: squared deviations
        sq = tl.zeros((), tl.float64)
        for k0 in range(0, n, BLOCK):
            k = k0 + lanes
            ok = k < n
            rows, x = _group_rows(order_ptr, col, base, k, ok, stride_row, 0.0, HAS_INDEX)
            d = tl.where(ok, x - mean, 0.0)
            sq += tl.sum(d * d, axis=0)
        nm1 = tl.where(nf - 1 > 1, nf - 1, 1.0)
        var = unbiased_var(sq, nf)  # segment_var
        if HAS_WEIGHT:
            wmean = tl.where(wsum > 0, m + wx / tl.where(wsum > 0, wsum, 1.0), 0.0)  # segment_wmean
        else:
            wmean = mean
        # segment_result: the singleton rule
        single = n == 1
        verl = singleton == 0
        r_mean = tl.where(single & verl, 0.0, mean)
        r_wmean = tl.where(single, tl.where(verl, 0.0, mean), wmean)
        r_var = tl.where(single & verl, 1.0, var)
        # pass 4: leave-one-out means (segment_loo_value), when wanted
        for k0 in range(0, n if HAS_LOO else 0, BLOCK):
            k = k0 + lanes
            ok = k < n
            rows, x = _group_rows(order_ptr, col, base, k, ok, stride_row, 0.0, HAS_INDEX)
            loo = m + (shifted - (x - m)) / nm1
            loo = tl.where(n > 1, loo, tl.where(verl, 0.0, x))
            tl.store(loo_ptr + rows * C + c, loo.to(out_ty), mask=ok)
        empty = n == 0
        o = g * C + c
        tl.store(mean_ptr + o, tl.where(empty, 0.0, r_mean).to(out_ty))
        tl.store(var_ptr + o, tl.where(empty, 0.0, r_var).to(out_ty))
        tl.store(std_ptr + o, tl.where(empty, 0.0, tl.sqrt(r_var)).to(out_ty))
        tl.store(max_ptr + o, tl.where(empty, 0.0, m).to(out_ty))
        tl.store(second_ptr + o, tl.where(empty, 0.0, sec).to(out_ty))
        tl.store(wmean_ptr + o, tl.where(empty, 0.0, r_wmean).to(out_ty))
        tl.store(argmax_ptr + o, tl.where(empty, 0, tl.where(am < 0, M, am)))


def segment_stats(values, offsets, order, group_size, num_groups, weight, singleton, outs):
    """Launch over ``num_groups`` programs. ``offsets``/``order``: the CSR layout of dense ids
    (fusedrl.ops.segments.csr), or None for contiguous groups of ``group_size`` rows."""
    M, C = values.shape
    count, mean, var, std, loo, gmax, second, argmax, wmean = outs
    has_index = offsets is not None
    if has_index:
        largest = int((offsets[1:] - offsets[:-1]).max()) if num_groups else 0
    else:
        offsets = order = torch.zeros(1, dtype=torch.int64, device=values.device)
        largest = group_size
    block = min(1024, max(16, triton.next_power_of_2(max(largest, 1))))
    dummy = mean
    _segment_kernel[(num_groups,)](
        values, offsets, order, weight if weight is not None else dummy,
        count, mean, var, std, loo if loo.numel() else dummy, gmax, second, argmax, wmean,
        M, C, values.stride(0), values.stride(1), group_size, singleton,
        HAS_INDEX=has_index, HAS_WEIGHT=weight is not None, HAS_LOO=loo.numel() > 0, BLOCK=block,
    )
