"""Frozen dataclasses holding every non-tensor option of a primitive.

One object travels from validation through dispatch to the kernel, so backward functions return
``None`` for it and the options are never re-read from scattered arguments.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LogprobParams:
    """Options of :func:`fusedrl.token_logprobs`.

    temperature: logits are divided by it before the softmax (> 0).
    ignore_index: label value whose rows give log-prob 0, entropy 0 and no gradient.
    return_entropy: whether the entropy is computed (and returned).
    """

    temperature: float = 1.0
    ignore_index: int = -100
    return_entropy: bool = False
