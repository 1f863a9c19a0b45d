"""Numerics-testing helpers for fusedrl's own tests and for users who test their losses and kernels.

Tolerances follow one rule: a float32 (or float64) computation must be within ``1e-5`` (``1e-10``)
of a float64 gold, relative to the gold's largest magnitude, and at least on the unit scale
(``floor=1``): a log-prob, entropy or loss of magnitude below one is held to an absolute ``1e-5``,
since its float32 rounding comes from the O(1) terms it is computed from. A bfloat16 or float16
computation must be no worse than twice the error of the same computation done by eager torch in
that dtype.

Contents:

- tolerances: :data:`RTOL`, :func:`max_error`, :func:`scale_of`, :func:`assert_close_to_reference`;
- hypothesis strategies (hypothesis is imported only when one is built): :func:`rl_batches`
  (:class:`RLBatch`), :func:`preference_pairs` (:class:`PreferencePairs`),
  :func:`preference_lists` (:class:`PreferenceLists`), :func:`logits_with_labels`
  (:class:`LogitsBatch`), each with knobs for dtype, extremes and degenerate layouts;
- invariance checkers for any loss function ``loss_fn(batch, **counts)``:
  :func:`check_microbatch_invariance`, :func:`check_permutation_invariance`,
  :func:`check_padding_invariance`, with :func:`default_counts`. They raise AssertionError saying
  what differs; run them on float64 batches (their default tolerance is 1e-6).

>>> from hypothesis import given
>>> from fusedrl.testing import rl_batches, check_microbatch_invariance
>>> @given(rl_batches(dtype=torch.float64))
... def test_my_loss_adds_up(batch):
...     check_microbatch_invariance(my_loss, batch, splits=2, ranks=2)  # doctest: +SKIP
"""

from __future__ import annotations

from fusedrl.testing.invariance import (
    default_counts,
    check_microbatch_invariance,
    check_permutation_invariance,
    check_padding_invariance,
)
from fusedrl.testing.strategies import (
    RLBatch,
    PreferencePairs,
    PreferenceLists,
    LogitsBatch,
    AWKWARD_VOCAB_SIZES,
    rl_batches,
    preference_pairs,
    preference_lists,
    logits_with_labels,
)
from fusedrl.testing.tolerances import RTOL, max_error, scale_of, assert_close_to_reference

__all__ = [
    "RTOL",
    "max_error",
    "scale_of",
    "assert_close_to_reference",
    "RLBatch",
    "PreferencePairs",
    "PreferenceLists",
    "LogitsBatch",
    "AWKWARD_VOCAB_SIZES",
    "rl_batches",
    "preference_pairs",
    "preference_lists",
    "logits_with_labels",
    "default_counts",
    "check_microbatch_invariance",
    "check_permutation_invariance",
    "check_padding_invariance",
]
