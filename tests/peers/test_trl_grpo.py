"""policy_loss + presets.trl against TRL's GRPOTrainer._compute_loss (trl 1.16.0).

`_compute_loss` runs unmodified with a SimpleNamespace standing in for the trainer (docs/PEERS.md):
a stub `_get_per_token_logps_and_entropies` returns our float64 leaf log-probs, the accelerator is an
identity. Loss and gradient w.r.t. the policy log-probs are compared for every loss_type x
importance_sampling_level x (beta, use_bias_correction_kl) x delta x epsilon_high, with gradient
accumulation / num_items_in_batch normalizers, the entropy bonus, and the vLLM importance-sampling
correction modes, whose ratios are computed by TRL's own code (the block of
`_generate_and_score_completions` that builds them, extracted from TRL's source and executed).
"""

import inspect
import math
import textwrap
import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import fusedrl
from fusedrl import presets

grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
TESTED_WITH = "trl 1.16.0"
GRPOTrainer = grpo_trainer.GRPOTrainer
TOL = dict(rtol=1e-6, atol=1e-9)

B, T = 5, 6


def make_batch(seed, per_token_adv=False, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.tensor([T, 3, 0, 1, 5])  # a full row, short rows, an empty row
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.int64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) if per_token_adv else torch.randn(B, generator=g, dtype=torch.float64)
    entropy = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    sampling = old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return dict(logp=logp, old=old, ref=ref, mask=mask, adv=adv, entropy=entropy, sampling=sampling)


def trl_loss(batch, loss_type, *, level="token", beta=0.0, bias_kl=True, delta=None, epsilon=0.2, epsilon_high=None,
             ga=1, num_processes=1, steps_per_generation=1, num_items=None, max_completion_length=T,
             entropy_coef=0.0, is_ratio=None, tau_pos=1.0, tau_neg=1.05, vespo=(2.0, 3.0, 3.0, 2.0),
             off_policy_mask_threshold=None, top_entropy_quantile=1.0, sampling=None):
    """(loss, d loss / d logp) from TRL's _compute_loss."""
    logp = batch["logp"].clone().requires_grad_(True)
    entropy = batch["entropy"].clone().requires_grad_(True)
    args = SimpleNamespace(
        delta=delta, use_bias_correction_kl=bias_kl, steps_per_generation=steps_per_generation,
        sapo_temperature_pos=tau_pos, sapo_temperature_neg=tau_neg,
        vespo_k_pos=vespo[0], vespo_lambda_pos=vespo[1], vespo_k_neg=vespo[2], vespo_lambda_neg=vespo[3],
    )
    accelerator = SimpleNamespace(
        gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x,
        num_processes=num_processes, sync_gradients=True, pad_across_processes=lambda x, dim, pad_index: x,
    )
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda model, *a, **k: (logp, entropy, None),
        aux_loss_enabled=False, top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=off_policy_mask_threshold, get_off_policy_mask=GRPOTrainer.get_off_policy_mask,
        get_gamma_weights=GRPOTrainer.get_gamma_weights,
        importance_sampling_level=level, beta=beta, loss_type=loss_type,
        epsilon_low=epsilon, epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        args=args, use_vllm=is_ratio is not None, vllm_importance_sampling_correction=is_ratio is not None,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=ga,
        max_completion_length=max_completion_length, accelerator=accelerator,
        _entropy_bonus_enabled=entropy_coef != 0.0, use_adaptive_entropy=False, entropy_coef=entropy_coef,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    mask = batch["mask"]
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
        "advantages": batch["adv"], "old_per_token_logps": batch["old"], "ref_per_token_logps": batch["ref"],
        "num_items_in_batch": mask.sum() if num_items is None else torch.tensor(float(num_items)),
    }
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    if sampling is not None:
        inputs["sampling_per_token_logps"] = sampling
    stub.get_high_entropy_mask = lambda *a: GRPOTrainer.get_high_entropy_mask(stub, *a)
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    grads = torch.autograd.grad(loss, (logp, entropy), allow_unused=True)
    return loss.detach(), grads[0], grads[1]


