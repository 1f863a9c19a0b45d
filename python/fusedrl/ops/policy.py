"""Ops of the fused policy objective: ``fusedrl::policy_stats`` (pass 1, the row statistics) and
``fusedrl::policy_objective`` (pass 2: loss, per-row metric sums and d loss / d logp in one pass;
registered autograd scales the saved gradient by the upstream one). Each is a
:class:`fusedrl.ops.library.Op`: ``POLICY_OBJECTIVE(backend, ...)``.

Spec: :mod:`fusedrl.reference.policy`; per-token math: csrc/include/fusedrl/policy.h. Between the
two passes, :func:`fusedrl.ops.normalizers.row_coefficients` (the one place where
the kernel paths normalize) turns the row counts into the per-row coefficients the kernel weighs
each token with.

Layouts: padded ``[B, T]`` (every row T long), or packed ``[1, N]`` / ``[N]`` with ``cu_seqlens``
``[S + 1]`` (row i is tokens ``cu[i]:cu[i+1]``; verl's remove-padding layout). Every operand is
passed as (tensor, row stride, token stride): a per-sequence advantage has token stride 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from fusedrl import _ext
from fusedrl.ops.library import Op, hand_over, pack_options, scaled, unpack_options
from fusedrl.ops import normalizers as norm
from fusedrl.reference import aggregate as ref_agg

SURROGATE_CODES = {"clip": 0, "cispo": 1, "sapo": 2, "geo_mean": 3, "reinforce": 4, "gpg": 5, "vespo": 6}
RATIO_CODES = {"token": 0, "sequence": 1, "sequence-token": 2, "cumulative": 3, "hybrid": 4}
KL_CODES = {"k1": 0, "abs": 1, "k2": 2, "k3": 3, "low_var_kl": 4}
ROLLOUT_CODES = {None: -1, "token_truncate": 0, "token_mask": 1, "sequence_truncate": 2, "sequence_mask": 3,
                 "icepop": 4}
# Mask codes of csrc/include/fusedrl/policy.h (float masks use the DType codes 0-3).
MASK_CODES = {torch.bool: 4, torch.uint8: 4, torch.int32: 5, torch.int64: 6}
NUM_STATS = 9
NUM_OUTPUTS = 9
STAT = {"count": 0, "sum_rho": 1, "sum_adv": 2, "sum_geo": 3, "sum_rollout": 4, "sum_logq": 5, "max_entropy": 6,
        "sum_vespo": 7, "sum_off_kl": 8}
OUT = {"loss": 0, "count": 1, "clip_low": 2, "clip_high": 3, "clip_dual": 4, "ratio": 5, "kl": 6, "entropy": 7,
       "rollout": 8}


# The kernel's Options by name (csrc/include/fusedrl/policy.h FUSEDRL_POLICY_INT_OPTIONS /
# FUSEDRL_POLICY_FLOAT_OPTIONS: the same names in the same order; the binding reports its order as
# policy_option_names and tests/test_policy_options.py checks both, and the Triton kernels'
# parameter names, against these).
INT_OPTIONS = ("surrogate", "ratio", "kl", "rollout", "kl_straight", "bias_kl", "clip_below", "hybrid_entropy",
               "has_dual", "has_delta", "has_cap", "has_cap_low", "has_clamp", "has_off_policy_mask",
               "has_entropy_mask")
FLOAT_OPTIONS = ("lo", "hi", "seq_lo", "seq_hi", "log_lo", "log_hi", "geo_lo", "geo_hi", "dual", "delta", "beta",
                 "entropy_coef", "cap", "cap_low", "clamp", "tau_pos", "tau_neg", "hybrid_alpha", "vespo_k_pos",
                 "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "off_policy_threshold", "entropy_threshold")


def kernel_options(p, entropy_mask_threshold: float | None = None) -> dict:
    """The kernel's Options (csrc/include/fusedrl/policy.h) from a resolved PolicyParams and the
    call's entropy-mask threshold (None: no mask), by name: ints for the codes and switches, floats
    for the values."""
    options = dict(_param_options(p))
    has_emask = entropy_mask_threshold is not None
    options.update(has_entropy_mask=int(has_emask), entropy_threshold=float(entropy_mask_threshold) if has_emask else 0.0)
    return options


def option_lists(options: dict) -> tuple[list[int], list[float]]:
    """The binding's two flat lists (integers, floats) of named options, in the C++ order."""
    return pack_options(options, INT_OPTIONS, FLOAT_OPTIONS)


