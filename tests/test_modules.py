"""PolicyLoss / GRPOLoss / DPOLoss: the modules give exactly the functions' values, metrics and
gradients; GRPOLoss's defaults are TRL's GRPOConfig defaults (read from the installed TRL); bad
options fail at construction with an error naming the option."""

import dataclasses

import pytest
import torch
from torch import nn

import fusedrl
from fusedrl import presets

TESTED_WITH = "trl 1.16.0"


def batch(B=5, Tn=6, seed=0, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    x = -torch.rand(B, Tn, generator=g, dtype=torch.float64) * 3
    mask = torch.arange(Tn)[None, :] < torch.tensor([6, 3, 0, 1, 5])[:B, None]
    return dict(
        x=x,
        o=x + 0.4 * torch.randn(B, Tn, generator=g, dtype=torch.float64),
        r=x + 0.3 * torch.randn(B, Tn, generator=g, dtype=torch.float64),
        mu=x + 0.2 * torch.randn(B, Tn, generator=g, dtype=torch.float64),
        H=torch.rand(B, Tn, generator=g, dtype=torch.float64),
        A=torch.randn((B, Tn) if per_token_adv else (B,), generator=g, dtype=torch.float64),
        mask=mask,
        groups=torch.tensor([0, 0, 1, 1, 2])[:B],
    )


def run(fn, d, **per_call):
    """loss, metrics and the gradients w.r.t. logp and entropy of fn(logp, old, A, mask, ...)."""
    x = d["x"].clone().requires_grad_(True)
    h = d["H"].clone().requires_grad_(True)
    loss, metrics = fn(x, d["o"], d["A"], d["mask"], entropy=h, **per_call)
    gx, gh = torch.autograd.grad(loss, (x, h), allow_unused=True)
    return loss.detach(), metrics, gx, gh


def assert_same(a, b):
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    for ga, gb in zip(a[2:], b[2:]):
        assert (ga is None and gb is None) or torch.equal(ga, gb)


POLICY_OPTIONS = [
    {},
    dict(aggregation="seq-mean-token-mean", clip_high=0.28, beta=0.04, kl="k3", use_bias_correction_kl=True),
    dict(surrogate="cispo", clip_high=4.0, entropy_coef=0.01, entropy_aggregation="token-mean"),
    dict(surrogate="sapo", ratio="sequence", aggregation="seq-mean-token-sum"),
    dict(ratio="cumulative", aggregation="balanced"),
    dict(aggregation="seq-mean-token-sum-norm", max_length=8, rollout_correction="token_truncate", rollout_cap=2.0),
    presets.verl("vanilla", "seq-mean-token-sum-norm", clip_ratio_high=0.28, use_kl_loss=True),
    presets.verl("geo_mean", "token-mean"),
    presets.trl("dr_grpo", epsilon_high=0.28, delta=1.5, beta=0.04),
]


@pytest.mark.parametrize("options", POLICY_OPTIONS)
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_policy_loss_module_equals_function(options, per_token_adv):
    d = batch(per_token_adv=per_token_adv)
    per_call = dict(ref_logp=d["r"], rollout_logp=d["mu"], group_ids=d["groups"], num_tokens=13)
    module = fusedrl.PolicyLoss(**options)
    got = run(module, d, **per_call)
    want = run(lambda *a, **kw: fusedrl.policy_loss(*a, **options, **kw), d, **per_call)
    assert_same(got, want)


def test_per_call_normalizers_override_construction_defaults():
    d = batch()
    module = fusedrl.PolicyLoss(aggregation="seq-mean-token-sum-norm", max_length=8, num_sequences=10)
    assert_same(run(module, d), run(lambda *a, **kw: fusedrl.policy_loss(
        *a, aggregation="seq-mean-token-sum-norm", max_length=8, num_sequences=10, **kw), d))
    assert_same(run(module, d, max_length=12), run(lambda *a, **kw: fusedrl.policy_loss(
        *a, aggregation="seq-mean-token-sum-norm", max_length=12, num_sequences=10, **kw), d))


def test_policy_module_is_a_plain_module():
    module = fusedrl.PolicyLoss(aggregation="seq-mean-token-mean", beta=0.04)
    assert isinstance(module, nn.Module) and not list(module.parameters()) and module.state_dict() == {}
    assert repr(module) == "PolicyLoss(aggregation='seq-mean-token-mean', beta=0.04)"
    options = module.options
    options["beta"] = 1.0  # a copy: the module keeps its options
    assert module.options == {"aggregation": "seq-mean-token-mean", "beta": 0.04}
    d = batch()
    seq = nn.ModuleDict({"loss": module})
    loss, _ = seq["loss"](d["x"], d["o"], d["A"], d["mask"], ref_logp=d["r"])
    assert torch.isfinite(loss)
    for name in ("PolicyLoss", "GRPOLoss", "DPOLoss"):
        assert name in fusedrl.__all__ and getattr(fusedrl, name) is getattr(fusedrl.modules, name)


@pytest.mark.parametrize("options,exc,name", [
    (dict(clip_low=-0.1), ValueError, "clip_low"),
    (dict(clip_high=-2.0), ValueError, "clip_high"),
    (dict(aggregation="mean"), ValueError, "aggregation"),
    (dict(surrogate="ppo"), ValueError, "surrogate"),
    (dict(kl="k4"), ValueError, "kl"),
    (dict(beta="0.1"), TypeError, "beta"),
    (dict(surrogate="cispo", delta=1.5), ValueError, "delta"),
    (dict(surrogate="geo_mean", ratio="sequence"), ValueError, "ratio"),
    (dict(rollout_correction="icepop"), ValueError, "rollout_cap_low"),
    (dict(num_tokens=-1), ValueError, "num_tokens"),
    (dict(max_length=0), ValueError, "max_length"),
    (dict(exclude_empty_rows=1), TypeError, "exclude_empty_rows"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(clip_ratio=0.2), TypeError, "clip_ratio"),
    (dict(epsilon=0.2), TypeError, "epsilon.*GRPOLoss"),
    (dict(loss_mode="gspo"), TypeError, "loss_mode.*presets.verl"),
    (dict(ref_logp=torch.zeros(2, 2)), TypeError, "ref_logp.*forward"),
    (dict(entropy=torch.zeros(2, 2)), TypeError, "entropy.*forward"),
])
def test_policy_loss_constructor_errors_name_the_option(options, exc, name):
    with pytest.raises(exc, match=f"PolicyLoss: .*{name}"):
        fusedrl.PolicyLoss(**options)


def test_policy_forward_errors():
    d = batch()
    module = fusedrl.PolicyLoss(beta=0.04)
    with pytest.raises(TypeError, match="beta is an option of the module"):
        module(d["x"], d["o"], d["A"], d["mask"], ref_logp=d["r"], beta=0.1)
    with pytest.raises(TypeError, match="unexpected keyword 'refs'"):
        module(d["x"], d["o"], d["A"], d["mask"], refs=d["r"])
    with pytest.raises(ValueError, match="needs ref_logp"):  # per-call requirements are checked per call
        module(d["x"], d["o"], d["A"], d["mask"])


# ---------------------------------------------------------------------------------------------
# GRPOLoss


@pytest.fixture(scope="module")
def trl_defaults():
    grpo_config = pytest.importorskip("trl.trainer.grpo_config")
    return {f.name: f.default for f in dataclasses.fields(grpo_config.GRPOConfig)}


def test_grpo_defaults_are_trls(trl_defaults):
    """Every default GRPOLoss takes from TRL equals the installed GRPOConfig's field default."""
    assert doc_names_trl_version()
    for name, value in fusedrl.GRPOLoss.TRL_DEFAULTS.items():
        assert name in trl_defaults, name
        assert trl_defaults[name] == value, (name, trl_defaults[name], value)
    module = fusedrl.GRPOLoss()
    cfg = trl_defaults
    expected = presets.trl(
        cfg["loss_type"], epsilon=cfg["epsilon"], epsilon_high=cfg["epsilon_high"], delta=cfg["delta"],
        importance_sampling_level=cfg["importance_sampling_level"], beta=cfg["beta"],
        sapo_temperature_pos=cfg["sapo_temperature_pos"], sapo_temperature_neg=cfg["sapo_temperature_neg"],
        use_bias_correction_kl=cfg["use_bias_correction_kl"], entropy_coef=cfg["entropy_coef"],
        # TRL applies the vLLM correction only when generating with vLLM
        vllm_importance_sampling_correction=cfg["use_vllm"] and cfg["vllm_importance_sampling_correction"],
    )
    assert module.options == expected
    assert module.options["aggregation"] == presets.TRL_LOSS_TYPES[cfg["loss_type"]]
    assert module.trl_options == fusedrl.GRPOLoss.TRL_DEFAULTS


def doc_names_trl_version():
    doc = fusedrl.GRPOLoss.__doc__
    return fusedrl.GRPOLoss.TRL_VERSION in doc and fusedrl.GRPOLoss.TRL_VERSION in TESTED_WITH and "dapo" in doc


@pytest.mark.parametrize("overrides", [
    {},
    dict(loss_type="grpo", beta=0.04),
    dict(loss_type="dapo", epsilon_high=0.28, importance_sampling_level="sequence"),
    dict(loss_type="cispo", epsilon_high=5.0),
    dict(loss_type="sapo", sapo_temperature_neg=2.0),
    dict(loss_type="luspo", delta=1.4, use_bias_correction_kl=False, beta=0.01),
])
def test_grpo_loss_equals_policy_loss_with_the_trl_preset(overrides):
    d = batch()
    module = fusedrl.GRPOLoss(**overrides)
    kwargs = presets.trl(**{"loss_type": "dapo", **overrides})
    assert module.options == kwargs
    per_call = dict(ref_logp=d["r"], num_tokens=11)
    want = run(lambda *a, **kw: fusedrl.policy_loss(*a, **kwargs, **kw), d, **per_call)
    assert_same(run(module, d, **per_call), want)


def test_grpo_loss_dr_grpo_and_extras():
    d = batch()
    module = fusedrl.GRPOLoss(loss_type="dr_grpo", max_length=16, log_ratio_clamp=10.0, kl="k1", beta=0.1)
    kwargs = {**presets.trl("dr_grpo", kl="k1", beta=0.1), "max_length": 16, "log_ratio_clamp": 10.0}
    assert module.options == kwargs
    assert "max_length=16" in repr(module)
    assert_same(run(module, d, ref_logp=d["r"]), run(lambda *a, **kw: fusedrl.policy_loss(*a, **kwargs, **kw), d,
                                                     ref_logp=d["r"]))


def test_grpo_loss_vllm_correction_follows_use_vllm():
    d = batch()
    assert fusedrl.GRPOLoss().options.get("rollout_correction") is None
    module = fusedrl.GRPOLoss(use_vllm=True)
    assert module.options["rollout_correction"] == "sequence_mask" and module.options["rollout_cap"] == 3.0
    with pytest.raises(ValueError, match="needs rollout_logp"):
        module(d["x"], d["o"], d["A"], d["mask"])
    kwargs = presets.trl("dapo", vllm_importance_sampling_correction=True)
    assert_same(run(module, d, rollout_logp=d["mu"]),
                run(lambda *a, **kw: fusedrl.policy_loss(*a, **kwargs, **kw), d, rollout_logp=d["mu"]))
    off = fusedrl.GRPOLoss(use_vllm=True, vllm_importance_sampling_correction=False)
    assert off.options.get("rollout_correction") is None


@pytest.mark.parametrize("overrides,exc,match", [
    (dict(clip_low=0.1), TypeError, "clip_low is set from TRL's epsilon"),
    (dict(aggregation="token-mean"), TypeError, "aggregation is set from TRL's loss_type"),
    (dict(rollout_cap=2.0), TypeError, "vllm_importance_sampling_clip_max"),
    (dict(num_items_in_batch=100), TypeError, "num_items_in_batch is a normalizer; pass num_tokens="),
    (dict(max_completion_length=64), TypeError, "max_completion_length is a normalizer; pass max_length="),
    (dict(loss_type="ppo"), ValueError, "loss_type"),
    (dict(importance_sampling_level="tok"), ValueError, "importance_sampling_level"),
    (dict(epsilon=-0.1), ValueError, "clip_low.*epsilon=-0.1"),
    (dict(epsilon_high=-3.0), ValueError, "clip_high.*epsilon_high=-3.0"),
    (dict(loss_type="sapo", sapo_temperature_pos=0.0), ValueError, "tau_pos.*sapo_temperature_pos"),
    (dict(use_vllm=True, vllm_importance_sampling_mode="icepop"), ValueError, "vllm_importance_sampling_mode"),
    (dict(use_vllm="yes"), TypeError, "use_vllm"),
    (dict(scale_rewards="group"), TypeError, "scale_rewards"),
])
def test_grpo_loss_constructor_errors(overrides, exc, match):
    with pytest.raises(exc, match=f"GRPOLoss: .*{match}"):
        fusedrl.GRPOLoss(**overrides)


# ---------------------------------------------------------------------------------------------
# DPOLoss


def pairs(B=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 20, (2, B), generator=g)
    pc, pr = (-torch.rand(2, B, generator=g, dtype=torch.float64) * lengths * 2).unbind()
    rc = pc - torch.randn(B, generator=g, dtype=torch.float64)
    rr = pr - torch.randn(B, generator=g, dtype=torch.float64)
    return (pc, pr, rc, rr), dict(chosen_lengths=lengths[0], rejected_lengths=lengths[1])


def run_pairs(fn, logps, **kw):
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in logps]
    loss, metrics = fn(*leaves, **kw)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return loss.detach(), metrics, *grads


