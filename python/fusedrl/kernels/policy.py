"""Triton kernels of the fused policy objective (``fusedrl::policy_stats`` and
``fusedrl::policy_objective``): the twin of csrc/cpu/policy.cpp.

The per-token math mirrors ``csrc/include/fusedrl/policy.h`` function by function:

========================  ===========================================================================
here                      fusedrl/policy.h / csrc/cpu/policy.cpp
========================  ===========================================================================
``_clampv``, ``_inside``  ``clampv``, ``inside`` (bounds inclusive: torch's clamp passes the
                          gradient there)
``_max_nan``,             ``max_nan``, ``min_nan`` (torch.maximum / minimum: a NaN wins)
``_min_nan``
``_dmax_a``, ``_dmin_a``  ``dmax_a``, ``dmin_a`` (a tie sends 1/2 to each side)
``_clamp_log``,           ``clamp_log``, ``clamp_log_pass`` (the log-weight clamp before every exp)
``_clamp_log_pass``
``_clip_ratio``,          ``clip_ratio``, ``clip_ratio_pass``
``_clip_ratio_pass``
``_clip_surrogate``       ``clip_surrogate`` (TRL's delta, verl's dual clip and its flag)
``_sapo_surrogate``       ``sapo_surrogate``
``_vespo_phi``            ``vespo_phi``
``_token_keep``           ``token_keep`` (the off-policy sequence mask and the entropy mask)
``_rollout_weight``       ``rollout_weight``
``_kl_value``             ``kl_value`` (value, derivative)
``_geo_log_ratio``        ``geo_log_ratio``
``_row_quantities``       ``row_quantities`` (the Row struct, from the pass-1 statistics)
``_ratio_terms``,         the stages of one token, ``ratio_terms``, ``surrogate_terms``,
``_surrogate_terms``,     ``token_rollout_weight``, ``kl_terms`` and ``combine``, on one block of
``_token_rollout_weight``, BLOCK tokens (returned as tuples where C++ returns a struct)
``_kl_terms``, ``_combine``
``_stats_kernel``         ``stats_rows`` (pass 1): one program per row
``_loss_kernel``          ``loss_rows`` (pass 2): one program per row
``_store_as``             ``store`` / ``from_float<D>``: float64 stores as is, other outputs through
                          float32 (bfloat16 with ``_to_output`` of python/fusedrl/kernels/logprobs.py)
========================  ===========================================================================

Mapping. One program per row (sequence) i; its span is tokens ``[start_i, start_i + len_i)`` with
``start_i = cu_seqlens[i]`` and ``len_i = cu_seqlens[i + 1] - start_i`` in the packed layout
(PACKED), ``start_i = 0`` and ``len_i = T`` in the padded one. Element (i, t) of an operand is at
``p + s_row * i + s_tok * (start_i + t)`` (csrc/include/fusedrl/view.h ``View``; a per-sequence advantage has
``s_tok = 0``). The program walks its row in blocks of BLOCK tokens (``tl.arange``); lanes past the
row's end load 0 and are excluded from every sum, so they act as if absent (the CPU tile simply
stops there). Every load is upcast at once to the accumulation type (float32; float64 for float64
log-probs) and cleaned: every operand is selected to 0 on tokens with mask == 0 before any
arithmetic (float masks are per-token weights; bool / uint8 / int32 / int64 masks integer
weights). Per-row sums are ``tl.sum`` of float64 values (each product formed in the accumulation
type, then widened, as the CPU kernel's ``double(...)``), blocks added in row order.

Row-coupled ratio levels. ``sequence`` / ``hybrid``: the block loop writes the local gradient to a
scratch row (accumulation type) and accumulates dL/ds in float64; a second loop over the row adds
``m_t dL/ds s / n``. ``cumulative``: the prefix ``c_t = sum_{t' <= t} m rho`` (and the prefix count
for sqrt(n)) is ``tl.cumsum`` of float64 values within a block plus a carried prefix; the local
dL/dc is written to a second scratch row, and a reverse loop over the blocks forms the suffix sum
``tl.cumsum(dc, reverse=True)`` plus a carried suffix (float64) and adds ``m_t suffix_t``. The
scratch rows are laid out like the operands (``i * T + t`` padded, ``start_i + t`` packed).

Runtime vs compile time. T, the strides, every hyperparameter (the named options of
:func:`fusedrl.ops.policy.kernel_options`, passed by name: a runtime parameter has the option's
name, a constexpr its upper-cased name (:func:`_option_args`); float values are converted to the
accumulation type in the kernel as ``A(o.x)`` in C++) and the presence-of-a-value flags (has_dual, has_delta, has_cap, has_cap_low,
has_clamp) and the kl_straight / bias_kl / clip_below switches are runtime arguments. Only BLOCK,
the option codes that select a code path (surrogate, ratio level, KL kind, rollout mode, hybrid
mixing, the off-policy and entropy masks: their thresholds are runtime values) and the presence of
each operand are ``tl.constexpr``.
"""

from __future__ import annotations

import functools
import inspect

import torch
import triton
import triton.language as tl

from .logprobs import _to_output

# Tokens per block (a power of two; the actual block is min(BLOCK_T, next_pow2(T)), at least 16).
# 256 keeps the loss kernel at ~130-170 registers per thread without spills on sm_80 with the
# default 4 warps (512 reaches the 255 limit). Module-level so that tests can shrink it to
# exercise the block carries; read at call time.
BLOCK_T = 256

# Option codes (fusedrl/policy.h; python/fusedrl/ops/policy.py keeps the same tables), as
# tl.constexpr globals so that the kernels can read them.
_cx = tl.constexpr
CLIP, CISPO, SAPO, GEO_MEAN, REINFORCE, GPG, VESPO = _cx(0), _cx(1), _cx(2), _cx(3), _cx(4), _cx(5), _cx(6)
TOKEN, SEQUENCE, SEQUENCE_TOKEN, CUMULATIVE, HYBRID = _cx(0), _cx(1), _cx(2), _cx(3), _cx(4)
K1, ABS, K2, K3, LOW_VAR = _cx(0), _cx(1), _cx(2), _cx(3), _cx(4)
NO_ROLLOUT, TOKEN_TRUNCATE, TOKEN_MASK = _cx(-1), _cx(0), _cx(1)
SEQUENCE_TRUNCATE, SEQUENCE_MASK, ICEPOP = _cx(2), _cx(3), _cx(4)
NUM_STATS, NUM_OUTPUTS = _cx(9), _cx(9)

