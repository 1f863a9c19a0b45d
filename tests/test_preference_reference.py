"""Preference losses against loops written from the formulas of docs/OBJECTIVES.md.

Every expected value is computed by plain Python loops over pairs, prompts and tokens, on 0-dim
float64 tensors (so autograd gives the expected gradients too), independently of the vectorized
reference: no masks, sorts or broadcasting are shared with it. Covered: sequence log-probs (masks,
weights, averages, fully masked rows), SimPO (gamma, lengths, label smoothing), CPO as the SimPO
variant, RPO's NLL term, token-weighted log-ratios (TGDPO / SparsePO), soft labels and per-pair
weights (SmPO / UPO / WPO), f-divergences, several loss types with weights, LiPO-lambda (pairs,
Delta_ij, ranks without gradient, ragged lists, mean over prompts), CPL (alpha, gamma^t discount,
lam), KTO and ORPO; hypothesis over values; extreme margins (+-1e4) finite; dtypes; bad input
raising TypeError / ValueError naming the argument.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedrl
from fusedrl.reference import preference as ref

TOL = dict(rtol=1e-10, atol=1e-12)
HYP = settings(max_examples=30, deadline=None)
F64 = torch.float64
LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------
# scalar helpers (0-dim tensors) and loops from the formulas
# ----------------------------------------------------------------------------------------------


def logsig(z):
    """log sigmoid(z) = -log(1 + e^{-z}), via logaddexp (not F.logsigmoid)."""
    return -torch.logaddexp(torch.zeros((), dtype=z.dtype), -z)


def sig(z):
    return torch.exp(logsig(z))


def leaves(*values):
    return [torch.tensor(v, dtype=F64, requires_grad=True) for v in values]


def rand_leaves(n, B, seed, scale=3.0, shift=-5.0):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(B, generator=g, dtype=F64) + shift).requires_grad_(True) for _ in range(n)]


def loop_mean(terms):
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total / len(terms)


def loop_sequence(logp_row, mask_row, weight_row=None, average=False):
    total, count = torch.zeros((), dtype=F64), 0
    for t in range(len(mask_row)):
        if mask_row[t]:
            w = 1.0 if weight_row is None else weight_row[t]
            total = total + w * logp_row[t]
            count += 1
    if average:
        total = total / max(count, 1)
    return total


def f_score(u, kind, a=0.5):
    if kind == "reverse_kl":
        return u
    if kind == "forward_kl":
        return 1.0 - torch.exp(-u)
    if kind == "js_divergence":
        return LN2 + logsig(u)
    if kind == "alpha_divergence":
        return (torch.exp((a - 1.0) * u) - 1.0) / (a - 1.0)
    raise AssertionError(kind)


def loop_dpo_term(kind, pc, pr, rc, rr, lc, lr, beta, p=1.0, kind_f="reverse_kl", a=0.5, eps=0.0, gamma=0.0,
                  average=True):
    """One pair's loss of a few loss types, from the formulas."""
    uc, ur = pc - rc, pr - rr
    h = beta * (f_score(uc, kind_f, a) - f_score(ur, kind_f, a))
    if kind == "sigmoid":
        return -p * logsig(h) - (1 - p) * logsig(-h)
    if kind == "sigmoid_norm":
        hn = beta * (f_score(uc, kind_f, a) / max(lc, 1) - f_score(ur, kind_f, a) / max(lr, 1))
        return -p * logsig(hn) - (1 - p) * logsig(-hn)
    if kind == "ipo":
        return (f_score(uc, kind_f, a) / max(lc, 1) - f_score(ur, kind_f, a) / max(lr, 1) - 1 / (2 * beta)) ** 2
    if kind == "hinge":
        return torch.clamp(1 - h, min=0.0)
    if kind == "simpo":
        c, r = (pc / max(lc, 1), pr / max(lr, 1)) if average else (pc, pr)
        z = beta * c - beta * r - gamma
        q = p * (1 - eps) + (1 - p) * eps
        return -q * logsig(z) - (1 - q) * logsig(-z)
    if kind == "bco_pair":
        return -logsig(beta * uc) - logsig(-beta * ur)
    raise AssertionError(kind)


def assert_loss_and_grads(got, expected, inputs, tol=TOL):
    torch.testing.assert_close(got, expected, **tol)
    g_got = torch.autograd.grad(got, inputs, allow_unused=True)
    g_exp = torch.autograd.grad(expected, inputs, allow_unused=True)
    for i, (a, b) in enumerate(zip(g_got, g_exp)):
        a = torch.zeros_like(inputs[i]) if a is None else a
        b = torch.zeros_like(inputs[i]) if b is None else b
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"gradient of input {i}: {m}")


# ----------------------------------------------------------------------------------------------
# sequence_logps
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_sequence_logps_loop(average, weighted):
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(4, 6, generator=g, dtype=F64) * 3).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0], [1, 0, 1, 0, 1, 1]])
    weights = torch.rand(4, 6, generator=g, dtype=F64) if weighted else None
    got = fusedrl.sequence_logps(logp, mask, weights=weights, average=average)
    expected = torch.stack([
        loop_sequence(logp[i], mask[i].tolist(), None if weights is None else weights[i].tolist(), average)
        for i in range(4)
    ])
    assert_loss_and_grads(got.sum(), expected.sum(), [logp])
    torch.testing.assert_close(got, expected, **TOL)
    assert got[2].item() == 0.0  # fully masked row


