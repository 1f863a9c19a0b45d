"""Ops ``fusedrl::token_logprobs`` and ``fusedrl::token_logprobs_backward`` (functional: what
:func:`fusedrl.token_logprobs` calls and torch.compile sees), and ``fusedrl::logprobs_forward`` /
``fusedrl::logprobs_backward`` (the same kernels writing into given buffers: the chunked paths of
:mod:`fusedrl.linear` and :mod:`fusedrl.distributed` reuse theirs).

The forward op returns ``(logp, entropy, row_max, log_norm)`` for 2-D logits ``[N, V]`` (unit
stride along V), where a row's log-sum-exp is ``row_max + log_norm`` (kept as the pair: see
csrc/include/fusedrl/logprobs.h); the backward op recomputes the softmax from them and writes
``d/d logits`` in the logits' dtype. Neither ever holds an ``[N, V]`` float32 log-softmax or probability tensor. Each is a
:class:`fusedrl.ops.library.Op`: ``TOKEN_LOGPROBS(backend, ...)`` runs the kernel of the backend
:func:`fusedrl.dispatch.select` chose; fake (meta) and autograd implementations are registered, so
torch.compile traces through without a graph break.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedrl import _ext
from fusedrl.ops.library import Op, backend_of


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


def _forward_fake(logits, labels, temperature, ignore_index, logp, entropy, row_max, log_norm):
    return None


def _backward_fake(logits, labels, temperature, ignore_index, row_max, log_norm, entropy, grad_logp, grad_entropy,
                   grad):
    return None


# Launches into preallocated buffers: the chunked paths (fusedrl.linear, fusedrl.distributed) reuse them.
FORWARD = Op(
    "logprobs_forward", "(Tensor logits, Tensor labels, float temperature, int ignore_index, Tensor(a!) logp, "
    "Tensor(b!)? entropy, Tensor(c!) row_max, Tensor(d!) log_norm) -> ()",
    fake=_forward_fake, kernels={"cpu": _cpu_forward, "cuda": _cuda_forward, "triton": _triton_forward},
)
BACKWARD = Op(
    "logprobs_backward", "(Tensor logits, Tensor labels, float temperature, int ignore_index, Tensor row_max, "
    "Tensor log_norm, Tensor? entropy, Tensor? grad_logp, Tensor? grad_entropy, Tensor(a!) grad) -> ()",
    fake=_backward_fake, kernels={"cpu": _cpu_backward, "cuda": _cuda_backward, "triton": _triton_backward},
)
BACKENDS = FORWARD.backends  # "torch" is served by fusedrl.reference directly


# ---------------------------------------------------------------------------------------------
# The functional ops (what token_logprobs calls and torch.compile sees)
# ---------------------------------------------------------------------------------------------
def _token_logprobs(backend):
    def token_logprobs(logits, labels, temperature, ignore_index, return_entropy):
        N = logits.shape[0]
        out = _out_dtype(logits.dtype)
        logp = _ext.empty(N, out, logits.device)
        row_max = _ext.empty(N, out, logits.device)
        log_norm = _ext.empty(N, out, logits.device)
        entropy = _ext.empty(N if return_entropy else 0, out, logits.device)
        if N > 0:
            FORWARD.kernels[backend](logits, labels, temperature, ignore_index, logp,
                                     entropy if return_entropy else None, row_max, log_norm)
        return logp, entropy, row_max, log_norm

    return token_logprobs


def _token_logprobs_fake(logits, labels, temperature, ignore_index, return_entropy):
    N = logits.shape[0]
    out = _out_dtype(logits.dtype)
    new = logits.new_empty
    return new(N, dtype=out), new(N if return_entropy else 0, dtype=out), new(N, dtype=out), new(N, dtype=out)


def _token_logprobs_backward(backend):
    def token_logprobs_backward(logits, labels, row_max, log_norm, entropy, grad_logp, grad_entropy, temperature,
                                ignore_index):
        grad = _ext.empty(logits.shape, logits.dtype, logits.device)
        if logits.shape[0] > 0:
            BACKWARD.kernels[backend](logits, labels, temperature, ignore_index, row_max, log_norm,
                                      entropy if entropy.numel() else None, grad_logp, grad_entropy, grad)
        return grad

    return token_logprobs_backward


def _token_logprobs_backward_fake(logits, *args):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


TOKEN_LOGPROBS_BACKWARD = Op(
    "token_logprobs_backward", "(Tensor logits, Tensor labels, Tensor row_max, Tensor log_norm, Tensor entropy, "
    "Tensor? grad_logp, Tensor? grad_entropy, float temperature, int ignore_index) -> Tensor",
    fake=_token_logprobs_backward_fake, kernels={b: _token_logprobs_backward(b) for b in FORWARD.kernels},
)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, return_entropy = inputs
    _, entropy, row_max, log_norm = output
    ctx.save_for_backward(logits, labels, row_max, log_norm, entropy)
    ctx.options = (temperature, ignore_index)
    ctx.mark_non_differentiable(row_max, log_norm)


def _backward(ctx, grad_logp, grad_entropy, _grad_row_max, _grad_log_norm):
    logits, labels, row_max, log_norm, entropy = ctx.saved_tensors
    temperature, ignore_index = ctx.options
    out = _out_dtype(logits.dtype)
    # Upstream gradients may be expanded views (e.g. from .sum()): give the kernel dense [N] buffers.
    if grad_logp is not None:
        grad_logp = grad_logp.to(out).contiguous()
    if grad_entropy is not None and entropy.numel():
        grad_entropy = grad_entropy.to(out).contiguous()
    else:
        grad_entropy = None
    grad = TOKEN_LOGPROBS_BACKWARD(backend_of(ctx, logits), logits, labels, row_max, log_norm, entropy, grad_logp, grad_entropy,
                                   temperature, ignore_index)
    return grad, None, None, None, None


TOKEN_LOGPROBS = Op(
    "token_logprobs", "(Tensor logits, Tensor labels, float temperature, int ignore_index, bool return_entropy) -> "
    "(Tensor, Tensor, Tensor, Tensor)",
    fake=_token_logprobs_fake, kernels={b: _token_logprobs(b) for b in FORWARD.kernels},
    setup_context=_setup_context, backward=_backward,
)
