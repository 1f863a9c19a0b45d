"""Parity of fusedrl's preference losses with Liger's chunked fused-linear losses.

Liger's ``LigerFusedLinear{SimPO,CPO,ORPO,KTO}Loss`` (``compiled=False``) take hidden states, the LM
head weight and targets. The same sequence log-probs are computed here with plain torch
(``log_softmax`` of ``hidden @ weight.T``, gathered at the targets, masked where the target is the
ignore index), summed (or averaged) by ``fusedrl.sequence_logps`` and fed to fusedrl. Loss, the
per-pair rewards Liger returns, and the gradients w.r.t. the hidden states, the weight and the bias
(end to end through autograd) must agree.

How a Liger user names each loss in fusedrl (what these tests pin down):
- SimPO: ``preference_loss(pc, pr, loss_type=["simpo", "sft"], loss_weights=[1, alpha], gamma=...,
  chosen_lengths=..., rejected_lengths=...)`` (drop "sft" when ``compute_nll_loss=False``).
- CPO: the same with ``gamma=0.0, average_log_prob=<Liger's average_log_prob, default False>``.
- ORPO: ``orpo_loss(pc, pr, chosen_lengths=..., rejected_lengths=..., beta=..., compute_nll_loss=...)``.
- KTO: ``kto_loss(logps, labels, ref_logps, kl=kl, beta=...)``.
"""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

import fusedrl

LIGER_VERSION = "0.8.5"  # the version these tests were written against (installed: asserted below)
pytest.importorskip("liger_kernel")
from liger_kernel.chunked_loss import (  # noqa: E402
    LigerFusedLinearCPOLoss,
    LigerFusedLinearKTOLoss,
    LigerFusedLinearORPOLoss,
    LigerFusedLinearSimPOLoss,
)

IGNORE = -100
TOL = dict(rtol=2e-5, atol=2e-6)  # Liger computes in float32 (log_softmax(logits.float()))


def test_liger_version_recorded():
    found = importlib.metadata.version("liger-kernel")
    assert found == LIGER_VERSION, f"parity was established against liger-kernel {LIGER_VERSION}, found {found}"