def test_sequence_logps_ignores_masked_values():
    logp = torch.tensor([[-1.0, float("nan"), float("-inf")], [-2.0, -3.0, float("inf")]], requires_grad=True)
    mask = torch.tensor([[True, False, False], [True, True, False]])
    out = fusedrl.sequence_logps(logp, mask)
    assert out.tolist() == [-1.0, -5.0]
    out.sum().backward()
    assert logp.grad.tolist() == [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]


def test_sequence_logps_dtypes():
    logp = -torch.rand(2, 5)
    mask = torch.ones(2, 5)
    assert fusedrl.sequence_logps(logp.bfloat16(), mask).dtype == torch.float32
    assert fusedrl.sequence_logps(logp.half(), mask).dtype == torch.float32
    assert fusedrl.sequence_logps(logp.double(), mask).dtype == F64
    # leading dims are kept
    assert fusedrl.sequence_logps(-torch.rand(2, 3, 5), torch.ones(2, 3, 5)).shape == (2, 3)


# ----------------------------------------------------------------------------------------------
# SimPO, CPO, RPO
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.7])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("average", [True, False])
def test_simpo_loop(gamma, label_smoothing, average):
    B, beta = 5, 2.0
    pc, pr = rand_leaves(2, B, seed=2, scale=10.0, shift=-20.0)
    lc, lr = [3, 1, 7, 0, 12], [5, 9, 2, 4, 0]  # zero lengths are clamped to 1
    got, metrics = fusedrl.preference_loss(
        pc, pr, loss_type="simpo", beta=beta, gamma=gamma, label_smoothing=label_smoothing,
        average_log_prob=average, chosen_lengths=torch.tensor(lc), rejected_lengths=torch.tensor(lr),
    )
    expected = loop_mean([
        loop_dpo_term("simpo", pc[i], pr[i], 0, 0, lc[i], lr[i], beta, eps=label_smoothing, gamma=gamma,
                      average=average)
        for i in range(B)
    ])
    assert_loss_and_grads(got, expected, [pc, pr])
    c = [pc[i].item() / (max(lc[i], 1) if average else 1) for i in range(B)]
    r = [pr[i].item() / (max(lr[i], 1) if average else 1) for i in range(B)]
    assert metrics["rewards_chosen"].item() == pytest.approx(beta * sum(c) / B, rel=1e-12)
    assert metrics["rewards_rejected"].item() == pytest.approx(beta * sum(r) / B, rel=1e-12)
    assert metrics["reward_accuracy"].item() == pytest.approx(sum(ci > ri for ci, ri in zip(c, r)) / B)


def test_simpo_ignores_the_reference():
    pc, pr = rand_leaves(2, 4, seed=3)
    lengths = torch.tensor([2, 3, 4, 5])
    kw = dict(loss_type="simpo", chosen_lengths=lengths, rejected_lengths=lengths)
    a, _ = fusedrl.preference_loss(pc, pr, **kw)
    b, _ = fusedrl.preference_loss(pc, pr, pc.detach() + 3, pr.detach() - 1, **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0, 0.4])
def test_cpo_as_simpo_variant(cpo_alpha):
    """CPO = -log sigmoid(beta (pc - pr)) + alpha * NLL per chosen token (no reference, no averaging)."""
    B, beta = 4, 0.3
    pc, pr = rand_leaves(2, B, seed=4)
    lc = [4, 2, 6, 3]
    got, _ = fusedrl.preference_loss(pc, pr, loss_type=["simpo", "sft"], loss_weights=[1.0, cpo_alpha], beta=beta,
                                     gamma=0.0, average_log_prob=False, chosen_lengths=torch.tensor(lc))
    nll = -(pc[0] + pc[1] + pc[2] + pc[3]) / sum(lc)
    expected = loop_mean([-logsig(beta * (pc[i] - pr[i])) for i in range(B)]) + cpo_alpha * nll
    assert_loss_and_grads(got, expected, [pc, pr])


@pytest.mark.parametrize("rpo_alpha", [0.0, 0.5, 2.0])
def test_rpo_nll_term(rpo_alpha):
    B, beta = 5, 0.1
    pc, pr, rc, rr = rand_leaves(4, B, seed=5)
    lc = [3, 8, 1, 0, 5]
    got, _ = fusedrl.preference_loss(pc, pr, rc, rr, beta=beta, rpo_alpha=rpo_alpha, chosen_lengths=torch.tensor(lc))
    expected = loop_mean([
        loop_dpo_term("sigmoid", pc[i], pr[i], rc[i], rr[i], lc[i], 1, beta) + rpo_alpha * (-pc[i] / max(lc[i], 1))
        for i in range(B)
    ])
    assert_loss_and_grads(got, expected, [pc, pr, rc, rr])


def test_sft_is_the_token_mean_nll():
    pc, pr = rand_leaves(2, 3, seed=6)
    lc = [2, 0, 5]
    got, _ = fusedrl.preference_loss(pc, pr, loss_type="sft", chosen_lengths=torch.tensor(lc))
    assert_loss_and_grads(got, -(pc[0] + pc[1] + pc[2]) / 7, [pc, pr])


