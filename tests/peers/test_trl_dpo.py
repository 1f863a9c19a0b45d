"""Parity of fusedrl's preference losses with TRL.

TRL's DPO loss lives inside ``DPOTrainer._compute_loss``; it is called unmodified with a
``types.SimpleNamespace`` standing in for ``self`` and a stub model whose per-token log-probs sum to
leaf tensors, so the gradients w.r.t. the four sequence log-prob inputs come out of TRL's own
autograd graph (reference log-probs enter as ``precompute_ref_log_probs`` inputs). Also covered:
TRL's WPO weighting (``use_weighting``) and LD-DPO (``ld_alpha``, end to end through
``fusedrl.sequence_logps``), ``KTOTrainer._compute_loss`` (kto, apo_zero_unpaired, KL estimate,
desirable/undesirable weights), ``CPOTrainer.cpo_loss`` and ``ORPOTrainer.odds_ratio_loss``.
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

import fusedrl

TRL_VERSION = "1.16.0"  # the version these tests were written against (installed: asserted below)
trl = pytest.importorskip("trl")
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

ALL_TYPES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]
F_DIV_TYPES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]
METRIC_KEYS = {
    "rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected",
    "rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
    "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected",
}


def test_trl_version_recorded():
    assert trl.__version__ == TRL_VERSION, f"parity was established against trl {TRL_VERSION}, found {trl.__version__}"


def _tol(dtype, loss_type=None):
    types_ = [loss_type] if isinstance(loss_type, str) else list(loss_type or [])
    if dtype != torch.float64:
        return dict(rtol=1e-5, atol=1e-6)
    if "exo_pair" in types_:
        # TRL builds EXO's epsilon as a float32 tensor, so log(eps) and log1p(-eps) carry float32 rounding
        return dict(rtol=1e-6, atol=1e-8)
    return dict(rtol=1e-9, atol=1e-10)


def _accelerator():
    return types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


class PairBatch:
    """B pairs of sequence log-probs (leaves) and the padded token layout TRL reads.

    Row i of the [2B, T+1] batch is chosen i (i < B) or rejected i - B; column 0 is the prompt,
    columns 1..len the completion. Per-token log-probs (shifted, [2B, T]) are fixed negatives on the
    completion plus, on the first completion token, the amount that makes each row sum to its leaf.
    """

    def __init__(self, B=5, T=6, dtype=torch.float64, seed=0, scale=1.0):
        g = torch.Generator().manual_seed(seed)
        self.B, self.T, self.dtype = B, T, dtype
        lengths = torch.randint(1, T + 1, (2 * B,), generator=g)
        self.lengths_c, self.lengths_r = lengths[:B], lengths[B:]
        pos = torch.arange(T)
        self.shift_mask = (pos < lengths[:, None]).long()  # [2B, T]
        self.completion_mask = torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), self.shift_mask], 1)
        self.input_ids = torch.randint(0, 50, (2 * B, T + 1), generator=g)
        self.attention_mask = torch.ones_like(self.input_ids)
        self.tokens = -torch.rand(2 * B, T, generator=g, dtype=torch.float64).to(dtype) * self.shift_mask
        self.log_sum_sq = (-0.5 - torch.rand(2 * B, T, generator=g, dtype=torch.float64)).to(dtype)

        def leaf(n):
            return (scale * torch.randn(n, generator=g, dtype=torch.float64) - 3.0).to(dtype).requires_grad_(True)

        self.pc, self.pr, self.rc, self.rr = leaf(B), leaf(B), leaf(B), leaf(B)

    def leaves(self):
        return [self.pc, self.pr, self.rc, self.rr]

    def per_token(self):
        logps = torch.cat([self.pc, self.pr])
        first = torch.zeros(2 * self.B, self.T, dtype=self.dtype)
        first[:, 0] = 1.0
        return self.tokens + (logps - self.tokens.sum(1)).unsqueeze(1) * first

    def wpo_weights(self):
        """TRL's WPO pair weights from the same per-token values (no gradient, as TRL)."""
        with torch.no_grad():
            per_token = self.per_token()
            mean = ((per_token - self.log_sum_sq) * self.shift_mask).sum(1) / self.shift_mask.sum(1).clamp_min(1)
            w = torch.exp(mean)
        return w[: self.B] * w[self.B:]