DPO_OPTIONS = [
    {},
    dict(loss_type="ipo", beta=0.3),
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    dict(loss_type="robust", label_smoothing=0.1, f_divergence_type="js_divergence"),
    dict(loss_type="sigmoid", soft_labels=0.9, rpo_alpha=0.5),
    dict(loss_type="discopop", discopop_tau=0.1),
    dict(loss_type="apo_zero"),
]


@pytest.mark.parametrize("options", DPO_OPTIONS)
def test_dpo_loss_module_equals_function(options):
    logps, lengths = pairs()
    w = torch.linspace(0.5, 1.5, 6, dtype=torch.float64)
    got = run_pairs(fusedrl.DPOLoss(**options), logps, weights=w, **lengths)
    want = run_pairs(lambda *a, **kw: fusedrl.preference_loss(*a, **options, **kw), logps, weights=w, **lengths)
    assert_same(got, want)


def test_dpo_loss_reference_free_simpo_and_per_call_soft_labels():
    logps, lengths = pairs()
    module = fusedrl.DPOLoss(loss_type="simpo", beta=2.0, gamma=0.5, soft_labels=0.8)
    got = run_pairs(module, logps[:2], **lengths)
    want = run_pairs(lambda *a, **kw: fusedrl.preference_loss(*a, loss_type="simpo", beta=2.0, gamma=0.5,
                                                              soft_labels=0.8, **kw), logps[:2], **lengths)
    assert_same(got, want)
    soft = torch.linspace(0.6, 1.0, 6, dtype=torch.float64)  # a per-call tensor overrides the number
    got = run_pairs(module, logps[:2], soft_labels=soft, **lengths)
    want = run_pairs(lambda *a, **kw: fusedrl.preference_loss(*a, loss_type="simpo", beta=2.0, gamma=0.5, **kw),
                     logps[:2], soft_labels=soft, **lengths)
    assert_same(got, want)
    assert repr(module) == "DPOLoss(loss_type='simpo', beta=2.0, gamma=0.5, soft_labels=0.8)"