# ----------------------------------------------------------------------------------------------
# token-weighted log-ratios, soft labels, per-pair weights
# ----------------------------------------------------------------------------------------------


def test_token_weighted_log_ratios():
    """TGDPO / SparsePO: log-ratio = sum_t w_t m_t (x_t - r_t), same weights for policy and reference."""
    g = torch.Generator().manual_seed(7)
    B, T, beta = 3, 5, 0.5
    x = [(-torch.rand(B, T, generator=g, dtype=F64) * 2).requires_grad_(True) for _ in range(2)]  # chosen, rejected
    r = [-torch.rand(B, T, generator=g, dtype=F64) * 2 for _ in range(2)]
    m = [torch.rand(B, T, generator=g) > 0.3 for _ in range(2)]
    w = [torch.rand(B, T, generator=g, dtype=F64) * 2 for _ in range(2)]
    seq = [[fusedrl.sequence_logps(t, m[k], weights=w[k]) for t in (x[k], r[k])] for k in range(2)]
    got, _ = fusedrl.preference_loss(seq[0][0], seq[1][0], seq[0][1], seq[1][1], beta=beta)

    terms = []
    for i in range(B):
        u = []
        for k in range(2):
            total = torch.zeros((), dtype=F64)
            for t in range(T):
                if m[k][i, t]:
                    total = total + w[k][i, t].item() * (x[k][i, t] - r[k][i, t].item())
            u.append(total)
        terms.append(-logsig(beta * (u[0] - u[1])))
    assert_loss_and_grads(got, loop_mean(terms), x)


@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid_norm", "simpo"])
@pytest.mark.parametrize("with_weights", [False, True])
def test_soft_labels_and_weights(loss_type, with_weights):
    B, beta = 6, 0.4
    pc, pr, rc, rr = rand_leaves(4, B, seed=8)
    lc, lr = [1, 4, 2, 7, 3, 5], [2, 2, 6, 1, 3, 9]
    p = [1.0, 0.0, 0.5, 0.8, 0.25, 0.9]
    wts = [0.5, 2.0, 1.0, 0.0, 3.0, 1.5] if with_weights else [1.0] * B
    got, _ = fusedrl.preference_loss(
        pc, pr, rc, rr, loss_type=loss_type, beta=beta, gamma=0.3, label_smoothing=0.1,
        soft_labels=torch.tensor(p, dtype=F64), weights=torch.tensor(wts, dtype=F64) if with_weights else None,
        chosen_lengths=torch.tensor(lc), rejected_lengths=torch.tensor(lr),
    )
    # sigmoid / sigmoid_norm ignore label_smoothing (TRL 1.16); simpo flips p with probability 0.1
    eps = 0.1 if loss_type == "simpo" else 0.0
    expected = loop_mean([
        wts[i] * loop_dpo_term(loss_type, pc[i], pr[i], rc[i], rr[i], lc[i], lr[i], beta, p=p[i], eps=eps, gamma=0.3)
        for i in range(B)
    ])
    assert_loss_and_grads(got, expected, [pc, pr, rc, rr])


def test_soft_labels_and_weights_carry_no_gradient():
    pc, pr = rand_leaves(2, 3, seed=9)
    p = torch.tensor([0.2, 0.5, 0.9], dtype=F64, requires_grad=True)
    w = torch.tensor([1.0, 2.0, 3.0], dtype=F64, requires_grad=True)
    loss, _ = fusedrl.preference_loss(pc, pr, soft_labels=p, weights=w)
    assert not loss.requires_grad or torch.autograd.grad(loss, [p, w], allow_unused=True) == (None, None)


def test_soft_label_scalar_equals_tensor():
    pc, pr = rand_leaves(2, 4, seed=10)
    a, _ = fusedrl.preference_loss(pc, pr, soft_labels=0.7)
    b, _ = fusedrl.preference_loss(pc, pr, soft_labels=torch.full((4,), 0.7, dtype=F64))
    torch.testing.assert_close(a, b, **TOL)


# ----------------------------------------------------------------------------------------------
# f-divergences and several loss types with weights
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,a", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
                                    ("alpha_divergence", 0.2), ("alpha_divergence", 1.8), ("alpha_divergence", 1.0)])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "sigmoid_norm"])
def test_f_divergences_loop(kind, a, loss_type):
    B, beta = 5, 0.7
    pc, pr, rc, rr = rand_leaves(4, B, seed=11, scale=1.0)
    lc, lr = [3, 1, 2, 5, 4], [2, 6, 1, 1, 3]
    got, _ = fusedrl.preference_loss(pc, pr, rc, rr, loss_type=loss_type, beta=beta, f_divergence_type=kind,
                                     f_alpha_divergence_coef=a, chosen_lengths=torch.tensor(lc),
                                     rejected_lengths=torch.tensor(lr))
    kind_f = "reverse_kl" if kind == "alpha_divergence" and a == 1.0 else kind
    expected = loop_mean([
        loop_dpo_term(loss_type, pc[i], pr[i], rc[i], rr[i], lc[i], lr[i], beta, kind_f=kind_f, a=a) for i in range(B)
    ])
    assert_loss_and_grads(got, expected, [pc, pr, rc, rr])


