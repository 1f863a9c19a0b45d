"""Token log-probs straight from hidden states: ``linear_logprobs`` never holds [N, V] logits.

The language-model head is where RL training runs out of memory: logits for N tokens over V words
take N x V x 4 bytes in float32, before their gradient. ``linear_logprobs`` computes the same
outputs and gradients as ``token_logprobs(hidden @ weight.T + bias, labels)`` chunked over tokens:
each chunk's logits are formed by a GEMM (torch: MKL/oneDNN on CPU, cuBLAS on GPU), reduced by the
token log-prob kernel, and dropped; the backward recomputes each chunk's logits, has the kernel write
d loss / d logits over them in place, and accumulates d hidden, d weight and d bias by GEMMs. Peak
extra memory is one chunk of logits plus O(N) statistics, independent of N x V.

Why the backward recomputes (the general path) rather than computing the gradient in the forward
(Liger's choice): the forward does not know the upstream gradients of logp and entropy, so it could
only precompute them for a fixed loss. Recomputing costs one more GEMM per chunk and keeps
``linear_logprobs`` an ordinary differentiable function that composes with any loss. A fused loss
that knows its upstream gradient (``LinearPolicyLoss``, issue 6) can take the single-pass path.
"""

from __future__ import annotations

import torch

from fusedrl import _ext, dispatch, reference
from fusedrl import _validate as check
from fusedrl.params import LogprobParams

__all__ = ["linear_logprobs"]

# Default chunk: about this many bytes of logits per chunk (at least 16 rows).
CHUNK_BYTES = 128 * 2**20