def trl_dpo(batch: PairBatch, *, per_token=None, **config):
    """Run TRL's DPOTrainer._compute_loss; returns (loss, metrics dict of floats)."""
    per_token = batch.per_token() if per_token is None else per_token
    zeros = torch.zeros(2 * batch.B, batch.T, dtype=batch.dtype)

    def model(**kwargs):
        assert kwargs["fused_lm_head"] is True
        return types.SimpleNamespace(
            log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
            log_sum_sq_probs=batch.log_sum_sq,
        )

    loss_type = config.pop("loss_type", "sigmoid")
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    loss_weights = config.pop("loss_weights", None)
    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=_accelerator(),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=config.pop("ld_alpha", None),
        f_divergence_type=config.pop("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=config.pop("f_alpha_divergence_coef", 0.5),
        loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types),
        beta=config.pop("beta", 0.1),
        label_smoothing=config.pop("label_smoothing", 0.0),
        use_weighting=config.pop("use_weighting", False),
        args=types.SimpleNamespace(discopop_tau=config.pop("discopop_tau", 0.05), gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    assert not config, f"unused TRL options {config}"
    inputs = {
        "input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
        "completion_mask": batch.completion_mask, "ref_chosen_logps": batch.rc, "ref_rejected_logps": batch.rr,
    }
    loss = DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return loss, metrics


def fused_dpo(batch: PairBatch, **options):
    options.setdefault("chosen_lengths", batch.lengths_c)
    options.setdefault("rejected_lengths", batch.lengths_r)
    return fusedrl.preference_loss(batch.pc, batch.pr, batch.rc, batch.rr, **options)


def _grads(loss, leaves):
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def assert_parity(trl_opts, fused_opts=None, *, dtype=torch.float64, seed=0, batch=None, check_metrics=True):
    batch = batch or PairBatch(dtype=dtype, seed=seed)
    fused_opts = dict(trl_opts) if fused_opts is None else fused_opts
    fused_opts.pop("use_weighting", None)
    expected, trl_metrics = trl_dpo(batch, **dict(trl_opts))
    got, metrics = fused_dpo(batch, **fused_opts)
    tol = _tol(dtype, trl_opts.get("loss_type"))
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, **tol)
    for name, g_exp, g_got in zip(("pc", "pr", "rc", "rr"), _grads(expected, batch.leaves()), _grads(got, batch.leaves())):
        g_exp = torch.zeros_like(batch.pc) if g_exp is None else g_exp
        g_got = torch.zeros_like(batch.pc) if g_got is None else g_got
        torch.testing.assert_close(g_got, g_exp, **tol, msg=lambda m: f"gradient w.r.t. {name}: {m}")
    if check_metrics:
        for trl_key, key in METRIC_KEYS.items():
            assert metrics[key].dim() == 0
            torch.testing.assert_close(metrics[key].item(), float(trl_metrics[trl_key]), rtol=1e-6, atol=1e-7)
    return got


# --------------------------------------------------------------------------------------------
# Every loss type x beta x label_smoothing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ALL_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.7])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_every_loss_type(loss_type, beta, label_smoothing):
    if loss_type == "exo_pair" and label_smoothing == 0.0:
        label_smoothing = 1e-3  # TRL and fusedrl both require eps > 0 for EXO
    assert_parity(dict(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing), seed=ALL_TYPES.index(loss_type))


def test_sigmoid_ignores_label_smoothing_as_trl():
    """TRL 1.16 (and Liger 0.8.5) apply label_smoothing to robust / exo_pair / aot only, not sigmoid."""
    batch = PairBatch()
    a, _ = fused_dpo(batch, loss_type="sigmoid", label_smoothing=0.3)
    b, _ = fused_dpo(batch, loss_type="sigmoid")
    assert torch.equal(a, b)
    # cDPO is the soft label p = 1 - eps
    c, _ = fused_dpo(batch, loss_type="sigmoid", soft_labels=0.7)
    h = 0.1 * ((batch.pc - batch.rc) - (batch.pr - batch.rr))
    cdpo = (-0.7 * torch.nn.functional.logsigmoid(h) - 0.3 * torch.nn.functional.logsigmoid(-h)).mean()
    torch.testing.assert_close(c, cdpo)


@pytest.mark.parametrize("tau", [0.05, 0.3, 2.0])
def test_discopop_tau(tau):
    assert_parity(dict(loss_type="discopop", beta=0.5, discopop_tau=tau), seed=3)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "discopop", "apo_down"])