def ours(batch, kw, *, entropy=False, **extra):
    logp = batch["logp"].clone().requires_grad_(True)
    h = batch["entropy"].clone().requires_grad_(True) if entropy else None
    loss, metrics = fusedrl.policy_loss(
        logp, batch["old"], batch["adv"], batch["mask"], ref_logp=batch["ref"], entropy=h, **kw, **extra
    )
    inputs = (logp, h) if entropy else (logp,)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return loss.detach(), grads[0], (grads[1] if entropy else None), metrics


def assert_same(a, b):
    assert torch.isfinite(a[0]) and a[1] is not None
    torch.testing.assert_close(a[0], b[0], **TOL)
    torch.testing.assert_close(a[1], b[1], **TOL)


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]


# vespo takes the token level only (presets.trl refuses "sequence": test_vespo_refusals)
LEVELS = [(lt, level) for lt in LOSS_TYPES for level in ("token", "sequence") if (lt, level) != ("vespo", "sequence")]


@pytest.mark.parametrize("loss_type,level", LEVELS)
@pytest.mark.parametrize("beta,bias_kl", [(0.0, True), (0.04, True), (0.04, False)])
@pytest.mark.parametrize("delta", [None, 1.3])
@pytest.mark.parametrize("epsilon_high", [None, 0.28, 1.3])
def test_compute_loss_grid(loss_type, level, beta, bias_kl, delta, epsilon_high):
    batch = make_batch(zlib.crc32(repr((loss_type, level, beta, bias_kl, delta, epsilon_high)).encode()) % 1000)
    hp = dict(epsilon=0.2, epsilon_high=epsilon_high, delta=delta, importance_sampling_level=level, beta=beta,
              use_bias_correction_kl=bias_kl)
    max_length = 9 if loss_type == "dr_grpo" else None  # TRL's max_completion_length != T
    ref = trl_loss(batch, loss_type, level=level, beta=beta, bias_kl=bias_kl, delta=delta, epsilon_high=epsilon_high,
                   max_completion_length=max_length or T)
    got = ours(batch, presets.trl(loss_type, **hp), max_length=max_length)
    assert_same(got, ref)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_per_token_advantages_and_sapo_temperatures(loss_type):
    batch = make_batch(7, per_token_adv=True, spread=0.8)
    ref = trl_loss(batch, loss_type, epsilon_high=0.28, beta=0.04, tau_pos=0.7, tau_neg=2.0)
    kw = presets.trl(loss_type, epsilon_high=0.28, beta=0.04, sapo_temperature_pos=0.7, sapo_temperature_neg=2.0)
    assert_same(ours(batch, kw), ref)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradient_accumulation_and_global_counts(loss_type):
    """TRL's normalizers map onto num_tokens / num_sequences (policy_loss docstring, 'Scaling')."""
    batch = make_batch(11)
    ga, processes, spg, items = 2, 2, 4, 37
    ref = trl_loss(batch, loss_type, ga=ga, num_processes=processes, steps_per_generation=spg, num_items=items)
    local_tokens = float(batch["mask"].sum())
    counts = {
        "grpo": dict(num_sequences=B * ga), "sapo": dict(num_sequences=B * ga), "luspo": dict(num_sequences=B * ga),
        "dr_grpo": dict(num_sequences=B * ga, max_length=T), "bnpo": dict(num_tokens=local_tokens * ga),
        "dapo": dict(num_tokens=items * ga / (processes * spg)), "cispo": dict(num_tokens=items * ga / (processes * spg)),
        "vespo": dict(num_tokens=items * ga / (processes * spg)),
    }[loss_type]
    assert_same(ours(batch, presets.trl(loss_type), **counts), ref)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_entropy_bonus(loss_type):
    """TRL's entropy bonus is a token mean whatever the loss type; its gradient reaches the entropies."""
    batch = make_batch(13)
    ref = trl_loss(batch, loss_type, entropy_coef=0.05)
    got = ours(batch, presets.trl(loss_type, entropy_coef=0.05), entropy=True)
    assert_same(got, ref)
    torch.testing.assert_close(got[2], ref[2], **TOL)