def default_chunk_size(N: int, V: int, dtype: torch.dtype) -> int:
    return max(16, min(max(N, 1), CHUNK_BYTES // max(V * dtype.itemsize, 1)))


def _chunk_logits(hidden, weight, bias, start, stop, buffer):
    """The [stop - start, V] logits of one chunk, in the hidden states' dtype, written into the
    rows of ``buffer`` (one buffer reused by every chunk: no allocator churn, a flat peak)."""
    h, out = hidden[start:stop], buffer[: stop - start]
    if bias is not None:
        return torch.addmm(bias, h, weight.t(), out=out)
    return torch.mm(h, weight.t(), out=out)


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, params: LogprobParams, chunk: int, backend: str):
        from fusedrl.ops import logprobs as op  # noqa: PLC0415

        N, V = hidden.shape[0], weight.shape[0]
        out = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logp, row_max, log_norm = (_ext.empty(N, out, hidden.device) for _ in range(3))
        entropy = _ext.empty(N if params.return_entropy else 0, out, hidden.device)
        forward_kernel = op.LAUNCHERS[backend][0]
        buffer = torch.empty(min(chunk, N), V, dtype=hidden.dtype, device=hidden.device)
        for start in range(0, N, chunk):
            stop = min(start + chunk, N)
            logits = _chunk_logits(hidden, weight, bias, start, stop, buffer)
            forward_kernel(
                logits, labels[start:stop], params.temperature, params.ignore_index, logp[start:stop],
                entropy[start:stop] if params.return_entropy else None, row_max[start:stop], log_norm[start:stop],
            )
        ctx.save_for_backward(hidden, weight, bias, labels, row_max, log_norm, entropy)
        ctx.options = (params, chunk, backend)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        from fusedrl.ops import logprobs as op  # noqa: PLC0415

        hidden, weight, bias, labels, row_max, log_norm, entropy = ctx.saved_tensors
        params, chunk, backend = ctx.options
        N = hidden.shape[0]
        out = row_max.dtype
        g_lp = grad_logp.to(out).contiguous() if grad_logp is not None else None
        g_h = grad_entropy.to(out).contiguous() if (grad_entropy is not None and entropy.numel()) else None
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        # weight and bias gradients accumulate over chunks in float32 (float64 for float64).
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        d_hidden = torch.empty_like(hidden) if need_h else None
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        d_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if (need_b and bias is not None) else None
        backward_kernel = op.LAUNCHERS[backend][1]
        buffer = torch.empty(min(chunk, N), weight.shape[0], dtype=hidden.dtype, device=hidden.device)
        for start in range(0, N, chunk):
            stop = min(start + chunk, N)
            logits = _chunk_logits(hidden, weight, bias, start, stop, buffer)
            backward_kernel(  # d loss / d logits, written over the chunk's logits in place
                logits, labels[start:stop], params.temperature, params.ignore_index, row_max[start:stop],
                log_norm[start:stop], entropy[start:stop] if entropy.numel() else None,
                None if g_lp is None else g_lp[start:stop], None if g_h is None else g_h[start:stop], logits,
            )
            if d_hidden is not None:
                torch.mm(logits, weight, out=d_hidden[start:stop])
            if d_weight is not None:
                d_weight.addmm_(logits.t().to(acc), hidden[start:stop].to(acc))
            if d_bias is not None:
                d_bias += logits.sum(0, dtype=acc)
        return (
            d_hidden,
            None if d_weight is None else d_weight.to(weight.dtype),
            None if d_bias is None else d_bias.to(bias.dtype),
            None, None, None, None,
        )


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
):
    r"""Log-probs (and entropy) of ``labels`` under ``softmax((hidden @ weight.T + bias) / T)``.

    Equal, values and gradients w.r.t. ``hidden``, ``weight`` and ``bias``, to
    ``token_logprobs(hidden @ weight.T + bias, labels, ...)`` (see :func:`fusedrl.token_logprobs`
    for the math), without ever holding the ``[N, V]`` logits: chunks of ``chunk_size`` tokens
    (default: about 128 MiB of logits per chunk) are formed by a GEMM, reduced by the log-prob kernel
    and dropped; the backward recomputes them (module docstring). Peak extra memory: one chunk of
    logits plus O(N), independent of N x V.

    Args:
        hidden: ``[..., H]`` float32, bfloat16, float16 (or float64) hidden states.
        weight: ``[V, H]`` the head's weight, same dtype and device as ``hidden``.
        labels: int64 or int32 shaped like ``hidden[..., 0]``; in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]``.
        temperature, ignore_index, return_entropy, backend: as :func:`fusedrl.token_logprobs`.
        chunk_size: tokens per chunk (>= 1).

    Returns:
        ``logp`` shaped like ``labels`` (float32; float64 for float64), or ``(logp, entropy)``.
        The ``torch`` backend computes the full logits (the reference composition).
    """
    check.tensor("hidden", hidden, check.FLOAT_DTYPES)
    check.tensor("weight", weight, check.FLOAT_DTYPES)
    check.tensor("labels", labels, check.INDEX_DTYPES)
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape [..., H], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
    check.same_device("weight", weight, "hidden", hidden)
    check.same_device("labels", labels, "hidden", hidden)
    V = weight.shape[0]
    if bias is not None:
        check.tensor("bias", bias, (hidden.dtype,), what=f"{str(hidden.dtype).replace('torch.', '')} (hidden's dtype)")
        if bias.shape != (V,):
            raise ValueError(f"bias must have shape [V] = ({V},), got {tuple(bias.shape)}")
        check.same_device("bias", bias, "hidden", hidden)
    params = LogprobParams(
        temperature=check.positive_float("temperature", temperature),
        ignore_index=check.integer("ignore_index", ignore_index),
        return_entropy=check.boolean("return_entropy", return_entropy),
    )
    if chunk_size is not None and (check.integer("chunk_size", chunk_size) < 1):
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not torch.compiler.is_compiling():
        bad = (labels != params.ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            first = labels[bad].flatten()[0].item()
            raise ValueError(f"labels must be in [0, {V}) or ignore_index={params.ignore_index}, got {first}")

    from fusedrl.ops import logprobs as op  # noqa: PLC0415

    name = dispatch.select("linear_logprobs", op.BACKENDS, hidden.device, hidden.dtype, backend)
    if name == "torch":
        logits = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden.reshape(-1, hidden.shape[-1]), weight.t()).view(*hidden.shape[:-1], V)
        return reference.token_logprobs(
            logits, labels, temperature=params.temperature, ignore_index=params.ignore_index,
            return_entropy=params.return_entropy,
        )
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    chunk = chunk_size or default_chunk_size(flat.shape[0], V, hidden.dtype)
    logp, entropy = _LinearLogprobs.apply(flat, weight, bias, flat_labels, params, chunk, name)
    logp = logp.view(labels.shape)
    if params.return_entropy:
        return logp, entropy.view(labels.shape)
    return logp
