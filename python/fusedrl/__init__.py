"""fusedrl: fused kernels for the objectives of reinforcement learning on language models.

Importing fusedrl is cheap: no extension, Triton or device query is loaded until a call needs it.
"""

from fusedrl.advantages import *  # noqa: F403  (each family module lists its public names in __all__)
from fusedrl.dispatch import backends
from fusedrl.functional import token_logprobs
from fusedrl.linear import linear_logprobs
from fusedrl.modules import *  # noqa: F403
from fusedrl.policy import *  # noqa: F403
from fusedrl.preference import *  # noqa: F403
from fusedrl.value import *  # noqa: F403
from fusedrl import advantages as _advantages, modules as _modules, policy as _policy, preference as _preference
from fusedrl import value as _value

__version__ = "0.1.0"


def __getattr__(name):
    """``fusedrl.distributed`` (torch.distributed helpers) is imported on first access only."""
    if name == "distributed":
        import importlib  # noqa: PLC0415

        return importlib.import_module("fusedrl.distributed")
    raise AttributeError(f"module 'fusedrl' has no attribute {name!r}")


__all__ = ["backends", "token_logprobs", "linear_logprobs", "__version__", *_advantages.__all__, *_modules.__all__,
           *_policy.__all__, *_preference.__all__, *_value.__all__]
