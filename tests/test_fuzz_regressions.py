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