def test_large_log_ratios(loss_type):
    """Log-ratios spread over tens of nats (where TRL is still finite)."""
    batch = PairBatch(scale=20.0, seed=11)
    assert_parity(dict(loss_type=loss_type, beta=0.3), batch=batch)


# --------------------------------------------------------------------------------------------
# f-divergences
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", F_DIV_TYPES)
@pytest.mark.parametrize(
    "f_div", [("forward_kl", None), ("js_divergence", None), ("alpha_divergence", 0.5),
              ("alpha_divergence", 0.2), ("alpha_divergence", 1.0), ("alpha_divergence", 1.5)],
)
def test_f_divergence(loss_type, f_div):
    kind, coef = f_div
    opts = dict(loss_type=loss_type, beta=0.3, f_divergence_type=kind)
    if loss_type in ("exo_pair", "robust"):
        opts["label_smoothing"] = 0.1
    dtype = torch.float64
    if coef is not None:
        opts["f_alpha_divergence_coef"] = coef
        dtype = torch.float32  # TRL's alpha-divergence clamp table has no float64 entry
    assert_parity(opts, dtype=dtype, seed=5)


def test_f_divergence_rejected_where_trl_rejects_it():
    batch = PairBatch()
    for loss_type in sorted(set(ALL_TYPES) - set(F_DIV_TYPES)):
        with pytest.raises(ValueError, match="f_divergence_type"):
            fused_dpo(batch, loss_type=loss_type, f_divergence_type="js_divergence")


# --------------------------------------------------------------------------------------------
# Several loss types with weights
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts",
    [
        dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),  # MPO
        dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),  # RPO as TRL 1.16 spells it
        dict(loss_type=["hinge", "ipo", "apo_zero", "aot"]),
        dict(loss_type=["robust", "exo_pair", "aot_unpaired"], loss_weights=[0.3, -0.2, 2.0], label_smoothing=0.05),
        dict(loss_type=["sigmoid", "ipo", "sft", "discopop"], loss_weights=[1.0, 0.1, 0.5, 0.25],
             f_divergence_type="js_divergence", beta=0.4),
        dict(loss_type=["nca_pair", "sppo_hard", "apo_down", "sigmoid_norm"], loss_weights=[1.0, 0.01, 2.0, 0.5]),
    ],
)
def test_loss_type_lists(opts):
    assert_parity(opts, seed=7)


# --------------------------------------------------------------------------------------------
# WPO weighting (use_weighting) and LD-DPO (ld_alpha)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts",
    [
        dict(loss_type="sigmoid"), dict(loss_type="ipo"), dict(loss_type="apo_down", beta=2.0),
        dict(loss_type="discopop"), dict(loss_type="nca_pair"), dict(loss_type="robust", label_smoothing=0.1),
        dict(loss_type=["sigmoid", "bco_pair", "apo_zero"], loss_weights=[0.8, 0.2, 1.0]),
        dict(loss_type="sigmoid_norm", f_divergence_type="forward_kl"),
    ],
)
def test_wpo_weighting(opts):
    """(TRL 1.16's in-place ``per_sequence_loss *= weights`` raises for "sft" (an expanded tensor) and
    breaks the backward of "hinge" (a saved relu output): hinge is compared on values below.)"""
    batch = PairBatch(seed=13)
    assert_parity(dict(opts, use_weighting=True), dict(opts, weights=batch.wpo_weights()), batch=batch)


