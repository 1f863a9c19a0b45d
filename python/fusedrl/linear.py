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
that knows its upstream gradient (``LinearPolicyLoss``) can take the single-pass path.
"""

from __future__ import annotations

import functools

import torch

from fusedrl import _ext, dispatch, reference
from fusedrl import _validate as check
from fusedrl.params import LogprobParams

__all__ = ["linear_logprobs"]

# Default chunk: about CHUNK_BYTES of logits, but at least CHUNK_MIN_ROWS tokens. The GEMMs of a
# chunk lose throughput when they have few rows: at H=512, V=151936 (fp32, 2-core AVX2 CPU, MKL),
# the three GEMMs of 4,096 tokens took 15-18% longer in chunks of 220 rows (what 128 MiB alone
# gives at that V) than in one piece, and the same as one piece in chunks of 384-512.
CHUNK_BYTES = 128 * 2**20
CHUNK_MIN_ROWS = 512


def default_chunk_size(N: int, V: int, dtype: torch.dtype) -> int:
    """Tokens per chunk: max(CHUNK_MIN_ROWS, CHUNK_BYTES of logits), at most N (and at least 1)."""
    return min(max(N, 1), max(CHUNK_MIN_ROWS, CHUNK_BYTES // max(V * dtype.itemsize, 1)))


def _chunk_logits(hidden, weight, bias, start, stop, buffer):
    """The [stop - start, V] logits of one chunk, in the hidden states' dtype, written into the
    rows of ``buffer`` (one buffer reused by every chunk: no allocator churn, a flat peak)."""
    h, out = hidden[start:stop], buffer[: stop - start]
    if bias is not None:
        return torch.addmm(bias, h, weight.t(), out=out)
    return torch.mm(h, weight.t(), out=out)


def validate(hidden, weight, labels, bias, temperature, ignore_index, return_entropy, chunk_size) -> LogprobParams:
    """Checks of the linear log-prob inputs (TypeError / ValueError naming the argument)."""
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
    if check.has_data(labels):
        bad = (labels != params.ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            first = labels[bad].flatten()[0].item()
            raise ValueError(f"labels must be in [0, {V}) or ignore_index={params.ignore_index}, got {first}")

    return params


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, params: LogprobParams, chunk: int, backend: str):
        from fusedrl.ops import logprobs as op  # noqa: PLC0415

        N, V = hidden.shape[0], weight.shape[0]
        out = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logp, row_max, log_norm = (_ext.empty(N, out, hidden.device) for _ in range(3))
        entropy = _ext.empty(N if params.return_entropy else 0, out, hidden.device)
        forward_kernel = functools.partial(op.FORWARD, backend)
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
        backward_kernel = functools.partial(op.BACKWARD, backend)
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
    (default: about 128 MiB of logits per chunk, at least 512 tokens) are formed by a GEMM,
    reduced by the log-prob kernel and dropped; the backward recomputes them (module docstring).
    Peak extra memory: one chunk of logits plus O(N), independent of N x V.

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
    params = validate(hidden, weight, labels, bias, temperature, ignore_index, return_entropy, chunk_size)
    V = weight.shape[0]

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


# ---------------------------------------------------------------------------------------------
# Single pass: the gradient computed while each chunk's logits exist (3 GEMMs per chunk, not 4)
# ---------------------------------------------------------------------------------------------
TOKEN_LOCAL_SURROGATES = ("clip", "cispo", "sapo", "reinforce", "gpg")
TOKEN_LOCAL_CORRECTIONS = (None, "token_truncate", "token_mask", "icepop")


def single_pass_declines(options: dict) -> str | None:
    """Why a policy configuration needs the two-pass path, or None when d loss / d logp_t depends
    on token t alone (then each chunk's gradient is known as soon as its log-probs are)."""
    if options.get("ratio", "token") != "token":
        return f"ratio={options['ratio']!r} couples the tokens of a row"
    if options.get("surrogate", "clip") not in TOKEN_LOCAL_SURROGATES:
        return f"surrogate={options['surrogate']!r} couples the tokens of a row"
    if options.get("rollout_correction") not in TOKEN_LOCAL_CORRECTIONS:
        return "a sequence-level rollout correction"  # (it does not depend on logp, but its weights are per row)
    if options.get("off_policy_mask_threshold") is not None:
        return "the off-policy sequence mask reads the row's mean log-ratio"
    if options.get("top_entropy_quantile", 1.0) != 1.0 or options.get("entropy_mask_threshold") is not None:
        return "the entropy mask's threshold is a quantile over the whole batch"
    if options.get("use_bias_correction_kl") and options.get("kl_aggregation") is not None:
        return "bias-corrected KL aggregated on its own"
    return None


def _aggregation_weights(mask, mode, norms, dtype):
    """d aggregate(v, mask, mode, **norms) / d v: every aggregation is linear in the per-token
    values, so its weights are one autograd call on the public function (no normalizer is
    re-derived here)."""
    from fusedrl.policy import aggregate  # noqa: PLC0415

    v = torch.zeros(mask.shape, dtype=dtype, device=mask.device, requires_grad=True)
    (w,) = torch.autograd.grad(aggregate(v, mask, mode, **norms), v)
    return w


class _SinglePassPolicy(torch.autograd.Function):
    """Forward: per chunk, logits (GEMM) -> log-probs (kernel) -> d loss / d logp of the chunk's
    tokens (the reference on a one-row pseudo-batch weighted by the aggregation) -> d logits
    (kernel, in place) -> d hidden, d weight, d bias (GEMMs). Returns the loss; backward hands the
    stored gradients to autograd without a copy (scaled in place when the upstream gradient is not
    1), so the graph supports one backward, as ``policy_loss``'s eager graph."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, loss_value, pieces):
        ctx.grads = pieces
        return loss_value.clone()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("fusedrl.LinearPolicyLoss: its graph supports one backward pass (the gradients are "
                               "handed over without a copy); call it again for another backward")
        grads, ctx.grads = ctx.grads, None
        scale_one = grad_out.device.type == "cpu" and float(grad_out) == 1.0
        out = [None if g.numel() == 0 else (g if scale_one else g.mul_(grad_out.to(g.dtype))) for g in grads]
        return out[0], out[1], out[2], None, None


def single_pass_policy_loss(hidden, weight, labels, old_logp, advantages, mask, *, bias, temperature, ignore_index,
                            chunk_size, options, tensors, backend):
    """The policy loss and its gradient w.r.t. hidden, weight and bias in one chunked pass (see
    :class:`_SinglePassPolicy`); ``options`` are policy_loss keywords for which
    :func:`single_pass_declines` is None; ``tensors`` holds ref_logp, rollout_logp, group_ids and
    the counts. Returns ``(loss, metrics)`` exactly as ``policy_loss(linear_logprobs(...), ...)``."""
    from fusedrl.ops import logprobs as op  # noqa: PLC0415
    from fusedrl.policy import kl_penalty, policy_loss  # noqa: PLC0415

    validate(hidden, weight, labels, bias, temperature, ignore_index, False, chunk_size)
    if labels.dim() != 2 or mask.shape != labels.shape:
        raise ValueError(f"labels and mask must have the same shape [B, T], got {tuple(labels.shape)} and {tuple(mask.shape)}")
    B, T = labels.shape
    H, V = hidden.shape[-1], weight.shape[0]
    flat_h = hidden.reshape(-1, H)
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    N = flat_h.shape[0]
    out = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    beta = options.get("beta", 0.0)
    coef = options.get("entropy_coef", 0.0)
    kl_agg, ent_agg = options.get("kl_aggregation"), options.get("entropy_aggregation")
    want_entropy = coef != 0.0
    norms = {k: tensors.get(k) for k in ("num_tokens", "num_sequences", "max_length", "group_ids", "num_groups")}
    norms["advantages"] = advantages
    norms["exclude_empty_rows"] = options.get("exclude_empty_rows", False)
    w_loss = _aggregation_weights(mask, options.get("aggregation", "token-mean"), norms, out).reshape(-1)
    w_kl = _aggregation_weights(mask, kl_agg, norms, out).reshape(-1) if (kl_agg and beta != 0.0) else None
    w_ent = _aggregation_weights(mask, ent_agg, norms, out).reshape(-1) if (ent_agg and coef != 0.0) else None
    per_token = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    adv_tok = (advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages).expand(B, T).reshape(-1)
    old_tok, ref_tok = per_token(old_logp), per_token(tensors.get("ref_logp"))
    roll_tok = per_token(tensors.get("rollout_logp"))
    # The per-chunk call: token-sum over a one-row pseudo-batch whose float mask is the aggregation
    # weight of each token; KL / entropy aggregated on their own are handled beside it.
    chunk_options = {k: v for k, v in options.items() if k not in (
        "aggregation", "kl_aggregation", "entropy_aggregation", "exclude_empty_rows", "backend")}
    chunk_options.update(aggregation="token-sum")
    if kl_agg is not None:
        chunk_options["beta"] = 0.0
    if ent_agg is not None:
        chunk_options["entropy_coef"] = 0.0

    dev = hidden.device
    logp, entropy, row_max, log_norm = (_ext.empty(N, out, dev) for _ in range(4))
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    d_hidden = torch.empty_like(flat_h)
    d_weight = torch.empty(weight.shape, dtype=acc, device=dev)  # the first chunk writes it, the others add
    d_bias = torch.zeros(V, dtype=acc, device=dev) if bias is not None else None
    forward_kernel, backward_kernel = functools.partial(op.FORWARD, backend), functools.partial(op.BACKWARD, backend)
    chunk = chunk_size or default_chunk_size(N, V, hidden.dtype)
    buffer = torch.empty(min(chunk, N), V, dtype=hidden.dtype, device=dev)
    with torch.no_grad():
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            logits = _chunk_logits(flat_h, weight, bias, s, e, buffer)
            forward_kernel(logits, flat_labels[s:e], temperature, ignore_index, logp[s:e],
                           entropy[s:e] if want_entropy else None, row_max[s:e], log_norm[s:e])
            with torch.enable_grad():
                x = logp[s:e].clone().requires_grad_(True)
                h = entropy[s:e].clone().requires_grad_(want_entropy)
                part, _ = policy_loss(
                    x.view(1, -1), None if old_tok is None else old_tok[s:e].view(1, -1), adv_tok[s:e].view(1, -1),
                    w_loss[s:e].view(1, -1), ref_logp=None if ref_tok is None else ref_tok[s:e].view(1, -1),
                    rollout_logp=None if roll_tok is None else roll_tok[s:e].view(1, -1),
                    entropy=h.view(1, -1) if want_entropy else None, backend="torch", **chunk_options,
                )
                if w_kl is not None:
                    kind = options.get("kl", "k3")
                    part = part + beta * (w_kl[s:e] * kl_penalty(x, ref_tok[s:e], kind=kind)).sum()
                if w_ent is not None:
                    part = part - coef * (w_ent[s:e] * h).sum()
                inputs = (x, h) if want_entropy else (x,)
                grads = torch.autograd.grad(part, inputs, allow_unused=True)
            g_lp = grads[0] if grads[0] is not None else torch.zeros_like(x)
            g_h = grads[1] if want_entropy and grads[1] is not None else None
            backward_kernel(logits, flat_labels[s:e], temperature, ignore_index, row_max[s:e], log_norm[s:e],
                            entropy[s:e] if want_entropy else None, g_lp.to(out).contiguous(), None if g_h is None else g_h.to(out).contiguous(),
                            logits)
            torch.mm(logits, weight, out=d_hidden[s:e])
            if s == 0:
                torch.mm(logits.t().to(acc), flat_h[s:e].to(acc), out=d_weight)
            else:
                d_weight.addmm_(logits.t().to(acc), flat_h[s:e].to(acc))
            if d_bias is not None:
                d_bias += logits.sum(0, dtype=acc)
        if N == 0:
            d_weight.zero_()
        # The value and the metrics: the public function on the full log-probs (cheap: [B, T]).
        loss, metrics = policy_loss(
            logp.view(B, T), old_logp, advantages, mask, entropy=entropy.view(B, T) if want_entropy else None,
            backend="torch", **{k: v for k, v in tensors.items() if v is not None},
            **{k: v for k, v in options.items() if k != "backend"},
        )
    empty = torch.empty(0, device=dev)
    pieces = (
        d_hidden.view_as(hidden) if hidden.requires_grad else empty,
        d_weight.to(weight.dtype) if weight.requires_grad else empty,
        d_bias.to(bias.dtype) if (bias is not None and bias.requires_grad) else empty,
    )
    return _SinglePassPolicy.apply(hidden, weight, bias, loss, pieces), metrics