def named_options(flags, values) -> dict:
    """The inverse of :func:`option_lists`: the options by name (the Triton launchers pass them so)."""
    return unpack_options(flags, values, INT_OPTIONS, FLOAT_OPTIONS)


@functools.lru_cache(maxsize=256)
def _call_lists(p, entropy_mask_threshold):
    return option_lists(kernel_options(p, entropy_mask_threshold))


@functools.lru_cache(maxsize=256)
def _param_options(p) -> tuple:
    seq_lo = p.clip_low if p.seq_clip_low is None else p.seq_clip_low
    seq_hi = p.clip_high if p.seq_clip_high is None else p.seq_clip_high
    base_kl = p.kl[:-1] if p.kl.endswith("+") else p.kl
    cumulative = p.ratio == "cumulative"
    ints = dict(
        surrogate=SURROGATE_CODES[p.surrogate], ratio=RATIO_CODES[p.ratio], kl=KL_CODES[base_kl],
        rollout=ROLLOUT_CODES[p.rollout_correction], kl_straight=p.kl.endswith("+"),
        bias_kl=p.use_bias_correction_kl, clip_below=not (p.surrogate == "cispo" and p.cispo_bounds == "upper"),
        hybrid_entropy=p.hybrid_mixing == "entropy", has_dual=p.clip_ratio_c is not None,
        has_delta=p.delta is not None, has_cap=p.rollout_cap is not None, has_cap_low=p.rollout_cap_low is not None,
        has_clamp=p.log_ratio_clamp is not None, has_off_policy_mask=p.off_policy_mask_threshold is not None,
    )
    floats = dict(
        lo=1.0 - p.clip_low, hi=1.0 + p.clip_high, seq_lo=1.0 - seq_lo, seq_hi=1.0 + seq_hi,
        log_lo=_log1p(-p.clip_low) if cumulative else 0.0, log_hi=_log1p(p.clip_high) if cumulative else 0.0,
        geo_lo=p.clip_low, geo_hi=p.clip_high, dual=p.clip_ratio_c or 0.0, delta=p.delta or 0.0, beta=p.beta,
        entropy_coef=p.entropy_coef, cap=p.rollout_cap or 0.0, cap_low=p.rollout_cap_low or 0.0,
        clamp=p.log_ratio_clamp or 0.0, tau_pos=p.tau_pos, tau_neg=p.tau_neg, hybrid_alpha=p.hybrid_alpha,
        vespo_k_pos=p.vespo_k_pos, vespo_lambda_pos=p.vespo_lambda_pos, vespo_k_neg=p.vespo_k_neg,
        vespo_lambda_neg=p.vespo_lambda_neg, off_policy_threshold=p.off_policy_mask_threshold or 0.0,
    )
    return tuple({k: int(v) for k, v in ints.items()}.items()) + tuple({k: float(v) for k, v in floats.items()}.items())


def _log1p(x: float) -> float:
    import math  # noqa: PLC0415

    return math.log1p(x)


def needs_stats(p, *, coefficient_counts: bool, balanced: bool) -> bool:
    """Whether pass 1 runs: the ratio level, the surrogate, the rollout mode or the aggregation
    coefficients need per-row sums."""
    return (
        coefficient_counts or balanced or p.ratio in ("sequence", "sequence-token", "hybrid")
        or p.surrogate in ("geo_mean", "vespo") or (p.rollout_correction or "").startswith("sequence")
        or p.off_policy_mask_threshold is not None
    )


# ---------------------------------------------------------------------------------------------
# operands


@dataclass
class Operands:
    """Everything a launcher needs: tensors (None: absent), their (row, token) strides in elements,
    the sizes and the options. ``T`` is the padded length (packed: the number of tokens N)."""

    tensors: dict
    strides: dict
    cu_seqlens: Tensor | None
    B: int
    T: int
    flags: list
    values: list
    stats: Tensor | None
    stats_adv: bool = False
    coef: Tensor | None = None
    rows: Tensor | None = None

    @property
    def options(self) -> dict:
        """The options by name (csrc/include/fusedrl/policy.h Options)."""
        return named_options(self.flags, self.values)


NAMES = ("logp", "old_logp", "advantages", "mask", "ref_logp", "rollout_logp", "entropy", "grad_logp",
         "grad_entropy")


def _dtype_code(t: Tensor) -> int:
    if t.dtype in _ext.DTYPE_CODES:
        return _ext.DTYPE_CODES[t.dtype]
    return MASK_CODES[t.dtype]


