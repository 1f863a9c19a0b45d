"""Lazy access to the compiled extension ``fusedrl._C`` and the torch <-> kernel argument glue.

Nothing is loaded at ``import fusedrl``. The first call that needs the extension loads it; if it
is missing (for example a source checkout that was never built), :func:`load` returns ``None``
and :func:`load_error` says why, and the dispatcher falls through to another backend.
"""

from __future__ import annotations

import functools

import torch

# Dtype codes shared with csrc/include/fusedrl/common.h (enum DType).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}

_error: str | None = None


@functools.lru_cache(maxsize=None)
def load():
    """The extension module, or None when it cannot be imported (see :func:`load_error`)."""
    global _error
    try:
        from fusedrl import _C  # noqa: PLC0415
    except ImportError as exc:  # missing build, or built for another Python/ABI
        _error = (
            f"the compiled extension fusedrl._C could not be imported ({exc}); "
            "reinstall fusedrl with `pip install .` from a checkout to build it"
        )
        return None
    return _C


def load_error() -> str | None:
    load()
    return _error


def ptr(t: torch.Tensor | None) -> int:
    """Data pointer of a tensor, 0 for None."""
    return 0 if t is None else t.data_ptr()
