"""fusedrl.integrations.openrlhf against OpenRLHF 0.11.2's own openrlhf/models/loss.py.

OpenRLHF's package imports deepspeed (openrlhf/models/__init__.py, models/utils.py), which is not
installed, so its loss module is loaded alone from the installed file, with its one helper
(``masked_mean``) taken from the installed openrlhf/models/utils.py by source: both are
OpenRLHF's code, unmodified. Loss, gradients and every returned metric are compared in float64.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import sys
import types

import pytest
import torch

from fusedrl.integrations import openrlhf as ours

TESTED_WITH = "openrlhf 0.11.2"
TOL = dict(rtol=1e-7, atol=1e-10)


def _load_openrlhf_loss():
    spec = importlib.util.find_spec("openrlhf")
    if spec is None:
        pytest.skip("openrlhf is not installed (scripts/setup.sh installs it from the lock)")
    models = pathlib.Path(next(iter(spec.submodule_search_locations))) / "models"
    utils_src = (models / "utils.py").read_text()
    tree = ast.parse(utils_src)
    wanted = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "masked_mean"]
    utils = types.ModuleType("_openrlhf_models.utils")
    utils.__dict__.update(torch=torch, Optional=__import__("typing").Optional)
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(models / "utils.py"), "exec"), utils.__dict__)
    package = types.ModuleType("_openrlhf_models")
    package.__path__ = [str(models)]
    sys.modules["_openrlhf_models"], sys.modules["_openrlhf_models.utils"] = package, utils
    loss_spec = importlib.util.spec_from_file_location("_openrlhf_models.loss", models / "loss.py")
    module = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(module)
    return module


ORL = _load_openrlhf_loss()
B, T = 5, 7


def batch(seed, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    rollout = old + 0.6 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.tensor([T, 4, 1, 6, 3])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    old_values = values + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    returns = values + torch.randn(B, T, generator=g, dtype=torch.float64)
    return dict(logp=logp, old=old, rollout=rollout, mask=mask, adv=adv, values=values, old_values=old_values,
                returns=returns)


def run(module, first, *args, **kwargs):
    x = first.clone().requires_grad_(True)
    out = module(x, *args, **kwargs)
    out = out if isinstance(out, tuple) else (out,)
    (grad,) = torch.autograd.grad(out[0], x)
    return out, grad


def assert_outputs(got, want):
    (out_g, grad_g), (out_w, grad_w) = got, want
    assert len(out_g) == len(out_w)
    for a, b in zip(out_g, out_w):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a.double(), b.double(), **TOL)
    torch.testing.assert_close(grad_g, grad_w, **TOL)
    assert torch.count_nonzero(grad_w) > 0


POLICY_CASES = [
    dict(),
    dict(clip_eps_low=0.1, clip_eps_high=0.28),
    dict(dual_clip=3.0),
    dict(token_level_loss=False, clip_eps_high=0.3),
    dict(policy_loss_type="gspo", clip_eps_low=3e-4, clip_eps_high=4e-4),
    dict(is_correction_level="token", is_correction_mode="clip", is_correction_threshold=(0.5, 2.0)),
    dict(is_correction_level="token", is_correction_mode="mask", is_correction_threshold=(0.6, 1.8), dual_clip=2.0),
    dict(is_correction_level="token", is_correction_mode="mask", token_level_loss=False),
]
COUNTS = [dict(), dict(dp_size=4, batch_num_tokens=41.0, global_batch_size=9.0)]


@pytest.mark.parametrize("options", POLICY_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("counts", COUNTS, ids=["local", "global"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_policy_loss(options, counts, backend):
    d = batch(len(options) + 3 * len(counts), spread=0.6)
    args = (d["old"], d["adv"], d["mask"])
    kw = dict(rollout_log_probs=d["rollout"], **counts)
    want = run(ORL.PolicyLoss(**options), d["logp"], *args, **kw)
    got = run(ours.PolicyLoss(**options, backend=backend), d["logp"], *args, **kw)
    assert_outputs(got, want)


@pytest.mark.parametrize("options", [dict(is_correction_level="seq"),
                                     dict(is_correction_level="token", is_correction_gating="tv",
                                          is_correction_threshold=(0.0, 0.1)),
                                     dict(policy_loss_type="gspo", is_correction_level="token")],
                         ids=["seq", "tv", "gspo-correction"])
def test_policy_loss_refuses_what_it_cannot_reproduce(options):
    ORL.PolicyLoss(**options)  # OpenRLHF accepts these
    with pytest.raises(ValueError, match="not supported"):
        ours.PolicyLoss(**options)


def test_policy_loss_bad_options():
    with pytest.raises(ValueError, match="policy_loss_type"):
        ours.PolicyLoss(policy_loss_type="grpo")
    with pytest.raises(ValueError, match="dual_clip"):
        ours.PolicyLoss(dual_clip=1.0)


@pytest.mark.parametrize("ipo", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("backend", ["torch", None])
def test_dpo_loss(ipo, label_smoothing, backend):
    g = torch.Generator().manual_seed(int(ipo) * 7 + int(label_smoothing * 10))
    pc, pr, rc, rr = (-torch.rand(6, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    want = run(ORL.DPOLoss(0.1, label_smoothing, ipo), pc, pr, rc, rr)
    got = run(ours.DPOLoss(0.1, label_smoothing, ipo, backend=backend), pc, pr, rc, rr)
    assert_outputs(got, want)


VALUE_CASES = [dict(), dict(clip_eps=0.2), dict(clip_eps=0.05, token_level_loss=False)]


@pytest.mark.parametrize("options", VALUE_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("counts", COUNTS, ids=["local", "global"])
def test_value_loss(options, counts):
    if not hasattr(__import__("fusedrl"), "value_loss"):
        pytest.fail("fusedrl.value_loss is missing")
    d = batch(11)
    args = (d["old_values"], d["returns"], d["mask"])
    want = run(ORL.ValueLoss(**options), d["values"], *args, **counts)
    got = run(ours.ValueLoss(**options), d["values"], *args, **counts)
    assert_outputs(got, want)
