"""fusedrl.testing: the hypothesis strategies generate what they promise (shapes, dtypes, and the
degenerate cases do appear), and the invariance checkers pass on fusedrl's losses for every
aggregation mode while failing, with a clear message, on deliberately wrong user functions."""

import sys

import pytest
import torch
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

import fusedrl
from fusedrl import testing as T
from fusedrl.policy import AGGREGATIONS

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIND = settings(max_examples=300, deadline=None, database=None, phases=[Phase.generate])  # no shrinking: fast


def finds(strategy, condition):
    """hypothesis finds an example of ``strategy`` satisfying ``condition`` (else NoSuchExample)."""
    return find(strategy, condition, settings=FIND)


# ---------------------------------------------------------------------------------------------
# import without hypothesis


def test_module_imports_hypothesis_lazily(monkeypatch):
    assert "hypothesis" not in vars(T) and "st" not in vars(T)
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    monkeypatch.setitem(sys.modules, "hypothesis.strategies", None)
    with pytest.raises(ImportError, match="pip install hypothesis"):
        T.rl_batches()
    # the checkers and the tolerance helpers do not need it
    b = {"logp": torch.zeros(2, 2, dtype=torch.float64), "mask": torch.ones(2, 2, dtype=torch.bool)}
    T.check_microbatch_invariance(lambda b, **kw: b["logp"].sum(), b, 2)
    T.assert_close_to_reference(torch.ones(2), torch.ones(2, dtype=torch.float64), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# rl_batches


@SETTINGS
@given(T.rl_batches(batch_size=(1, 5), seq_len=(1, 6), dtype=(torch.float32, torch.bfloat16, torch.float64)))
def test_rl_batches_shapes_and_dtypes(b):
    B, Tn = b.mask.shape
    assert 1 <= B <= 5 and 1 <= Tn <= 6 and b.shape == (B, Tn)
    dt = b.logp.dtype
    assert dt in (torch.float32, torch.bfloat16, torch.float64) and b.mask.dtype == torch.bool
    for name in ("logp", "old_logp", "ref_logp", "rollout_logp", "entropy"):
        t = getattr(b, name)
        assert t.shape == (B, Tn) and t.dtype == dt and torch.isfinite(t).all(), name
    assert b.advantages.shape in ((B,), (B, Tn)) and b.advantages.dtype == dt
    assert b.group_ids.shape == (B,) and b.group_ids.dtype == torch.int64 and (b.group_ids >= 0).all()
    assert b.rewards.shape == (B,)
    assert (b.entropy >= 0).all() and (b.logp <= 0).all()
    assert set(b.to_dict()) == {"logp", "old_logp", "ref_logp", "rollout_logp", "entropy", "advantages", "mask",
                                "group_ids", "rewards"}


@SETTINGS
@given(T.rl_batches(degenerate=False, mask_layout="right_padded", group_layout="contiguous", per_token_advantages=True,
                    mask_dtype=torch.int64))
def test_rl_batches_knobs(b):
    m = b.mask
    assert m.dtype == torch.int64 and (m.sum(-1) > 0).all() and (b.advantages != 0).all()
    assert b.advantages.dim() == 2
    lengths = m.sum(-1, keepdim=True)
    assert torch.equal(m, (torch.arange(m.shape[1]) < lengths).to(m.dtype))  # a valid prefix per row
    ids = b.group_ids
    assert ids[0] == 0 and ((ids[1:] - ids[:-1]) >= 0).all() and ((ids[1:] - ids[:-1]) <= 1).all()


def test_rl_batches_degenerate_cases_appear():
    s = T.rl_batches(extremes=(50.0, 1e4))
    finds(s, lambda b: bool((b.mask.sum(-1) == 0).any()))  # a fully masked row
    finds(s, lambda b: b.mask.shape[0] > 1 and not b.mask.any())  # a fully masked batch
    finds(s, lambda b: b.mask.shape[1] == 1)
    finds(s, lambda b: b.mask.shape[0] == 1)
    finds(s, lambda b: b.advantages.dim() == 2)
    finds(s, lambda b: b.advantages.dim() == 1)
    finds(s, lambda b: bool((b.advantages == 0).any()))
    finds(s, lambda b: bool((b.mask.sum(-1) % b.mask.shape[1] != 0).any()))  # a partly padded row
    finds(s, lambda b: len(set(b.group_ids.tolist())) == b.mask.shape[0] > 1)  # singleton groups only
    finds(s, lambda b: max(int(b.group_ids.max()), 0) >= b.mask.shape[0])  # ids beyond 0..G-1
    for m in (50.0, 1e4):  # extreme log-ratios on valid tokens
        finds(s, lambda b, m=m: bool(((b.logp - b.old_logp).abs() == m).any()))

    def zero_variance_group(b):
        for gid in set(b.group_ids.tolist()):
            r = b.rewards[b.group_ids == gid]
            if len(r) > 1 and bool((r == r[0]).all()):
                return True
        return False

    finds(s, zero_variance_group)


@pytest.mark.parametrize("kw,exc,name", [
    (dict(batch_size=(0, 3)), ValueError, "batch_size"),
    (dict(seq_len=(3, 2)), ValueError, "seq_len"),
    (dict(batch_size="4"), TypeError, "batch_size"),
    (dict(dtype=torch.int64), TypeError, "dtype"),
    (dict(mask_layout="left"), ValueError, "mask_layout"),
    (dict(group_layout="sorted"), ValueError, "group_layout"),
    (dict(extremes=(-1.0,)), ValueError, "extremes"),
])
def test_rl_batches_bad_arguments(kw, exc, name):
    with pytest.raises(exc, match=name):
        T.rl_batches(**kw)


# ---------------------------------------------------------------------------------------------
# preference pairs and lists, logits


@SETTINGS
@given(T.preference_pairs(batch_size=(1, 6), dtype=(torch.float32, torch.float64)))
def test_preference_pairs_shapes(p):
    B = p.policy_chosen_logps.shape[0]
    assert 1 <= B <= 6
    for name in ("policy_chosen_logps", "policy_rejected_logps", "weights", "soft_labels"):
        assert getattr(p, name).shape == (B,) and getattr(p, name).dtype in (torch.float32, torch.float64)
    assert (p.ref_chosen_logps is None) == (p.ref_rejected_logps is None)
    assert p.chosen_lengths.dtype == torch.int64 and (p.chosen_lengths >= 0).all() and (p.rejected_lengths >= 0).all()
    assert (p.weights > 0).all() and ((p.soft_labels >= 0) & (p.soft_labels <= 1)).all()
    # the pairs feed fusedrl.preference_loss as they are
    loss, _ = fusedrl.preference_loss(p.policy_chosen_logps, p.policy_rejected_logps, p.ref_chosen_logps,
                                      p.ref_rejected_logps, loss_type="ipo", chosen_lengths=p.chosen_lengths,
                                      rejected_lengths=p.rejected_lengths, weights=p.weights)
    assert torch.isfinite(loss)


def test_preference_pairs_cases_appear():
    s = T.preference_pairs(extremes=(1e4,))
    finds(s, lambda p: p.ref_chosen_logps is None)
    finds(s, lambda p: p.ref_chosen_logps is not None
          and bool(((p.policy_chosen_logps - p.ref_chosen_logps).abs() == 1e4).any()))
    finds(s, lambda p: bool((p.chosen_lengths == 0).any()))
    finds(s, lambda p: p.policy_chosen_logps.shape[0] > 1
          and bool((p.policy_chosen_logps == p.policy_rejected_logps).any()))  # ties
    finds(s, lambda p: p.policy_chosen_logps.shape[0] == 1)
    assert find(T.preference_pairs(degenerate=False, reference=True), lambda p: True).ref_chosen_logps is not None


@SETTINGS
@given(T.preference_lists(num_prompts=(1, 3), list_size=(1, 5), dtype=torch.float64))
def test_preference_lists_shapes(lists):
    P, K = lists.policy_logps.shape
    assert 1 <= P <= 3 and 1 <= K <= 5
    assert lists.labels.shape == (P, K) and lists.mask.shape == (P, K) and lists.mask.dtype == torch.bool
    assert lists.ref_logps is None or lists.ref_logps.shape == (P, K)
    assert ((lists.labels >= 0) & (lists.labels <= 4)).all() and (lists.labels == lists.labels.round()).all()
    loss, _ = fusedrl.listwise_preference_loss(lists.policy_logps, lists.labels, lists.ref_logps, mask=lists.mask)
    assert torch.isfinite(loss)


def test_preference_lists_cases_appear():
    s = T.preference_lists()
    finds(s, lambda lists: bool((lists.mask.sum(-1) <= 1).any()) and lists.mask.shape[1] > 2)  # ragged, <= 1 valid
    finds(s, lambda lists: bool((lists.labels > 1).any()))  # graded
    finds(s, lambda lists: lists.labels.shape[1] > 2 and bool((lists.labels[0] == lists.labels[0, 0]).all()))  # ties
    finds(s, lambda lists: lists.ref_logps is None)
    strict = find(T.preference_lists(degenerate=False, list_size=(2, 4)), lambda lists: True)
    assert strict.mask.all() and (strict.labels[:, 0] != strict.labels[:, 1]).all()


@SETTINGS
@given(T.logits_with_labels(rows=(1, 8), vocab_size=(1, 300), dtype=(torch.float32, torch.bfloat16),
                            batch_dims=None, contiguous=None, masked_vocab=True))
def test_logits_with_labels_shapes(x):
    V = x.logits.shape[-1]
    assert x.labels.shape == x.logits.shape[:-1] and x.labels.dtype == torch.int64 and 1 <= V <= 300
    assert x.logits.dtype in (torch.float32, torch.bfloat16) and x.logits.dim() in (2, 3)
    kept = x.labels != x.ignore_index
    assert ((x.labels[kept] >= 0) & (x.labels[kept] < V)).all()
    label_logits = x.logits.gather(-1, x.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert torch.isfinite(label_logits[kept]).all()  # -inf entries never sit on a label
    logp = fusedrl.token_logprobs(x.logits, x.labels, ignore_index=x.ignore_index, backend="torch")
    assert torch.isfinite(logp).all() and (logp[~kept] == 0).all()


def test_logits_with_labels_cases_appear():
    s = T.logits_with_labels(contiguous=None, batch_dims=None, masked_vocab=True, extremes=(1e4,))
    finds(s, lambda x: x.logits.shape[-1] in T.AWKWARD_VOCAB_SIZES)
    finds(s, lambda x: x.logits.shape[-1] == 1)
    finds(s, lambda x: not x.logits.is_contiguous())
    finds(s, lambda x: x.logits.dim() == 3)
    finds(s, lambda x: bool((x.labels == -100).any()) and bool((x.labels != -100).any()))
    finds(s, lambda x: bool((x.labels == -100).all()))
    finds(s, lambda x: bool(torch.isneginf(x.logits).any()))
    finds(s, lambda x: float(x.logits[torch.isfinite(x.logits)].abs().max()) > 1e3)
    never = T.logits_with_labels(ignore=False, degenerate=False)
    x = find(never, lambda x: True)
    assert (x.labels != -100).all()


# ---------------------------------------------------------------------------------------------
# the checkers on fusedrl's losses


def counts_for(aggregation, exclude_empty_rows=False):
    """The global counts of a batch for policy_loss: default_counts, verl's row rule, and the number
    of groups holding a signed sequence for balanced aggregation."""

    def counts(b):
        kw = T.default_counts(b)
        rows = b.mask.sum(-1)
        if exclude_empty_rows:
            kw["num_sequences"] = int((rows > 0).sum())
        if aggregation == "balanced":
            adv = b.advantages.double()
            if adv.dim() == 2:
                adv = (adv * b.mask).sum(-1)
            signed = (torch.sign(adv) != 0) & (rows > 0)
            kw["num_groups"] = len(set(b.group_ids[signed].tolist()))
        return kw

    return counts


def policy_fn(aggregation, surrogate="clip", ratio="token", exclude_empty_rows=False):
    def loss_fn(b, **counts):
        return fusedrl.policy_loss(
            b.logp, b.old_logp, b.advantages, b.mask, surrogate=surrogate, ratio=ratio, aggregation=aggregation,
            exclude_empty_rows=exclude_empty_rows, ref_logp=b.ref_logp, beta=0.05, kl="low_var_kl",
            entropy=b.entropy, entropy_coef=0.01, rollout_logp=b.rollout_logp, rollout_correction="token_truncate",
            group_ids=b.group_ids, **counts,
        )
    return loss_fn


COMBOS = [("clip", "token"), ("clip", "sequence"), ("cispo", "token"), ("sapo", "sequence-token"),
          ("geo_mean", "token"), ("reinforce", "cumulative"), ("gpg", "hybrid")]
F64 = dict(dtype=torch.float64, batch_size=(2, 6), seq_len=(1, 5))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@settings(max_examples=8, deadline=None)
@given(b=T.rl_batches(**F64, extremes=(50.0, 1e4)), combo=st.sampled_from(COMBOS), exclude=st.booleans(),
       ranks=st.integers(1, 2), splits=st.integers(1, 3))
def test_checkers_pass_on_policy_loss(aggregation, b, combo, exclude, ranks, splits):
    fn = policy_fn(aggregation, *combo, exclude_empty_rows=exclude)
    counts = counts_for(aggregation, exclude)
    wrt = ("logp", "entropy")
    keep = aggregation == "balanced"
    if len(set(b.group_ids.tolist())) >= ranks or not keep:
        T.check_microbatch_invariance(fn, b, splits, ranks=ranks, counts=counts, wrt=wrt, keep_groups=keep)
    T.check_permutation_invariance(fn, b, counts=counts, wrt=wrt)
    T.check_padding_invariance(fn, b, counts=counts, wrt=wrt)
    T.check_padding_invariance(fn, b, counts=counts, wrt=wrt, pad_value=float("nan"), extra=1)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_checkers_pass_on_aggregate(aggregation):
    b = find(T.rl_batches(**F64, degenerate=False, per_token_advantages=False), lambda b: b.mask.shape[0] >= 4)

    def fn(b, **counts):
        values = (b.logp - b.old_logp) ** 2 * b.advantages[:, None]
        return fusedrl.aggregate(values, b.mask, aggregation, advantages=b.advantages, group_ids=b.group_ids, **counts)

    counts = counts_for(aggregation)
    T.check_microbatch_invariance(fn, b, [[0, 2], [1], list(range(3, b.mask.shape[0]))] if aggregation != "balanced"
                                  else 2, counts=counts, keep_groups=aggregation == "balanced")
    T.check_permutation_invariance(fn, b, counts=counts)
    T.check_padding_invariance(fn, b, counts=counts)  # fn computes values at padded positions: finite padding


# ---------------------------------------------------------------------------------------------
# the checkers catch wrong user functions


def fixed_batch():
    g = torch.Generator().manual_seed(3)
    B, Tn = 6, 5
    logp = -torch.rand(B, Tn, generator=g, dtype=torch.float64) * 2
    mask = torch.arange(Tn)[None, :] < torch.tensor([5, 3, 4, 1, 5, 2])[:, None]
    return dict(logp=logp, old_logp=logp + 0.1 * torch.randn(B, Tn, generator=g, dtype=torch.float64),
                advantages=torch.randn(B, generator=g, dtype=torch.float64), mask=mask,
                group_ids=torch.tensor([0, 0, 1, 1, 2, 2]))


def per_token(b):
    """A PPO-style per-token loss, padded positions selected away with torch.where."""
    ratio = torch.exp(torch.where(b["mask"], b["logp"] - b["old_logp"], 0.0))
    return torch.where(b["mask"], -ratio * b["advantages"][:, None], 0.0)


def good_token_mean(b, num_tokens=None, **_):
    m = b["mask"]
    return per_token(b).sum() / (m.sum() if num_tokens is None else num_tokens)


def local_token_mean(b, **_):  # ignores the global count it is given
    return per_token(b).sum() / b["mask"].sum()


def test_user_function_with_global_counts_passes():
    b = fixed_batch()
    T.check_microbatch_invariance(good_token_mean, b, 3)
    T.check_microbatch_invariance(good_token_mean, b, [[5, 0], [2, 4, 1], [3]])
    T.check_microbatch_invariance(good_token_mean, b, 2, ranks=3)
    T.check_permutation_invariance(good_token_mean, b)
    T.check_padding_invariance(good_token_mean, b, pad_value=float("nan"))


def test_local_normalization_fails_microbatch_checker():
    b = fixed_batch()
    with pytest.raises(AssertionError, match=r"micro-batch invariance.*differs.*instead of the global one"):
        T.check_microbatch_invariance(local_token_mean, b, 2)
    # fusedrl's own loss without global counts breaks the law the same way
    with pytest.raises(AssertionError, match="micro-batch invariance"):
        T.check_microbatch_invariance(
            lambda b, **_: fusedrl.policy_loss(b["logp"], b["old_logp"], b["advantages"], b["mask"]), b, 2)
    T.check_permutation_invariance(local_token_mean, b)  # it is order- and padding-invariant, though
    T.check_padding_invariance(local_token_mean, b)


def test_ranks_sum_like_micro_batches():
    """Simulated ranks add up as micro-batches do (fusedrl's convention); a per-rank local count fails."""
    b = fixed_batch()
    T.check_microbatch_invariance(good_token_mean, b, 1, ranks=3)
    with pytest.raises(AssertionError, match=r"3 micro-batches over 3 rank\(s\)"):
        T.check_microbatch_invariance(local_token_mean, b, 1, ranks=3)


def test_reading_padded_positions_fails_padding_checker():
    b = fixed_batch()

    def mean_over_t(b, **_):  # averages every position, padded ones included
        ratio = torch.exp(b["logp"] - b["old_logp"])
        return -(ratio.mean(-1) * b["advantages"]).mean()

    with pytest.raises(AssertionError, match="padding invariance.*loss"):
        T.check_padding_invariance(mean_over_t, b)

    def times_mask(b, num_tokens=None, **_):  # fine for finite padding, NaN * 0 is NaN
        m = b["mask"].double()
        return (-torch.exp(b["logp"] - b["old_logp"]) * b["advantages"][:, None] * m).sum() / num_tokens

    T.check_padding_invariance(times_mask, b)
    with pytest.raises(AssertionError, match="padding invariance.*nan"):
        T.check_padding_invariance(times_mask, b, pad_value=float("nan"))

    def normalized_by_padded_length(b, **_):  # Dr. GRPO with the local T instead of max_length
        return fusedrl.policy_loss(b["logp"], b["old_logp"], b["advantages"], b["mask"],
                                   aggregation="seq-mean-token-sum-norm")[0]

    with pytest.raises(AssertionError, match="padding invariance"):
        T.check_padding_invariance(normalized_by_padded_length, b)

    def leaky_gradient(b, num_tokens=None, **_):  # right value, gradient on every position
        x = b["logp"]
        return good_token_mean(b, num_tokens) + (x - x.detach()).sum()

    with pytest.raises(AssertionError, match="nonzero at padded positions"):
        T.check_padding_invariance(leaky_gradient, b)


def test_order_or_id_dependence_fails_permutation_checker():
    b = fixed_batch()

    def row_weighted(b, **_):
        rows = per_token(b).sum(-1)
        return (rows * torch.arange(1, len(rows) + 1)).sum()

    with pytest.raises(AssertionError, match="permutation invariance"):
        T.check_permutation_invariance(row_weighted, b)

    def id_weighted(b, **_):  # depends on the ids' values, not on which rows share a group
        return (per_token(b).sum(-1) * b["group_ids"]).sum()

    T.check_permutation_invariance(id_weighted, b, relabel_groups=False, perm=list(range(6)))
    with pytest.raises(AssertionError, match="relabelling group_ids"):
        T.check_permutation_invariance(id_weighted, b, perm=list(range(6)))

    def contiguous_groups(b, **_):  # TRL's view(-1, G) layout assumption: breaks when rows move
        rows = per_token(b).sum(-1).view(-1, 2)
        return (rows - rows.mean(-1, keepdim=True)).pow(2).sum() + rows[:, 0].sum()

    with pytest.raises(AssertionError, match="permutation invariance"):
        T.check_permutation_invariance(contiguous_groups, b, perm=[1, 0, 3, 2, 5, 4])


# ---------------------------------------------------------------------------------------------
# checker arguments


def test_checker_arguments():
    b = fixed_batch()
    with pytest.raises(ValueError, match="sum to"):
        T.check_microbatch_invariance(good_token_mean, b, [2, 2])
    with pytest.raises(ValueError, match="exactly once"):
        T.check_microbatch_invariance(good_token_mean, b, [[0, 1], [1, 2, 3, 4, 5]])
    with pytest.raises(ValueError, match="part of a group"):
        T.check_microbatch_invariance(good_token_mean, b, [1, 5], keep_groups=True)
    with pytest.raises(ValueError, match="7 ranks"):
        T.check_microbatch_invariance(good_token_mean, b, 1, ranks=7)
    with pytest.raises(ValueError, match="wrt"):
        T.check_microbatch_invariance(good_token_mean, b, 2, wrt=("entropy",))
    with pytest.raises(TypeError, match="one-element loss"):
        T.check_permutation_invariance(lambda b, **_: per_token(b), b)
    with pytest.raises(ValueError, match="perm"):
        T.check_permutation_invariance(good_token_mean, b, perm=[0, 0, 1, 2, 3, 4])
    with pytest.raises(TypeError, match="batch"):
        T.check_padding_invariance(good_token_mean, [1, 2])
    # groups kept whole: the pieces are made of whole groups
    T.check_microbatch_invariance(good_token_mean, b, 3, keep_groups=True)
    assert T.default_counts(b) == {"num_tokens": 20, "num_sequences": 6, "max_length": 5}