def test_metrics_match_trl_clip_ratios():
    batch = make_batch(3, spread=0.8)
    stub_metrics = {}
    loss_type = "dapo"
    logp = batch["logp"]
    # TRL logs clip fractions as a global masked mean of (coef_1 < 1 - eps_low) & (A < 0), etc.
    coef_1 = torch.exp(logp - batch["old"])
    adv = batch["adv"][:, None]
    m = batch["mask"].bool()
    stub_metrics["low"] = ((coef_1 < 0.8) & (adv < 0))[m].double().mean()
    stub_metrics["high"] = ((coef_1 > 1.28) & (adv > 0))[m].double().mean()
    _, _, _, metrics = ours(batch, presets.trl(loss_type, epsilon_high=0.28))
    assert float(stub_metrics["low"] + stub_metrics["high"]) > 0  # the case exercises clipping
    torch.testing.assert_close(metrics["clipfrac_low"], stub_metrics["low"])
    torch.testing.assert_close(metrics["clipfrac_high"], stub_metrics["high"])
    torch.testing.assert_close(metrics["ratio_mean"], coef_1[m].mean())


# ---------------------------------------------------------------------------------------------
# vLLM importance-sampling correction, with TRL's own ratio code


def _trl_is_block():
    """The statements of `_generate_and_score_completions` that compute the vLLM IS ratio."""
    src = textwrap.dedent(inspect.getsource(GRPOTrainer._generate_and_score_completions))
    anchor = src.index("per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps)")
    start = src.rindex("if self.use_vllm and self.vllm_importance_sampling_correction:", 0, anchor)
    start = src.rindex("\n", 0, start) + 1
    end = src.index("# Compute the per-token log probabilities for the reference model", start)
    block = textwrap.dedent(src[start:end])
    assert "vllm_importance_sampling_ratio = torch.exp(logps_diff)" in block
    return compile(block, "<trl vllm IS block>", "exec")


IS_BLOCK = _trl_is_block()


def trl_is_ratio(batch, mode, clip_max, clip_min):
    stub = SimpleNamespace(
        use_vllm=True, vllm_importance_sampling_correction=True, vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_max=clip_max, vllm_importance_sampling_clip_min=clip_min,
    )
    scope = dict(self=stub, completion_mask=batch["mask"], tool_mask=None, old_per_token_logps=batch["old"],
                 sampling_per_token_logps=batch["sampling"], torch=torch, math=math)
    exec(IS_BLOCK, scope)
    return scope["vllm_importance_sampling_ratio"]


IS_CASES = [
    ("token_truncate", 3.0, None), ("token_truncate", 1.5, 0.5), ("token_truncate", None, 0.8),
    ("token_mask", 3.0, None), ("token_mask", 1.5, 0.5), ("token_mask", None, 0.8),
    ("sequence_truncate", 3.0, None), ("sequence_truncate", 2.0, 0.3),
    ("sequence_mask", 3.0, None), ("sequence_mask", 2.0, 0.3),
]


@pytest.mark.parametrize("mode,clip_max,clip_min", IS_CASES)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
def test_vllm_importance_sampling_correction(mode, clip_max, clip_min, loss_type):
    batch = make_batch(17)
    ratio = trl_is_ratio(batch, mode, clip_max, clip_min)
    ref = trl_loss(batch, loss_type, is_ratio=ratio, beta=0.04)
    kw = presets.trl(loss_type, beta=0.04, vllm_importance_sampling_correction=True,
                     vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_max=clip_max,
                     vllm_importance_sampling_clip_min=clip_min)
    got = ours(batch, kw, rollout_logp=batch["sampling"])
    assert_same(got, ref)
    without = ours(batch, presets.trl(loss_type, beta=0.04))
    assert not torch.allclose(got[1], without[1])  # the correction changes the gradient here


