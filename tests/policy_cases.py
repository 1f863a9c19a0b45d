"""Shared cases of the fused policy objective tests (tests/test_policy_backends.py for every kernel
backend, tests/test_policy_cpu.py and tests/test_policy_triton.py for each one's own paths):
operands with padded NaN and every mask dtype, the packed layout, a backend runner, the float64
gold and its error, the option grid and a hypothesis strategy over options."""

from __future__ import annotations

import importlib.util

import torch
from hypothesis import strategies as st

import fusedrl

def make_inputs(B=3, T=6, dtype=torch.float64, *, seed=0, per_token_adv=False, mask="bool", empty_row=True,
                nan=True, scale=0.4, zero_adv=True):
    """Operands [B, T] with a random mask (a padded tail and holes), row 1 fully masked when
    ``empty_row``, NaN in every operand at padded positions when ``nan``. ``mask``: bool, uint8,
    int32, int64 (integer weights 0-2), float (weights in [0.5, 2])."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    lengths = torch.randint(1, T + 1, (B,), generator=g)
    valid = (torch.arange(T)[None, :] < lengths[:, None]) & (torch.rand(B, T, generator=g) > 0.2)
    valid[:, 0] = True
    if empty_row and B > 1:
        valid[1] = False
    x = rnd(B, T) * 0.5 - 1.0
    old = x + rnd(B, T) * scale
    ref = x + rnd(B, T) * scale
    mu = old + rnd(B, T) * scale
    h = torch.rand(B, T, generator=g, dtype=torch.float64) * 2.0
    adv = rnd(B, T) if per_token_adv else rnd(B)
    if zero_adv and B > 2:
        adv[2] = 0.0
    if mask == "float":
        m = torch.where(valid, 0.5 + 1.5 * torch.rand(B, T, generator=g, dtype=torch.float64), 0.0)
    elif mask == "bool":
        m = valid
    else:
        w = torch.randint(1, 3, (B, T), generator=g)
        m = torch.where(valid, w, 0).to(dict(uint8=torch.uint8, int32=torch.int32, int64=torch.int64)[mask])
    if nan:
        x, old, ref, mu, h = (torch.where(valid, t, float("nan")) for t in (x, old, ref, mu, h))
        if per_token_adv:
            adv = torch.where(valid, adv, float("nan"))
    if mask == "float":
        m = m.to(dtype)
    cast = [t.to(dtype) for t in (x, old, adv, ref, mu, h)]
    x, old, adv, ref, mu, h = cast
    return dict(logp=x, old_logp=old, advantages=adv, mask=m, ref_logp=ref, rollout_logp=mu, entropy=h)


def pack(d):
    """The padded operands as the packed layout [1, N] with cu_seqlens, rows cut at the last valid
    token (the masked holes inside a row stay); per-sequence advantages stay [S]."""
    mask = d["mask"]
    B, T = mask.shape
    lengths = [int((mask[i] != 0).nonzero().max()) + 1 if bool((mask[i] != 0).any()) else 0 for i in range(B)]
    lengths = [n if i % 2 == 0 else min(T, n + 1) for i, n in enumerate(lengths)]  # some masked tails
    cu = torch.tensor([0] + lengths).cumsum(0)
    out = {}
    for k, t in d.items():
        if t is None or (k == "advantages" and t.dim() == 1):
            out[k] = t
            continue
        out[k] = torch.cat([t[i, :n] for i, n in enumerate(lengths)])[None, :].contiguous()
    return out, cu


# ---------------------------------------------------------------------------------------------
# runs


# Triton launches of the loss kernel: run() checks that backend="triton" ran Triton (the dispatcher
# falls through to the next backend, with a one-time warning, when a backend declines).
LAUNCHES = {"triton": 0}
if importlib.util.find_spec("triton") is not None:
    from fusedrl.kernels import policy as _tk

    def _counted(fn):
        def launch(o):
            LAUNCHES["triton"] += 1
            return fn(o)

        return launch

    _tk.policy_loss = _counted(_tk.policy_loss)


def run(backend, d, *, entropy_grad=True, **opts):
    """(loss, metrics, d loss / d logp, d loss / d entropy) of fusedrl.policy_loss on ``backend``."""
    before = LAUNCHES["triton"]
    x = d["logp"].detach().clone().requires_grad_(True)
    h = d.get("entropy")
    if h is not None:
        h = h.detach().clone().requires_grad_(entropy_grad)
    kw = {k: v for k, v in d.items() if k not in ("logp", "old_logp", "advantages", "mask", "entropy")}
    loss, metrics = fusedrl.policy_loss(x, d["old_logp"], d["advantages"], d["mask"], entropy=h, backend=backend,
                                        **kw, **opts)
    inputs = [x] + ([h] if h is not None and h.requires_grad else [])
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    gx = grads[0] if grads[0] is not None else torch.zeros_like(x)
    gh = None
    if h is not None and h.requires_grad:
        gh = grads[1] if grads[1] is not None else torch.zeros_like(h)
    assert (LAUNCHES["triton"] == before + 1) == (backend == "triton"), f"backend {backend!r} did not run"
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, gx, gh


def gold(d):
    """The operands in float64 (the gold's inputs: the same values)."""
    return {k: (v.to(torch.float64) if v is not None and v.is_floating_point() and k != "mask" else v)
            for k, v in d.items()}


def error(got, want):
    """Max error of (loss, metrics, grads) against the gold, each relative to the gold's scale."""
    out = []
    for a, b in zip([got[0], *got[1].values(), got[2]] + ([got[3]] if got[3] is not None else []),
                    [want[0], *want[1].values(), want[2]] + ([want[3]] if want[3] is not None else [])):
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        out.append(float((a.to(torch.float64) - b).abs().max()) / scale if b.numel() else 0.0)
    return max(out)


def assert_same(got, want, rtol, atol, what=""):
    loss, metrics, gx, gh = got
    loss_w, metrics_w, gx_w, gh_w = want
    assert loss.dtype == loss_w.dtype, what
    torch.testing.assert_close(loss, loss_w, rtol=rtol, atol=atol, msg=lambda m: f"{what} loss: {m}")
    assert set(metrics) == set(metrics_w), (what, sorted(metrics), sorted(metrics_w))
    for k in metrics:
        torch.testing.assert_close(metrics[k], metrics_w[k], rtol=rtol, atol=atol, msg=lambda m: f"{what} {k}: {m}")
    assert gx.dtype == gx_w.dtype and gx.shape == gx_w.shape, what
    torch.testing.assert_close(gx, gx_w, rtol=rtol, atol=atol, msg=lambda m: f"{what} grad logp: {m}")
    assert (gh is None) == (gh_w is None), what
    if gh is not None:
        torch.testing.assert_close(gh, gh_w, rtol=rtol, atol=atol, msg=lambda m: f"{what} grad entropy: {m}")
    for t in (loss, gx) + tuple(metrics.values()) + ((gh,) if gh is not None else ()):
        assert torch.isfinite(t).all(), what


def without(d, *names):
    return {k: (None if k in names else v) for k, v in d.items()}


# ---------------------------------------------------------------------------------------------
# the option grid (float64: ~1e-10 against the reference)

KL_ALL = dict(beta=0.1)
ENT = dict(entropy_coef=0.01)

GRID = [
    # surrogates x ratio levels
    dict(surrogate="clip", ratio="token", **KL_ALL, **ENT),
    dict(surrogate="clip", ratio="sequence", **KL_ALL),
    dict(surrogate="clip", ratio="sequence-token", **ENT),
    dict(surrogate="clip", ratio="cumulative", **KL_ALL, **ENT),
    dict(surrogate="clip", ratio="hybrid", hybrid_alpha=0.3, seq_clip_low=0.1, seq_clip_high=0.15, **KL_ALL),
    dict(surrogate="clip", ratio="hybrid", hybrid_mixing="entropy", **ENT),
    dict(surrogate="cispo", ratio="token", **KL_ALL),
    dict(surrogate="cispo", cispo_bounds="both", ratio="sequence"),
    dict(surrogate="cispo", cispo_bounds="both", ratio="cumulative", clip_low=0.1, clip_high=0.3),
    dict(surrogate="cispo", ratio="hybrid", hybrid_mixing="entropy"),
    dict(surrogate="sapo", ratio="token", tau_pos=0.9, tau_neg=1.3, **ENT),
    dict(surrogate="sapo", ratio="sequence-token"),
    dict(surrogate="geo_mean", **KL_ALL, **ENT),
    dict(surrogate="geo_mean", clip_low=0.05, clip_high=0.1, aggregation="seq-mean-token-mean"),
    dict(surrogate="reinforce", ratio="token", **KL_ALL),
    dict(surrogate="reinforce", ratio="hybrid"),
    dict(surrogate="gpg", **KL_ALL, **ENT),
    # dual clip, delta, asymmetric clip
    dict(clip_ratio_c=1.3, clip_low=0.1, clip_high=0.2),
    dict(clip_ratio_c=1.2, ratio="sequence", clip_low=0.05),
    dict(delta=1.1, clip_low=0.3, clip_high=0.5),
    dict(delta=1.05, clip_ratio_c=1.1, clip_high=0.28, ratio="cumulative"),
    # KL kinds ("+" kinds, bias correction)
    dict(beta=0.2, kl="k1"),
    dict(beta=0.2, kl="abs"),
    dict(beta=0.2, kl="k2", ratio="sequence"),
    dict(beta=0.2, kl="k3", use_bias_correction_kl=True),
    dict(beta=0.2, kl="low_var_kl", ratio="cumulative"),
    dict(beta=0.2, kl="k1+", use_bias_correction_kl=True, ratio="hybrid"),
    dict(beta=0.2, kl="abs+"),
    dict(beta=0.2, kl="k3+", use_bias_correction_kl=True, ratio="cumulative"),
    dict(beta=0.2, kl="low_var_kl+", ratio="sequence-token", use_bias_correction_kl=True),
    dict(beta=0.2, kl="k2+", surrogate="geo_mean"),
    # rollout correction
    dict(rollout_correction="token_truncate", rollout_cap=1.2),
    dict(rollout_correction="token_truncate", rollout_cap=None, rollout_cap_low=0.9, ratio="sequence"),
    dict(rollout_correction="token_mask", rollout_cap=1.3, rollout_cap_low=0.8, ratio="cumulative"),
    dict(rollout_correction="sequence_truncate", rollout_cap=1.5, rollout_cap_low=0.7),
    dict(rollout_correction="sequence_mask", rollout_cap=2.0, rollout_cap_low=0.5, ratio="hybrid"),
    dict(rollout_correction="icepop", rollout_cap=1.3, rollout_cap_low=0.7, **KL_ALL),
    dict(rollout_correction="token_mask", rollout_cap=1.3, surrogate="geo_mean"),
    dict(rollout_correction="sequence_truncate", rollout_cap=1.1, surrogate="geo_mean"),
    # aggregation, global counts, kl / entropy aggregation
    dict(aggregation="token-sum", **KL_ALL, **ENT),
    dict(aggregation="seq-mean-token-mean", ratio="sequence", **ENT),
    dict(aggregation="seq-mean-token-mean", exclude_empty_rows=True, **KL_ALL),
    dict(aggregation="seq-mean-token-sum", num_sequences=7),
    dict(aggregation="seq-mean-token-sum", exclude_empty_rows=True, ratio="cumulative"),
    dict(aggregation="seq-mean-token-sum-norm", max_length=11, **ENT),
    dict(aggregation="seq-mean-token-sum-norm"),
    dict(aggregation="token-mean", num_tokens=23, **KL_ALL),
    dict(aggregation="balanced", **KL_ALL, **ENT),
    dict(aggregation="balanced", group_ids=[0, 1, 0, 1], num_groups=3, ratio="sequence"),
    dict(aggregation="seq-mean-token-mean", kl_aggregation="token-mean", entropy_aggregation="token-sum", **KL_ALL,
         **ENT),
    dict(aggregation="balanced", group_ids=[1, 1, 0, 0], kl_aggregation="balanced",
         entropy_aggregation="seq-mean-token-mean", **KL_ALL, **ENT),
    dict(kl_aggregation="seq-mean-token-sum-norm", max_length=9, beta=0.3, ratio="hybrid", hybrid_mixing="entropy",
         entropy_coef=0.02, entropy_aggregation="token-mean"),
    # vespo, the off-policy sequence mask, the entropy mask
    dict(surrogate="vespo", **KL_ALL, **ENT),
    dict(surrogate="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.0, vespo_lambda_neg=0.0,
         aggregation="seq-mean-token-mean"),
    dict(surrogate="vespo", log_ratio_clamp=0.1, use_bias_correction_kl=True, beta=0.2),
    dict(off_policy_mask_threshold=0.05, **KL_ALL),
    dict(off_policy_mask_threshold=0.0, ratio="sequence", clip_ratio_c=1.5),
    dict(entropy_mask_threshold=1.0, **ENT),
    dict(top_entropy_quantile=0.4, off_policy_mask_threshold=0.02, ratio="cumulative", **KL_ALL, **ENT),
    dict(top_entropy_quantile=0.5, surrogate="vespo", off_policy_mask_threshold=0.1, aggregation="balanced"),
    dict(off_policy_mask_threshold=-0.05, ratio="hybrid", rollout_correction="token_truncate", rollout_cap=1.2),
    # the clamp: off, and tight
    dict(log_ratio_clamp=None, ratio="sequence"),
    dict(log_ratio_clamp=0.15, ratio="cumulative", **KL_ALL),
    dict(log_ratio_clamp=0.2, ratio="hybrid", rollout_correction="sequence_truncate", rollout_cap=1.2),
]


def _options(case, B):
    opts = dict(case)
    if "group_ids" in opts:
        opts["group_ids"] = torch.tensor(opts["group_ids"][:B])
    return opts


def _case_id(case):
    return ",".join(f"{k}={v}" for k, v in case.items())


PACKED = [
    dict(**KL_ALL, **ENT),
    dict(ratio="sequence", aggregation="seq-mean-token-mean"),
    dict(ratio="cumulative", rollout_correction="token_truncate", rollout_cap=1.2, **KL_ALL),
    dict(ratio="hybrid", hybrid_mixing="entropy", **ENT),
    dict(surrogate="geo_mean", rollout_correction="sequence_mask", rollout_cap=1.5),
    dict(ratio="sequence-token", aggregation="balanced", group_ids=[0, 0, 1, 1]),
    dict(aggregation="seq-mean-token-sum-norm", max_length=8, surrogate="sapo"),
    dict(surrogate="vespo", top_entropy_quantile=0.6, off_policy_mask_threshold=0.05, **KL_ALL),
]



@st.composite
def scenarios(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 7))
    surrogate = draw(st.sampled_from(["clip", "cispo", "sapo", "geo_mean", "reinforce", "gpg", "vespo"]))
    ratio = "token" if surrogate in ("geo_mean", "vespo") else draw(
        st.sampled_from(["token", "sequence", "sequence-token", "cumulative", "hybrid"]))
    opts = dict(surrogate=surrogate, ratio=ratio,
                clip_low=draw(st.sampled_from([0.1, 0.2])), clip_high=draw(st.sampled_from([0.2, 0.28])),
                beta=draw(st.sampled_from([0.0, 0.05])), kl=draw(st.sampled_from(["k1", "k3", "low_var_kl", "k2+"])),
                entropy_coef=draw(st.sampled_from([0.0, 0.01])),
                aggregation=draw(st.sampled_from(["token-mean", "seq-mean-token-mean", "balanced", "token-sum"])),
                rollout_correction=draw(st.sampled_from([None, "token_truncate", "sequence_mask", "icepop"])))
    if surrogate == "vespo":
        opts["rollout_correction"] = None
    if opts["rollout_correction"] is not None:
        opts.update(rollout_cap=1.4, rollout_cap_low=0.7)
    if surrogate != "geo_mean" and draw(st.booleans()):  # the masks act on per-token surrogates
        opts["off_policy_mask_threshold"] = draw(st.sampled_from([-0.1, 0.0, 0.1]))
    if surrogate != "geo_mean" and draw(st.booleans()):
        opts["entropy_mask_threshold"] = draw(st.sampled_from([0.5, 1.0, 1.5]))
    if ratio == "hybrid":
        opts["hybrid_mixing"] = draw(st.sampled_from(["average", "entropy"]))
    if surrogate == "clip" and draw(st.booleans()):
        opts["clip_ratio_c"] = 1.5
    data = dict(B=B, T=T, seed=draw(st.integers(0, 10_000)), per_token_adv=draw(st.booleans()),
                mask=draw(st.sampled_from(["bool", "float", "int32"])), packed=draw(st.booleans()))
    return data, opts