def test_several_loss_types_with_weights():
    B, beta = 4, 0.2
    pc, pr, rc, rr = rand_leaves(4, B, seed=12)
    lc, lr = [3, 1, 2, 5], [2, 6, 1, 1]
    types_, weights = ["sigmoid", "ipo", "bco_pair", "sft", "simpo"], [0.8, 0.05, 0.2, 1.0, -0.5]
    pair_w = [1.0, 0.5, 2.0, 0.25]
    got, _ = fusedrl.preference_loss(pc, pr, rc, rr, loss_type=types_, loss_weights=weights, beta=beta, gamma=0.4,
                                     chosen_lengths=torch.tensor(lc), rejected_lengths=torch.tensor(lr),
                                     weights=torch.tensor(pair_w, dtype=F64), rpo_alpha=0.3)
    nll = -(pc[0] + pc[1] + pc[2] + pc[3]) / sum(lc)
    expected = 0
    for kind, lw in zip(types_, weights):
        if kind == "sft":
            expected = expected + lw * loop_mean([pair_w[i] * nll for i in range(B)])
        else:
            expected = expected + lw * loop_mean([
                pair_w[i] * loop_dpo_term(kind, pc[i], pr[i], rc[i], rr[i], lc[i], lr[i], beta, gamma=0.4)
                for i in range(B)
            ])
    expected = expected + 0.3 * loop_mean([pair_w[i] * (-pc[i] / lc[i]) for i in range(B)])
    assert_loss_and_grads(got, expected, [pc, pr, rc, rr])


def test_reference_free_is_zero_reference():
    pc, pr = rand_leaves(2, 4, seed=13)
    z = torch.zeros(4, dtype=F64)
    for loss_type in ["sigmoid", "apo_zero", "aot", "sppo_hard"]:
        a, _ = fusedrl.preference_loss(pc, pr, loss_type=loss_type)
        b, _ = fusedrl.preference_loss(pc, pr, z, z, loss_type=loss_type)
        assert torch.equal(a, b)


def test_dpo_metrics_loop():
    B, beta = 5, 0.3
    pc, pr, rc, rr = rand_leaves(4, B, seed=14)
    _, m = fusedrl.preference_loss(pc, pr, rc, rr, beta=beta)
    ch = [beta * (pc[i].item() - rc[i].item()) for i in range(B)]
    rj = [beta * (pr[i].item() - rr[i].item()) for i in range(B)]
    assert m["rewards_chosen"].item() == pytest.approx(sum(ch) / B, rel=1e-12)
    assert m["rewards_rejected"].item() == pytest.approx(sum(rj) / B, rel=1e-12)
    assert m["reward_accuracy"].item() == pytest.approx(sum(c > r for c, r in zip(ch, rj)) / B)
    assert m["reward_margin"].item() == pytest.approx(sum(c - r for c, r in zip(ch, rj)) / B, rel=1e-12)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


def test_reduction_is_the_mean_over_pairs():
    pc, pr, rc, rr = rand_leaves(4, 6, seed=15)
    full, _ = fusedrl.preference_loss(pc, pr, rc, rr, loss_type=["sigmoid", "ipo"],
                                      chosen_lengths=torch.arange(1, 7), rejected_lengths=torch.arange(2, 8))
    halves = [fusedrl.preference_loss(pc[s], pr[s], rc[s], rr[s], loss_type=["sigmoid", "ipo"],
                                      chosen_lengths=torch.arange(1, 7)[s], rejected_lengths=torch.arange(2, 8)[s])[0]
              for s in (slice(0, 3), slice(3, 6))]
    torch.testing.assert_close(full, (halves[0] + halves[1]) / 2, **TOL)


def test_gradcheck():
    pc, pr, rc, rr = rand_leaves(4, 3, seed=16, scale=1.0)
    lengths = torch.tensor([1, 2, 3])
    for loss_type in ref.LOSS_TYPES:
        kw = dict(loss_type=loss_type, chosen_lengths=lengths, rejected_lengths=lengths + 1, beta=0.5)
        if loss_type == "exo_pair":
            kw["label_smoothing"] = 0.01
        assert torch.autograd.gradcheck(lambda a, b, c, d: fusedrl.preference_loss(a, b, c, d, **kw)[0],
                                        (pc, pr, rc, rr)), loss_type


# ----------------------------------------------------------------------------------------------
# hypothesis over values
# ----------------------------------------------------------------------------------------------

finite = st.floats(min_value=-60.0, max_value=5.0, allow_nan=False, allow_infinity=False)


