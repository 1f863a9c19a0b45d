"""Custom ops ``fusedrl::token_logprobs`` and ``fusedrl::token_logprobs_backward``.

The forward op returns ``(logp, entropy, row_max, log_norm)`` for 2-D logits ``[N, V]`` (unit
stride along V), where a row's log-sum-exp is ``row_max + log_norm`` (kept as the pair: see
csrc/include/fusedrl/logprobs.h); the backward op recomputes the softmax from them and writes
``d/d logits`` in the logits' dtype. Neither ever holds an ``[N, V]`` float32 log-softmax or probability tensor. The
``backend`` argument names the kernel (``cpu``, ``cuda`` or ``triton``); the choice is made by
:func:`fusedrl.dispatch.select` before the op is called. Registered with fake (meta) and autograd
implementations, so torch.compile traces through without a graph break.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedrl import _ext


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Launchers: one per backend, the same signature. Outputs are preallocated by the op.
# ---------------------------------------------------------------------------------------------
def _cpu_forward(logits, labels, temperature, ignore_index, logp, entropy, row_max, log_norm):
    N, V = logits.shape
    _ext.load().logprobs_forward_cpu(
        logits.data_ptr(), labels.data_ptr(), _ext.DTYPE_CODES[logits.dtype], N, V, logits.stride(0),
        ignore_index, 1.0 / temperature, logp.data_ptr(), _ext.ptr(entropy), row_max.data_ptr(),
        log_norm.data_ptr(), torch.get_num_threads(),
    )


def _cpu_backward(logits, labels, temperature, ignore_index, row_max, log_norm, entropy, grad_logp, grad_entropy, grad):
    N, V = logits.shape
    _ext.load().logprobs_backward_cpu(
        logits.data_ptr(), labels.data_ptr(), _ext.DTYPE_CODES[logits.dtype], N, V, logits.stride(0),
        ignore_index, 1.0 / temperature, row_max.data_ptr(), log_norm.data_ptr(), _ext.ptr(entropy),
        _ext.ptr(grad_logp), _ext.ptr(grad_entropy), grad.data_ptr(), grad.stride(0), torch.get_num_threads(),
    )


def _cuda_forward(logits, labels, temperature, ignore_index, logp, entropy, row_max, log_norm):
    N, V = logits.shape
    _ext.load().logprobs_forward_cuda(
        logits.data_ptr(), labels.data_ptr(), _ext.DTYPE_CODES[logits.dtype], N, V, logits.stride(0),
        ignore_index, 1.0 / temperature, logp.data_ptr(), _ext.ptr(entropy), row_max.data_ptr(),
        log_norm.data_ptr(), torch.cuda.current_stream(logits.device).cuda_stream,
    )


def _cuda_backward(logits, labels, temperature, ignore_index, row_max, log_norm, entropy, grad_logp, grad_entropy, grad):
    N, V = logits.shape
    _ext.load().logprobs_backward_cuda(
        logits.data_ptr(), labels.data_ptr(), _ext.DTYPE_CODES[logits.dtype], N, V, logits.stride(0),
        ignore_index, 1.0 / temperature, row_max.data_ptr(), log_norm.data_ptr(), _ext.ptr(entropy),
        _ext.ptr(grad_logp), _ext.ptr(grad_entropy), grad.data_ptr(), grad.stride(0),
        torch.cuda.current_stream(logits.device).cuda_stream,
    )


def _triton_forward(*args):
    from fusedrl.kernels import logprobs as k  # noqa: PLC0415  (imports triton)

    k.forward(*args)


def _triton_backward(*args):
    from fusedrl.kernels import logprobs as k  # noqa: PLC0415

    k.backward(*args)


LAUNCHERS = {
    "cpu": (_cpu_forward, _cpu_backward),
    "cuda": (_cuda_forward, _cuda_backward),
    "triton": (_triton_forward, _triton_backward),
}
BACKENDS = ("cpu", "cuda", "triton", "torch")  # "torch" is served by fusedrl.reference directly


# ---------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fusedrl::token_logprobs", mutates_args=())
def token_logprobs_op(
    logits: Tensor, labels: Tensor, temperature: float, ignore_index: int, return_entropy: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    N = logits.shape[0]
    out = _out_dtype(logits.dtype)
    logp = _ext.empty(N, out, logits.device)
    row_max = _ext.empty(N, out, logits.device)
    log_norm = _ext.empty(N, out, logits.device)
    entropy = _ext.empty(N if return_entropy else 0, out, logits.device)
    if N > 0:
        LAUNCHERS[backend][0](
            logits, labels, temperature, ignore_index, logp, entropy if return_entropy else None, row_max, log_norm
        )
    return logp, entropy, row_max, log_norm


@token_logprobs_op.register_fake
def _(logits, labels, temperature, ignore_index, return_entropy, backend):
    N = logits.shape[0]
    out = _out_dtype(logits.dtype)
    new = logits.new_empty
    return new(N, dtype=out), new(N if return_entropy else 0, dtype=out), new(N, dtype=out), new(N, dtype=out)


@torch.library.custom_op("fusedrl::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(
    logits: Tensor,
    labels: Tensor,
    row_max: Tensor,
    log_norm: Tensor,
    entropy: Tensor,
    grad_logp: Tensor | None,
    grad_entropy: Tensor | None,
    temperature: float,
    ignore_index: int,
    backend: str,
) -> Tensor:
    grad = _ext.empty(logits.shape, logits.dtype, logits.device)
    if logits.shape[0] > 0:
        LAUNCHERS[backend][1](
            logits, labels, temperature, ignore_index, row_max, log_norm, entropy if entropy.numel() else None,
            grad_logp, grad_entropy, grad,
        )
    return grad


@token_logprobs_backward_op.register_fake
def _(logits, labels, row_max, log_norm, entropy, grad_logp, grad_entropy, temperature, ignore_index, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, return_entropy, backend = inputs
    _, entropy, row_max, log_norm = output
    ctx.save_for_backward(logits, labels, row_max, log_norm, entropy)
    ctx.options = (temperature, ignore_index, backend)
    ctx.mark_non_differentiable(row_max, log_norm)


def _backward(ctx, grad_logp, grad_entropy, _grad_row_max, _grad_log_norm):
    logits, labels, row_max, log_norm, entropy = ctx.saved_tensors
    temperature, ignore_index, backend = ctx.options
    out = _out_dtype(logits.dtype)
    # Upstream gradients may be expanded views (e.g. from .sum()): give the kernel dense [N] buffers.
    if grad_logp is not None:
        grad_logp = grad_logp.to(out).contiguous()
    if grad_entropy is not None and entropy.numel():
        grad_entropy = grad_entropy.to(out).contiguous()
    else:
        grad_entropy = None
    grad = token_logprobs_backward_op(
        logits, labels, row_max, log_norm, entropy, grad_logp, grad_entropy, temperature, ignore_index, backend
    )
    return grad, None, None, None, None, None


token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)
