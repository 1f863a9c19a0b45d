"""Failures found by the fuzz campaign (scripts/fuzz.py), each kept as a regression test."""

import pytest
import torch

import fusedrl


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_ignored_row_with_nan_logit_gets_zero_gradient(backend):
    """fuzz: token_logprobs / linear_logprobs 'valid nan'. An ignore_index row holding a NaN logit
    gave the reference (torch backend) a NaN gradient for that row (log_softmax's backward reads
    the row even though its log-prob is selected away); the kernels gave 0, as documented."""
    z = torch.tensor([[1.0, float("nan"), 2.0], [0.5, 0.2, 0.1]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([-100, 1])
    logp, entropy = fusedrl.token_logprobs(z, labels, return_entropy=True, backend=backend)
    (logp.sum() + entropy.sum()).backward()
    assert torch.equal(z.grad[0], torch.zeros(3, dtype=torch.float64))
    assert bool(z.grad[1].isfinite().all()) and z.grad[1].abs().sum() > 0
    assert logp[0] == 0 and entropy[0] == 0


def test_linear_ignored_row_with_nan_hidden_gets_zero_gradient():
    hidden = torch.tensor([[0.7, float("nan")], [-1.6, -1.4]], dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    logp = fusedrl.linear_logprobs(hidden, weight, torch.tensor([-100, 1]), backend="torch")
    logp.sum().backward()
    assert torch.equal(hidden.grad[0], torch.zeros(2, dtype=torch.float64))
    assert bool(hidden.grad[1].isfinite().all())
    # (d weight = d logits^T @ hidden holds 0 * NaN from the ignored row, as an unfused matmul does)


@pytest.mark.parametrize("temperature", [0.7, 0.3, 1.3])
def test_cpu_backward_max_entry_is_exact_with_a_temperature(temperature):
    """fuzz: token_logprobs / cpu 'valid plain', float32 logits ~ 200 with temperature 0.7: the
    gradient at the row's max was 1 ulp of z / T off (-1.4285579 for -1.4285714, dH 1.4e-5 for 0:
    a 1e-5 relative error, where torch's float32 error is 1e-7). The backward fused z * (1/T) - max
    into an FMA, so x - max was not 0 at the max; it now rounds x first, as the forward does."""
    z = torch.tensor([[-135.2169, 179.5107, 20.1200, 233.3377, -10.2782],
                      [50.9042, 94.2679, -122.6167, 35.0806, 67.3825]])
    labels = torch.tensor([1, 4])
    gold = []
    for backend, dtype in (("cpu", torch.float32), ("torch", torch.float64)):
        x = z.to(dtype).detach().clone().requires_grad_(True)
        logp, entropy = fusedrl.token_logprobs(x, labels, temperature=temperature, return_entropy=True, backend=backend)
        (logp.sum() + 0.5 * entropy.sum()).backward()
        gold.append(x.grad.double())
    torch.testing.assert_close(gold[0], gold[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("layout", ["group_size", "group_ids"])
def test_grpo_passk_rejects_nan_rewards(backend, layout):
    """fuzz: group_advantages 'valid nan', estimator='grpo_passk': a NaN reward made the reference
    raise a RuntimeError (index out of bounds: no row equals a NaN max) and the cpu kernel return
    all zeros (the NaN swallowed). Now a ValueError naming rewards, on every backend."""
    rewards = torch.tensor([-0.9, float("nan"), -0.1, 0.3], dtype=torch.float64)
    layout_kw = dict(group_size=2) if layout == "group_size" else dict(group_ids=torch.tensor([4, 4, 1, 1]))
    with pytest.raises(ValueError, match="rewards must not hold NaN"):
        fusedrl.group_advantages(rewards, estimator="grpo_passk", backend=backend, **layout_kw)
    finite = torch.tensor([-0.9, 0.5, -0.1, 0.3], dtype=torch.float64)
    out = fusedrl.group_advantages(finite, estimator="grpo_passk", backend=backend, **layout_kw)
    assert out[1] > 0 and out[3] > 0 and out[0] == 0 and out[2] == 0


def _policy_grad(backend, logp, old, adv, mask, **opts):
    x = logp.detach().clone().requires_grad_(True)
    loss, _ = fusedrl.policy_loss(x, old, adv, mask, backend=backend, **opts)
    loss.backward()
    return loss.detach(), x.grad


POLICY_KERNELS = ["cpu", pytest.param("triton", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("triton") is None, reason="triton is not installed"))]


@pytest.mark.parametrize("backend", POLICY_KERNELS)
def test_vespo_nan_old_logp_at_a_valid_token_matches_the_reference(backend):
    """fuzz: policy_loss / cpu 'valid nan', surrogate='vespo' with a NaN old_logp at a valid token.
    The sequence weight phi is then 0 (TRL's nan_to_num), so the reference's loss and gradients are
    finite; the kernel multiplied the surrogate's zero d loss / d w by the NaN d w / d x. A zero
    partial now contributes an exact zero (through_ratio in csrc/include/fusedrl/policy.h)."""
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(2, 4, generator=g, dtype=torch.float64)
    old = logp + 0.1 * torch.randn(2, 4, generator=g, dtype=torch.float64)
    old[1, 2] = float("nan")
    adv = torch.randn(2, 4, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    want = _policy_grad("torch", logp, old, adv, mask, surrogate="vespo")
    got = _policy_grad(backend, logp, old, adv, mask, surrogate="vespo")
    assert bool(want[1].isfinite().all())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", POLICY_KERNELS)
def test_gpg_hybrid_nan_old_logp_keeps_the_direct_gradient(backend):
    """fuzz: policy_loss / cpu 'valid nan', surrogate='gpg' (l = -A x: no ratio) with ratio='hybrid'
    and a NaN old_logp: the row's sequence ratio is NaN but no loss term uses it; the kernel added
    its zero share times NaN to every token of the row (sequence_share in fusedrl/policy.h)."""
    g = torch.Generator().manual_seed(4)
    logp = -torch.rand(1, 4, generator=g, dtype=torch.float64)
    old = logp + 0.1 * torch.randn(1, 4, generator=g, dtype=torch.float64)
    old[0, 1] = float("nan")
    adv = torch.randn(1, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True]])
    opts = dict(surrogate="gpg", ratio="hybrid", aggregation="seq-mean-token-mean")
    want = _policy_grad("torch", logp, old, adv, mask, **opts)
    got = _policy_grad(backend, logp, old, adv, mask, **opts)
    assert bool(want[1].isfinite().all())
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-14)


NAN_PROPAGATION = [
    dict(ratio="sequence-token"),  # min(log s, 10) of a NaN log s
    dict(ratio="cumulative"),  # the clipped prefix min(c, sqrt(n) log(1 + hi)) of a NaN c
    dict(ratio="cumulative", cispo_bounds="both", surrogate="cispo"),
    dict(clip_ratio_c=3.0),  # the dual clip's min(l, -A c) and the clip's max of a NaN l
    dict(ratio="sequence", clip_ratio_c=3.0),
]


@pytest.mark.parametrize("opts", NAN_PROPAGATION, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("backend", POLICY_KERNELS)
def test_nan_at_a_valid_token_gives_a_nan_loss_like_the_reference(backend, opts):
    """fuzz: policy_loss / cpu and triton 'valid nan': a NaN log-prob at a valid token gave the
    reference a NaN loss (torch.clamp / maximum / minimum propagate NaN) but the kernels a finite
    one: `a < b ? a : b` drops a NaN a. The kernels' minima and maxima of values now propagate NaN
    (max_nan / min_nan in csrc/include/fusedrl/common.h), as documented in fusedrl.policy_loss."""
    g = torch.Generator().manual_seed(5)
    logp = -torch.rand(2, 4, generator=g, dtype=torch.float64)
    old = logp + 0.1 * torch.randn(2, 4, generator=g, dtype=torch.float64)
    adv = -torch.rand(2, generator=g, dtype=torch.float64)  # A < 0: the dual clip is active
    mask = torch.ones(2, 4, dtype=torch.bool)
    for where in ("logp", "old"):
        x, o = logp.clone(), old.clone()
        (x if where == "logp" else o)[1, 1] = float("nan")
        want = fusedrl.policy_loss(x, o, adv, mask, backend="torch", **opts)[0]
        got = fusedrl.policy_loss(x, o, adv, mask, backend=backend, **opts)[0]
        assert bool(torch.isnan(want)), (where, float(want))
        assert bool(torch.isnan(got)), (where, float(got))