# ---------------------------------------------------------------------------------------------
# vespo, the off-policy sequence mask and the top-entropy-quantile mask (TRL's own methods)


@pytest.mark.parametrize("vespo", [(2.0, 3.0, 3.0, 2.0), (1.0, 0.5, 4.0, 0.0), (3.0, 1.0, 0.5, 6.0)])
@pytest.mark.parametrize("spread", [0.1, 0.6, 3.0])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_vespo_gamma_weights(vespo, spread, per_token_adv):
    batch = make_batch(int(spread * 10) + len(vespo), per_token_adv=per_token_adv, spread=spread)
    ref = trl_loss(batch, "vespo", beta=0.04, vespo=vespo)
    kw = presets.trl("vespo", beta=0.04, vespo_k_pos=vespo[0], vespo_lambda_pos=vespo[1], vespo_k_neg=vespo[2],
                     vespo_lambda_neg=vespo[3])
    for backend in ("torch", "cpu"):
        assert_same(ours(batch, kw, backend=backend), ref)


def test_vespo_refusals():
    with pytest.raises(ValueError, match="importance_sampling_level"):
        presets.trl("vespo", importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="vllm_importance_sampling_correction"):
        presets.trl("vespo", vllm_importance_sampling_correction=True)
    batch = make_batch(1)
    with pytest.raises(ValueError, match="rollout_correction"):
        ours(batch, dict(surrogate="vespo", rollout_correction="token_truncate"), rollout_logp=batch["sampling"])
    with pytest.raises(ValueError, match="ratio must be 'token'"):
        ours(batch, dict(surrogate="vespo", ratio="sequence"))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "vespo"])
@pytest.mark.parametrize("threshold", [-0.2, 0.0, 0.3])
@pytest.mark.parametrize("with_sampling", [False, True])
def test_off_policy_mask(loss_type, threshold, with_sampling):
    batch = make_batch(23, spread=0.8)
    sampling = batch["sampling"] if with_sampling else None
    ref = trl_loss(batch, loss_type, beta=0.04, off_policy_mask_threshold=threshold, sampling=sampling)
    kw = presets.trl(loss_type, beta=0.04, off_policy_mask_threshold=threshold)
    for backend in ("torch", "cpu"):
        got = ours(batch, kw, rollout_logp=sampling, backend=backend)
        assert_same(got, ref)
    unmasked = ours(batch, presets.trl(loss_type, beta=0.04), rollout_logp=sampling)
    if threshold < 0.3:  # the mask drops a sequence here
        assert not torch.allclose(got[1], unmasked[1])


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "vespo"])
@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.9])
def test_top_entropy_quantile(loss_type, quantile):
    """TRL's mask keeps tokens at or above the (1 - q)-quantile of the valid entropies; its entropy
    bonus then averages over the kept tokens (the trainer integration's job: checked there)."""
    batch = make_batch(29, spread=0.5)
    ref = trl_loss(batch, loss_type, beta=0.04, top_entropy_quantile=quantile)
    kw = presets.trl(loss_type, beta=0.04, top_entropy_quantile=quantile)
    for backend in ("torch", "cpu"):
        got = ours(batch, kw, entropy=True, backend=backend)
        assert_same(got, ref)
    threshold = float(torch.quantile(batch["entropy"][batch["mask"].bool()].float(), 1 - quantile))
    explicit = ours(batch, dict(kw, top_entropy_quantile=1.0, entropy_mask_threshold=threshold), entropy=True)
    assert_same(explicit, ref)
    assert not torch.allclose(got[1], ours(batch, presets.trl(loss_type, beta=0.04))[1])
