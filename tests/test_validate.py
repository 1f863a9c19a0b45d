"""Every public function that takes a mask accepts the same dtypes (fusedrl/_validate.py
MASK_DTYPES: bool, any integer, any floating dtype; nonzero = valid) with the same result as a bool
mask of the same valid tokens, and rejects any other dtype with a TypeError naming the argument."""

from __future__ import annotations

import pytest
import torch

import fusedrl
from fusedrl import _validate as check

B, T = 3, 5


def _inputs():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    return g, logp, valid


def _calls():
    g, logp, valid = _inputs()
    old = logp + 0.1
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    return valid, {
        "policy_loss": lambda m: fusedrl.policy_loss(logp, old, adv, m)[0],
        "value_loss": lambda m: fusedrl.value_loss(v, v + 0.1, r, m, clip=0.2)[0],
        "aggregate": lambda m: fusedrl.aggregate(logp, m),
        "group_advantages": lambda m: fusedrl.group_advantages(torch.randn(B, generator=torch.Generator().manual_seed(1),
                                                                           dtype=torch.float64), group_size=B, mask=m),
        "gae": lambda m: fusedrl.gae(r, v, m)[0],
        "discounted_returns": lambda m: fusedrl.discounted_returns(r, m),
        "sequence_logps": lambda m: fusedrl.sequence_logps(logp, m),
    }


CALLS = list(_calls()[1])


@pytest.mark.parametrize("dtype", check.MASK_DTYPES, ids=str)
@pytest.mark.parametrize("name", CALLS)
def test_every_mask_dtype_gives_the_bool_result(name, dtype):
    valid, calls = _calls()
    want = calls[name](valid)
    got = calls[name](valid.to(dtype))
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", CALLS)
def test_other_mask_dtypes_raise_naming_the_mask(name):
    valid, calls = _calls()
    for bad in (valid.to(torch.complex64),):
        with pytest.raises(TypeError, match=r"\bmask\b"):
            calls[name](bad)


# N >= 2^31 faked with stride-0 expanded tensors (no memory for the data): each public function
# must refuse before it allocates anything, naming the argument (scripts/fuzz.py --big probes).
_BIG = 2**31 + 1
_BIG_CALLS = {
    "logits": lambda: fusedrl.token_logprobs(
        torch.zeros(1, 3).expand(_BIG, 3), torch.zeros(1, dtype=torch.int64).expand(_BIG)),
    "hidden": lambda: fusedrl.linear_logprobs(
        torch.zeros(1, 2).expand(_BIG, 2), torch.zeros(3, 2), torch.zeros(1, dtype=torch.int64).expand(_BIG)),
    "logp": lambda: fusedrl.policy_loss(
        torch.zeros(1, 1).expand(_BIG, 1), None, torch.zeros(1).expand(_BIG),
        torch.ones(1, 1, dtype=torch.bool).expand(_BIG, 1)),
    "rewards": lambda: fusedrl.group_advantages(torch.zeros(1).expand(_BIG + 1), group_size=2),
    "rewards ": lambda: fusedrl.gae(
        torch.zeros(1, 1).expand(_BIG, 1), torch.zeros(1, 1).expand(_BIG, 1),
        torch.ones(1, 1, dtype=torch.bool).expand(_BIG, 1)),
    "rewards  ": lambda: fusedrl.discounted_returns(
        torch.zeros(1, 1).expand(1, _BIG), torch.ones(1, 1, dtype=torch.bool).expand(1, _BIG)),
}


@pytest.mark.parametrize("name", list(_BIG_CALLS))
def test_a_dimension_past_2_31_raises_naming_the_argument(name):
    with pytest.raises(ValueError, match=rf"^{name.strip()} has a dimension above 2\*\*31 - 1"):
        _BIG_CALLS[name]()


def test_the_dimension_limit_is_inclusive():
    check.tensor("x", torch.zeros(1).expand(check.MAX_DIM))  # at the limit: accepted
    with pytest.raises(ValueError, match="x has a dimension"):
        check.tensor("x", torch.zeros(1).expand(check.MAX_DIM + 1))
