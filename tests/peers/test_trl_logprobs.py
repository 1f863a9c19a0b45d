"""token_logprobs against TRL's selective_log_softmax / entropy_from_logits /
selective_log_softmax_and_entropy (trl 1.16.0; on CPU tensors TRL runs its eager torch path)."""

import pytest
import torch

import fusedrl

trl_utils = pytest.importorskip("trl.trainer.utils")
TESTED_WITH = "trl 1.16.0"


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_matches_trl(backend, dtype, temperature):
    logits = torch.randn(2, 3, 503, dtype=dtype) * 4
    labels = torch.randint(0, 503, (2, 3))
    g_lp, g_h = torch.randn(2, 3, dtype=dtype), torch.randn(2, 3, dtype=dtype)

    z_trl = logits.clone().requires_grad_(True)
    scaled = z_trl / temperature
    lp_trl = trl_utils.selective_log_softmax(scaled, labels)
    h_trl = trl_utils.entropy_from_logits(scaled)
    ((lp_trl * g_lp).sum() + (h_trl * g_h).sum()).backward()

    z = logits.clone().requires_grad_(True)
    lp, h = fusedrl.token_logprobs(z, labels, temperature=temperature, return_entropy=True, backend=backend)
    ((lp * g_lp.to(lp.dtype)).sum() + (h * g_h.to(h.dtype)).sum()).backward()

    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lp.to(dtype), lp_trl.detach(), **tol)
    torch.testing.assert_close(h.to(dtype), h_trl.detach(), **tol)
    torch.testing.assert_close(z.grad, z_trl.grad, **tol)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_matches_trl_fused_entry_with_row_mask(backend):
    """TRL's one-pass entry point with a row mask is fusedrl with ignore_index on masked rows."""
    logits = torch.randn(4, 5, 257) * 3
    labels = torch.randint(0, 257, (4, 5))
    row_mask = torch.rand(4, 5) > 0.3
    lp_trl, h_trl = trl_utils.selective_log_softmax_and_entropy(logits, labels, temperature=0.8, row_mask=row_mask)
    lp, h = fusedrl.token_logprobs(
        logits, labels.masked_fill(~row_mask, -100), temperature=0.8, return_entropy=True, backend=backend
    )
    torch.testing.assert_close(lp, lp_trl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_trl, rtol=1e-5, atol=1e-5)


def test_bf16_is_more_accurate_than_trl():
    """TRL returns bf16 log-probs for bf16 logits (error ~1e-2); fusedrl returns float32."""
    logits = (torch.randn(64, 1000) * 3).bfloat16()
    labels = torch.randint(0, 1000, (64,))
    gold = fusedrl.token_logprobs(logits.double(), labels, backend="torch")
    err_trl = (trl_utils.selective_log_softmax(logits, labels).double() - gold).abs().max()
    err_ours = (fusedrl.token_logprobs(logits, labels, backend="cpu").double() - gold).abs().max()
    assert err_ours < 1e-5 < err_trl
