"""Plain-PyTorch references: the spec, the ``torch`` backend and the oracle of every kernel.

Written for clarity, not speed or memory: each function is the formula of docs/OBJECTIVES.md
in eager PyTorch, differentiable by autograd, computed in float32 (float64 for float64 input).
"""

from fusedrl.reference.logprobs import token_logprobs

__all__ = ["token_logprobs"]
