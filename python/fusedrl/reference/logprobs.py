"""Reference token log-probs and entropy from logits."""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, float32 for everything else (bf16 and fp16 are upcast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """logp_t = x_{t,label} - logsumexp_v x_{t,v} and H_t = -sum_v p_v log p_v, with x = z / T.

    Rows whose label is ``ignore_index`` give logp 0 and entropy 0 (and no gradient). A logit of
    -inf (a masked vocabulary entry) contributes nothing to the entropy. Returns logp shaped like
    ``labels`` (float32, or float64 for float64 logits), or ``(logp, entropy)``.
    """
    x = logits.to(accumulation_dtype(logits.dtype)) / temperature
    valid = labels != ignore_index
    # ignored rows take no part, not even in the backward of log_softmax (a NaN there would leak)
    x = torch.where(valid.unsqueeze(-1), x, 0.0)
    safe_labels = torch.where(valid, labels, 0).long()
    log_softmax = torch.log_softmax(x, dim=-1)
    logp = log_softmax.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, 0.0)
    if not return_entropy:
        return logp
    # p log p with p = 0 (a -inf logit) is 0: zero its log p so that 0 * (-inf) never forms,
    # in the value or in the gradient.
    finite_log_softmax = log_softmax.masked_fill(log_softmax == float("-inf"), 0.0)
    entropy = -(log_softmax.exp() * finite_log_softmax).sum(-1)
    entropy = torch.where(valid, entropy, 0.0)
    return logp, entropy
