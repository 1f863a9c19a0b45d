"""Argument checks shared by the public functions: each raises TypeError or ValueError naming the
argument and what was expected. Nothing here is an ``assert``."""

from __future__ import annotations

import math
import numbers

import torch
from torch._subclasses.fake_tensor import is_fake

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)
# Every mask argument (policy, value, advantages, preference, distributed) takes the same dtypes:
# bool, any integer or floating dtype; nonzero = valid (floating and integer masks are per-token
# weights where the objective has them).
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64) + FLOAT_DTYPES
MASK_EXPECTED = "a bool, integer or floating-point tensor"
# The largest dimension (rows, tokens, length, vocabulary) of any tensor argument: the kernels map
# rows to launch grids and lengths to loop bounds, both at most 2^31 - 1 on every backend. Checked
# before anything is allocated, so a batch past it gets a ValueError, not an allocation failure.
MAX_DIM = 2**31 - 1


def mask_tensor(name: str, value) -> torch.Tensor:
    """A mask argument: a tensor of one of :data:`MASK_DTYPES` (TypeError naming ``name`` else)."""
    return tensor(name, value, MASK_DTYPES, MASK_EXPECTED)


def tensor(name: str, value, dtypes=None, what: str | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        expected = what or " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be {expected}, got {str(value.dtype).replace('torch.', '')}")
    for d in value.shape:
        if d > MAX_DIM:
            raise ValueError(f"{name} has a dimension above 2**31 - 1 (the kernels' limit; split the batch), "
                             f"got shape {tuple(value.shape)}")
    return value


def same_device(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {value.device}")


def positive_float(name: str, value) -> float:
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def integer(name: str, value) -> int:
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def has_data(*tensors) -> bool:
    """Whether checks may read the values of ``tensors``: False while torch.compile traces and for
    fake or meta tensors (shapes and devices, no data), where data-dependent checks are skipped."""
    if torch.compiler.is_compiling():
        return False
    return not any(t is not None and (t.is_meta or is_fake(t)) for t in tensors)