def test_wpo_weighting_hinge_values():
    batch = PairBatch(seed=13)
    with torch.no_grad():
        expected, _ = trl_dpo(batch, loss_type="hinge", beta=2.0, use_weighting=True)
        got, _ = fused_dpo(batch, loss_type="hinge", beta=2.0, weights=batch.wpo_weights())
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", ["sigmoid", "ipo"]])
def test_ld_alpha_through_sequence_logps(ld_alpha, loss_type):
    """LD-DPO end to end: TRL's shared/tail split == sequence_logps with per-token weights."""
    batch = PairBatch(seed=17)
    per_token = batch.per_token().detach().requires_grad_(True)
    expected, _ = trl_dpo(batch, per_token=per_token, loss_type=loss_type, ld_alpha=ld_alpha)

    # weights: 1 up to the shorter response of the pair, ld_alpha after
    shared = torch.minimum(batch.lengths_c, batch.lengths_r).repeat(2)
    pos = torch.arange(batch.T) + 1
    ld_weights = torch.where(pos <= shared[:, None], 1.0, ld_alpha).to(batch.dtype)
    logps = fusedrl.sequence_logps(per_token, batch.shift_mask, weights=ld_weights)
    got, _ = fusedrl.preference_loss(
        logps[: batch.B], logps[batch.B:], batch.rc, batch.rr, loss_type=loss_type,
        chosen_lengths=batch.lengths_c, rejected_lengths=batch.lengths_r,
    )
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    (g_exp,) = torch.autograd.grad(expected, per_token)
    (g_got,) = torch.autograd.grad(got, per_token)
    # TRL's shared/tail masks also cover padding positions (their log-probs are 0 in a real model, so
    # the value is unaffected); fusedrl gives padding zero gradient. Compare on completion tokens,
    # and check the padding gradient is zero on our side.
    valid = batch.shift_mask.bool()
    torch.testing.assert_close(g_got[valid], g_exp[valid], rtol=1e-9, atol=1e-10)
    assert torch.count_nonzero(g_got[~valid]) == 0


# --------------------------------------------------------------------------------------------
# KTO (KTOTrainer._compute_loss)
# --------------------------------------------------------------------------------------------


def trl_kto(logps, ref_logps, labels, kl_logps, ref_kl_logps, lengths, *, loss_type, beta, desirable_weight,
            undesirable_weight):
    B, T = logps.shape[0], int(lengths.max())
    mask = (torch.arange(T) < lengths[:, None]).long()
    first = torch.zeros(B, T, dtype=logps.dtype)
    first[:, 0] = 1.0
    per_token = logps.unsqueeze(1) * first  # sums to logps, gradient 1 w.r.t. it
    kl_per_token = kl_logps.unsqueeze(1) * first
    input_ids = torch.ones(B, T + 1, dtype=torch.long)
    kl_input_ids = torch.ones(B, T + 1, dtype=torch.long)
    completion_mask = torch.cat([torch.zeros(B, 1, dtype=torch.long), mask], 1)
    zeros = torch.zeros(B, T, dtype=logps.dtype)

    def model(**kwargs):
        if kwargs["input_ids"] is kl_input_ids:
            return types.SimpleNamespace(log_probs=kl_per_token)
        return types.SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros)

    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=_accelerator(), calculate_KL=loss_type == "kto",
        loss_type=loss_type, beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        precompute_ref_logps=True, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    stub._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(stub, m, b)
    batch = {
        "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": completion_mask,
        "KL_input_ids": kl_input_ids, "KL_attention_mask": torch.ones_like(input_ids),
        "KL_completion_mask": completion_mask, "label": labels, "ref_logps": ref_logps,
        "ref_KL_logps": ref_kl_logps,
    }
    loss = KTOTrainer._compute_loss(stub, model, batch, return_outputs=False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.75)])
@pytest.mark.parametrize("kl_shift", [0.0, 2.0, -2.0])  # -2: negative KL estimate, clamped to 0 by TRL
def test_kto_trainer(loss_type, weights, kl_shift):
    g = torch.Generator().manual_seed(23)
    B = 7
    logps = (torch.randn(B, generator=g, dtype=torch.float64) - 4).requires_grad_(True)
    ref_logps = (torch.randn(B, generator=g, dtype=torch.float64) - 4).requires_grad_(True)
    labels = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
    kl_logps = torch.randn(B, generator=g, dtype=torch.float64) - 4 + kl_shift
    ref_kl_logps = torch.randn(B, generator=g, dtype=torch.float64) - 4
    lengths = torch.randint(1, 5, (B,), generator=g)
    beta = 0.3
    expected, trl_metrics = trl_kto(logps, ref_logps, labels, kl_logps, ref_kl_logps, lengths, loss_type=loss_type,
                                    beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1])
    kl_kw = dict(policy_kl_logps=kl_logps, ref_kl_logps=ref_kl_logps) if loss_type == "kto" else {}
    got, metrics = fusedrl.kto_loss(logps, labels, ref_logps, beta=beta, loss_type=loss_type,
                                    desirable_weight=weights[0], undesirable_weight=weights[1], **kl_kw)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    for g_got, g_exp in zip(torch.autograd.grad(got, [logps, ref_logps]), torch.autograd.grad(expected, [logps, ref_logps])):
        torch.testing.assert_close(g_got, g_exp, rtol=1e-9, atol=1e-10)
    for trl_key, key in [("rewards/chosen", "rewards_chosen"), ("rewards/rejected", "rewards_rejected"),
                         ("rewards/margins", "reward_margin"), ("logps/chosen", "logps_chosen"),
                         ("logps/rejected", "logps_rejected")]:
        torch.testing.assert_close(metrics[key].item(), float(trl_metrics[trl_key]), rtol=1e-9, atol=1e-10)
    if loss_type == "kto":
        torch.testing.assert_close(metrics["kl"].item(), float(trl_metrics["kl"]), rtol=1e-9, atol=1e-10)
        if kl_shift < 0:
            assert metrics["kl"].item() == 0.0