@pytest.mark.parametrize("options,exc,name", [
    (dict(beta=0.0), ValueError, "beta"),
    (dict(loss_type="dpo"), ValueError, "loss_type"),
    (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), ValueError, "loss_weights"),
    (dict(loss_type="robust", label_smoothing=0.6), ValueError, "label_smoothing"),
    (dict(loss_type="exo_pair"), ValueError, "label_smoothing"),
    (dict(loss_type="bco_pair", f_divergence_type="forward_kl"), ValueError, "f_divergence_type"),
    (dict(f_divergence_type="kl"), ValueError, "f_divergence_type"),
    (dict(discopop_tau=-1.0), ValueError, "discopop_tau"),
    (dict(soft_labels=1.5), ValueError, "soft_labels"),
    (dict(soft_labels=torch.ones(2)), TypeError, "soft_labels"),
    (dict(loss_type="hinge", soft_labels=0.9), ValueError, "soft_labels"),
    (dict(weights=torch.ones(2)), TypeError, "weights.*forward"),
    (dict(chosen_lengths=torch.ones(2)), TypeError, "chosen_lengths.*forward"),
    (dict(average_log_prob=1), TypeError, "average_log_prob"),
    (dict(simpo_gamma=0.5), TypeError, "simpo_gamma"),
])
def test_dpo_loss_constructor_errors_name_the_option(options, exc, name):
    with pytest.raises(exc, match=f"DPOLoss: .*{name}"):
        fusedrl.DPOLoss(**options)


def test_dpo_forward_errors():
    logps, lengths = pairs()
    module = fusedrl.DPOLoss(loss_type="ipo")
    with pytest.raises(TypeError, match="beta is an option of the module"):
        module(*logps, beta=0.2, **lengths)
    with pytest.raises(ValueError, match="chosen_lengths is required"):
        module(*logps)
