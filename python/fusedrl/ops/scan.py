"""Ops of the scan primitive: ``fusedrl::gae``, ``fusedrl::discounted_returns`` and
``fusedrl::masked_prefix_sum``.

Masked scans along T of a padded ``[B, T]`` layout, one sequential walk per row, rows in parallel
(spec: :mod:`fusedrl.reference.advantages` -- ``gae``, ``discounted_returns``, ``whiten``,
``prefix_sum``). Each op is a :class:`fusedrl.ops.library.Op`: ``GAE(backend, ...)`` runs the kernel of the
backend :func:`fusedrl.dispatch.select` chose. The outputs are
constants (advantages and returns carry no gradient), so the ops have fake (meta) implementations
and no autograd formula.

Argument glue done here, not in the kernels: a row must have unit stride along T (else it is
copied); rewards and values of different dtypes are both converted to the accumulation dtype; the
mask is passed as is when it is bool / uint8 / int32 / int64 / float32 / float64 (nonzero = valid)
and converted to bool otherwise; the bootstrap is converted to the output dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedrl import _ext
from fusedrl.ops.library import Op

# Mask element codes shared with csrc/include/fusedrl/scan_args.h (enum MaskCode).
MASK_CODES = {torch.bool: 0, torch.uint8: 0, torch.int32: 1, torch.int64: 2, torch.float32: 3, torch.float64: 4}


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(t: Tensor) -> Tensor:
    """``t`` with unit stride along T (the kernels take a row stride)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _stride(t: Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[-1]


def _mask(mask: Tensor) -> Tensor:
    return _rows(mask if mask.dtype in MASK_CODES else mask != 0)


def _inputs(rewards: Tensor, values: Tensor | None):
    if values is not None and values.dtype != rewards.dtype:
        out = _out_dtype(rewards.dtype)
        rewards, values = rewards.to(out), values.to(out)
    return _rows(rewards), (None if values is None else _rows(values))


# ---------------------------------------------------------------------------------------------
# Launchers: one per backend, the same signature. Outputs are preallocated by the op.
# ---------------------------------------------------------------------------------------------
def _reverse_args(x, values, mask, bootstrap, gamma, lam, out, returns, whiten, workspace):
    B, T = x.shape
    return (
        x.data_ptr(), _ext.ptr(values), mask.data_ptr(), _ext.ptr(bootstrap), _ext.DTYPE_CODES[x.dtype],
        MASK_CODES[mask.dtype], B, T, _stride(x), 0 if values is None else _stride(values), _stride(mask),
        gamma, lam, out.data_ptr(), _ext.ptr(returns), whiten, _ext.ptr(workspace),
    )


def _cpu_reverse(x, values, mask, bootstrap, gamma, lam, out, returns, whiten, workspace):
    _ext.load().reverse_scan_cpu(
        *_reverse_args(x, values, mask, bootstrap, gamma, lam, out, returns, whiten, workspace),
        torch.get_num_threads(),
    )


def _cuda_reverse(x, values, mask, bootstrap, gamma, lam, out, returns, whiten, workspace):
    _ext.load().reverse_scan_cuda(
        *_reverse_args(x, values, mask, bootstrap, gamma, lam, out, returns, whiten, workspace),
        torch.cuda.current_stream(x.device).cuda_stream,
    )


def _triton_reverse(*args):
    from fusedrl.kernels import scan as k  # noqa: PLC0415  (imports triton)

    k.reverse_scan(*args)


def _prefix_args(x, mask, out):
    B, T = x.shape
    return (x.data_ptr(), mask.data_ptr(), _ext.DTYPE_CODES[x.dtype], MASK_CODES[mask.dtype], B, T, _stride(x),
            _stride(mask), out.data_ptr())


def _cpu_prefix(x, mask, out):
    _ext.load().prefix_sum_cpu(*_prefix_args(x, mask, out), torch.get_num_threads())


def _cuda_prefix(x, mask, out):
    _ext.load().prefix_sum_cuda(*_prefix_args(x, mask, out), torch.cuda.current_stream(x.device).cuda_stream)


def _triton_prefix(*args):
    from fusedrl.kernels import scan as k  # noqa: PLC0415

    k.prefix_sum(*args)


def _workspace(B: int, T: int, mask: Tensor, backend: str) -> Tensor:
    """Whitening workspace (float64 words). cpu: per row (n, k, s1, s2, lo, hi); cuda / triton: per
    row (n, mean, M2), then (mean, scale)."""
    if backend == "cpu":
        return torch.empty(6 * B, dtype=torch.float64)
    return torch.empty(3 * B + 2, dtype=torch.float64, device=mask.device)


# ---------------------------------------------------------------------------------------------
# The ops: one body each, given a backend's launcher (fusedrl.ops.library registers them per device)
# ---------------------------------------------------------------------------------------------
def _gae(backend, reverse):
    def gae(rewards, values, mask, bootstrap, gamma, lam, whiten):
        B, T = rewards.shape
        dtype = _out_dtype(rewards.dtype)
        adv = _ext.empty((B, T), dtype, rewards.device)
        ret = _ext.empty((B, T), dtype, rewards.device)
        if B > 0 and T > 0:
            x, v = _inputs(rewards, values)
            boot = None if bootstrap is None else bootstrap.to(dtype).contiguous()
            m = _mask(mask)
            ws = _workspace(B, T, m, backend) if whiten else None
            reverse(x, v, m, boot, gamma, lam, adv, ret, whiten, ws)
        return adv, ret

    return gae


def _gae_fake(rewards, values, mask, bootstrap, gamma, lam, whiten):
    dtype = _out_dtype(rewards.dtype)
    return rewards.new_empty(rewards.shape, dtype=dtype), rewards.new_empty(rewards.shape, dtype=dtype)


def _discounted_returns(reverse):
    def discounted_returns(rewards, mask, gamma):
        B, T = rewards.shape
        out = _ext.empty((B, T), _out_dtype(rewards.dtype), rewards.device)
        if B > 0 and T > 0:
            reverse(_rows(rewards), None, _mask(mask), None, gamma, 1.0, out, None, False, None)
        return out

    return discounted_returns


def _prefix_sum(prefix):
    def masked_prefix_sum(x, mask):
        B, T = x.shape
        out = _ext.empty((B, T), _out_dtype(x.dtype), x.device)
        if B > 0 and T > 0:
            prefix(_rows(x), _mask(mask), out)
        return out

    return masked_prefix_sum


def _same_fake(x, *args):
    return x.new_empty(x.shape, dtype=_out_dtype(x.dtype))


_REVERSE = {"cpu": _cpu_reverse, "cuda": _cuda_reverse, "triton": _triton_reverse}
_PREFIX = {"cpu": _cpu_prefix, "cuda": _cuda_prefix, "triton": _triton_prefix}

GAE = Op("gae", "(Tensor rewards, Tensor values, Tensor mask, Tensor? bootstrap, float gamma, float lam, "
         "bool whiten) -> (Tensor, Tensor)", fake=_gae_fake,
         kernels={b: _gae(b, f) for b, f in _REVERSE.items()})
DISCOUNTED_RETURNS = Op("discounted_returns", "(Tensor rewards, Tensor mask, float gamma) -> Tensor",
                        fake=_same_fake, kernels={b: _discounted_returns(f) for b, f in _REVERSE.items()})
MASKED_PREFIX_SUM = Op("masked_prefix_sum", "(Tensor x, Tensor mask) -> Tensor", fake=_same_fake,
                       kernels={b: _prefix_sum(f) for b, f in _PREFIX.items()})
BACKENDS = GAE.backends  # "torch" is served by fusedrl.reference directly


def masked_prefix_sum(x: Tensor, mask: Tensor, *, backend: str | None = None) -> Tensor:
    """Masked prefix sum of ``x [B, T]`` along T (:func:`fusedrl.reference.advantages.prefix_sum`):
    the running sum over the valid tokens (``mask`` nonzero) at valid tokens, 0 at masked ones;
    float32 (float64 for float64 ``x``). Internal (no public function uses it yet): the inputs are
    assumed valid (floating ``x`` of 2 dims, ``mask`` of its shape on its device)."""
    from fusedrl import dispatch  # noqa: PLC0415
    from fusedrl.reference import advantages as ref  # noqa: PLC0415

    name = dispatch.select("masked_prefix_sum", BACKENDS, x.device, x.dtype, backend)
    if name == "torch":
        return ref.prefix_sum(x, mask != 0)
    return MASKED_PREFIX_SUM(name, x, mask)