# verl's bounds (policy.h kGspoTokenLogMax, kLowVarLogBound, kLowVarValueBound, kGeoMeanLogEps).
GSPO_TOKEN_LOG_MAX = _cx(10.0)
LOW_VAR_LOG_BOUND = _cx(20.0)
LOW_VAR_VALUE_BOUND = _cx(10.0)
GEO_MEAN_LOG_EPS = _cx(1e-10)
# TRL's vespo bounds (policy.h kVespoLogMin = log(1e-8), kVespoLogMax, kVespoLambdaMin).
VESPO_LOG_MIN = _cx(-18.420680743952367)
VESPO_LOG_MAX = _cx(20.0)
VESPO_LAMBDA_MIN = _cx(1e-4)


# ---------------------------------------------------------------------------------------------
# elementary pieces (policy.h)


@triton.jit
def _clampv(v, lo, hi):
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit
def _inside(v, lo, hi):
    return tl.where((v >= lo) & (v <= hi), 1.0, 0.0)


@triton.jit
def _max_nan(a, b):
    """max_nan: torch.maximum (NaN when either is NaN)."""
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def _min_nan(a, b):
    """min_nan: torch.minimum (NaN when either is NaN)."""
    return tl.where((a < b) | (a != a), a, b)


@triton.jit
def _dmax_a(a, b):
    return tl.where(a > b, 1.0, tl.where(a == b, 0.5, 0.0))


@triton.jit
def _dmin_a(a, b):
    return tl.where(a < b, 1.0, tl.where(a == b, 0.5, 0.0))


@triton.jit
def _clamp_log(v, has_clamp, clamp):
    return tl.where(has_clamp != 0, _clampv(v, -clamp, clamp), v)


@triton.jit
def _sequence_share(dlds, s, s_pass, count_div, ACC: tl.constexpr):
    """sequence_share of fusedrl/policy.h: exactly 0 when dlds = 0."""
    return tl.where(dlds != 0.0, dlds.to(ACC) * s * s_pass / count_div, 0.0).to(ACC)


@triton.jit
def _through_ratio(l_dw, pw, l_dwc, pwc):
    """through_ratio of fusedrl/policy.h: a zero partial contributes an exact zero."""
    return tl.where(l_dw != 0.0, l_dw * pw, 0.0) + tl.where(l_dwc != 0.0, l_dwc * pwc, 0.0)


@triton.jit
def _clamp_log_pass(v, has_clamp, clamp):
    return tl.where(has_clamp != 0, _inside(v, -clamp, clamp), 1.0)


@triton.jit
def _clip_ratio(w, lo, hi, below):
    up = tl.where(w > hi, hi, w)
    return tl.where((below != 0) & (w < lo), lo, up)


@triton.jit
def _clip_ratio_pass(w, lo, hi, below):
    return tl.where(((below == 0) | (w >= lo)) & (w <= hi), 1.0, 0.0)


