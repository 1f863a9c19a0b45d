"""The public functions of fusedrl. Each one validates its arguments, freezes its options into a
params dataclass, picks a backend (:mod:`fusedrl.dispatch`) and calls the custom op or, for the
``torch`` backend, the reference."""

from __future__ import annotations

import torch

from fusedrl import _validate as check
from fusedrl import dispatch, reference
from fusedrl.params import LogprobParams


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str | None = None,
):
    r"""Log-probabilities of ``labels`` under ``softmax(logits / temperature)``, and the entropy.

    .. math::
        x_v = z_v / T,\quad \log p_{label} = x_{label} - \log\sum_v e^{x_v},\quad
        H = -\sum_v p_v \log p_v

    Gradients flow to ``logits`` through both outputs:
    :math:`\partial \log p / \partial z_v = (1[v = label] - p_v) / T` and
    :math:`\partial H / \partial z_v = -p_v (\log p_v + H) / T` (docs/OBJECTIVES.md).
    Equal to TRL's ``selective_log_softmax(logits / T, labels)`` and ``entropy_from_logits``, but
    the kernels never hold an ``[N, V]`` float32 log-softmax: the forward is one online
    log-sum-exp pass over V per row, and the backward recomputes the softmax from the saved
    log-sum-exp (no ``[N, V]`` probabilities are stored).

    Args:
        logits: ``[..., V]`` float32, bfloat16, float16 (or float64); any strides.
        labels: int64 or int32 shaped like ``logits[..., 0]``; each in ``[0, V)`` or ``ignore_index``.
        temperature: > 0; logits are divided by it.
        ignore_index: label value whose positions give logp 0, entropy 0 and no gradient.
        return_entropy: also return the entropy.
        backend: ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``; default: chosen from the
            tensors' device (``FUSEDRL_BACKEND`` overrides). See :mod:`fusedrl.dispatch`.

    Returns:
        ``logp`` shaped like ``labels``, float32 (float64 for float64 logits), or ``(logp, entropy)``.

    Non-finite logits: a -inf logit is a masked vocabulary entry (probability 0, no entropy
    contribution, zero gradient). A row holding a NaN or +inf logit gives NaN log-prob and entropy
    (and NaN gradient) for that row only, as ``torch.log_softmax`` does; no check scans the logits.
    """
    check.tensor("logits", logits, check.FLOAT_DTYPES)
    check.tensor("labels", labels, check.INDEX_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    check.same_device("labels", labels, "logits", logits)
    params = LogprobParams(
        temperature=check.positive_float("temperature", temperature),
        ignore_index=check.integer("ignore_index", ignore_index),
        return_entropy=check.boolean("return_entropy", return_entropy),
    )
    V = logits.shape[-1]
    if check.has_data(labels):  # a data-dependent check: skipped inside torch.compile and for fake tensors
        bad = (labels != params.ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            first = labels[bad].flatten()[0].item()
            raise ValueError(f"labels must be in [0, {V}) or ignore_index={params.ignore_index}, got {first}")

    from fusedrl.ops import logprobs as op  # noqa: PLC0415  (registers the custom ops)

    name = dispatch.select("token_logprobs", op.BACKENDS, logits.device, logits.dtype, backend)
    if name == "torch":
        return reference.token_logprobs(
            logits, labels, temperature=params.temperature, ignore_index=params.ignore_index,
            return_entropy=params.return_entropy,
        )
    flat = logits.reshape(-1, V)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    logp, entropy, _, _ = op.TOKEN_LOGPROBS(
        name, flat, flat_labels, params.temperature, params.ignore_index, params.return_entropy
    )
    logp = logp.view(labels.shape)
    if params.return_entropy:
        return logp, entropy.view(labels.shape)
    return logp