def _strides(t: Tensor, per_row: bool, packed: bool) -> tuple[int, int]:
    if per_row:  # advantages [B] / [S]: one value per row
        return t.stride(0), 0
    if t.dim() == 2:
        return (0 if packed else t.stride(0)), t.stride(1)
    return 0, t.stride(0)  # packed [N]


def _cpu_views(o: Operands):
    views = []
    for name in NAMES:
        t = o.tensors.get(name)
        if t is None:
            views.append((0, 0, 0, 0))
        else:
            s_row, s_tok = o.strides[name]
            views.append((t.data_ptr(), _dtype_code(t), s_row, s_tok))
    return views


def _cpu_stats(o: Operands):
    _ext.load().policy_stats_cpu(_cpu_views(o), _ext.ptr(o.cu_seqlens), o.B, o.T, o.flags, o.values,
                                 o.stats.data_ptr(), o.stats_adv, torch.get_num_threads())


def _cpu_loss(o: Operands):
    _ext.load().policy_loss_cpu(_cpu_views(o), _ext.ptr(o.cu_seqlens), o.B, o.T, o.flags, o.values,
                                _ext.ptr(o.stats), o.coef.data_ptr(), o.rows.data_ptr(), torch.get_num_threads())


def _cuda_stats(o: Operands):
    dev = o.tensors["logp"].device
    _ext.load().policy_stats_cuda(_cpu_views(o), _ext.ptr(o.cu_seqlens), o.B, o.T, o.flags, o.values,
                                  o.stats.data_ptr(), o.stats_adv, torch.cuda.current_stream(dev).cuda_stream)


def _cuda_loss(o: Operands):
    dev = o.tensors["logp"].device
    _ext.load().policy_loss_cuda(_cpu_views(o), _ext.ptr(o.cu_seqlens), o.B, o.T, o.flags, o.values,
                                 _ext.ptr(o.stats), o.coef.data_ptr(), o.rows.data_ptr(),
                                 torch.cuda.current_stream(dev).cuda_stream)


def _triton_stats(o: Operands):
    from fusedrl.kernels import policy as k  # noqa: PLC0415  (imports triton)

    k.policy_stats(o)


def _triton_loss(o: Operands):
    from fusedrl.kernels import policy as k  # noqa: PLC0415

    k.policy_loss(o)


def _mask(mask: Tensor) -> Tensor:
    if mask.dtype in MASK_CODES or mask.dtype in _ext.DTYPE_CODES:
        return mask
    return mask.to(torch.int32)  # int8 / int16: integer weights


def _operands(logp, old_logp, advantages, mask, ref_logp, rollout_logp, entropy, cu_seqlens, flags, values,
              grad_logp=None, grad_entropy=None) -> Operands:
    packed = cu_seqlens is not None
    tensors = dict(logp=logp, old_logp=old_logp, advantages=advantages, mask=_mask(mask), ref_logp=ref_logp,
                   rollout_logp=rollout_logp, entropy=entropy, grad_logp=grad_logp, grad_entropy=grad_entropy)
    per_row = advantages.shape != logp.shape
    strides = {k: _strides(t, per_row and k == "advantages", packed) for k, t in tensors.items() if t is not None}
    if packed:
        B, T = cu_seqlens.numel() - 1, logp.shape[-1]
    else:
        B, T = logp.shape
    return Operands(tensors, strides, cu_seqlens, B, T, list(flags), list(values), None)


def _rows(logp: Tensor, cu_seqlens: Tensor | None) -> int:
    return cu_seqlens.numel() - 1 if cu_seqlens is not None else logp.shape[0]


# ---------------------------------------------------------------------------------------------
# ops


def _policy_stats(launch):
    def policy_stats(logp, old_logp, advantages, mask, rollout_logp, entropy, cu_seqlens, flags, values, stats_adv):
        o = _operands(logp, old_logp, advantages, mask, None, rollout_logp, entropy, cu_seqlens, flags, values)
        o.stats = _ext.empty((o.B, NUM_STATS), torch.float64, logp.device)
        o.stats_adv = stats_adv
        if o.B > 0:
            launch(o)
        return o.stats

    return policy_stats


def _policy_stats_fake(logp, old_logp, advantages, mask, rollout_logp, entropy, cu_seqlens, flags, values, stats_adv):
    return logp.new_empty((_rows(logp, cu_seqlens), NUM_STATS), dtype=torch.float64)


