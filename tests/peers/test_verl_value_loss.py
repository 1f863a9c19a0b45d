"""fusedrl.value_loss and fusedrl.integrations.verl (compute_value_loss, value_loss) against verl
0.9.1's core_algos.compute_value_loss and its critic loss verl/workers/utils/losses.py value_loss:
every loss_agg_mode, cliprange_value values (0 included), without and with the global-batch
arguments (fusedrl = verl(dp_size=D) / D), exact ties at the clip bounds (clip_ties="verl"
reproduces verl's gradient there, "clamp" does not), the clipfrac, verl's errors when a global count
is missing, and the critic loss function on verl's own TensorDict inputs."""

from functools import partial

import pytest
import torch

import fusedrl

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
losses = pytest.importorskip("verl.workers.utils.losses")
CriticConfig = pytest.importorskip("verl.workers.config").CriticConfig
tu = pytest.importorskip("verl.utils.tensordict_utils")
from tensordict import TensorDict  # noqa: E402  (verl's dependency)

from fusedrl.integrations import verl as fusedrl_verl  # noqa: E402

TESTED_WITH = "verl 0.9.1"
AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
GLOBAL = dict(dp_size=4, batch_num_tokens=97, global_batch_size=19, loss_scale_factor=11)
B, T = 6, 7
TOL = dict(rtol=1e-7, atol=1e-12)  # verl adds 1e-8 to seq-mean-token-mean's row counts and to the clipfrac's


def make_batch(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    vpreds = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = vpreds + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    returns = vpreds + torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.tensor([T, 4, 0, 1, 6, 3])  # includes a fully masked row
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return {k: t.to(dtype) for k, t in dict(vpreds=vpreds, values=values, returns=returns).items()} | dict(mask=mask)


def verl_loss(d, clip, agg, **glob):
    x = d["vpreds"].clone().requires_grad_(True)
    loss, clipfrac = core_algos.compute_value_loss(x, d["returns"], d["values"], d["mask"], clip, agg, **glob)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), clipfrac, g


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("clip", [0.0, 0.2, 0.5, 3.0])
@pytest.mark.parametrize("glob", [{}, GLOBAL], ids=["local", "global"])
@pytest.mark.parametrize("backend", ["cpu", "triton", "torch"])
def test_compute_value_loss(agg, clip, glob, backend):
    d = make_batch(seed=len(agg) + int(10 * clip))
    want = verl_loss(d, clip, agg, **glob)
    # fusedrl.value_loss: verl's / dp_size with verl's counts and rule for empty rows
    x = d["vpreds"].clone().requires_grad_(True)
    loss, metrics = fusedrl.value_loss(
        x, d["values"], d["returns"], d["mask"], clip=clip, clip_ties="verl", aggregation=agg,
        num_tokens=glob.get("batch_num_tokens"), num_sequences=glob.get("global_batch_size"),
        max_length=glob.get("loss_scale_factor"), exclude_empty_rows=True, backend=backend,
    )
    (g,) = torch.autograd.grad(loss, x)
    dp = glob.get("dp_size", 1)
    torch.testing.assert_close(loss * dp, want[0], **TOL)
    torch.testing.assert_close(g * dp, want[2], **TOL)
    torch.testing.assert_close(metrics["clipfrac"], want[1].double(), **TOL)
    # the integration: verl's signature and return values, the dp_size factor included
    x = d["vpreds"].clone().requires_grad_(True)
    vf_loss, vf_clipfrac = fusedrl_verl.compute_value_loss(x, d["returns"], d["values"], d["mask"], clip, agg, **glob)
    (g,) = torch.autograd.grad(vf_loss, x)
    torch.testing.assert_close(vf_loss, want[0], **TOL)
    torch.testing.assert_close(g, want[2], **TOL)
    torch.testing.assert_close(vf_clipfrac, want[1], **TOL)
    assert vf_clipfrac.dim() == 0 and not vf_clipfrac.requires_grad


def test_clip_is_active():
    """Guard: verl's clipfrac is well inside (0, 1) on these inputs."""
    _, clipfrac, _ = verl_loss(make_batch(0), 0.2, "token-mean")
    assert 0.2 < float(clipfrac) < 0.9