@HYP
@given(
    data=st.lists(st.tuples(finite, finite, finite, finite, st.integers(0, 30), st.integers(0, 30),
                            st.floats(0.0, 1.0), st.floats(0.0, 3.0)), min_size=1, max_size=8),
    beta=st.floats(0.01, 3.0),
    loss_type=st.sampled_from(["sigmoid", "sigmoid_norm", "simpo", "ipo", "hinge", "bco_pair"]),
)
def test_hypothesis_against_loop(data, beta, loss_type):
    cols = list(zip(*data))
    pc, pr, rc, rr = [torch.tensor(c, dtype=F64, requires_grad=True) for c in cols[:4]]
    lc, lr, p, w = list(cols[4]), list(cols[5]), list(cols[6]), list(cols[7])
    soft = loss_type in ("sigmoid", "sigmoid_norm", "simpo")
    got, _ = fusedrl.preference_loss(
        pc, pr, rc, rr, loss_type=loss_type, beta=beta, gamma=0.5, chosen_lengths=torch.tensor(lc),
        rejected_lengths=torch.tensor(lr), soft_labels=torch.tensor(p, dtype=F64) if soft else None,
        weights=torch.tensor(w, dtype=F64),
    )
    expected = loop_mean([
        w[i] * loop_dpo_term(loss_type, pc[i], pr[i], rc[i], rr[i], lc[i], lr[i], beta, p=p[i] if soft else 1.0,
                             gamma=0.5)
        for i in range(len(data))
    ])
    assert_loss_and_grads(got, expected, [pc, pr, rc, rr], tol=dict(rtol=1e-9, atol=1e-9))


# ----------------------------------------------------------------------------------------------
# LiPO-lambda
# ----------------------------------------------------------------------------------------------


def loop_ranks(scores):
    """1-based descending ranks; ties: earlier index first."""
    order = sorted(range(len(scores)), key=lambda k: (-scores[k], k))
    ranks = [0] * len(scores)
    for position, k in enumerate(order):
        ranks[k] = position + 1
    return ranks


def loop_lipo(policy, labels, ref_logps, valid, beta):
    per_prompt = []
    for q in range(len(labels)):
        idx = [k for k in range(len(labels[q])) if valid[q][k]]
        s = {k: beta * (policy[q][k] - (ref_logps[q][k] if ref_logps is not None else 0.0)) for k in idx}
        ranks = dict(zip(idx, loop_ranks([s[k].item() for k in idx])))
        total = torch.zeros((), dtype=F64)
        for i in idx:
            for j in idx:
                if labels[q][i] > labels[q][j]:
                    gi, gj = 2 ** labels[q][i] - 1, 2 ** labels[q][j] - 1
                    di, dj = 1 / math.log2(1 + ranks[i]), 1 / math.log2(1 + ranks[j])
                    total = total - abs(gi - gj) * abs(di - dj) * logsig(s[i] - s[j])
        per_prompt.append(total)
    return loop_mean(per_prompt)


@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("ragged", [False, True])
def test_lipo_lambda_loop(with_ref, ragged):
    g = torch.Generator().manual_seed(17)
    P, K, beta = 3, 5, 0.5
    policy = (torch.randn(P, K, generator=g, dtype=F64) * 4 - 10).requires_grad_(True)
    reference = torch.randn(P, K, generator=g, dtype=F64) * 4 - 10 if with_ref else None
    labels = [[3, 1, 0, 2, 2], [1.0, 0.0, 0.0, 1.0, 0.5], [0, 0, 0, 0, 1]]
    valid = [[True] * K, [True, True, False, True, True], [True, False, True, True, False]] if ragged else [[True] * K] * P
    got, metrics = fusedrl.listwise_preference_loss(
        policy, torch.tensor(labels, dtype=F64), reference, beta=beta, mask=torch.tensor(valid) if ragged else None,
    )
    expected = loop_lipo(policy, labels, reference, valid, beta)
    assert_loss_and_grads(got, expected, [policy])
    pairs = sum(1 for q in range(P) for i in range(K) for j in range(K)
                if valid[q][i] and valid[q][j] and labels[q][i] > labels[q][j])
    assert metrics["num_pairs"].item() == pairs


def test_lipo_ties_and_no_pairs():
    policy = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -1.0, -3.0]], dtype=F64, requires_grad=True)
    labels = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=F64)  # second prompt: no ordered pair
    got, metrics = fusedrl.listwise_preference_loss(policy, labels, beta=1.0)
    expected = loop_lipo(policy, labels.tolist(), None, [[True] * 3] * 2, 1.0)
    assert_loss_and_grads(got, expected, [policy])
    assert metrics["num_pairs"].item() == 3


def test_lipo_permutation_invariance():
    g = torch.Generator().manual_seed(18)
    policy = torch.randn(2, 6, generator=g, dtype=F64)
    labels = torch.randint(0, 4, (2, 6), generator=g).to(F64)
    perm = torch.randperm(6, generator=g)
    a, _ = fusedrl.listwise_preference_loss(policy, labels)
    b, _ = fusedrl.listwise_preference_loss(policy[:, perm], labels[:, perm])
    torch.testing.assert_close(a, b, **TOL)


def test_lipo_ranks_carry_no_gradient():
    """The gradient equals the loop's with Delta held fixed (the loop uses Python-float Delta)."""
    policy = torch.tensor([[-3.0, -1.0, -2.0, -4.0]], dtype=F64, requires_grad=True)
    labels = [[0.0, 2.0, 1.0, 3.0]]
    got, _ = fusedrl.listwise_preference_loss(policy, torch.tensor(labels, dtype=F64), beta=2.0)
    assert_loss_and_grads(got, loop_lipo(policy, labels, None, [[True] * 4], 2.0), [policy])