# Pass 1: the row statistics [B, 9] (float64; the Stat enum of fusedrl/policy.h).
POLICY_STATS = Op(
    "policy_stats", "(Tensor logp, Tensor? old_logp, Tensor advantages, Tensor mask, Tensor? rollout_logp, "
    "Tensor? entropy, Tensor? cu_seqlens, int[] flags, float[] values, bool stats_adv) -> Tensor",
    fake=_policy_stats_fake,
    kernels={"cpu": _policy_stats(_cpu_stats), "cuda": _policy_stats(_cuda_stats), "triton": _policy_stats(_triton_stats)},
)


def _grad_buffer(t: Tensor, want: bool, cu_seqlens: Tensor | None) -> Tensor:
    if not want:
        return t.new_empty((0,))
    if cu_seqlens is not None:  # tokens outside every segment get no write
        return torch.zeros_like(t, memory_format=torch.contiguous_format)
    return _ext.empty(t.shape, t.dtype, t.device)


def _policy_objective(launch):
    def policy_objective(logp, old_logp, advantages, mask, ref_logp, rollout_logp, entropy, cu_seqlens, stats, coef,
                         flags, values, want_grad_logp, want_grad_entropy):
        want_h = want_grad_entropy and entropy is not None
        grad_logp = _grad_buffer(logp, want_grad_logp, cu_seqlens)
        grad_entropy = _grad_buffer(entropy if entropy is not None else logp, want_h, cu_seqlens)
        o = _operands(logp, old_logp, advantages, mask, ref_logp, rollout_logp, entropy, cu_seqlens, flags, values,
                      grad_logp if want_grad_logp else None, grad_entropy if want_h else None)
        o.stats, o.coef = stats, coef
        o.rows = _ext.empty((o.B, NUM_OUTPUTS), torch.float64, logp.device)
        if o.B > 0:
            launch(o)
        acc = torch.float64 if logp.dtype == torch.float64 else torch.float32
        loss = o.rows[:, 0].sum().to(acc)
        return loss, o.rows, grad_logp, grad_entropy

    return policy_objective


def _policy_objective_fake(logp, old_logp, advantages, mask, ref_logp, rollout_logp, entropy, cu_seqlens, stats, coef,
                           flags, values, want_grad_logp, want_grad_entropy):
    acc = torch.float64 if logp.dtype == torch.float64 else torch.float32
    B = _rows(logp, cu_seqlens)
    g = logp.new_empty(logp.shape) if want_grad_logp else logp.new_empty((0,))
    ge = entropy.new_empty(entropy.shape) if (want_grad_entropy and entropy is not None) else logp.new_empty((0,))
    return logp.new_empty((), dtype=acc), logp.new_empty((B, NUM_OUTPUTS), dtype=torch.float64), g, ge


def _setup(ctx, inputs, output):
    _, rows, grad_logp, grad_entropy = output
    ctx.mark_non_differentiable(rows, grad_logp, grad_entropy)
    ctx.handed = (grad_logp, grad_entropy)  # not saved_tensors: hand_over releases them (no copy)


def _backward(ctx, g_loss, g_rows, g_grad_logp, g_grad_entropy):
    grad_logp, grad_entropy = hand_over(ctx, "fusedrl.policy_loss")
    if g_loss is None:  # no gradient reached the loss (gradients are not materialized as zeros)
        return (None,) * 14
    dx = scaled(grad_logp, g_loss) if ctx.needs_input_grad[0] and grad_logp.numel() else None
    dh = scaled(grad_entropy, g_loss) if ctx.needs_input_grad[6] and grad_entropy.numel() else None
    return dx, None, None, None, None, None, dh, None, None, None, None, None, None, None


# Pass 2: ``(loss, rows, grad_logp, grad_entropy)``: the 0-dim loss, the per-row outputs [B, 9]
# (float64; the Output enum of fusedrl/policy.h) and d loss / d logp, d loss / d entropy (empty
# when not wanted), written in the same pass; the autograd formula scales them by the upstream
# gradient (fusedrl.ops.library.hand_over, scaled).
POLICY_OBJECTIVE = Op(
    "policy_objective", "(Tensor logp, Tensor? old_logp, Tensor advantages, Tensor mask, Tensor? ref_logp, "
    "Tensor? rollout_logp, Tensor? entropy, Tensor? cu_seqlens, Tensor? stats, Tensor coef, int[] flags, "
    "float[] values, bool want_grad_logp, bool want_grad_entropy) -> (Tensor, Tensor, Tensor, Tensor)",
    fake=_policy_objective_fake,
    kernels={"cpu": _policy_objective(_cpu_loss), "cuda": _policy_objective(_cuda_loss),
             "triton": _policy_objective(_triton_loss)},
    setup_context=_setup, backward=_backward,
)


