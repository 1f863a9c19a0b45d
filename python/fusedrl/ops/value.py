"""Op of the clipped value loss: ``fusedrl::value_objective`` (one pass: the loss, the per-row
metric sums and d loss / d values; registered autograd scales the saved gradient by the upstream
one). A :class:`fusedrl.ops.library.Op`: ``VALUE_OBJECTIVE(backend, ...)``.

Spec: :mod:`fusedrl.reference.value`; per-token math: csrc/include/fusedrl/value.h. Before the
pass, :func:`fusedrl.ops.normalizers.row_coefficients` (the one place where the kernel paths
normalize) turns the row counts into the per-row coefficients the kernel weighs each token with.
The row counts (sum_t m) are read from the mask here, and only when the aggregation needs them
(:func:`fusedrl.ops.normalizers.needs_row_count`): a value loss has no other row statistic, so
no statistics kernel.

Layouts and operands as :mod:`fusedrl.ops.policy`: padded ``[B, T]`` or packed ``[1, N]`` / ``[N]``
with ``cu_seqlens`` ``[S + 1]``; every operand passed as (tensor, row stride, token stride).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fusedrl import _ext
from fusedrl.ops.library import Op, hand_over, pack_options, scaled, unpack_options
from fusedrl.ops import policy as _policy_ops
from fusedrl.ops import normalizers as norm
from fusedrl.reference import aggregate as ref_agg

NUM_OUTPUTS = 4
OUT = {"loss": 0, "count": 1, "clipped": 2, "values": 3}  # the Output enum of fusedrl/value.h
NAMES = ("values", "old_values", "returns", "mask", "grad")


# The kernel's Options by name: csrc/include/fusedrl/value.h FUSEDRL_VALUE_INT_OPTIONS /
# FUSEDRL_VALUE_FLOAT_OPTIONS, the same names in the same order (the binding reports its order as
# value_option_names; tests/test_policy_options.py checks it and the Triton kernel's parameters).
INT_OPTIONS = ("has_clip", "verl_ties")
FLOAT_OPTIONS = ("clip",)


def kernel_options(clip: float | None, clip_ties: str) -> dict:
    """The kernel's Options by name from the call's clip (None: no clip) and tie convention."""
    return dict(has_clip=int(clip is not None), verl_ties=int(clip_ties == "verl"), clip=float(clip or 0.0))


def option_lists(options: dict) -> tuple[list[int], list[float]]:
    """The binding's two flat lists (integers, floats) of named options, in the C++ order."""
    return pack_options(options, INT_OPTIONS, FLOAT_OPTIONS)


@dataclass
class Operands:
    """Everything a launcher needs (as :class:`fusedrl.ops.policy.Operands`)."""

    tensors: dict
    strides: dict
    cu_seqlens: Tensor | None
    B: int
    T: int
    flags: list
    values: list
    coef: Tensor | None = None
    rows: Tensor | None = None

    @property
    def options(self) -> dict:
        """The options by name (csrc/include/fusedrl/value.h Options)."""
        return unpack_options(self.flags, self.values, INT_OPTIONS, FLOAT_OPTIONS)


def _views(o: Operands):
    views = []
    for name in NAMES:
        t = o.tensors.get(name)
        if t is None:
            views.append((0, 0, 0, 0))
        else:
            s_row, s_tok = o.strides[name]
            views.append((t.data_ptr(), _policy_ops._dtype_code(t), s_row, s_tok))
    return views


def _cpu_loss(o: Operands):
    _ext.load().value_loss_cpu(_views(o), _ext.ptr(o.cu_seqlens), o.B, o.T, o.flags, o.values, o.coef.data_ptr(),
                               o.rows.data_ptr(), torch.get_num_threads())


def _cuda_loss(o: Operands):
    dev = o.tensors["values"].device
    _ext.load().value_loss_cuda(_views(o), _ext.ptr(o.cu_seqlens), o.B, o.T, o.flags, o.values, o.coef.data_ptr(),
                                o.rows.data_ptr(), torch.cuda.current_stream(dev).cuda_stream)


def _triton_loss(o: Operands):
    from fusedrl.kernels import value as k  # noqa: PLC0415  (imports triton)

    k.value_loss(o)


def _rows(values: Tensor, cu_seqlens: Tensor | None) -> int:
    return cu_seqlens.numel() - 1 if cu_seqlens is not None else values.shape[0]


