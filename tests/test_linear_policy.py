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


OPTIONS = [
    dict(aggregation="token-mean", beta=0.04, clip_high=0.28),
    dict(aggregation="seq-mean-token-mean", entropy_coef=0.01),
    dict(aggregation="seq-mean-token-sum-norm", ratio="sequence", max_length=7),
    dict(surrogate="cispo", clip_high=4.0, aggregation="token-sum", beta=0.04, kl="low_var_kl"),
    dict(aggregation="seq-mean-token-mean", beta=0.04, kl="low_var_kl", kl_aggregation="token-mean",
         entropy_coef=0.01, entropy_aggregation="token-mean", clip_ratio_c=3.0, exclude_empty_rows=True),
    dict(surrogate="sapo", aggregation="token-mean", num_tokens=40, beta=0.04, use_bias_correction_kl=True),
    dict(surrogate="gpg", aggregation="seq-mean-token-sum", num_sequences=5),
    dict(surrogate="reinforce", ratio="sequence-token", aggregation="token-mean"),
]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("single_pass", [None, False])
def test_equals_unfused_composition(backend, options, chunk_size, single_pass):
    hidden, weight, bias, labels, mask, adv, ref_hidden, _ = batch()
    h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    module = fusedrl.LinearPolicyLoss(temperature=0.9, chunk_size=chunk_size, backend=backend,
                                      single_pass=single_pass, **options)
    token_local = options.get("ratio", "token") == "token"
    assert module.single_pass == (token_local and single_pass is None)
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
    loss2, metrics2 = fusedrl.policy_loss(lp[0], old, adv, mask, backend="torch", **options, **extra)
    want = grads(loss2, h2, w2, b2)
    torch.testing.assert_close(loss, loss2, rtol=1e-9, atol=1e-12)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)
    assert metrics.keys() == metrics2.keys()
    for k in metrics:
        torch.testing.assert_close(metrics[k], metrics2[k], rtol=1e-9, atol=1e-12)


def test_errors_name_the_option():
    with pytest.raises(ValueError, match="LinearPolicyLoss: temperature"):
        fusedrl.LinearPolicyLoss(temperature=0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        fusedrl.LinearPolicyLoss(chunk_size=0)
    hidden, weight, bias, labels, mask, adv, ref_hidden, _ = batch()
    with pytest.raises(ValueError, match="mask must have the shape of labels"):
        fusedrl.LinearPolicyLoss()(hidden, weight, labels, None, adv, mask[:, :3])
    with pytest.raises(ValueError, match="single_pass=True does not apply"):
        fusedrl.LinearPolicyLoss(single_pass=True, ratio="sequence")


def test_single_pass_with_float_mask_token_advantages_and_rollout_correction():
    hidden, weight, bias, labels, mask, adv, ref_hidden, _ = batch(seed=5)
    fmask = mask.double() * torch.rand(mask.shape, dtype=torch.float64)
    tadv = torch.randn(labels.shape, dtype=torch.float64)
    rollout = (fusedrl.token_logprobs(hidden @ weight.t() + bias, labels) + 0.1 * torch.randn(labels.shape)).detach()
    old = (rollout + 0.05 * torch.randn(labels.shape, dtype=torch.float64)).detach()
    opts = dict(aggregation="seq-mean-token-mean", rollout_correction="token_truncate", rollout_cap=1.05)
    results = []
    for single in (None, False):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        module = fusedrl.LinearPolicyLoss(single_pass=single, chunk_size=5, **opts)
        assert module.single_pass == (single is None)
        loss, metrics = module(h, w, labels, old, tadv, fmask, rollout_logp=rollout)
        results.append((loss, *grads(loss, h, w), metrics))
    for a, e in zip(results[0][:3], results[1][:3]):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)
    assert results[0][-1].keys() == results[1][-1].keys()
    for k in results[0][-1]:
        torch.testing.assert_close(results[0][-1][k], results[1][-1][k], rtol=1e-9, atol=1e-12)


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


def test_single_pass_scales_with_the_upstream_gradient_and_respects_requires_grad():
    hidden, weight, bias, labels, mask, adv, _, _ = batch(seed=7)
    module = fusedrl.LinearPolicyLoss(chunk_size=6)
    assert module.single_pass
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, _ = module(h, w, labels, None, adv, mask)
    gh, gw = grads(3.0 * loss, h, w)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss2, _ = fusedrl.LinearPolicyLoss(chunk_size=6, single_pass=False)(h2, w2, labels, None, adv, mask)
    gh2, gw2 = grads(3.0 * loss2, h2, w2)
    torch.testing.assert_close(gh, gh2, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, gw2, rtol=1e-9, atol=1e-12)
    frozen, _ = module(hidden, w, labels, None, adv, mask)  # hidden without grad
    (gw3,) = grads(frozen, w)
    torch.testing.assert_close(gw3 * 3.0, gw, rtol=1e-9, atol=1e-12)


def test_single_pass_bf16_close_to_float64():
    hidden, weight, bias, labels, mask, adv, _, _ = batch(dtype=torch.float64, seed=9)
    out = []
    for dt in (torch.bfloat16, torch.float64):
        h, w = hidden.to(dt).requires_grad_(True), weight.to(dt).requires_grad_(True)
        loss, _ = fusedrl.LinearPolicyLoss(chunk_size=8, beta=0.0)(h, w, labels, None, adv, mask)
        out.append((loss.double(), *(g.double() for g in grads(loss, h, w))))
    for a, e in zip(*out):
        assert (a - e).abs().max() <= 2e-2 * max(e.abs().max().item(), 1e-3)


def test_single_pass_hands_gradients_over_once():
    """The stored gradients go to autograd without a copy (unit upstream gradient) or scaled in
    place: a second backward through the same graph raises instead of reusing them."""
    hidden, weight, bias, labels, mask, adv, _, _ = batch(seed=11)
    module = fusedrl.LinearPolicyLoss(chunk_size=5)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, _ = module(h, w, labels, None, adv, mask)
    loss.backward(retain_graph=True)
    g1 = w.grad.clone()
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()
    w.grad = None
    loss2, _ = module(h, w, labels, None, adv, mask)
    loss2.backward()
    torch.testing.assert_close(w.grad, g1, rtol=0, atol=0)


def test_single_pass_empty_batch():
    hidden, weight, bias, labels, mask, adv, _, _ = batch(seed=12)
    h, w = hidden[:0].clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, _ = fusedrl.LinearPolicyLoss()(h, w, labels[:0], None, adv[:0], mask[:0])
    loss.backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