# ----------------------------------------------------------------------------------------------
# CPL
# ----------------------------------------------------------------------------------------------


def loop_cpl_score(logp_row, mask_row, alpha, gamma):
    total, t = torch.zeros((), dtype=F64), 0
    for pos in range(len(mask_row)):
        if mask_row[pos]:
            total = total + alpha * gamma**t * logp_row[pos]
            t += 1
    return total


@pytest.mark.parametrize("alpha,gamma,lam", [(0.1, 1.0, 1.0), (1.0, 0.9, 0.5), (0.5, 0.5, 0.25)])
def test_cpl_loop(alpha, gamma, lam):
    g = torch.Generator().manual_seed(19)
    B, T, T2 = 4, 6, 4
    xc = (-torch.rand(B, T, generator=g, dtype=F64) * 3).requires_grad_(True)
    xr = (-torch.rand(B, T2, generator=g, dtype=F64) * 3).requires_grad_(True)
    mc = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    mr = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 1, 1]])
    got, metrics = fusedrl.cpl_loss(xc, mc, xr, mr, alpha=alpha, gamma=gamma, lam=lam)
    terms = []
    for i in range(B):
        sc = loop_cpl_score(xc[i], mc[i].tolist(), alpha, gamma)
        sr = loop_cpl_score(xr[i], mr[i].tolist(), alpha, gamma)
        terms.append(-(sc - torch.logaddexp(sc, lam * sr)))  # -log(e^Sc / (e^Sc + e^{lam Sr}))
    assert_loss_and_grads(got, loop_mean(terms), [xc, xr])
    assert metrics["rewards_chosen"].item() == pytest.approx(
        sum(loop_cpl_score(xc[i], mc[i].tolist(), alpha, gamma).item() for i in range(B)) / B, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# KTO and ORPO
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_type,kl_mode",
    [("kto", "none"), ("kto", "given"), ("kto", "estimated"), ("kto", "estimated_negative"),
     ("apo_zero_unpaired", "none")],
)
def test_kto_loop(loss_type, kl_mode):
    B, beta, wd, wu = 6, 0.4, 1.3, 0.7
    p, r = rand_leaves(2, B, seed=20)
    labels = [True, False, True, False, False, True]
    kl_p, kl_r = [-5.0, -4.0, -5.5], [-5.5, -4.5, -5.0]  # mean difference 1/6
    if kl_mode == "estimated_negative":  # mean difference -1/6: clamped to 0 (TRL)
        kl_p, kl_r = kl_r, kl_p
    kw = {}
    z = 0.0
    if kl_mode == "given":
        kw["kl"] = torch.tensor(0.3, dtype=F64)
        z = 0.3
    elif kl_mode.startswith("estimated"):
        kw.update(policy_kl_logps=torch.tensor(kl_p, dtype=F64), ref_kl_logps=torch.tensor(kl_r, dtype=F64))
        z = max(sum(a - b for a, b in zip(kl_p, kl_r)) / 3, 0.0)
    got, metrics = fusedrl.kto_loss(p, torch.tensor(labels), r, beta=beta, loss_type=loss_type, desirable_weight=wd,
                                    undesirable_weight=wu, **kw)
    terms = []
    for i in range(B):
        u = p[i] - r[i]
        if loss_type == "kto":
            terms.append(wd * (1 - sig(beta * (u - z))) if labels[i] else wu * (1 - sig(beta * (z - u))))
        else:
            terms.append(wd * (1 - sig(beta * u)) if labels[i] else wu * sig(beta * u))
    assert_loss_and_grads(got, loop_mean(terms), [p, r])
    ch = [beta * (p[i] - r[i]).item() for i in range(B) if labels[i]]
    assert metrics["rewards_chosen"].item() == pytest.approx(sum(ch) / len(ch), rel=1e-12)
    if loss_type == "kto":
        assert metrics["kl"].item() == pytest.approx(z, abs=1e-15)


def test_kto_without_desirable_examples_reports_nan_reward():
    loss, metrics = fusedrl.kto_loss(torch.tensor([-3.0, -4.0]), torch.tensor([0, 0]))
    assert torch.isfinite(loss) and math.isnan(metrics["rewards_chosen"].item())


def loop_log1mexp(x):
    return math.log(-math.expm1(x))


