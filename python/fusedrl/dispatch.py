"""Call-time backend dispatch.

Every primitive is implemented by some of four backends:

=========  ==========================================================  ===============================
name       what runs                                                   runs on
=========  ==========================================================  ===============================
``cpu``    C++ kernels (OpenMP) in the extension ``fusedrl._C``        CPU tensors
``cuda``   CUDA kernels in ``fusedrl._C`` (built when nvcc was found)  CUDA tensors
``triton`` Triton kernels (``fusedrl.kernels``)                        CUDA tensors; CPU tensors only
                                                                       under ``TRITON_INTERPRET=1``
``torch``  the plain-PyTorch reference (``fusedrl.reference``)         anywhere
=========  ==========================================================  ===============================

A call picks the first backend of its preference list that accepts it. The list is the user's
choice (``backend=`` keyword, else the ``FUSEDRL_BACKEND`` environment variable) followed by the
default order ``cpu, cuda, triton, torch``. A backend that declines says why; the reason is
reported once (a warning when the user asked for that backend or when it is missing from this
machine, a debug log line otherwise) and the call falls through to the next backend.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

from fusedrl import _ext

logger = logging.getLogger("fusedrl")

ORDER = ("cpu", "cuda", "triton", "torch")
_reported: set[tuple[str, str, str]] = set()
_unavailable: dict[str, str | None] = {}


def unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot run on this machine at all, or None when it can (cached)."""
    if name not in _unavailable:
        _unavailable[name] = _probe(name)
    return _unavailable[name]


def _probe(name: str) -> str | None:
    if name == "torch":
        return None
    if name == "cpu":
        return _ext.load_error()
    if name == "cuda":
        if _ext.load() is None:
            return _ext.load_error()
        if not getattr(_ext.load(), "cuda_compiled", False):
            return "fusedrl._C was built without CUDA kernels (no CUDA compiler at build time, or FUSEDRL_CUDA=OFF)"
        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
        return None
    if name == "triton":
        try:
            import triton  # noqa: F401, PLC0415
        except ImportError as exc:
            return f"triton is not installed ({exc}); pip install 'fusedrl[triton]'"
        return None
    raise ValueError(f"backend must be one of {ORDER}, got {name!r}")


def _declines(name: str, device: torch.device, dtype: torch.dtype, ops: tuple[str, ...]) -> str | None:
    if name not in ops:
        return "it has no kernel for this operation yet"
    why = unavailable(name)
    if why is not None:
        return why
    if name == "cpu" and device.type != "cpu":
        return f"it runs on CPU tensors, got a {device.type} tensor"
    if name == "cuda" and device.type != "cuda":
        return f"it runs on CUDA tensors, got a {device.type} tensor"
    if name == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "CPU tensors run in Triton only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"it runs on CUDA tensors, got a {device.type} tensor"
    if name in ("cpu", "cuda", "triton") and dtype not in _ext.DTYPE_CODES:
        return f"it takes float32, bfloat16, float16 or float64, got {dtype}"
    return None


def requested_backend(backend: str | None) -> str | None:
    """The user's choice: the ``backend=`` argument, else ``FUSEDRL_BACKEND``, else None."""
    if backend is None:
        backend = os.environ.get("FUSEDRL_BACKEND") or None
        source = "FUSEDRL_BACKEND"
    else:
        source = "backend"
    if backend is not None:
        if not isinstance(backend, str) or backend not in ORDER:
            raise ValueError(f"{source} must be one of {ORDER} or None, got {backend!r}")
    return backend


def select(op: str, ops: tuple[str, ...], device: torch.device, dtype: torch.dtype, backend: str | None = None) -> str:
    """Name of the backend that runs ``op`` for tensors on ``device`` of ``dtype``.

    ``ops`` lists the backends that implement ``op``; ``backend`` is the user's choice (or None).
    """
    wanted = requested_backend(backend)
    order = ((wanted,) if wanted else ()) + tuple(n for n in ORDER if n != wanted)
    for name in order:
        why = _declines(name, device, dtype, ops)
        if why is None:
            return name
        key = (op, name, why)
        if key in _reported:
            continue
        _reported.add(key)
        msg = f"fusedrl: backend {name!r} declined {op}: {why}"
        missing_default = name == "cpu" and device.type == "cpu" and unavailable("cpu") is not None
        if name == wanted or missing_default:
            warnings.warn(msg + "; falling through to the next backend", RuntimeWarning, stacklevel=3)
        else:
            logger.debug(msg)
    raise RuntimeError(f"fusedrl: no backend can run {op}")  # unreachable: torch accepts everything


def backends() -> dict[str, str | None]:
    """Each backend's availability on this machine: ``{name: None}`` when it can run, else the reason.

    >>> fusedrl.backends()  # doctest: +SKIP
    {'cpu': None, 'cuda': 'torch sees no CUDA device', 'triton': None, 'torch': None}
    """
    return {name: unavailable(name) for name in ORDER}