def make_inputs(rows, T=7, H=16, V=37, seed=0, bias=False):
    """Hidden [rows, T, H], weight [V, H], optional bias [V], targets [rows, T] with prompt and padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, T, H, generator=g).requires_grad_(True)
    w = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_(True)
    b = (0.1 * torch.randn(V, generator=g)).requires_grad_(True) if bias else None
    target = torch.randint(0, V, (rows, T), generator=g)
    prompt = torch.randint(0, 3, (rows,), generator=g)
    length = torch.randint(1, T - 2, (rows,), generator=g)
    pos = torch.arange(T)
    keep = (pos >= prompt[:, None]) & (pos < (prompt + length)[:, None])
    target = torch.where(keep, target, IGNORE)
    return x, w, b, target


def torch_token_logps(x, w, b, target):
    """Token log-probs of the targets and the mask, with plain torch (Liger's chunk_forward, unchunked)."""
    logits = x @ w.t()
    if b is not None:
        logits = logits + b
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = target != IGNORE
    token = logp.gather(-1, torch.where(mask, target, 0).unsqueeze(-1)).squeeze(-1)
    return token, mask


def paired_logps(x, w, b, target):
    token, mask = torch_token_logps(x, w, b, target)
    B = x.shape[0] // 2
    logps = fusedrl.sequence_logps(token, mask)
    lengths = mask.sum(-1)
    return logps[:B], logps[B:], lengths[:B], lengths[B:]


def grads(loss, tensors):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(loss, tensors)


def assert_same(liger_loss, fused_loss, tensors):
    torch.testing.assert_close(fused_loss.float(), liger_loss, **TOL)
    for name, g_liger, g_fused in zip(("hidden", "weight", "bias"), grads(liger_loss, tensors), grads(fused_loss, tensors)):
        torch.testing.assert_close(g_fused, g_liger, **TOL, msg=lambda m: f"gradient w.r.t. {name}: {m}")


@pytest.mark.parametrize("beta,gamma", [(0.1, 0.5), (2.0, 1.2), (0.5, 0.0)])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("compute_nll_loss,alpha", [(True, 1.0), (True, 0.3), (False, 1.0)])
@pytest.mark.parametrize("chunk_size", [1, 3])
def test_simpo(beta, gamma, label_smoothing, compute_nll_loss, alpha, chunk_size):
    x, w, b, target = make_inputs(2 * 4, seed=1)
    liger = LigerFusedLinearSimPOLoss(beta=beta, alpha=alpha, label_smoothing=label_smoothing,
                                      compute_nll_loss=compute_nll_loss, compiled=False, gamma=gamma,
                                      chunk_size=chunk_size)
    liger_loss, aux = liger(w, x, target)
    pc, pr, lc, lr = paired_logps(x, w, b, target)
    loss_type, loss_weights = (["simpo", "sft"], [1.0, alpha]) if compute_nll_loss else ("simpo", None)
    loss, metrics = fusedrl.preference_loss(pc, pr, loss_type=loss_type, loss_weights=loss_weights, beta=beta,
                                            gamma=gamma, label_smoothing=label_smoothing,
                                            chosen_lengths=lc, rejected_lengths=lr)
    assert_same(liger_loss, loss, [x, w])
    chosen_avg, rejected_avg, _, _, nll, chosen_rewards, rejected_rewards = aux
    torch.testing.assert_close(pc.detach() / lc, chosen_avg, **TOL)
    torch.testing.assert_close(pr.detach() / lr, rejected_avg, **TOL)
    torch.testing.assert_close(metrics["rewards_chosen"], chosen_rewards.mean(), **TOL)
    torch.testing.assert_close(metrics["rewards_rejected"], rejected_rewards.mean(), **TOL)
    torch.testing.assert_close(metrics["reward_accuracy"], (chosen_rewards > rejected_rewards).float().mean())
    if compute_nll_loss:
        torch.testing.assert_close(-pc.detach().sum() / lc.sum(), nll, **TOL)


@pytest.mark.parametrize("beta", [0.1, 1.5])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("average_log_prob", [False, True])
@pytest.mark.parametrize("compute_nll_loss,alpha", [(True, 1.0), (True, 0.25), (False, 1.0)])
def test_cpo(beta, label_smoothing, average_log_prob, compute_nll_loss, alpha):
    x, w, b, target = make_inputs(2 * 3, seed=2, bias=True)
    liger = LigerFusedLinearCPOLoss(beta=beta, alpha=alpha, label_smoothing=label_smoothing,
                                    compute_nll_loss=compute_nll_loss, compiled=False,
                                    average_log_prob=average_log_prob, chunk_size=2)
    liger_loss, aux = liger(w, x, target, b)
    pc, pr, lc, lr = paired_logps(x, w, b, target)
    loss_type, loss_weights = (["simpo", "sft"], [1.0, alpha]) if compute_nll_loss else ("simpo", None)
    loss, metrics = fusedrl.preference_loss(pc, pr, loss_type=loss_type, loss_weights=loss_weights, beta=beta,
                                            gamma=0.0, average_log_prob=average_log_prob,
                                            label_smoothing=label_smoothing, chosen_lengths=lc, rejected_lengths=lr)
    assert_same(liger_loss, loss, [x, w, b])
    chosen_rewards, rejected_rewards = aux[5], aux[6]
    torch.testing.assert_close(metrics["rewards_chosen"], chosen_rewards.mean(), **TOL)
    torch.testing.assert_close(metrics["rewards_rejected"], rejected_rewards.mean(), **TOL)


@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
@pytest.mark.parametrize("compute_nll_loss", [True, False])
@pytest.mark.parametrize("chunk_size,bias", [(1, False), (2, True)])
def test_orpo(beta, compute_nll_loss, chunk_size, bias):
    x, w, b, target = make_inputs(2 * 4, seed=3, bias=bias, V=7)  # small V: average log-probs near -ln 2
    liger = LigerFusedLinearORPOLoss(beta=beta, compute_nll_loss=compute_nll_loss, compiled=False,
                                     chunk_size=chunk_size)
    liger_loss, aux = liger(w, x, target, b)
    pc, pr, lc, lr = paired_logps(x, w, b, target)
    loss, metrics = fusedrl.orpo_loss(pc, pr, chosen_lengths=lc, rejected_lengths=lr, beta=beta,
                                      compute_nll_loss=compute_nll_loss)
    assert_same(liger_loss, loss, [x, w, b])
    chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = aux[5:9]
    torch.testing.assert_close(metrics["rewards_chosen"], chosen_rewards.mean(), **TOL)
    torch.testing.assert_close(metrics["rewards_rejected"], rejected_rewards.mean(), **TOL)
    torch.testing.assert_close(metrics["log_odds_ratio"], log_odds_ratio, **TOL)
    torch.testing.assert_close(metrics["log_odds_chosen"], log_odds_chosen, **TOL)
    if compute_nll_loss:
        torch.testing.assert_close(metrics["nll_loss"], aux[4], **TOL)


@pytest.mark.parametrize("beta", [0.1, 0.8])
@pytest.mark.parametrize("use_ref_model", [True, False])
@pytest.mark.parametrize("average_log_prob", [False, True])
@pytest.mark.parametrize("kl", [None, 0.0, 0.7])
def test_kto(beta, use_ref_model, average_log_prob, kl):
    rows = 6
    x, w, b, target = make_inputs(rows, seed=4, bias=True)
    _, ref_w, ref_b, _ = make_inputs(rows, seed=5, bias=True)
    ref_x = (x.detach() + 0.1 * torch.randn_like(x)).requires_grad_(False)
    ref_w, ref_b = ref_w.detach(), ref_b.detach()
    labels = torch.tensor([True, False, False, True, True, False])
    kl_t = None if kl is None else torch.tensor(kl)
    liger = LigerFusedLinearKTOLoss(beta=beta, compiled=False, use_ref_model=use_ref_model,
                                    average_log_prob=average_log_prob, chunk_size=2)
    liger_loss, aux = liger(x, w, target, b, preference_labels=labels,
                            ref_input=ref_x if use_ref_model else None,
                            ref_weight=ref_w if use_ref_model else None,
                            ref_bias=ref_b if use_ref_model else None, kl=kl_t)

    token, mask = torch_token_logps(x, w, b, target)
    logps = fusedrl.sequence_logps(token, mask, average=average_log_prob)
    ref_logps = None
    if use_ref_model:
        with torch.no_grad():
            ref_token, _ = torch_token_logps(ref_x, ref_w, ref_b, target)
            ref_logps = fusedrl.sequence_logps(ref_token, mask, average=average_log_prob)
    loss, metrics = fusedrl.kto_loss(logps, labels, ref_logps, kl=kl_t, beta=beta)
    assert_same(liger_loss, loss, [x, w, b])
    chosen_rewards_sum, rejected_rewards_sum = aux[4], aux[5]
    torch.testing.assert_close(metrics["rewards_chosen"], chosen_rewards_sum / labels.sum(), **TOL)
    torch.testing.assert_close(metrics["rewards_rejected"], rejected_rewards_sum / (~labels).sum(), **TOL)
    torch.testing.assert_close(metrics["logps_chosen"], aux[0] / labels.sum(), **TOL)