# ---------------------------------------------------------------------------------------------
# the fused policy loss


def _metrics(rows: Tensor, p, has_ref: bool, has_entropy: bool, dtype: torch.dtype) -> dict:
    total = rows.detach().sum(0)
    means = (total / norm.divisor(total[OUT["count"]])).to(dtype).unbind()  # one op for every view

    def mean(key):
        return means[OUT[key]]

    metrics = {"clipfrac_low": mean("clip_low"), "clipfrac_high": mean("clip_high"), "ratio_mean": mean("ratio")}
    if p.clip_ratio_c is not None:
        metrics["clipfrac_dual"] = mean("clip_dual")
    if has_ref:
        metrics["kl_mean"] = mean("kl")
    if has_entropy:
        metrics["entropy_mean"] = mean("entropy")
    if p.rollout_correction is not None:
        metrics["rollout_weight_mean"] = mean("rollout")
    return metrics


def fused_policy_loss(backend: str, logp, old_logp, advantages, mask, *, ref_logp, rollout_logp, entropy, cu_seqlens,
                      group_ids, num_tokens, num_sequences, max_length, num_groups, params, entropy_mask_threshold=None):
    """:func:`fusedrl.reference.policy.policy_loss` computed by the ``backend`` kernel (inputs
    validated by :func:`fusedrl.policy_loss`). Returns ``(loss, metrics)``."""
    p = params
    flags, values = _call_lists(p, entropy_mask_threshold)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int64).contiguous()  # the kernels read int64 offsets
    # constants for the kernels (the policy_objective autograd returns no gradient for them)
    old_logp, advantages, ref_logp, rollout_logp = (
        None if t is None else t.detach() for t in (old_logp, advantages, ref_logp, rollout_logp)
    )
    B = _rows(logp, cu_seqlens)
    acc = torch.float64 if logp.dtype == torch.float64 else torch.float32
    modes = [p.aggregation]
    if p.kl_aggregation is not None and p.beta != 0.0 and ref_logp is not None:
        modes.append(p.kl_aggregation)
    if p.entropy_aggregation is not None and p.entropy_coef != 0.0 and entropy is not None:
        modes.append(p.entropy_aggregation)
    norms = dict(num_tokens=num_tokens, num_sequences=num_sequences, exclude_empty_rows=p.exclude_empty_rows)
    counts = any(norm.needs_row_count(m, **norms) for m in modes)
    balanced = "balanced" in modes
    stats = None
    if needs_stats(p, coefficient_counts=counts, balanced=balanced):
        stats = POLICY_STATS(backend, logp.detach(), old_logp, advantages, mask, rollout_logp,
                             None if entropy is None else entropy.detach(), cu_seqlens, flags, values, balanced)
    row_count = None if stats is None else stats[:, STAT["count"]]
    row_sign = None
    if balanced:
        adv_sum = stats[:, STAT["sum_adv"]]
        sign_of = adv_sum if advantages.shape == logp.shape else advantages.detach().to(torch.float64)
        row_sign = torch.where(row_count > 0, torch.sign(sign_of), 0.0)

    def coefficients(mode):
        return norm.row_coefficients(
            mode, row_count, rows=B, length=None if cu_seqlens is not None else logp.shape[-1], dtype=torch.float64,
            device=logp.device, num_tokens=num_tokens, num_sequences=num_sequences, max_length=max_length,
            row_sign=row_sign, group_ids=group_ids, num_groups=num_groups, exclude_empty_rows=p.exclude_empty_rows,
        )

    g = coefficients(p.aggregation)
    gk = coefficients(p.kl_aggregation) if p.kl_aggregation is not None and len(modes) > 1 and p.beta != 0.0 else g
    ge = g
    if p.entropy_aggregation is not None and p.entropy_coef != 0.0 and entropy is not None:
        ge = coefficients(p.entropy_aggregation)
    coef = torch.stack([g, gk, ge], dim=1).contiguous()
    want_x = logp.requires_grad and torch.is_grad_enabled()
    want_h = entropy is not None and entropy.requires_grad and torch.is_grad_enabled()
    loss, rows, _, _ = POLICY_OBJECTIVE(backend, logp, old_logp, advantages, mask, ref_logp, rollout_logp, entropy,
                                        cu_seqlens, stats, coef, flags, values, want_x, want_h)
    return loss, _metrics(rows, p, ref_logp is not None, entropy is not None, acc)