@pytest.mark.parametrize("compute_nll_loss", [True, False])
def test_orpo_loop(compute_nll_loss):
    B, beta = 5, 0.25
    lc, lr = [3, 1, 7, 2, 4], [5, 2, 2, 6, 1]
    pc = torch.tensor([-0.3, -0.9, -20.0, -1.2, -0.01], dtype=F64, requires_grad=True)
    pr = torch.tensor([-4.0, -0.5, -9.0, -8.0, -0.2], dtype=F64, requires_grad=True)
    got, metrics = fusedrl.orpo_loss(pc, pr, chosen_lengths=torch.tensor(lc), rejected_lengths=torch.tensor(lr),
                                     beta=beta, compute_nll_loss=compute_nll_loss)
    terms = []
    for i in range(B):
        c, r = pc[i] / lc[i], pr[i] / lr[i]
        log_odds = (c - r) - (torch.log(-torch.expm1(c)) - torch.log(-torch.expm1(r)))
        assert log_odds.item() == pytest.approx(
            (c - r).item() - (loop_log1mexp(c.item()) - loop_log1mexp(r.item())), rel=1e-10)
        terms.append(-beta * logsig(log_odds))
    expected = loop_mean(terms)
    if compute_nll_loss:
        expected = expected - (pc[0] + pc[1] + pc[2] + pc[3] + pc[4]) / sum(lc)
    assert_loss_and_grads(got, expected, [pc, pr])
    assert metrics["nll_loss"].item() == pytest.approx(-sum(pc.tolist()) / sum(lc), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# extreme values, dtypes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ref.LOSS_TYPES)
@pytest.mark.parametrize("magnitude", [50.0, 1e4])
def test_extreme_margins_finite(loss_type, magnitude):
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])
    pc = (-5.0 + magnitude * sign).requires_grad_(True)
    pr = (-5.0 - magnitude * sign).requires_grad_(True)
    rc, rr = torch.full((4,), -5.0, requires_grad=True), torch.full((4,), -5.0, requires_grad=True)
    lengths = torch.tensor([1, 3, 0, 2])
    kw = dict(loss_type=loss_type, chosen_lengths=lengths, rejected_lengths=lengths)
    if loss_type == "exo_pair":
        kw["label_smoothing"] = 1e-3
    for f_div in (["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
                  if loss_type in ref.F_DIVERGENCE_LOSS_TYPES else ["reverse_kl"]):
        inputs = [pc, pr, rc, rr]
        if loss_type == "ipo" and f_div in ("forward_kl", "alpha_divergence"):
            # documented limit: the square of an exponential score (up to e^80) needs float64
            inputs = [t.detach().double().requires_grad_(True) for t in inputs]
        loss, metrics = fusedrl.preference_loss(*inputs, f_divergence_type=f_div, **kw)
        grads = [g for g in torch.autograd.grad(loss, inputs, allow_unused=True) if g is not None]
        assert torch.isfinite(loss), (loss_type, f_div)
        assert all(torch.isfinite(g).all() for g in grads), (loss_type, f_div)
        assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("magnitude", [50.0, 1e4])
def test_extreme_values_other_losses(magnitude):
    policy = torch.tensor([[magnitude, -magnitude, 0.0], [-magnitude, magnitude, 1.0]], requires_grad=True)
    loss, _ = fusedrl.listwise_preference_loss(policy, torch.tensor([[2.0, 0.0, 1.0], [2.0, 0.0, 1.0]]))
    assert torch.isfinite(loss) and torch.isfinite(torch.autograd.grad(loss, policy)[0]).all()

    x = torch.tensor([[-magnitude, -1.0], [-1.0, -1.0]], requires_grad=True)
    y = torch.tensor([[-1.0, -1.0], [-magnitude, -magnitude]], requires_grad=True)
    loss, _ = fusedrl.cpl_loss(x, torch.ones(2, 2), y, torch.ones(2, 2), alpha=1.0)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in torch.autograd.grad(loss, [x, y]))

    p = torch.tensor([magnitude, -magnitude, magnitude, -magnitude], requires_grad=True)
    loss, _ = fusedrl.kto_loss(p, torch.tensor([1, 1, 0, 0]), kl=torch.tensor(magnitude))
    assert torch.isfinite(loss) and torch.isfinite(torch.autograd.grad(loss, p)[0]).all()

    pc = torch.tensor([-magnitude, -1e-3, -0.5], requires_grad=True)
    pr = torch.tensor([-1e-3, -magnitude, -0.7], requires_grad=True)
    one = torch.ones(3)
    loss, _ = fusedrl.orpo_loss(pc, pr, chosen_lengths=one, rejected_lengths=one)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in torch.autograd.grad(loss, [pc, pr]))


def test_output_dtypes():
    pc, pr = -torch.rand(3), -torch.rand(3)
    assert fusedrl.preference_loss(pc.bfloat16(), pr.bfloat16())[0].dtype == torch.float32
    assert fusedrl.preference_loss(pc.double(), pr.double())[0].dtype == F64
    assert fusedrl.preference_loss(pc, pr)[1]["reward_accuracy"].dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def _pair(B=3):
    return -torch.rand(B), -torch.rand(B)


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        (dict(loss_type="dpo"), ValueError, "loss_type"),
        (dict(loss_type=[]), TypeError, "loss_type"),
        (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), ValueError, "loss_weights"),
        (dict(loss_weights=[float("nan")]), ValueError, "loss_weights"),
        (dict(beta=0.0), ValueError, "beta"),
        (dict(beta="0.1"), TypeError, "beta"),
        (dict(label_smoothing=1.0), ValueError, "label_smoothing"),
        (dict(loss_type="robust", label_smoothing=0.5), ValueError, "label_smoothing"),
        (dict(loss_type="exo_pair"), ValueError, "label_smoothing"),
        (dict(f_divergence_type="kl"), ValueError, "f_divergence_type"),
        (dict(loss_type="bco_pair", f_divergence_type="js_divergence"), ValueError, "f_divergence_type"),
        (dict(loss_type="ipo"), ValueError, "chosen_lengths"),
        (dict(loss_type="simpo", chosen_lengths=torch.ones(3)), ValueError, "rejected_lengths"),
        (dict(rpo_alpha=1.0), ValueError, "chosen_lengths"),
        (dict(loss_type="sft", chosen_lengths=torch.tensor([1, -1, 2])), ValueError, "chosen_lengths"),
        (dict(loss_type="sft", chosen_lengths=torch.ones(4)), ValueError, "chosen_lengths"),
        (dict(soft_labels=torch.tensor([0.5, 1.5, 0.0])), ValueError, "soft_labels"),
        (dict(soft_labels=0.5, loss_type="hinge"), ValueError, "soft_labels"),
        (dict(weights=torch.ones(3), loss_type="aot"), ValueError, "weights"),
        (dict(weights=torch.tensor([1.0, float("inf"), 1.0])), ValueError, "weights"),
        (dict(discopop_tau=-1.0, loss_type="discopop"), ValueError, "discopop_tau"),
        (dict(average_log_prob=1), TypeError, "average_log_prob"),
        (dict(backend="gpu"), ValueError, "backend"),
    ],
)
def test_preference_loss_bad_options(kwargs, exc, name):
    pc, pr = _pair()
    with pytest.raises(exc, match=name):
        fusedrl.preference_loss(pc, pr, **kwargs)


