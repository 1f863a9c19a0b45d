"""fusedrl: fused kernels for the objectives of reinforcement learning on language models.

Importing fusedrl is cheap: no extension, Triton or device query is loaded until a call needs it.
"""

from fusedrl.dispatch import backends
from fusedrl.functional import token_logprobs

__version__ = "0.1.0"

__all__ = ["backends", "token_logprobs", "__version__"]
