"""Op ``fusedrl::segment_stats``: per-group statistics of ``values [M, C]``.

The outputs are those of :func:`fusedrl.reference.advantages.group_stats` (a
:class:`~fusedrl.reference.advantages.GroupStats`): count ``[G, 1]``, mean, var, std, max, second
max, argmax and weighted mean ``[G, C]``, and the leave-one-out mean ``[M, C]``, in the
accumulation dtype (float32; float64 for float64 values). Groups are either dense ids ``index [M]``
in ``[0, G)`` or, with ``index=None``, contiguous runs of ``group_size`` rows (no index is read or
built). The kernels reduce each group sequentially in row order (csrc/include/fusedrl/segments.h),
so the results are the same under any thread count. ``SEGMENT_STATS(backend, ...)`` runs the kernel of
the backend :func:`fusedrl.dispatch.select` chose (:class:`fusedrl.ops.library.Op`). No gradient:
advantages are constants.

Op ``fusedrl::group_advantages`` (CPU): the group estimators in one kernel call, from raw ids
or a fixed group size to per-row advantages (see :func:`group_advantages_op`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedrl import _ext
from fusedrl.ops.library import Op

SINGLETON_CODES = {"verl": 0, "zero": 1}


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _args(values, index, group_size, num_groups, weight, singleton, outs):
    M, C = values.shape
    return (
        values.data_ptr(), _ext.DTYPE_CODES[values.dtype], M, C, values.stride(0), values.stride(1),
        _ext.ptr(index), group_size, num_groups, _ext.ptr(weight), SINGLETON_CODES[singleton],
        *(t.data_ptr() if t.numel() else 0 for t in outs),  # an empty loo_mean: not computed
    )


def _cpu(values, index, group_size, num_groups, weight, singleton, outs):
    _ext.load().segment_stats_cpu(
        *_args(values, index, group_size, num_groups, weight, singleton, outs), torch.get_num_threads()
    )


def csr(index: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """(offsets [G + 1], order [M]) of dense ids: the rows of group g are
    ``order[offsets[g]:offsets[g + 1]]`` in increasing row order (a stable sort: deterministic)."""
    order = torch.sort(index, stable=True).indices
    offsets = torch.zeros(num_groups + 1, dtype=torch.int64, device=index.device)
    torch.cumsum(torch.bincount(index, minlength=num_groups), 0, out=offsets[1:])
    return offsets, order


def _cuda(values, index, group_size, num_groups, weight, singleton, outs):
    offsets, order = csr(index, num_groups) if index is not None else (None, None)
    _ext.load().segment_stats_cuda(
        *_args(values, index, group_size, num_groups, weight, singleton, outs), _ext.ptr(offsets), _ext.ptr(order),
        torch.cuda.current_stream(values.device).cuda_stream,
    )


def _triton(values, index, group_size, num_groups, weight, singleton, outs):
    from fusedrl.kernels import segments as k  # noqa: PLC0415  (imports triton)

    offsets, order = csr(index, num_groups) if index is not None else (None, None)
    k.segment_stats(values, offsets, order, group_size, num_groups, weight, SINGLETON_CODES[singleton], outs)




def _fresh(shape, dtype, device):
    """``_ext.empty``; integer buffers are poisoned with -1 (no NaN) under FUSEDRL_POISON=1."""
    if dtype.is_floating_point:
        return _ext.empty(shape, dtype, device)
    return _ext.empty(shape, torch.float64, device).nan_to_num_(-1.0).to(dtype)


def _empty_outputs(values: Tensor, num_groups: int, need_loo: bool, fresh):
    M, C = values.shape
    dt = _out_dtype(values.dtype)
    dev = values.device
    g = (num_groups, C)
    return (
        fresh((num_groups, 1), dt, dev), fresh(g, dt, dev), fresh(g, dt, dev), fresh(g, dt, dev),
        fresh((M if need_loo else 0, C), dt, dev), fresh(g, dt, dev), fresh(g, dt, dev), fresh(g, torch.int64, dev), fresh(g, dt, dev),
    )


def _segment_stats(launch):
    def segment_stats(values, index, group_size, num_groups, weight, singleton, need_loo):
        outs = _empty_outputs(values, num_groups, need_loo, _fresh)
        if num_groups > 0:
            launch(values, index, group_size, num_groups, weight, singleton, outs)
        return outs

    return segment_stats


def _segment_stats_fake(values, index, group_size, num_groups, weight, singleton, need_loo):
    return _empty_outputs(values, num_groups, need_loo, lambda shape, dt, dev: values.new_empty(shape, dtype=dt))


SEGMENT_STATS = Op(
    "segment_stats", "(Tensor values, Tensor? index, int group_size, int num_groups, Tensor? weight, str singleton, "
    "bool need_loo) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    fake=_segment_stats_fake, kernels={"cpu": _segment_stats(_cpu), "cuda": _segment_stats(_cuda),
                                       "triton": _segment_stats(_triton)},
)
BACKENDS = SEGMENT_STATS.backends  # "torch" is the reference's group_stats


def group_stats(
    values: Tensor,
    index: Tensor | None,
    num_groups: int,
    *,
    weight: Tensor | None = None,
    singleton: str = "verl",
    group_size: int | None = None,
    need_loo: bool = True,
    backend: str = "cpu",
):
    """:func:`fusedrl.reference.advantages.group_stats` computed by the ``backend`` kernel.

    ``values [M, C]`` (any strides); ``index [M]`` dense int64 ids, or None with ``group_size`` for
    contiguous groups (``num_groups == 1`` never reads the index: one group of every row). ``weight
    [M]`` as the reference (OPO's lengths). ``need_loo=False`` skips the leave-one-out means
    (``loo_mean`` is then an empty ``[0, C]`` tensor). Inputs are assumed validated.
    """
    from fusedrl.reference.advantages import GroupStats  # noqa: PLC0415

    M = values.shape[0]
    if num_groups == 1:
        index, group_size = None, M
    elif index is not None:
        index = index.to(torch.int64).contiguous()
        group_size = 0
    if weight is not None:
        weight = weight.to(_out_dtype(values.dtype)).contiguous()
    count, mean, var, std, loo, gmax, second, argmax, wmean = SEGMENT_STATS(
        backend, values, index, int(group_size), int(num_groups), weight, singleton, bool(need_loo)
    )
    return GroupStats(count, mean, var, std, loo, gmax, second, argmax, wmean)


# ----------------------------------------------------------------------------------------------
# group advantages in one call (CPU): densify, statistics, estimator, combine and finish fused
# ----------------------------------------------------------------------------------------------

# Codes of csrc/include/fusedrl/segments.h (GroupEstimator, GroupScale, GroupCombine, GroupFinish).
ESTIMATOR_CODES = {"grpo": 0, "rloo": 1, "reinforce++-baseline": 2, "grpo_passk": 3, "gpg": 4, "opo": 5}
SCALE_CODES = {"group": 0, "batch": 1, "none": 2}
COMBINE_CODES = {None: 0, "sum_then_normalize": 1, "normalize_then_sum": 2, "chebyshev": 3, "min": 4, "mean_minus_var": 5}
FINISH_CODES = {None: 0, "whiten": 1, "batch_normalize": 2}


def group_advantages_cpu(
    rewards: Tensor, group_ids: Tensor | None, group_size: int, weight: Tensor | None, estimator: str, scale: str,
    eps: float, singleton: str, combine: str | None, finish: str | None, weights: list[float], ideal: list[float],
    var_coef: float,
) -> Tensor:
    """Per-row advantages ``[M]`` of ``rewards [M]`` or ``[M, K]`` (CPU kernel
    ``group_advantages_cpu``): see :func:`fusedrl.advantages.group_advantages`, whose inputs are
    validated before this is called. ``finish``: None, ``"whiten"`` or ``"batch_normalize"``. The
    CPU kernel of the op ``fusedrl::group_advantages`` (:data:`GROUP_ADVANTAGES`)."""
    if rewards.dim() == 2:
        (M, K), (row_stride, col_stride) = rewards.shape, rewards.stride()
    else:
        M, K, row_stride, col_stride = rewards.shape[0], 1, rewards.stride(0), 1
    out = _ext.empty(M, _out_dtype(rewards.dtype), rewards.device)
    status = _ext.load().group_advantages_cpu(
        rewards.data_ptr(), _ext.DTYPE_CODES[rewards.dtype], M, K, row_stride, col_stride,
        _ext.ptr(group_ids), group_ids is not None and group_ids.dtype == torch.int32,
        group_ids.stride(0) if group_ids is not None else 1, group_size, _ext.ptr(weight),
        ESTIMATOR_CODES[estimator], SCALE_CODES[scale], SINGLETON_CODES[singleton], COMBINE_CODES[combine],
        FINISH_CODES[finish], eps, var_coef, weights, ideal, out.data_ptr(), torch.get_num_threads(),
    )
    if status == 2:
        raise ValueError("estimator='grpo_passk' needs at least 2 rows in every group (verl raises too)")
    if status != 0:
        raise TypeError(f"rewards: unsupported dtype {rewards.dtype}")
    return out


def _group_advantages_fake(rewards, group_ids, group_size, weight, estimator, scale, eps, singleton, combine, finish,
                           weights, ideal, var_coef):
    return rewards.new_empty(rewards.shape[0], dtype=_out_dtype(rewards.dtype))


GROUP_ADVANTAGES = Op(
    "group_advantages", "(Tensor rewards, Tensor? group_ids, int group_size, Tensor? weight, str estimator, str scale, "
    "float eps, str singleton, str? combine, str? finish, float[] weights, float[] ideal, float var_coef) -> Tensor",
    fake=_group_advantages_fake, kernels={"cpu": group_advantages_cpu},
)
