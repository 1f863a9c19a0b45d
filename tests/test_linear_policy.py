"""LinearPolicyLoss equals policy_loss(token_logprobs(hidden @ weight.T + bias), ...) in loss and in
gradients w.r.t. hidden, weight and bias; and matches Liger's LigerFusedLinearGRPOLoss (0.8.5) on
the configurations Liger supports."""

import pytest
import torch

import fusedrl


def batch(B=3, T=7, H=16, V=301, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) / H**0.5
    bias = torch.randn(V, generator=g, dtype=dtype) * 0.1
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 1:] = False
    advantages = torch.randn(B, generator=g, dtype=dtype)
    ref_hidden = hidden + 0.05 * torch.randn(B, T, H, generator=g, dtype=dtype)
    old_logp = None
    return hidden, weight, bias, labels, mask, advantages, ref_hidden, old_logp


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize(
    "options",
    [
        dict(aggregation="token-mean", beta=0.04, clip_high=0.28),
        dict(aggregation="seq-mean-token-mean", entropy_coef=0.01),
        dict(aggregation="seq-mean-token-sum-norm", ratio="sequence", max_length=7),
        dict(surrogate="cispo", clip_high=4.0, aggregation="token-sum", beta=0.04, kl="low_var_kl"),
    ],
)
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_equals_unfused_composition(backend, options, chunk_size):
    hidden, weight, bias, labels, mask, adv, ref_hidden, _ = batch()
    h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    module = fusedrl.LinearPolicyLoss(temperature=0.9, chunk_size=chunk_size, backend=backend, **options)
    old = (fusedrl.token_logprobs(hidden @ weight.t() + bias, labels, temperature=0.9) + 0.02).detach()
    kw = dict(ref_hidden=ref_hidden) if options.get("beta") else {}
    loss, metrics = module(h, w, labels, old, adv, mask, bias=b, **kw)
    got = grads(loss, h, w, b)

    h2, w2, b2 = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    lp = fusedrl.token_logprobs(h2 @ w2.t() + b2, labels.masked_fill(~mask, -100), temperature=0.9,
                                return_entropy=True, backend="torch")
    extra = {}
    if options.get("beta"):
        extra["ref_logp"] = fusedrl.token_logprobs(ref_hidden @ weight.t(), labels.masked_fill(~mask, -100),
                                                   temperature=0.9, backend="torch")
    if options.get("entropy_coef"):
        extra["entropy"] = lp[1]
    opts = {k: v for k, v in options.items()}
    loss2, metrics2 = fusedrl.policy_loss(lp[0], old, adv, mask, backend="torch", **opts, **extra)
    want = grads(loss2, h2, w2, b2)
    torch.testing.assert_close(loss, loss2, rtol=1e-9, atol=1e-12)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)
    assert metrics.keys() == metrics2.keys()


def test_errors_name_the_option():
    with pytest.raises(ValueError, match="LinearPolicyLoss: temperature"):
        fusedrl.LinearPolicyLoss(temperature=0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        fusedrl.LinearPolicyLoss(chunk_size=0)
    hidden, weight, bias, labels, mask, adv, ref_hidden, _ = batch()
    with pytest.raises(ValueError, match="mask must have the shape of labels"):
        fusedrl.LinearPolicyLoss()(hidden, weight, labels, None, adv, mask[:, :3])


liger = pytest.importorskip("liger_kernel.chunked_loss")
LIGER_VERSION = "0.8.5"


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_matches_liger_fused_linear_grpo(loss_type, beta):
    """Liger's LigerFusedLinearGRPOLoss (compiled=False) on the same hidden states, head and inputs:
    loss and gradients w.r.t. hidden, weight and bias (float32)."""
    hidden, weight, bias, labels, mask, adv, ref_hidden, _ = batch(dtype=torch.float32, seed=3)
    B, T = labels.shape
    old = (fusedrl.token_logprobs(hidden @ weight.t() + bias, labels) + 0.05 * torch.randn(B, T)).detach()
    ref_logp = fusedrl.token_logprobs(ref_hidden @ weight.t() + bias, labels).detach()
    h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    theirs = liger.LigerFusedLinearGRPOLoss(beta=beta, compiled=False, use_ref_model=beta > 0, loss_type=loss_type,
                                            epsilon_low=0.2, epsilon_high=0.28, max_completion_length=T,
                                            temperature=1.0)
    loss_l = theirs(h, w, labels, mask.long(), adv, bias=b, ref_per_token_logps=ref_logp if beta else None,
                    old_per_token_logps=old)[0]
    g_l = grads(loss_l, h, w, b)

    h2, w2, b2 = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    options = fusedrl.presets.trl(loss_type, epsilon=0.2, epsilon_high=0.28, beta=beta, use_bias_correction_kl=False)
    counts = {"num_tokens": int(mask.sum()), "max_length": T}
    ours = fusedrl.LinearPolicyLoss(**options)
    loss, _ = ours(h2, w2, labels, old, adv, mask, bias=b2, ref_logp=ref_logp if beta else None,
                   **{k: v for k, v in counts.items() if k in ("num_tokens",) or loss_type == "dr_grpo"})
    g = grads(loss, h2, w2, b2)
    torch.testing.assert_close(loss, loss_l, rtol=2e-5, atol=2e-6)
    for a, e in zip(g, g_l):
        torch.testing.assert_close(a, e, rtol=2e-4, atol=2e-6)