# --------------------------------------------------------------------------------------------
# CPO and ORPO loss functions (trl.experimental)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
def test_cpo_loss(loss_type, label_smoothing):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer  # noqa: PLC0415

    g = torch.Generator().manual_seed(29)
    B, beta, simpo_gamma = 6, 0.4, 0.7
    pc = (torch.randn(B, generator=g, dtype=torch.float64) * 3 - 10).requires_grad_(True)
    pr = (torch.randn(B, generator=g, dtype=torch.float64) * 3 - 10).requires_grad_(True)
    lc = torch.randint(1, 9, (B,), generator=g)
    lr = torch.randint(1, 9, (B,), generator=g)
    averaged = loss_type in ("ipo", "simpo")  # TRL's CPO averages the log-probs for these two
    stub = types.SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, simpo_gamma=simpo_gamma,
                                 label_smoothing=label_smoothing, accelerator=_accelerator())
    args = (pc / lc, pr / lr) if averaged else (pc, pr)
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(stub, *args)
    expected = losses.mean()

    if loss_type == "sigmoid":  # CPO: the SimPO variant without margin or averaging
        opts = dict(loss_type="simpo", gamma=0.0, average_log_prob=False, label_smoothing=label_smoothing)
    elif loss_type == "simpo":
        opts = dict(loss_type="simpo", gamma=simpo_gamma, label_smoothing=label_smoothing)
    else:
        opts = dict(loss_type=loss_type)
    got, metrics = fusedrl.preference_loss(pc, pr, beta=beta, chosen_lengths=lc, rejected_lengths=lr, **opts)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    for g_got, g_exp in zip(torch.autograd.grad(got, [pc, pr]), torch.autograd.grad(expected, [pc, pr])):
        torch.testing.assert_close(g_got, g_exp, rtol=1e-9, atol=1e-10)
    if opts["loss_type"] == "simpo":
        torch.testing.assert_close(metrics["rewards_chosen"], chosen_rewards.mean())
        torch.testing.assert_close(metrics["rewards_rejected"], rejected_rewards.mean())


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_odds_ratio_loss(beta):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # noqa: PLC0415

    g = torch.Generator().manual_seed(31)
    B = 8
    lc = torch.randint(1, 9, (B,), generator=g)
    lr = torch.randint(1, 9, (B,), generator=g)
    # average log-probs on both sides of TRL's -ln 2 branch point
    pc = (-torch.rand(B, generator=g, dtype=torch.float64) * 1.5 * lc).requires_grad_(True)
    pr = (-torch.rand(B, generator=g, dtype=torch.float64) * 1.5 * lr).requires_grad_(True)
    stub = types.SimpleNamespace(beta=beta, accelerator=_accelerator())
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(
        stub, pc / lc, pr / lr
    )
    nll = -pc.sum() / lc.sum()  # TRL's chosen cross-entropy (mean over chosen tokens)
    expected = nll - losses.mean()
    got, metrics = fusedrl.orpo_loss(pc, pr, chosen_lengths=lc, rejected_lengths=lr, beta=beta)
    # TRL's odds_ratio_loss casts to float32
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-6, atol=1e-7)
    for g_got, g_exp in zip(torch.autograd.grad(got, [pc, pr]), torch.autograd.grad(expected, [pc, pr])):
        torch.testing.assert_close(g_got, g_exp, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(metrics["log_odds_ratio"].float(), log_odds_ratio, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(metrics["log_odds_chosen"].float(), log_odds_chosen, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(metrics["rewards_chosen"].float(), chosen_rewards.mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(metrics["rewards_rejected"].float(), rejected_rewards.mean(), rtol=1e-6, atol=1e-7)