def test_preference_loss_bad_tensors():
    pc, pr = _pair()
    with pytest.raises(TypeError, match="policy_chosen_logps"):
        fusedrl.preference_loss([1.0], pr)
    with pytest.raises(TypeError, match="policy_rejected_logps"):
        fusedrl.preference_loss(pc, pr.long())
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        fusedrl.preference_loss(pc, pr[:2])
    with pytest.raises(ValueError, match="policy_chosen_logps"):
        fusedrl.preference_loss(pc.reshape(3, 1), pr.reshape(3, 1))
    with pytest.raises(ValueError, match="policy_chosen_logps"):
        fusedrl.preference_loss(torch.ones(0), torch.ones(0))
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        fusedrl.preference_loss(pc, pr, pc)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        fusedrl.preference_loss(pc, pr, pc, pr[:1])


def test_other_functions_bad_input():
    with pytest.raises(ValueError, match="mask"):
        fusedrl.sequence_logps(torch.zeros(2, 3), torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="weights"):
        fusedrl.sequence_logps(torch.zeros(2, 3), torch.ones(2, 3), weights=torch.ones(3))
    with pytest.raises(TypeError, match="average"):
        fusedrl.sequence_logps(torch.zeros(2, 3), torch.ones(2, 3), average="yes")
    with pytest.raises(ValueError, match="policy_logps"):
        fusedrl.listwise_preference_loss(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="labels"):
        fusedrl.listwise_preference_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="labels"):
        fusedrl.listwise_preference_loss(torch.zeros(1, 2), torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="gamma"):
        fusedrl.cpl_loss(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3), torch.ones(2, 3), gamma=1.5)
    with pytest.raises(ValueError, match="lam"):
        fusedrl.cpl_loss(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3), torch.ones(2, 3), lam=0.0)
    with pytest.raises(ValueError, match="rejected_logp"):
        fusedrl.cpl_loss(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(3, 3), torch.ones(3, 3))
    with pytest.raises(ValueError, match="labels"):
        fusedrl.kto_loss(torch.zeros(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="loss_type"):
        fusedrl.kto_loss(torch.zeros(3), torch.tensor([0, 1, 1]), loss_type="bco")
    with pytest.raises(ValueError, match="kl"):
        fusedrl.kto_loss(torch.zeros(3), torch.tensor([0, 1, 1]), loss_type="apo_zero_unpaired", kl=torch.tensor(0.1))
    with pytest.raises(ValueError, match="kl"):
        fusedrl.kto_loss(torch.zeros(3), torch.tensor([0, 1, 1]), kl=torch.zeros(2))
    with pytest.raises(ValueError, match="ref_kl_logps"):
        fusedrl.kto_loss(torch.zeros(3), torch.tensor([0, 1, 1]), policy_kl_logps=torch.zeros(3))
    with pytest.raises(ValueError, match="undesirable_weight"):
        fusedrl.kto_loss(torch.zeros(3), torch.tensor([0, 1, 1]), undesirable_weight=-1.0)
    with pytest.raises(ValueError, match="rejected_lengths"):
        fusedrl.orpo_loss(torch.zeros(3), torch.zeros(3), chosen_lengths=torch.ones(3), rejected_lengths=torch.ones(2))
    with pytest.raises(TypeError, match="compute_nll_loss"):
        fusedrl.orpo_loss(torch.zeros(3), torch.zeros(3), chosen_lengths=torch.ones(3),
                          rejected_lengths=torch.ones(3), compute_nll_loss=None)


def test_public_names():
    for name in ["sequence_logps", "preference_loss", "listwise_preference_loss", "cpl_loss", "kto_loss", "orpo_loss",
                 "PreferenceParams", "KTOParams", "ORPOParams", "CPLParams", "ListwiseParams", "SequenceLogpsParams"]:
        assert hasattr(fusedrl, name), name
    with pytest.raises(Exception):
        fusedrl.PreferenceParams().beta = 1.0  # frozen