@pytest.mark.parametrize("clip", [0.25, 0.0])
def test_ties_follow_verl(clip):
    """v exactly at v_old +- c (and v = v_old with c = 0): clip_ties="verl" gives verl's gradient
    there (its min/max pass 1/2, or 1/4), the default "clamp" gives the clamp's (1)."""
    old = torch.tensor([[0.5, 0.5, 0.25, -1.0]], dtype=torch.float64)
    v = torch.tensor([[0.75, 0.25, 0.25, -0.5]], dtype=torch.float64)
    ret = torch.tensor([[2.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones_like(v, dtype=torch.bool)
    d = dict(vpreds=v, values=old, returns=ret, mask=mask)
    want = verl_loss(d, clip, "token-sum")
    x = v.clone().requires_grad_(True)
    vf_loss, _ = fusedrl_verl.compute_value_loss(x, ret, old, mask, clip, "token-sum")
    (g,) = torch.autograd.grad(vf_loss, x)
    torch.testing.assert_close(g, want[2], rtol=0, atol=0)
    x = v.clone().requires_grad_(True)
    loss, _ = fusedrl.value_loss(x, old, ret, mask, clip=clip, aggregation="token-sum")  # clip_ties="clamp"
    (g_clamp,) = torch.autograd.grad(loss, x)
    assert not torch.equal(g_clamp, want[2])
    torch.testing.assert_close(loss, want[0], rtol=0, atol=0)  # the values agree


def test_bfloat16_inputs():
    """verl computes in the input dtype, fusedrl in float32: within bfloat16's own error."""
    d = make_batch(3, torch.bfloat16)
    want = verl_loss({k: (t.double() if t.is_floating_point() else t) for k, t in d.items()}, 0.2, "token-mean")
    got, _ = fusedrl_verl.compute_value_loss(d["vpreds"], d["returns"], d["values"], d["mask"], 0.2)
    peer = verl_loss(d, 0.2, "token-mean")[0]
    assert abs(float(got) - float(want[0])) <= 2 * abs(float(peer) - float(want[0])) + 1e-6


def test_missing_global_counts_raise_as_verl():
    d = make_batch(1)
    args = (d["vpreds"], d["returns"], d["values"], d["mask"], 0.2)
    for agg, missing in (("token-mean", "batch_num_tokens"), ("seq-mean-token-mean", "global_batch_size"),
                         ("seq-mean-token-sum-norm", "global_batch_size")):
        with pytest.raises(ValueError, match=missing):
            core_algos.compute_value_loss(*args, agg, dp_size=2)
        with pytest.raises(ValueError, match=missing):
            fusedrl_verl.compute_value_loss(*args, agg, dp_size=2)
    with pytest.raises(ValueError, match="dp_size"):
        fusedrl_verl.compute_value_loss(*args, dp_size=0)
    with pytest.raises(ValueError, match="aggregation"):
        fusedrl_verl.compute_value_loss(*args, "seq-mean")


def critic_inputs(seed, glob):
    """The inputs of verl's critic loss: model_output["values"] in the remove-padding layout
    (total_nnz,) over prompt + response tokens, and the TensorDict with prompts, responses,
    attention_mask, values, returns, response_mask and the global-batch info."""
    g = torch.Generator().manual_seed(seed)
    P, R = 3, 5
    prompt_lens = torch.tensor([3, 1, 2, 3])
    response_lens = torch.tensor([5, 2, 4, 1])
    n = prompt_lens.numel()
    attn = torch.zeros(n, P + R, dtype=torch.int64)
    for i in range(n):
        attn[i, P - prompt_lens[i]:P] = 1  # left-padded prompts
        attn[i, P:P + response_lens[i]] = 1
    response_mask = attn[:, P:].clone()
    nnz = int(attn.sum())
    data = TensorDict({
        "prompts": torch.zeros(n, P, dtype=torch.int64), "responses": torch.zeros(n, R, dtype=torch.int64),
        "attention_mask": attn, "values": torch.randn(n, R, generator=g, dtype=torch.float64),
        "returns": torch.randn(n, R, generator=g, dtype=torch.float64), "response_mask": response_mask,
    }, batch_size=[n])
    tu.assign_non_tensor(data, dp_size=glob.get("dp_size", 1), batch_num_tokens=glob.get("batch_num_tokens"),
                         global_batch_size=glob.get("global_batch_size"))
    return torch.randn(nnz, generator=g, dtype=torch.float64), data


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("glob", [{}, dict(dp_size=2, batch_num_tokens=30, global_batch_size=8)],
                         ids=["local", "global"])
def test_critic_loss_function(agg, glob):
    """fusedrl_verl.value_loss vs verl's value_loss on the same config, model output and data:
    the loss, its gradient w.r.t. the model's values, and every metric."""
    config = CriticConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, cliprange_value=0.3, loss_agg_mode=agg,
                          loss_scale_factor=6 if glob else None)
    out = {}
    for name, fn in (("verl", losses.value_loss), ("fusedrl", fusedrl_verl.value_loss)):
        flat, data = critic_inputs(5, glob)
        x = flat.clone().requires_grad_(True)
        loss, metrics = partial(fn, config=config)(model_output={"values": x}, data=data)
        (g,) = torch.autograd.grad(loss, x)
        out[name] = (loss.detach(), g, metrics)
    torch.testing.assert_close(out["fusedrl"][0], out["verl"][0], **TOL)
    torch.testing.assert_close(out["fusedrl"][1], out["verl"][1], **TOL)
    mv, mf = out["verl"][2], out["fusedrl"][2]
    assert mv.keys() == mf.keys()
    assert mf["critic/vf_loss"].aggregation == mv["critic/vf_loss"].aggregation
    torch.testing.assert_close(torch.as_tensor(mf["critic/vf_loss"].values), torch.as_tensor(mv["critic/vf_loss"].values),
                               **TOL)
    for key in ("critic/vf_clipfrac", "critic/vpred_mean"):
        assert mf[key] == pytest.approx(mv[key], rel=1e-7, abs=1e-12), key
