"""Lazy access to the compiled extension ``fusedrl._C`` and the torch <-> kernel argument glue.

Nothing is loaded at ``import fusedrl``. The first call that needs the extension loads it; if it
is missing (for example a source checkout that was never built), :func:`load` returns ``None``
and :func:`load_error` says why, and the dispatcher falls through to another backend.
"""

from __future__ import annotations

import os

import torch

# Dtype codes shared with csrc/include/fusedrl/common.h (enum DType).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}

_state: dict = {}  # "module" and "error" once loaded (a plain dict: torch.compile traces it cleanly)


def load():
    """The extension module, or None when it cannot be imported (see :func:`load_error`)."""
    if "module" not in _state:
        try:
            from fusedrl import _C  # noqa: PLC0415

            _state["module"], _state["error"] = _C, None
        except ImportError as exc:  # missing build, or built for another Python/ABI
            _state["module"] = None
            _state["error"] = (
                f"the compiled extension fusedrl._C could not be imported ({exc}); "
                "reinstall fusedrl with `pip install .` from a checkout to build it"
            )
    return _state["module"]


def load_error() -> str | None:
    load()
    return _state["error"]


def ptr(t: torch.Tensor | None) -> int:
    """Data pointer of a tensor, 0 for None."""
    return 0 if t is None else t.data_ptr()


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A fresh output buffer. With FUSEDRL_POISON=1 (the test suite sets it) it is filled with NaN,
    so a kernel that leaves an element unwritten shows up as a NaN in the tests."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if os.environ.get("FUSEDRL_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