@triton.jit
def _sqrt_acc(x):
    """std::sqrt: correctly rounded (sqrt_rn in float32; float64 sqrt is exact-rounded)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


# ---- surrogates ----


@triton.jit
def _clip_surrogate(w, wc, adv, has_delta, delta, has_dual, dual):
    """clip_surrogate: (l, dl/dw, dl/dwc, dual-clip flag)."""
    wu = tl.where(has_delta != 0, tl.where(w > delta, delta, w), w)
    dwu = tl.where(has_delta != 0, tl.where(w <= delta, 1.0, 0.0), 1.0)
    a1 = -adv * wu
    a2 = -adv * wc
    l = _max_nan(a1, a2)
    f1 = _dmax_a(a1, a2)
    f2 = 1.0 - f1
    c = -adv * dual
    neg = adv < 0.0
    dual_on = has_dual != 0
    fd = tl.where(dual_on & neg, _dmin_a(l, c), 1.0)
    out = tl.where(dual_on & neg, _min_nan(l, c), l)
    aw = -adv * w
    unclipped_max = tl.where(aw > a2, aw, a2)  # the reference flags with w, not min(w, delta)
    hit = tl.where(dual_on & neg & (c < unclipped_max), 1.0, 0.0)
    dw = fd * f1 * (-adv) * dwu
    dwc = fd * f2 * (-adv)
    return out, dw, dwc, hit


@triton.jit
def _sapo_surrogate(w, adv, tau_pos, tau_neg):
    """sapo_surrogate: (l, dl/dw)."""
    tau = tl.where(adv > 0.0, tau_pos, tau_neg)
    sig = 1.0 / (1.0 + tl.exp(-tau * (w - 1.0)))
    dw = -4.0 * adv * sig * (1.0 - sig)
    return -(sig * 4.0 / tau) * adv, dw


@triton.jit
def _vespo_phi(adv, log_w, w, k_pos, lambda_pos, k_neg, lambda_neg):
    """vespo_phi: the gamma weight exp(lambda + k log W - lambda W); non-finite -> 0."""
    nonneg = adv >= 0.0
    k = tl.where(nonneg, k_pos, k_neg)
    lam = tl.where(nonneg, lambda_pos, lambda_neg)
    lam = tl.where(lam > VESPO_LAMBDA_MIN, lam, VESPO_LAMBDA_MIN)
    phi = tl.exp(lam + k * log_w - lam * w)
    return tl.where((phi == phi) & (phi < float("inf")), phi, 0.0)


@triton.jit
def _token_keep(adv, h, row_off_kl, off_threshold, entropy_threshold, HAS_OFF_POLICY_MASK: tl.constexpr,
                HAS_ENTROPY_MASK: tl.constexpr):
    """token_keep: the off-policy sequence mask (A >= 0 or the row's mean sg(mu - x) <= threshold)
    times the entropy mask (H >= threshold); 1 without masks."""
    keep = tl.zeros(adv.shape, adv.dtype) + 1.0
    if HAS_OFF_POLICY_MASK:
        low_kl = tl.where(row_off_kl <= off_threshold, 1.0, 0.0)  # the row's (a scalar)
        keep = tl.where(adv >= 0.0, keep, keep * low_kl)
    if HAS_ENTROPY_MASK:
        keep = tl.where(h >= entropy_threshold, keep, 0.0)
    return keep


# ---- rollout correction ----


@triton.jit
def _rollout_weight(d, has_cap, cap, has_cap_low, cap_low, has_clamp, clamp, ROLLOUT: tl.constexpr):
    q = tl.exp(_clamp_log(d, has_clamp, clamp))
    if (ROLLOUT == TOKEN_TRUNCATE) or (ROLLOUT == SEQUENCE_TRUNCATE):
        q = tl.where((has_cap_low != 0) & (q < cap_low), cap_low, q)
        q = tl.where((has_cap != 0) & (q > cap), cap, q)
    else:
        keep = ((has_cap == 0) | (q <= cap)) & ((has_cap_low == 0) | (q >= cap_low))
        q = tl.where(keep, q, 0.0)
    return q


# ---- KL estimators of diff = x - r ----


@triton.jit
def _kl_value(diff, KIND: tl.constexpr):
    """kl_value: (value of the kind, its derivative in diff)."""
    if KIND == K1:
        value = diff
        deriv = tl.full(diff.shape, 1.0, diff.dtype)
    elif KIND == ABS:
        deriv = tl.where(diff > 0.0, 1.0, tl.where(diff < 0.0, -1.0, 0.0)).to(diff.dtype)
        value = tl.where(diff < 0.0, -diff, diff)
    elif KIND == K2:
        deriv = diff
        value = 0.5 * diff * diff
    elif KIND == K3:
        d = -diff
        e = tl.exp(d)
        deriv = 1.0 - e
        value = e - d - 1.0
    else:  # low_var_kl
        d0 = -diff
        d = _clampv(d0, -LOW_VAR_LOG_BOUND, LOW_VAR_LOG_BOUND)
        e = tl.exp(d)
        v0 = e - d - 1.0
        value = _clampv(v0, -LOW_VAR_VALUE_BOUND, LOW_VAR_VALUE_BOUND)
        deriv = (1.0 - e) * _inside(d0, -LOW_VAR_LOG_BOUND, LOW_VAR_LOG_BOUND) * _inside(
            v0, -LOW_VAR_VALUE_BOUND, LOW_VAR_VALUE_BOUND)
    return value, deriv


# ---- geo_mean (GMPO) ----


@triton.jit
def _geo_log_ratio(rho, adv, geo_lo, geo_hi):
    """geo_log_ratio: (sign-aware clipped log-ratio, its derivative in rho, clip flag)."""
    rc = _clampv(rho, -geo_lo, geo_hi)
    clipped = rho != rc
    pos = adv > 0.0
    neg = adv < 0.0
    drho = tl.where(pos, tl.where(rho <= geo_hi, 1.0, 0.0), tl.where(neg, tl.where(rho >= -geo_lo, 1.0, 0.0), 0.0))
    value = tl.where(pos, tl.where(rho < rc, rho, rc), tl.where(neg, tl.where(rho > rc, rho, rc), 0.0))
    return value, drho, clipped


# ---- per-row quantities from the pass-1 statistics ----


@triton.jit
def _row_quantities(st_ptr, has_cap, cap, has_cap_low, cap_low, has_clamp, clamp,
                    SURROGATE: tl.constexpr, ROLLOUT: tl.constexpr, ACC: tl.constexpr):
    """row_quantities: (count_div, s, s_pass, log_s, adv_mean, geo, geo_pass, q_row, h_max, n,
    vespo_log_w, vespo_w, off_kl)."""
    n = tl.load(st_ptr + 0).to(ACC)
    count_div = tl.where(n > 0.0, n, 1.0).to(ACC)
    log_s = tl.load(st_ptr + 1).to(ACC) / count_div
    s = tl.exp(_clamp_log(log_s, has_clamp, clamp))
    s_pass = _clamp_log_pass(log_s, has_clamp, clamp)
    adv_mean = tl.load(st_ptr + 2).to(ACC) / count_div
    geo_mean = tl.load(st_ptr + 3).to(ACC) / count_div
    geo = tl.exp(_clamp_log(geo_mean, has_clamp, clamp))
    geo_pass = _clamp_log_pass(geo_mean, has_clamp, clamp)
    q_row = tl.full((), 1.0, ACC)
    if (ROLLOUT == SEQUENCE_TRUNCATE) or (ROLLOUT == SEQUENCE_MASK):
        q = _rollout_weight(tl.load(st_ptr + 4).to(ACC), has_cap, cap, has_cap_low, cap_low, has_clamp, clamp,
                            ROLLOUT)
        if SURROGATE == GEO_MEAN:
            # geo_mean takes the geometric mean of the (constant) token weights: exp(mean log(q + eps))
            q_row = tl.exp(tl.log(q + GEO_MEAN_LOG_EPS) * n / count_div)
        else:
            q_row = q
    elif (ROLLOUT != NO_ROLLOUT) and (SURROGATE == GEO_MEAN):
        q_row = tl.exp(tl.load(st_ptr + 5).to(ACC) / count_div)
    h_max = tl.load(st_ptr + 6).to(ACC)
    vespo_log_w = _clampv(tl.load(st_ptr + 7).to(ACC), VESPO_LOG_MIN, VESPO_LOG_MAX).to(ACC)
    vespo_w = tl.exp(vespo_log_w)
    off_kl = tl.load(st_ptr + 8).to(ACC) / count_div
    return count_div, s, s_pass, log_s, adv_mean, geo, geo_pass, q_row, h_max, n, vespo_log_w, vespo_w, off_kl


# ---------------------------------------------------------------------------------------------
# loads and stores


@triton.jit
def _load(ptr, i, s_row, s_tok, pos, inb, ok, ACC: tl.constexpr):
    """Tokens ``pos`` of row i of a View, upcast to ACC and cleaned (0 where the mask is 0)."""
    v = tl.load(ptr + i * s_row + pos * s_tok, mask=inb, other=0).to(ACC)
    return tl.where(ok, v, 0.0)


@triton.jit
def _load_mask(ptr, i, s_row, s_tok, pos, inb, ACC: tl.constexpr):
    """(m, ok): the mask weight in ACC (0 on padding and past the row's end) and m != 0."""
    m = tl.load(ptr + i * s_row + pos * s_tok, mask=inb, other=0).to(ACC)
    ok = inb & (m != 0.0)
    return tl.where(ok, m, 0.0), ok


@triton.jit
def _store_as(ptr, off, x, inb):
    """store / from_float<D>: float64 outputs take the value as is, others go through float32."""
    out_ty: tl.constexpr = ptr.dtype.element_ty
    if out_ty == tl.float64:
        tl.store(ptr + off, x.to(tl.float64), mask=inb)
    else:
        tl.store(ptr + off, _to_output(x.to(tl.float32), out_ty), mask=inb)


@triton.jit
def _row_span(cu_ptr, i, T, PACKED: tl.constexpr):
    if PACKED:
        start = tl.load(cu_ptr + i)
        length = tl.load(cu_ptr + i + 1) - start
    else:
        start = i * 0
        length = i * 0 + T
    return start, length


# ---------------------------------------------------------------------------------------------
# pass 1: row statistics


@triton.jit
def _stats_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, mu_ptr, h_ptr, cu_ptr, stats_ptr,
    T,
    s_x_row, s_x_tok, s_o_row, s_o_tok, s_a_row, s_a_tok, s_m_row, s_m_tok, s_mu_row, s_mu_tok, s_h_row, s_h_tok,
    has_cap, has_cap_low, has_clamp,
    geo_lo: tl.float64, geo_hi: tl.float64, cap: tl.float64, cap_low: tl.float64, clamp: tl.float64,
    SURROGATE: tl.constexpr, RATIO: tl.constexpr, ROLLOUT: tl.constexpr, HYBRID_ENTROPY: tl.constexpr,
    STATS_ADV: tl.constexpr, HAS_OLD: tl.constexpr, HAS_MU: tl.constexpr, HAS_H: tl.constexpr,
    HAS_OFF_POLICY_MASK: tl.constexpr, PACKED: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    ACC: tl.constexpr = tl.float64 if logp_ptr.dtype.element_ty == tl.float64 else tl.float32
    IS_VESPO: tl.constexpr = SURROGATE == VESPO
    NEED_RHO: tl.constexpr = (RATIO == SEQUENCE) or (RATIO == SEQUENCE_TOKEN) or (RATIO == HYBRID)
    GEO: tl.constexpr = SURROGATE == GEO_MEAN
    NEED_ADV: tl.constexpr = GEO or STATS_ADV
    SEQ_ROLL: tl.constexpr = (ROLLOUT == SEQUENCE_TRUNCATE) or (ROLLOUT == SEQUENCE_MASK)
    TOK_ROLL_GEO: tl.constexpr = GEO and (ROLLOUT != NO_ROLLOUT) and not SEQ_ROLL
    NEED_X: tl.constexpr = NEED_RHO or GEO or IS_VESPO or HAS_OFF_POLICY_MASK
    NEED_O: tl.constexpr = NEED_X or SEQ_ROLL or TOK_ROLL_GEO
    NEED_MU: tl.constexpr = (SEQ_ROLL or TOK_ROLL_GEO or HAS_OFF_POLICY_MASK) and HAS_MU
    NEED_H: tl.constexpr = (RATIO == HYBRID) and HYBRID_ENTROPY
    geo_lo_a = tl.full((), geo_lo, ACC)
    geo_hi_a = tl.full((), geo_hi, ACC)
    cap_a = tl.full((), cap, ACC)
    cap_low_a = tl.full((), cap_low, ACC)
    clamp_a = tl.full((), clamp, ACC)
    start, length = _row_span(cu_ptr, i, T, PACKED)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    cnt = tl.zeros((), tl.float64)
    srho = tl.zeros((), tl.float64)
    sadv = tl.zeros((), tl.float64)
    sgeo = tl.zeros((), tl.float64)
    sroll = tl.zeros((), tl.float64)
    slogq = tl.zeros((), tl.float64)
    svespo = tl.zeros((), tl.float64)
    soff = tl.zeros((), tl.float64)
    hmax = tl.full((), float("-inf"), ACC)
    for t0 in range(0, length, BLOCK):
        offs = t0 + lanes
        inb = offs < length
        pos = start + offs
        m, ok = _load_mask(mask_ptr, i, s_m_row, s_m_tok, pos, inb, ACC)
        cnt += tl.sum(m.to(tl.float64), axis=0)
        if NEED_O:
            x = _load(logp_ptr, i, s_x_row, s_x_tok, pos, inb, ok, ACC)
            if HAS_OLD:
                o = _load(old_ptr, i, s_o_row, s_o_tok, pos, inb, ok, ACC)
            else:
                o = x
            if NEED_RHO:
                srho += tl.sum((m * (x - o)).to(tl.float64), axis=0)
            if IS_VESPO:
                svespo += tl.sum((m * _clamp_log(x - o, has_clamp, clamp_a)).to(tl.float64), axis=0)
            if HAS_OFF_POLICY_MASK and not HAS_MU:
                soff += tl.sum((m * (o - x)).to(tl.float64), axis=0)
        if NEED_ADV:
            adv = _load(adv_ptr, i, s_a_row, s_a_tok, pos, inb, ok, ACC)
            sadv += tl.sum((m * adv).to(tl.float64), axis=0)
            if GEO:
                g, drho, clipped = _geo_log_ratio(x - o, adv, geo_lo_a, geo_hi_a)
                sgeo += tl.sum((m * g).to(tl.float64), axis=0)
        if NEED_MU:
            mu = _load(mu_ptr, i, s_mu_row, s_mu_tok, pos, inb, ok, ACC)
            if SEQ_ROLL:
                sroll += tl.sum((m * (o - mu)).to(tl.float64), axis=0)
            if TOK_ROLL_GEO:
                q = _rollout_weight(o - mu, has_cap, cap_a, has_cap_low, cap_low_a, has_clamp, clamp_a, ROLLOUT)
                lq = m * tl.log(q + GEO_MEAN_LOG_EPS)
                slogq += tl.sum(tl.where(inb, lq, 0.0).to(tl.float64), axis=0)
            if HAS_OFF_POLICY_MASK:  # the sampler's log-probs
                soff += tl.sum((m * (mu - x)).to(tl.float64), axis=0)
        if NEED_H and HAS_H:
            h = _load(h_ptr, i, s_h_row, s_h_tok, pos, inb, ok, ACC)
            # padded tokens count as 0; a NaN never wins (the C++ `h > hmax ? h : hmax`)
            h = tl.where(inb & (h == h), h, float("-inf"))
            hmax = tl.maximum(hmax, tl.max(h, axis=0))
    st = stats_ptr + i * NUM_STATS
    tl.store(st + 0, cnt)
    tl.store(st + 1, srho)
    tl.store(st + 2, sadv)
    tl.store(st + 3, sgeo)
    tl.store(st + 4, sroll)
    tl.store(st + 5, slogq)
    tl.store(st + 6, hmax.to(tl.float64))
    tl.store(st + 7, svespo)
    tl.store(st + 8, soff)


# ---------------------------------------------------------------------------------------------
# pass 2: loss, metrics, gradients


@triton.jit
def _ratio_terms(x, o, m, h, row_s, row_log_s, row_h_max, c_carry, n_carry,
                 lo, hi, seq_lo, seq_hi, log_lo, log_hi, below, hybrid_alpha, has_clamp, clamp,
                 RATIO: tl.constexpr, HYBRID_ENTROPY: tl.constexpr, ACC: tl.constexpr):
    """ratio_terms (RatioTerms) and the carried prefixes: (w, wc, pw, pwc, rw, rwc, c_carry, n_carry); pw / pwc are
    dw/dx and dwc/dx (dw/dc for cumulative), rw / rwc the factors of the row's dL/ds."""
    zero = tl.zeros(x.shape, ACC)
    if RATIO == TOKEN:
        rho = x - o
        w = tl.exp(_clamp_log(rho, has_clamp, clamp))
        pw = w * _clamp_log_pass(rho, has_clamp, clamp)
        wc = _clip_ratio(w, lo, hi, below)
        pwc = _clip_ratio_pass(w, lo, hi, below) * pw
        rw = zero
        rwc = zero
    elif RATIO == SEQUENCE:
        w = zero + row_s
        wc = zero + _clip_ratio(row_s, lo, hi, below)
        pw = zero
        pwc = zero
        rw = zero + 1.0
        rwc = zero + _clip_ratio_pass(row_s, lo, hi, below)
    elif RATIO == SEQUENCE_TOKEN:
        lw = _min_nan(row_log_s, GSPO_TOKEN_LOG_MAX).to(ACC)
        w_s = tl.exp(_clamp_log(lw, has_clamp, clamp))
        pw_s = w_s * tl.where(row_log_s <= GSPO_TOKEN_LOG_MAX, 1.0, 0.0) * _clamp_log_pass(lw, has_clamp, clamp)
        w = zero + w_s
        pw = zero + pw_s
        wc = zero + _clip_ratio(w_s, lo, hi, below)
        pwc = zero + _clip_ratio_pass(w_s, lo, hi, below) * pw_s
        rw = zero
        rwc = zero
    elif RATIO == HYBRID:
        sc = _clip_ratio(row_s, seq_lo, seq_hi, below)
        spc = _clip_ratio_pass(row_s, seq_lo, seq_hi, below)
        if HYBRID_ENTROPY:
            a = tl.where(row_h_max > 0.0, h / tl.where(row_h_max > 0.0, row_h_max, 1.0), 0.0)
        else:
            a = zero + hybrid_alpha
        rho = x - o
        wt = tl.exp(_clamp_log(rho, has_clamp, clamp))
        pt = wt * _clamp_log_pass(rho, has_clamp, clamp)
        w = a * wt + (1.0 - a) * row_s
        wc = a * _clip_ratio(wt, lo, hi, below) + (1.0 - a) * sc
        pw = a * pt
        pwc = a * _clip_ratio_pass(wt, lo, hi, below) * pt
        rw = 1.0 - a
        rwc = (1.0 - a) * spc
    else:  # cumulative: w = exp(c), wc = exp(c clipped to sqrt(n) [log(1 - lo), log(1 + hi)])
        inc = (m * (x - o)).to(tl.float64)
        mf = m.to(tl.float64)
        c = c_carry + tl.cumsum(inc, axis=0)
        cnt = n_carry + tl.cumsum(mf, axis=0)
        c_carry += tl.sum(inc, axis=0)
        n_carry += tl.sum(mf, axis=0)
        cj = c.to(ACC)
        root = _sqrt_acc(cnt.to(ACC))
        bh = root * log_hi
        cc = _min_nan(cj, bh)
        dcc = _dmin_a(cj, bh)
        bl = root * log_lo
        on = below != 0
        dcc = tl.where(on, dcc * _dmax_a(cc, bl), dcc)
        cc = tl.where(on, _max_nan(cc, bl), cc)
        w = tl.exp(_clamp_log(cj, has_clamp, clamp))
        wc = tl.exp(_clamp_log(cc, has_clamp, clamp))
        pw = w * _clamp_log_pass(cj, has_clamp, clamp)
        pwc = wc * _clamp_log_pass(cc, has_clamp, clamp) * dcc
        rw = zero
        rwc = zero
    return w, wc, pw, pwc, rw, rwc, c_carry, n_carry


@triton.jit
def _surrogate_terms(w, wc, x, o, adv, row_adv_mean, row_geo, row_geo_pass, row_count_div, row_vespo_log_w,
                     row_vespo_w, has_delta, delta, has_dual, dual, tau_pos, tau_neg, geo_lo, geo_hi,
                     k_pos, lambda_pos, k_neg, lambda_neg, SURROGATE: tl.constexpr, ACC: tl.constexpr):
    """surrogate_terms (SurrogateTerms): (l, dl/dw, dl/dwc, dl/dx, clipped-low, clipped-high, dual flag)."""
    zero = tl.zeros(x.shape, ACC)
    if SURROGATE == CLIP:
        l, dw, dwc, f_dual = _clip_surrogate(w, wc, adv, has_delta, delta, has_dual, dual)
        dx = zero
    elif SURROGATE == CISPO:
        l = -wc * adv * x
        dx = -wc * adv
        dw = zero
        dwc = zero
        f_dual = zero
    elif SURROGATE == SAPO:
        l, dw = _sapo_surrogate(w, adv, tau_pos, tau_neg)
        dwc = zero
        dx = zero
        f_dual = zero
    elif SURROGATE == REINFORCE:
        l = -w * adv
        dw = -adv
        dwc = zero
        dx = zero
        f_dual = zero
    elif SURROGATE == GPG:
        l = -adv * x
        dx = -adv
        dw = zero
        dwc = zero
        f_dual = zero
    elif SURROGATE == VESPO:  # -sg(phi) A x, phi from the row's sequence weight and the sign of A
        phi = _vespo_phi(adv, row_vespo_log_w, row_vespo_w, k_pos, lambda_pos, k_neg, lambda_neg)
        l = -phi * adv * x
        dx = -phi * adv
        dw = zero
        dwc = zero
        f_dual = zero
    else:  # geo_mean: every token carries the row's -mean(A) exp(mean rho~)
        value = -row_adv_mean * row_geo
        # d/dx_t of the row value, times the row's token weight sum in the combine (geo_weight)
        scale = value * row_geo_pass * tl.where(row_count_div > 0.0, 1.0 / row_count_div, 0.0)
        g, drho, clipped = _geo_log_ratio(x - o, adv, geo_lo, geo_hi)
        l = zero + value
        dx = scale * drho
        dw = zero
        dwc = zero
        f_dual = zero
    if SURROGATE == GEO_MEAN:
        f_low = tl.where(clipped & (adv < 0.0), 1.0, 0.0)
        f_high = tl.where(clipped & (adv > 0.0), 1.0, 0.0)
    elif (SURROGATE == CLIP) or (SURROGATE == CISPO):
        f_low = tl.where((wc > w) & (adv < 0.0), 1.0, 0.0)
        f_high = tl.where((wc < w) & (adv > 0.0), 1.0, 0.0)
    else:
        f_low = zero
        f_high = zero
    return l, dw, dwc, dx, f_low, f_high, f_dual


@triton.jit
def _token_rollout_weight(o, mu, row_q, has_cap, cap, has_cap_low, cap_low, has_clamp, clamp,
                   SURROGATE: tl.constexpr, ROLLOUT: tl.constexpr, ACC: tl.constexpr):
    """token_rollout_weight: the token weight q (per token, or the row's q_row)."""
    PER_TOKEN: tl.constexpr = ((ROLLOUT == TOKEN_TRUNCATE) or (ROLLOUT == TOKEN_MASK) or (ROLLOUT == ICEPOP)) and (
        SURROGATE != GEO_MEAN)
    if PER_TOKEN:
        q = _rollout_weight(o - mu, has_cap, cap, has_cap_low, cap_low, has_clamp, clamp, ROLLOUT)
    else:
        q = tl.zeros(o.shape, ACC) + row_q
    return q


@triton.jit
def _kl_terms(x, r, w, kl_straight, bias_kl, KL: tl.constexpr):
    """kl_terms (KlTerms): (kl, dkl/dx, dkl/dw)."""
    diff = x - r
    k, dk = _kl_value(diff, KL)
    dk = tl.where(kl_straight != 0, diff, dk)
    bias = bias_kl != 0
    kl = tl.where(bias, k * w, k)
    dkl_x = tl.where(bias, dk * w, dk)
    dkl_w = tl.where(bias, k, 0.0)
    return kl, dkl_x, dkl_w


@triton.jit
def _combine(m, g, q, keep, bg, dx_scale, pw, pwc, rw, rwc, w, l, dw_l, dwc_l, dx_l, f_low, f_high, f_dual,
             kl, dkl_x, dkl_w, IS_CUMULATIVE: tl.constexpr):
    """combine (TokenTerms): (gx, dc, ds, sur, kl, w, q, low, high, dual); exact zeros on padded
    tokens (selected, as in C++)."""
    mq = m * (g * q * keep)
    dw = mq * dw_l + m * bg * dkl_w
    dwc = mq * dwc_l
    dx = mq * (dx_l * dx_scale) + m * bg * dkl_x
    local = _through_ratio(dw, pw, dwc, pwc)
    ok = m != 0
    if IS_CUMULATIVE:
        gx = tl.where(ok, dx, 0.0)
    else:
        gx = tl.where(ok, dx + local, 0.0)
    dc = tl.where(ok, local, 0.0)
    ds = tl.where(ok, dw * rw + dwc * rwc, 0.0)
    sur = tl.where(ok, m * q * keep * l, 0.0)
    kl_t = tl.where(ok, m * kl, 0.0)
    w_t = tl.where(ok, m * w, 0.0)
    q_t = tl.where(ok, m * q, 0.0)
    return gx, dc, ds, sur, kl_t, w_t, q_t, m * f_low, m * f_high, m * f_dual


@triton.jit
def _loss_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, mu_ptr, h_ptr, gx_ptr, gh_ptr,
    cu_ptr, stats_ptr, coef_ptr, rows_ptr, scr_g_ptr, scr_c_ptr,
    T, scr_row,
    s_x_row, s_x_tok, s_o_row, s_o_tok, s_a_row, s_a_tok, s_m_row, s_m_tok, s_r_row, s_r_tok,
    s_mu_row, s_mu_tok, s_h_row, s_h_tok, s_gx_row, s_gx_tok, s_gh_row, s_gh_tok,
    kl_straight, bias_kl, clip_below, has_dual, has_delta, has_cap, has_cap_low, has_clamp,
    lo: tl.float64, hi: tl.float64, seq_lo: tl.float64, seq_hi: tl.float64, log_lo: tl.float64,
    log_hi: tl.float64, geo_lo: tl.float64, geo_hi: tl.float64, dual: tl.float64, delta: tl.float64,
    beta: tl.float64, entropy_coef: tl.float64, cap: tl.float64, cap_low: tl.float64, clamp: tl.float64,
    tau_pos: tl.float64, tau_neg: tl.float64, hybrid_alpha: tl.float64,
    vespo_k_pos: tl.float64, vespo_lambda_pos: tl.float64, vespo_k_neg: tl.float64, vespo_lambda_neg: tl.float64,
    off_policy_threshold: tl.float64, entropy_threshold: tl.float64,
    SURROGATE: tl.constexpr, RATIO: tl.constexpr, KL: tl.constexpr, ROLLOUT: tl.constexpr,
    HYBRID_ENTROPY: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_MU: tl.constexpr,
    HAS_H: tl.constexpr, HAS_STATS: tl.constexpr, HAS_GX: tl.constexpr, HAS_GH: tl.constexpr,
    HAS_OFF_POLICY_MASK: tl.constexpr, HAS_ENTROPY_MASK: tl.constexpr, PACKED: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    ACC: tl.constexpr = tl.float64 if logp_ptr.dtype.element_ty == tl.float64 else tl.float32
    IS_COUPLED: tl.constexpr = (RATIO == SEQUENCE) or (RATIO == HYBRID)
    IS_CUMULATIVE: tl.constexpr = RATIO == CUMULATIVE
    # the hyperparameters in the accumulation type (A(o.x) in C++)
    lo_a = tl.full((), lo, ACC)
    hi_a = tl.full((), hi, ACC)
    seq_lo_a = tl.full((), seq_lo, ACC)
    seq_hi_a = tl.full((), seq_hi, ACC)
    log_lo_a = tl.full((), log_lo, ACC)
    log_hi_a = tl.full((), log_hi, ACC)
    geo_lo_a = tl.full((), geo_lo, ACC)
    geo_hi_a = tl.full((), geo_hi, ACC)
    dual_a = tl.full((), dual, ACC)
    delta_a = tl.full((), delta, ACC)
    cap_a = tl.full((), cap, ACC)
    cap_low_a = tl.full((), cap_low, ACC)
    clamp_a = tl.full((), clamp, ACC)
    tau_pos_a = tl.full((), tau_pos, ACC)
    tau_neg_a = tl.full((), tau_neg, ACC)
    alpha_a = tl.full((), hybrid_alpha, ACC)
    k_pos_a = tl.full((), vespo_k_pos, ACC)
    lambda_pos_a = tl.full((), vespo_lambda_pos, ACC)
    k_neg_a = tl.full((), vespo_k_neg, ACC)
    lambda_neg_a = tl.full((), vespo_lambda_neg, ACC)
    off_threshold_a = tl.full((), off_policy_threshold, ACC)
    entropy_threshold_a = tl.full((), entropy_threshold, ACC)
    start, length = _row_span(cu_ptr, i, T, PACKED)
    # the row quantities (defaults when pass 1 did not run)
    if HAS_STATS:
        (count_div, row_s, s_pass, log_s, adv_mean, geo, geo_pass, q_row, h_max, n_row, vespo_log_w, vespo_w,
         off_kl) = _row_quantities(
            stats_ptr + i * NUM_STATS, has_cap, cap_a, has_cap_low, cap_low_a, has_clamp, clamp_a,
            SURROGATE, ROLLOUT, ACC)
        geo_weight = n_row  # geo_mean: the row value is counted on each of the row's tokens
    else:
        one = tl.full((), 1.0, ACC)
        zero_s = tl.zeros((), ACC)
        count_div, row_s, s_pass, log_s, adv_mean, geo, geo_pass, q_row, h_max = (
            one, one, zero_s, zero_s, zero_s, one, zero_s, one, zero_s)
        vespo_log_w, vespo_w, off_kl = zero_s, one, zero_s
        geo_weight = zero_s
    g = tl.load(coef_ptr + 3 * i).to(ACC)
    bg = (beta * tl.load(coef_ptr + 3 * i + 1)).to(ACC)
    eg = (entropy_coef * tl.load(coef_ptr + 3 * i + 2)).to(ACC)
    if SURROGATE == GEO_MEAN:
        dx_scale = geo_weight
    else:
        dx_scale = tl.full((), 1.0, ACC)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    s_sur = tl.zeros((), tl.float64)
    s_kl = tl.zeros((), tl.float64)
    s_h = tl.zeros((), tl.float64)
    cnt = tl.zeros((), tl.float64)
    c_low = tl.zeros((), tl.float64)
    c_high = tl.zeros((), tl.float64)
    c_dual = tl.zeros((), tl.float64)
    s_w = tl.zeros((), tl.float64)
    s_q = tl.zeros((), tl.float64)
    dlds = tl.zeros((), tl.float64)
    c_carry = tl.zeros((), tl.float64)
    n_carry = tl.zeros((), tl.float64)
    scr = i * scr_row + start  # scratch rows: laid out like the operands
    for t0 in range(0, length, BLOCK):
        offs = t0 + lanes
        inb = offs < length
        pos = start + offs
        m, ok = _load_mask(mask_ptr, i, s_m_row, s_m_tok, pos, inb, ACC)
        x = _load(logp_ptr, i, s_x_row, s_x_tok, pos, inb, ok, ACC)
        if HAS_OLD:
            o = _load(old_ptr, i, s_o_row, s_o_tok, pos, inb, ok, ACC)
        else:
            o = x
        adv = _load(adv_ptr, i, s_a_row, s_a_tok, pos, inb, ok, ACC)
        if HAS_H:
            h = _load(h_ptr, i, s_h_row, s_h_tok, pos, inb, ok, ACC)
        else:
            h = tl.zeros((BLOCK,), ACC)
        w, wc, pw, pwc, rw, rwc, c_carry, n_carry = _ratio_terms(
            x, o, m, h, row_s, log_s, h_max, c_carry, n_carry, lo_a, hi_a, seq_lo_a, seq_hi_a, log_lo_a, log_hi_a,
            clip_below, alpha_a, has_clamp, clamp_a, RATIO, HYBRID_ENTROPY, ACC)
        l, dw_l, dwc_l, dx_l, f_low, f_high, f_dual = _surrogate_terms(
            w, wc, x, o, adv, adv_mean, geo, geo_pass, count_div, vespo_log_w, vespo_w, has_delta, delta_a, has_dual,
            dual_a, tau_pos_a, tau_neg_a, geo_lo_a, geo_hi_a, k_pos_a, lambda_pos_a, k_neg_a, lambda_neg_a,
            SURROGATE, ACC)
        if (ROLLOUT != NO_ROLLOUT) and HAS_MU:
            mu = _load(mu_ptr, i, s_mu_row, s_mu_tok, pos, inb, ok, ACC)
        else:
            mu = tl.zeros((BLOCK,), ACC)
        q = _token_rollout_weight(o, mu, q_row, has_cap, cap_a, has_cap_low, cap_low_a, has_clamp, clamp_a,
                           SURROGATE, ROLLOUT, ACC)
        keep = _token_keep(adv, h, off_kl, off_threshold_a, entropy_threshold_a, HAS_OFF_POLICY_MASK, HAS_ENTROPY_MASK)
        if HAS_REF:
            r = _load(ref_ptr, i, s_r_row, s_r_tok, pos, inb, ok, ACC)
            kl, dkl_x, dkl_w = _kl_terms(x, r, w, kl_straight, bias_kl, KL)
        else:
            kl = tl.zeros((BLOCK,), ACC)
            dkl_x = kl
            dkl_w = kl
        # combine; the row sums take float64 values (lanes past the row have m = 0: exact zeros)
        gx_t, dc_t, ds_t, sur_t, kl_t, w_t, q_t, low_t, high_t, dual_t = _combine(
            m, g, q, keep, bg, dx_scale, pw, pwc, rw, rwc, w, l, dw_l, dwc_l, dx_l, f_low, f_high, f_dual,
            kl, dkl_x, dkl_w, IS_CUMULATIVE)
        dlds += tl.sum(ds_t.to(tl.float64), axis=0)
        s_sur += tl.sum(sur_t.to(tl.float64), axis=0)
        s_kl += tl.sum(kl_t.to(tl.float64), axis=0)
        s_h += tl.sum(tl.where(inb, (m * h).to(tl.float64), 0.0), axis=0)
        cnt += tl.sum(tl.where(inb, m.to(tl.float64), 0.0), axis=0)
        c_low += tl.sum(tl.where(inb, low_t.to(tl.float64), 0.0), axis=0)
        c_high += tl.sum(tl.where(inb, high_t.to(tl.float64), 0.0), axis=0)
        c_dual += tl.sum(tl.where(inb, dual_t.to(tl.float64), 0.0), axis=0)
        s_w += tl.sum(w_t.to(tl.float64), axis=0)
        s_q += tl.sum(q_t.to(tl.float64), axis=0)
        if HAS_GX:
            if IS_CUMULATIVE:
                tl.store(scr_g_ptr + scr + offs, gx_t.to(ACC), mask=inb)
                tl.store(scr_c_ptr + scr + offs, dc_t.to(ACC), mask=inb)
            elif IS_COUPLED:
                tl.store(scr_g_ptr + scr + offs, gx_t.to(ACC), mask=inb)
            else:
                _store_as(gx_ptr, i * s_gx_row + pos * s_gx_tok, gx_t, inb)
        if HAS_GH:
            _store_as(gh_ptr, i * s_gh_row + pos * s_gh_tok, -eg * m, inb)
    if HAS_GX:
        if IS_COUPLED:  # dL/dx_t += m_t dL/ds ds/d(sum m rho) with ds = s / n per unit of m rho
            tl.debug_barrier()
            k = _sequence_share(dlds, row_s, s_pass, count_div, ACC)
            for t0 in range(0, length, BLOCK):
                offs = t0 + lanes
                inb = offs < length
                pos = start + offs
                m, ok = _load_mask(mask_ptr, i, s_m_row, s_m_tok, pos, inb, ACC)
                gx = tl.load(scr_g_ptr + scr + offs, mask=inb, other=0.0)
                _store_as(gx_ptr, i * s_gx_row + pos * s_gx_tok, tl.where(m != 0, gx + m * k, 0.0), inb)
        if IS_CUMULATIVE:  # c_t = sum_{t'<=t} m rho: dL/dx_t = direct_t + m_t sum_{t'>=t} dL/dc_t'
            tl.debug_barrier()
            suffix = tl.zeros((), tl.float64)
            nblk = tl.cdiv(length, BLOCK)
            for kb in range(0, nblk):
                offs = (nblk - 1 - kb) * BLOCK + lanes
                inb = offs < length
                pos = start + offs
                m, ok = _load_mask(mask_ptr, i, s_m_row, s_m_tok, pos, inb, ACC)
                dc = tl.load(scr_c_ptr + scr + offs, mask=inb, other=0.0).to(tl.float64)
                sfx = suffix + tl.cumsum(dc, axis=0, reverse=True)
                suffix += tl.sum(dc, axis=0)
                gx = tl.load(scr_g_ptr + scr + offs, mask=inb, other=0.0)
                _store_as(gx_ptr, i * s_gx_row + pos * s_gx_tok, gx + m * sfx.to(ACC), inb)
    out = rows_ptr + i * NUM_OUTPUTS
    tl.store(out + 0, g.to(tl.float64) * s_sur + bg.to(tl.float64) * s_kl - eg.to(tl.float64) * s_h)
    tl.store(out + 1, cnt)
    tl.store(out + 2, c_low)
    tl.store(out + 3, c_high)
    tl.store(out + 4, c_dual)
    tl.store(out + 5, s_w)
    tl.store(out + 6, s_kl)
    tl.store(out + 7, s_h)
    tl.store(out + 8, s_q)


# ---------------------------------------------------------------------------------------------
# host side


# Option codes that select a code path: tl.constexpr parameters named as the option, upper-cased
# (the other options are runtime parameters of the same name as in csrc/include/fusedrl/policy.h).
CODE_OPTIONS = ("surrogate", "ratio", "kl", "rollout")
SWITCH_OPTIONS = ("hybrid_entropy", "has_off_policy_mask", "has_entropy_mask")


@functools.lru_cache(maxsize=None)
def kernel_parameters(kernel) -> tuple[str, ...]:
    fn = getattr(kernel, "fn", kernel)
    return tuple(inspect.signature(fn).parameters)


def _option_args(kernel, options: dict) -> dict:
    """The named options (:func:`fusedrl.ops.policy.named_options`) that ``kernel`` takes: a
    runtime parameter of the option's name, or a constexpr of its upper-cased name."""
    params = kernel_parameters(kernel)
    args = {}
    for name, value in options.items():
        if name in params:
            args[name] = value
        elif name.upper() in params:
            args[name.upper()] = int(value) if name in CODE_OPTIONS else bool(value)
    return args


def _block(T: int) -> int:
    return min(BLOCK_T, max(16, triton.next_power_of_2(max(int(T), 1))))


def _operand(o, name, dummy):
    """(tensor or dummy, s_row, s_tok, present). bool masks are read as uint8 (same bytes)."""
    t = o.tensors.get(name)
    if t is None:
        return dummy, 0, 0, False
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    s_row, s_tok = o.strides[name]
    return t, s_row, s_tok, True


def _cu(o, dummy):
    if o.cu_seqlens is None:
        return dummy, False
    return o.cu_seqlens.to(torch.int64).contiguous(), True


def policy_stats(o) -> None:
    """Pass 1: fills ``o.stats`` [B, 9] (float64) as csrc/cpu/policy.cpp ``stats_rows``."""
    dummy = o.stats
    x, sxr, sxt, _ = _operand(o, "logp", dummy)
    old, sor, sot, has_old = _operand(o, "old_logp", dummy)
    adv, sar, sat, _ = _operand(o, "advantages", dummy)
    mask, smr, smt, _ = _operand(o, "mask", dummy)
    mu, sur, sut, has_mu = _operand(o, "rollout_logp", dummy)
    h, shr, sht, has_h = _operand(o, "entropy", dummy)
    cu, packed = _cu(o, dummy)
    _stats_kernel[(o.B,)](
        x, old, adv, mask, mu, h, cu, o.stats,
        o.T, sxr, sxt, sor, sot, sar, sat, smr, smt, sur, sut, shr, sht,
        **_option_args(_stats_kernel, o.options),
        STATS_ADV=bool(o.stats_adv), HAS_OLD=has_old, HAS_MU=has_mu, HAS_H=has_h, PACKED=packed,
        BLOCK=_block(o.T),
    )


def policy_loss(o) -> None:
    """Pass 2: fills ``o.rows`` [B, 9] (float64) and the gradients ``grad_logp`` / ``grad_entropy``
    (when present) as csrc/cpu/policy.cpp ``loss_rows``."""
    dummy = o.rows
    x, sxr, sxt, _ = _operand(o, "logp", dummy)
    old, sor, sot, has_old = _operand(o, "old_logp", dummy)
    adv, sar, sat, _ = _operand(o, "advantages", dummy)
    mask, smr, smt, _ = _operand(o, "mask", dummy)
    ref, srr, srt, has_ref = _operand(o, "ref_logp", dummy)
    mu, sur, sut, has_mu = _operand(o, "rollout_logp", dummy)
    h, shr, sht, has_h = _operand(o, "entropy", dummy)
    gx, sgxr, sgxt, has_gx = _operand(o, "grad_logp", dummy)
    gh, sghr, sght, has_gh = _operand(o, "grad_entropy", dummy)
    cu, packed = _cu(o, dummy)
    options = o.options
    ratio = options["ratio"]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    scr_g = scr_c = dummy
    scr_row = 0 if packed else o.T
    if has_gx and ratio in (SEQUENCE.value, HYBRID.value, CUMULATIVE.value):  # row-coupled: scratch rows
        size = o.T if packed else o.B * o.T
        scr_g = torch.empty(size, dtype=acc, device=x.device)
        if ratio == CUMULATIVE.value:
            scr_c = torch.empty(size, dtype=acc, device=x.device)
    _loss_kernel[(o.B,)](
        x, old, adv, mask, ref, mu, h, gx, gh,
        cu, o.stats if o.stats is not None else dummy, o.coef, o.rows, scr_g, scr_c,
        o.T, scr_row,
        sxr, sxt, sor, sot, sar, sat, smr, smt, srr, srt, sur, sut, shr, sht, sgxr, sgxt, sghr, sght,
        **_option_args(_loss_kernel, options),
        HAS_OLD=has_old, HAS_REF=has_ref, HAS_MU=has_mu, HAS_H=has_h, HAS_STATS=o.stats is not None,
        HAS_GX=has_gx, HAS_GH=has_gh, PACKED=packed, BLOCK=_block(o.T),
    )