def _value_objective(launch):
    def value_objective(values, old_values, returns, mask, cu_seqlens, coef, flags, opts, want_grad):
        packed = cu_seqlens is not None
        grad = _policy_ops._grad_buffer(values, want_grad, cu_seqlens)
        tensors = dict(values=values, old_values=old_values, returns=returns, mask=_policy_ops._mask(mask),
                       grad=grad if want_grad else None)
        strides = {k: _policy_ops._strides(t, False, packed) for k, t in tensors.items() if t is not None}
        B, T = (cu_seqlens.numel() - 1, values.shape[-1]) if packed else values.shape
        o = Operands(tensors, strides, cu_seqlens, B, T, list(flags), list(opts), coef)
        o.rows = _ext.empty((B, NUM_OUTPUTS), torch.float64, values.device)
        if B > 0:
            launch(o)
        acc = torch.float64 if values.dtype == torch.float64 else torch.float32
        loss = o.rows[:, 0].sum().to(acc)
        return loss, o.rows, grad

    return value_objective


def _value_objective_fake(values, old_values, returns, mask, cu_seqlens, coef, flags, opts, want_grad):
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    B = _rows(values, cu_seqlens)
    g = values.new_empty(values.shape) if want_grad else values.new_empty((0,))
    return values.new_empty((), dtype=acc), values.new_empty((B, NUM_OUTPUTS), dtype=torch.float64), g


def _setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.handed = (output[2],)  # not saved_tensors: hand_over releases it (no copy)


def _backward(ctx, g_loss, g_rows, g_grad):
    (grad,) = hand_over(ctx, "fusedrl.value_loss")
    if g_loss is None:  # no gradient reached the loss (gradients are not materialized as zeros)
        return (None,) * 9
    dv = scaled(grad, g_loss) if ctx.needs_input_grad[0] and grad.numel() else None
    return dv, None, None, None, None, None, None, None, None


# ``(loss, rows, grad)``: the 0-dim loss, the per-row outputs [B, 4] (float64; the Output enum of
# fusedrl/value.h) and d loss / d values (empty when not wanted), written in the same pass.
VALUE_OBJECTIVE = Op(
    "value_objective", "(Tensor values, Tensor? old_values, Tensor returns, Tensor mask, Tensor? cu_seqlens, "
    "Tensor coef, int[] flags, float[] opts, bool want_grad) -> (Tensor, Tensor, Tensor)",
    fake=_value_objective_fake,
    kernels={"cpu": _value_objective(_cpu_loss), "cuda": _value_objective(_cuda_loss),
             "triton": _value_objective(_triton_loss)},
    setup_context=_setup, backward=_backward,
)


# ---------------------------------------------------------------------------------------------
# the fused value loss


def row_counts(mask: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """sum_t m per row, float64 [B] (padded) or [S] (packed: prefix sums of the weights taken at
    the segment offsets; exact for bool / integer masks)."""
    _, weight = ref_agg.mask_weight(mask, torch.float64)
    if cu_seqlens is None:
        return weight.sum(-1)
    prefix = torch.cat([weight.new_zeros(1), weight.reshape(-1).cumsum(0)])
    return prefix[cu_seqlens[1:]] - prefix[cu_seqlens[:-1]]


def _metrics(rows: Tensor, has_clip: bool, dtype: torch.dtype) -> dict:
    total = rows.detach().sum(0)
    means = (total / norm.divisor(total[OUT["count"]])).to(dtype).unbind()
    metrics = {"clipfrac": means[OUT["clipped"]]} if has_clip else {}
    metrics["values_mean"] = means[OUT["values"]]
    return metrics


def fused_value_loss(backend: str, values, old_values, returns, mask, *, cu_seqlens, clip, clip_ties, aggregation,
                     num_tokens, num_sequences, max_length, exclude_empty_rows):
    """:func:`fusedrl.reference.value.value_loss` computed by the ``backend`` kernel (inputs
    validated by :func:`fusedrl.value_loss`). Returns ``(loss, metrics)``."""
    flags, opts = option_lists(kernel_options(clip, clip_ties))
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int64).contiguous()  # the kernels read int64 offsets
    old_values = None if old_values is None or clip is None else old_values.detach()
    returns = returns.detach()
    B = _rows(values, cu_seqlens)
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    needs = norm.needs_row_count(aggregation, num_tokens=num_tokens, num_sequences=num_sequences,
                                    exclude_empty_rows=exclude_empty_rows)
    count = row_counts(mask, cu_seqlens) if needs else None
    coef = norm.row_coefficients(
        aggregation, count, rows=B, length=None if cu_seqlens is not None else values.shape[-1], dtype=torch.float64,
        device=values.device, num_tokens=num_tokens, num_sequences=num_sequences, max_length=max_length,
        exclude_empty_rows=exclude_empty_rows,
    ).contiguous()
    want = values.requires_grad and torch.is_grad_enabled()
    loss, rows, _ = VALUE_OBJECTIVE(backend, values, old_values, returns, mask, cu_seqlens, coef, flags, opts, want)
    return loss, _metrics(rows, clip is not None, acc)
