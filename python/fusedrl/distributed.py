r"""Past one process: data-parallel normalizers and group advantages, vocabulary-parallel log-probs.

Import it explicitly (``import fusedrl.distributed``, or the attribute ``fusedrl.distributed``,
which loads it on first access): ``import fusedrl`` alone loads nothing of this module. Every
collective runs over ``group`` (a ``torch.distributed`` process group; None: the default group).
When torch.distributed is not initialized and ``group`` is None, every function is the one-process
computation (no collective runs), so the same training code runs unchanged on one process.

**Data parallel** (each rank holds different rows of one optimizer step's batch):

- :func:`global_normalizers`: the global counts that :func:`fusedrl.policy_loss` and
  :func:`fusedrl.aggregate` need (``num_tokens``, ``num_sequences``, ``max_length``,
  ``num_groups``), all-reduced in one collective (plus one for ``max_length`` and one all-gather for
  ``num_groups``), and the factor ``scale`` that undoes DDP / FSDP gradient averaging. With them the
  per-rank losses add up to the one-process loss (fusedrl's invariance law,
  python/fusedrl/reference/aggregate.py), and ``loss * scale`` gives, after DDP averages the
  gradients over the D ranks, exactly the one-process gradient::

      norms = fusedrl.distributed.global_normalizers(mask)          # one call per optimizer step
      loss, metrics = fusedrl.policy_loss(logp, old_logp, adv, mask, aggregation=mode, **norms)
      (loss * norms.scale).backward()                                # DDP averages: scale = D

  This is the bug class of verl PR #5798 (seq-mean losses dp_size^2 too small) and of per-rank
  local normalizers: the counts are global and the D is applied exactly once, here. verl's
  ``agg_loss(..., dp_size=D, batch_num_tokens=N, global_batch_size=S, loss_scale_factor=L)`` is
  ``policy_loss(..., num_tokens=N, num_sequences=S, max_length=L, exclude_empty_rows=True) * D``,
  i.e. ``loss * norms.scale`` with ``global_normalizers(mask, exclude_empty_rows=True)``.
- :func:`group_advantages`, :func:`phase_advantages`, :func:`segment_advantages`: the advantages of
  groups that span ranks (verl's ``uid`` groups after a shuffle, TRL's contiguous groups split by the
  sampler). The rewards, ids and masks are all-gathered (a few numbers per completion) and each rank
  runs the one-process estimator on the whole batch, then keeps its own rows: bitwise the
  one-process result for every estimator, scale and combine, including those with batch
  statistics (``scale="batch"``, reinforce++, gpg's global count, normalize_then_sum).
- :func:`gae`: GAE per row (rows are independent), with ``whiten=True`` whitening over the valid
  tokens of every rank (the mean and variance all-reduced: two collectives of 2 numbers).

**Vocabulary (tensor) parallel** (each rank holds a slice ``[vocab_start, vocab_start + V_r)`` of
the vocabulary, as Megatron's ``VocabParallelEmbedding`` / verl's vocab-parallel log-probs; the
``V_r`` may differ, so V need not divide by the group size):

- :func:`token_logprobs` of logits shards ``[..., V_r]``;
- :func:`linear_logprobs` of a weight shard ``[V_r, H]`` (and bias shard ``[V_r]``) applied to the
  replicated hidden states, chunked over tokens as :func:`fusedrl.linear_logprobs` (one chunk of
  ``[chunk, V_r]`` logits at a time).

Each shard's row statistics come from fusedrl's log-prob kernels (the ``cpu`` / ``cuda`` /
``triton`` launchers of python/fusedrl/ops/logprobs.py): the local max m_r, log-normalizer, entropy
H_r and the label's logit when the label lies in the shard. Then one MAX all-reduce gives the row
max M and one SUM all-reduce gives :math:`S = \sum_r e^{m_r - M} s_r`, the label logit (0 from
the ranks that do not hold it) and the entropy parts, with
:math:`H = \sum_r w_r H_r - \sum_r w_r \log w_r`, :math:`w_r` the probability mass of shard r
(no cancellation when one shard holds the mass). The backward needs no collective for the logits
(the kernel's backward runs with the global statistics; a row whose label is elsewhere gets no
one-hot term); :func:`linear_logprobs` all-reduces d hidden (the sum of every shard's
``d logits @ W_r``), as Megatron's column-parallel layer does for its replicated input.
"""

from __future__ import annotations

import functools

import dataclasses
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from fusedrl import _ext, dispatch
from fusedrl import _validate as check
from fusedrl.params import LogprobParams

__all__ = [
    "Normalizers",
    "global_normalizers",
    "dp_scale",
    "group_advantages",
    "phase_advantages",
    "segment_advantages",
    "gae",
    "token_logprobs",
    "linear_logprobs",
    "vocab_range",
]


# ---------------------------------------------------------------------------------------------
# process-group plumbing
# ---------------------------------------------------------------------------------------------


def _world(group) -> tuple[int, int]:
    """``(size, rank)`` of ``group``; ``(1, 0)`` without an initialized default group."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    if not dist.is_initialized():
        raise ValueError("group was given but torch.distributed is not initialized (call init_process_group)")
    return dist.get_world_size(group), dist.get_rank(group)


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    """``t`` reduced over ``group`` (a new tensor; ``t`` itself when there is one process)."""
    if _world(group)[0] == 1:
        return t
    out = t.clone()
    dist.all_reduce(out, op=op, group=group)
    return out


def _all_gather_rows(t: torch.Tensor, group, pad_value=0) -> tuple[torch.Tensor, list[int]]:
    """The ranks' ``t`` (same trailing shape and dtype, any number of rows) concatenated along dim 0
    in rank order, and the row count of each rank."""
    size = _world(group)[0]
    if size == 1:
        return t, [t.shape[0]]
    rows = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    counts = [torch.empty_like(rows) for _ in range(size)]
    dist.all_gather(counts, rows, group=group)
    counts = [int(c) for c in counts]
    wire = t.to(torch.uint8) if t.dtype == torch.bool else t
    padded = wire.new_full((max(counts),) + tuple(t.shape[1:]), pad_value)
    padded[: t.shape[0]] = wire
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    out = torch.cat([p[:c] for p, c in zip(parts, counts)])
    return (out.to(torch.bool) if t.dtype == torch.bool else out), counts


def _gather_tokens(t: torch.Tensor, group, length: int, pad_value=0) -> tuple[torch.Tensor, list[int]]:
    """:func:`_all_gather_rows` of a ``[N_r, T_r]`` tensor padded to the global ``length`` columns."""
    if t.shape[1] < length:
        t = torch.cat([t, t.new_full((t.shape[0], length - t.shape[1]), pad_value)], dim=1)
    return _all_gather_rows(t, group, pad_value)


def _max_int(value: int, group, device) -> int:
    return int(_all_reduce(torch.tensor([value], dtype=torch.int64, device=device), dist.ReduceOp.MAX, group))


def dp_scale(group=None) -> float:
    """The factor that undoes the gradient averaging of DDP / FSDP over ``group``: its size D."""
    return float(_world(group)[0])


# ---------------------------------------------------------------------------------------------
# data parallel: the global counts of the aggregation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Normalizers(Mapping):
    """The global counts of one optimizer step's batch, to pass as keywords (``**norms``) to
    :func:`fusedrl.policy_loss` / :func:`fusedrl.aggregate`, and ``scale``, the factor to multiply
    each rank's loss by (D under DDP / FSDP averaging, 1 otherwise; not a keyword).

    The counts are 0-dim float64 tensors on the mask's device (no host synchronization), except
    ``max_length`` (an int) and ``num_groups`` (an int); a count the batch cannot give is None and
    is left out of the keywords (``max_length`` in the packed layout without one given;
    ``num_groups`` without ``advantages``).
    """

    num_tokens: torch.Tensor
    num_sequences: torch.Tensor
    max_length: int | None = None
    num_groups: int | None = None
    scale: float = 1.0

    _KEYS = ("num_tokens", "num_sequences", "max_length", "num_groups")

    def __getitem__(self, key):
        if key not in self._KEYS or getattr(self, key) is None:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return (k for k in self._KEYS if getattr(self, k) is not None)

    def __len__(self):
        return sum(1 for _ in self)


def _as_list(name: str, value, n: int | None):
    """A tensor, a list / tuple of tensors (micro-batches) or None, as a list."""
    if value is None:
        return [None] * (n or 1)
    if isinstance(value, torch.Tensor):
        items = [value]
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        items = list(value)
    else:
        raise TypeError(f"{name} must be a tensor or a list / tuple of tensors (micro-batches), got {type(value).__name__}")
    if n is not None and len(items) != n:
        raise ValueError(f"{name} must have one entry per micro-batch of mask ({n}), got {len(items)}")
    return items


def global_normalizers(
    mask,
    *,
    group=None,
    dp_average: bool = True,
    exclude_empty_rows: bool = False,
    max_length: int | None = None,
    advantages=None,
    group_ids=None,
    cu_seqlens=None,
) -> Normalizers:
    r"""The global counts of the aggregation over the data-parallel ``group``, and the DDP factor.

    Call it once per optimizer step with this rank's masks (all its gradient-accumulation
    micro-batches as a list), pass the result as keywords to every micro-batch's
    :func:`fusedrl.policy_loss` / :func:`fusedrl.aggregate`, and multiply each loss by
    ``norms.scale``. The counts (over every rank and micro-batch; docs in
    python/fusedrl/reference/aggregate.py):

    - ``num_tokens``: :math:`\sum m` (the mask weights for a float mask);
    - ``num_sequences``: the rows (with ``exclude_empty_rows``: the rows holding a valid token,
      verl's rule);
    - ``max_length``: the given one, else the largest padded T of any rank and micro-batch (the T
      of the one-process padded batch), None in the packed layout;
    - ``num_groups`` (``aggregation="balanced"``; only with ``advantages``): the groups of
      ``group_ids`` holding a signed sequence. Balanced aggregation needs every group whole in one
      micro-batch of one rank (its per-group token means are local); a group met in two
      micro-batches or on two ranks raises ValueError on every rank, as does ``group_ids=None``
      with more than one micro-batch in all (the batch is then one group that is split).

    ``scale``: D = the size of ``group`` when ``dp_average`` (DDP and FSDP average gradients over
    the ranks; verl's and TRL's ``* dp_size``), else 1 (gradients summed, or reduced by hand).
    Then, for every aggregation, ``policy_loss(..., **norms) * norms.scale`` on each rank gives
    after averaging the gradient of the one-process loss on the concatenated batch, and the losses
    of the ranks (without the scale) sum to that loss.

    Args:
        mask: this rank's ``[B, T]`` mask (bool, integer or float weights), or a list of them (its
            micro-batches); with ``cu_seqlens`` the packed ``[1, N]`` / ``[N]`` masks.
        group: the data-parallel process group (None: the default group, or one process).
        dp_average: whether gradients are averaged over ``group`` (DDP, FSDP).
        exclude_empty_rows: count only rows with a valid token as sequences (verl).
        max_length: Dr. GRPO's L (TRL ``max_completion_length``; verl ``loss_scale_factor``).
        advantages, group_ids: as for ``aggregation="balanced"`` (one per micro-batch when mask is a
            list); ``num_groups`` is computed only when ``advantages`` is given.
        cu_seqlens: the packed layout's ``[S + 1]`` offsets (one per micro-batch).

    Returns:
        A :class:`Normalizers` (a mapping of the counts, plus ``.scale``).
    """
    from fusedrl import policy as _policy  # noqa: PLC0415
    from fusedrl.reference import aggregate as _agg  # noqa: PLC0415

    masks = _as_list("mask", mask, None)
    if not masks:
        raise ValueError("mask must hold at least one micro-batch")
    n = len(masks)
    advs = _as_list("advantages", advantages, n)
    gids = _as_list("group_ids", group_ids, n)
    cus = _as_list("cu_seqlens", cu_seqlens, n)
    check.boolean("dp_average", dp_average)
    check.boolean("exclude_empty_rows", exclude_empty_rows)
    if max_length is not None:
        max_length = check.integer("max_length", max_length)
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
    device = None
    tokens = sequences = None
    padded_length = 0
    signed_ids = []
    for k, (m, adv, gid, cu) in enumerate(zip(masks, advs, gids, cus)):
        name = "mask" if n == 1 else f"mask[{k}]"
        check.mask_tensor(name, m)
        if device is None:
            device = m.device
        check.same_device(name, m, "mask" if n == 1 else "mask[0]", masks[0])
        if cu is None:
            if m.dim() != 2:
                raise ValueError(f"{name} must have shape [B, T] (padded layout), got {tuple(m.shape)}")
            dtype = torch.float64
            _, weight = _agg.mask_weight(m, dtype)
            row_count = weight.sum(-1)
            padded_length = max(padded_length, m.shape[-1])
        else:
            rows = _policy._packed(name, torch.empty(m.shape, device=m.device), m, cu)
            _, weight = _agg.mask_weight(m.reshape(-1), torch.float64)
            cu64 = cu.to(torch.int64)
            prefix = torch.cat([weight.new_zeros(1), weight.cumsum(0)])
            row_count = prefix[cu64[1:]] - prefix[cu64[:-1]] if rows else weight.new_zeros(0)
        local_seq = (row_count > 0).sum().to(torch.float64) if exclude_empty_rows else torch.tensor(
            float(row_count.shape[0]), dtype=torch.float64, device=m.device)
        tokens = row_count.sum() if tokens is None else tokens + row_count.sum()
        sequences = local_seq if sequences is None else sequences + local_seq
        if adv is not None:
            values = torch.empty(m.shape if cu is None else (row_count.shape[0], 1), device=m.device)
            if cu is None:
                _policy._advantages(adv, values)
                sign = _agg.sequence_sign(adv, m, row_count)
            else:
                if tuple(adv.shape) != (row_count.shape[0],):
                    raise ValueError(f"advantages must have shape [S] = ({row_count.shape[0]},) in the packed layout "
                                     f"(per-sequence), got {tuple(adv.shape)}")
                sign = torch.where(row_count > 0, torch.sign(adv.detach().to(torch.float64)), 0.0)
            if gid is not None:
                _policy._group_ids(gid, values)
            signed_ids.append((gid, sign))
    size, _ = _world(group)
    stacked = _all_reduce(torch.stack([tokens, sequences]), dist.ReduceOp.SUM, group)
    if max_length is None and cus[0] is None:
        max_length = _max_int(padded_length, group, device)
    num_groups = None
    if advantages is not None:
        num_groups = _balanced_groups(signed_ids, group, device, size)
    return Normalizers(
        num_tokens=stacked[0], num_sequences=stacked[1], max_length=max_length, num_groups=num_groups,
        scale=float(size) if dp_average else 1.0,
    )


def _balanced_groups(signed_ids, group, device, size) -> int:
    """The number of groups with a signed sequence over every rank and micro-batch; ValueError
    (on every rank alike) when one such group is split."""
    if any(gid is None for gid, _ in signed_ids):
        if size > 1 or len(signed_ids) > 1:
            raise ValueError("aggregation='balanced' with group_ids=None treats the batch as one group, which is split "
                             "over micro-batches or ranks here: pass group_ids (each group whole on one rank)")
        return int(bool((signed_ids[0][1] != 0).any()))
    rank = _world(group)[1]
    local = []
    for k, (gid, sign) in enumerate(signed_ids):  # (id, rank, micro-batch) of each signed group here
        ids = torch.unique(gid[sign != 0].to(torch.int64))
        local.append(torch.stack([ids, torch.full_like(ids, rank), torch.full_like(ids, k)], dim=1))
    everywhere, _ = _all_gather_rows(torch.cat(local), group)
    places = torch.unique(everywhere, dim=0)  # one row per (id, rank, micro-batch)
    num_groups = int(torch.unique(everywhere[:, 0]).numel())
    if places.shape[0] != num_groups:
        raise ValueError("aggregation='balanced' needs every group whole in one micro-batch of one rank (its token means "
                         "are per group); some group_ids occur in several: keep each prompt's completions together")
    return num_groups


# ---------------------------------------------------------------------------------------------
# data parallel: advantages of groups that span ranks
# ---------------------------------------------------------------------------------------------


def _rows_tensor(name, value, dims, float_=True):
    check.tensor(name, value, check.FLOAT_DTYPES if float_ else check.INDEX_DTYPES)
    if value.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(f'{d} dims' for d in dims)}, got shape {tuple(value.shape)}")
    return value


def _local_rows(out: torch.Tensor, counts: list[int], rank: int, length: int | None) -> torch.Tensor:
    start = sum(counts[:rank])
    out = out[start: start + counts[rank]]
    return (out if length is None or out.dim() < 2 else out[:, :length]).clone()


def _check_mask(mask, rows: int, length: int | None, like):
    """A ``[rows, T]`` mask (all ones ``[rows, length]`` when None and ``length`` is given)."""
    from fusedrl import advantages as _adv  # noqa: PLC0415

    if mask is None:
        return None if length is None else torch.ones((rows, length), dtype=torch.bool, device=like.device)
    check.mask_tensor("mask", mask)
    if mask.dim() != 2 or mask.shape[0] != rows or (length is not None and mask.shape[1] != length):
        expected = f"[N, T] with N = {rows}" + ("" if length is None else f", T = {length}")
        raise ValueError(f"mask must have shape {expected}, got {tuple(mask.shape)}")
    check.same_device("mask", mask, "rewards", like)
    return mask


def group_advantages(rewards, group_ids=None, *, group=None, group_size=None, mask=None, baseline=None, **options):
    """:func:`fusedrl.group_advantages` over the rows of every rank of ``group``: rank r passes its
    rows (the rows of the one-process batch are the ranks' rows in rank order) and gets the
    advantages of those rows, equal to the one-process computation on the concatenated batch.

    ``group_ids`` must name the groups consistently across ranks (verl's ``uid``); ``group_size``
    lays contiguous groups over the concatenated rows (the number of rows of a rank need not be a
    multiple of it). ``mask`` ``[N_r, T_r]`` may have a different T on each rank (zero-padded to the
    largest); the output has this rank's T. ``options``: the other keywords of
    :func:`fusedrl.group_advantages` (estimator, scale, eps, weights, combine, ...), the same on
    every rank. Collectives: one all-gather of the row counts and one per tensor given.
    """
    from fusedrl import advantages as _adv  # noqa: PLC0415

    _rows_tensor("rewards", rewards, (1, 2))
    N = rewards.shape[0]
    size, rank = _world(group)
    if size == 1:
        return _adv.group_advantages(rewards, group_ids, group_size=group_size, mask=mask, baseline=baseline, **options)
    if group_ids is not None:
        _rows_tensor("group_ids", group_ids, (1,), float_=False)
    mask = _check_mask(mask, N, None, rewards)
    length = None if mask is None else mask.shape[1]
    all_rewards, counts = _all_gather_rows(rewards.contiguous(), group)
    all_ids = None if group_ids is None else _all_gather_rows(group_ids.contiguous(), group)[0]
    all_baseline = None if baseline is None else _all_gather_rows(_rows_tensor("baseline", baseline, (1,)).contiguous(), group)[0]
    all_mask = None
    if mask is not None:
        all_mask = _gather_tokens(mask.contiguous(), group, _max_int(length, group, rewards.device))[0]
    out = _adv.group_advantages(all_rewards, all_ids, group_size=group_size, mask=all_mask, baseline=all_baseline, **options)
    return _local_rows(out, counts, rank, length)


def phase_advantages(rewards, phase_ids, group_ids=None, *, group=None, group_size=None, mask=None, **options):
    """:func:`fusedrl.phase_advantages` over every rank's rows (as :func:`group_advantages`):
    ``rewards [N_r, P]`` (the same P everywhere), ``phase_ids [N_r, T_r]``, ``mask [N_r, T_r]``."""
    from fusedrl import advantages as _adv  # noqa: PLC0415

    size, rank = _world(group)
    if size == 1:
        return _adv.phase_advantages(rewards, phase_ids, group_ids, group_size=group_size, mask=mask, **options)
    _rows_tensor("rewards", rewards, (2,))
    _rows_tensor("phase_ids", phase_ids, (2,), float_=False)
    N, T = phase_ids.shape
    mask = _check_mask(mask, N, T, rewards)
    length = _max_int(T, group, rewards.device)
    all_rewards, counts = _all_gather_rows(rewards.contiguous(), group)
    all_phase = _gather_tokens(phase_ids.contiguous(), group, length)[0]
    all_mask = _gather_tokens(mask.contiguous(), group, length)[0]
    all_ids = None if group_ids is None else _all_gather_rows(group_ids.contiguous(), group)[0]
    out = _adv.phase_advantages(all_rewards, all_phase, all_ids, group_size=group_size, mask=all_mask, **options)
    return _local_rows(out, counts, rank, T)


def segment_advantages(trajectory_rewards, segment_rewards, segment_ids, group_ids=None, *, group=None,
                       group_size=None, mask=None, **options):
    """:func:`fusedrl.segment_advantages` over every rank's rows (as :func:`group_advantages`):
    ``segment_rewards [N_r, S_r]`` (zero-padded to the largest S), ``segment_ids`` and ``mask``
    ``[N_r, T_r]``."""
    from fusedrl import advantages as _adv  # noqa: PLC0415

    size, rank = _world(group)
    if size == 1:
        return _adv.segment_advantages(trajectory_rewards, segment_rewards, segment_ids, group_ids,
                                       group_size=group_size, mask=mask, **options)
    _rows_tensor("trajectory_rewards", trajectory_rewards, (1,))
    _rows_tensor("segment_rewards", segment_rewards, (2,))
    _rows_tensor("segment_ids", segment_ids, (2,), float_=False)
    N, T = segment_ids.shape
    mask = _check_mask(mask, N, T, trajectory_rewards)
    dev = trajectory_rewards.device
    length, segments = _max_int(T, group, dev), _max_int(segment_rewards.shape[1], group, dev)
    all_traj, counts = _all_gather_rows(trajectory_rewards.contiguous(), group)
    all_seg = _gather_tokens(segment_rewards.contiguous(), group, segments)[0]
    all_sid = _gather_tokens(segment_ids.contiguous(), group, length, pad_value=-1)[0]
    all_mask = _gather_tokens(mask.contiguous(), group, length)[0]
    all_ids = None if group_ids is None else _all_gather_rows(group_ids.contiguous(), group)[0]
    out = _adv.segment_advantages(all_traj, all_seg, all_sid, all_ids, group_size=group_size, mask=all_mask, **options)
    return _local_rows(out, counts, rank, T)


def gae(rewards, values, mask, *, group=None, whiten: bool = False, **options):
    """:func:`fusedrl.gae` on this rank's rows; ``whiten=True`` whitens the advantages over the
    valid tokens of every rank (verl's ``masked_whiten`` on the one-process batch: mean and unbiased
    variance all-reduced, two collectives). ``options``: gamma, lam, bootstrap, backend."""
    from fusedrl import advantages as _adv  # noqa: PLC0415
    from fusedrl.reference import advantages as _ref  # noqa: PLC0415

    check.boolean("whiten", whiten)
    if _world(group)[0] == 1 or not whiten:
        return _adv.gae(rewards, values, mask, whiten=whiten, **options)
    adv, returns = _adv.gae(rewards, values, mask, whiten=False, **options)
    valid = mask != 0
    x = torch.where(valid, adv, 0.0)
    sums = _all_reduce(torch.stack([valid.sum().to(adv.dtype), x.sum()]), dist.ReduceOp.SUM, group)
    count = sums[0]
    mean = sums[1] / torch.clamp(count, min=1.0)
    centred = torch.where(valid, adv - mean, 0.0)
    sq = _all_reduce((centred * centred).sum().reshape(1), dist.ReduceOp.SUM, group)[0]
    var = torch.where(count > 1, sq / torch.clamp(count - 1, min=1.0), 0.0)
    return torch.where(valid, centred * torch.rsqrt(var + _ref.WHITEN_EPS), 0.0), returns


# ---------------------------------------------------------------------------------------------
# vocabulary parallel: the local statistics (a kernel launcher, or torch for the torch backend)
# ---------------------------------------------------------------------------------------------

_KERNEL_IGNORE = -1  # the local kernels' ignore_index: never a local column


def _torch_forward(logits, labels, temperature, ignore_index, logp, entropy, row_max, log_norm):
    """The log-prob launchers' forward in torch (the ``torch`` backend): same outputs, same rules."""
    acc = row_max.dtype
    x = logits.to(acc) * (1.0 / temperature)
    ignored = labels == ignore_index
    m = x.amax(-1)
    shift = torch.clamp(x - torch.where(m == float("-inf"), 0.0, m)[:, None], min=-128.0)
    e = torch.where(x == float("-inf"), 0.0, torch.exp(shift))
    s = e.sum(-1)
    ls = torch.log(s)
    lab = torch.where(ignored, 0, labels)
    xl = x.gather(1, lab[:, None]).squeeze(1)
    row_max.copy_(torch.where(ignored, 0.0, m))
    log_norm.copy_(torch.where(ignored, 0.0, ls))
    logp.copy_(torch.where(ignored, 0.0, (xl - m) - ls))
    if entropy is not None:
        t = (e * shift).sum(-1)
        entropy.copy_(torch.where(ignored, 0.0, ls - t / s))


def _torch_backward(logits, labels, temperature, ignore_index, row_max, log_norm, entropy, grad_logp, grad_entropy,
                    grad):
    acc = row_max.dtype
    inv = 1.0 / temperature
    x = logits.to(acc) * inv
    ignored = labels == ignore_index
    lp = torch.clamp((x - row_max[:, None]) - log_norm[:, None], min=-128.0)
    p = torch.exp(lp)
    onehot = torch.zeros_like(x, dtype=torch.bool).scatter_(1, torch.where(ignored, 0, labels)[:, None], True)
    g_lp = torch.zeros_like(row_max) if grad_logp is None else grad_logp
    g_h = torch.zeros_like(row_max) if grad_entropy is None else grad_entropy
    h = torch.zeros_like(row_max) if entropy is None else entropy
    d = inv * (g_lp[:, None] * torch.where(onehot, -torch.expm1(lp), -p) - g_h[:, None] * p * (lp + h[:, None]))
    d = torch.where(ignored[:, None] | ((g_lp == 0) & (g_h == 0))[:, None], 0.0, d)
    grad.copy_(d.to(grad.dtype))


def _launchers(backend: str):
    if backend == "torch":
        return _torch_forward, _torch_backward
    from fusedrl.ops import logprobs as op  # noqa: PLC0415

    return functools.partial(op.FORWARD, backend), functools.partial(op.BACKWARD, backend)


def vocab_range(local_size: int, *, group=None, vocab_start=None, vocab_size=None, device=None) -> tuple[int, int]:
    """``(vocab_start, vocab_size)`` of this rank's shard of ``local_size`` columns: the given ones
    (checked), or, when both are None, the shards in rank order (one all-gather of the sizes, on
    ``device``: the logits' device; a CUDA one for NCCL)."""
    local_size = check.integer("local_size", local_size)
    if (vocab_start is None) != (vocab_size is None):
        raise ValueError("pass both vocab_start and vocab_size, or neither (then they are derived from the shard sizes)")
    if vocab_start is not None:
        start, total = check.integer("vocab_start", vocab_start), check.integer("vocab_size", vocab_size)
        if start < 0 or start + local_size > total:
            raise ValueError(f"vocab_start must be in [0, vocab_size - V_r] = [0, {total - local_size}] for a shard of "
                             f"V_r = {local_size} columns, got vocab_start={start}, vocab_size={total}")
        return start, total
    size, rank = _world(group)
    if size == 1:
        return 0, local_size
    mine = torch.tensor([local_size], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(sizes, mine, group=group)
    sizes = [int(s) for s in sizes]
    return sum(sizes[:rank]), sum(sizes)


def _labels_check(labels, params: LogprobParams, vocab_size: int) -> None:
    if check.has_data(labels):
        bad = (labels != params.ignore_index) & ((labels < 0) | (labels >= vocab_size))
        if bool(bad.any()):
            first = labels[bad].flatten()[0].item()
            raise ValueError(f"labels must be in [0, {vocab_size}) (the whole vocabulary) or "
                             f"ignore_index={params.ignore_index}, got {first}")


def _local_labels(labels, params: LogprobParams, start: int, width: int):
    """The kernels' labels: the local column of an in-shard label, column 0 (a stand-in whose one-hot
    term the backward removes) for a label held elsewhere, -1 for ignored rows; and the masks."""
    ignored = labels == params.ignore_index
    local = labels - start
    inside = ~ignored & (local >= 0) & (local < width)
    kernel_labels = torch.where(ignored, _KERNEL_IGNORE, torch.where(inside, local, 0))
    return kernel_labels, inside, ignored


class _Stats:
    """The per-row local statistics of one shard, filled chunk by chunk."""

    def __init__(self, N, acc, device, want_entropy):
        self.m, self.ls, self.xl = (_ext.empty(N, acc, device) for _ in range(3))
        self.logp = _ext.empty(N, acc, device)
        self.h = _ext.empty(N, acc, device) if want_entropy else None

    def fill(self, forward, logits, kernel_labels, inside, params, s, e):
        forward(logits, kernel_labels[s:e], params.temperature, _KERNEL_IGNORE, self.logp[s:e],
                None if self.h is None else self.h[s:e], self.m[s:e], self.ls[s:e])
        col = torch.where(inside[s:e], kernel_labels[s:e], 0)
        xl = logits.gather(1, col[:, None]).squeeze(1).to(self.m.dtype) * (1.0 / params.temperature)
        self.xl[s:e] = torch.where(inside[s:e], xl, 0.0)


def _combine(stats: _Stats, ignored, group):
    """The global ``(logp, entropy, row_max, log_norm)`` from every shard's statistics (module
    docstring): one MAX and one SUM all-reduce of [N]-sized vectors."""
    M = _all_reduce(stats.m, dist.ReduceOp.MAX, group)
    shift = stats.m - M
    log_w = shift + stats.ls  # log of the shard's sum-exp relative to M
    w = torch.exp(log_w)
    parts = [w, stats.xl]
    if stats.h is not None:
        zero = w == 0  # an all -inf shard: no mass (its H_r and log w_r are not numbers)
        parts += [torch.where(zero, 0.0, w * stats.h), torch.where(zero, 0.0, w * log_w)]
    total = _all_reduce(torch.stack(parts), dist.ReduceOp.SUM, group)
    log_S = torch.log(total[0])
    logp = torch.where(ignored, 0.0, (total[1] - M) - log_S)
    entropy = None
    if stats.h is not None:
        entropy = torch.where(ignored, 0.0, total[2] / total[0] - (total[3] / total[0] - log_S))
    return logp, entropy, torch.where(ignored, 0.0, M), torch.where(ignored, 0.0, log_S)


def _backward_chunk(backward, logits, kernel_labels, elsewhere, params, M, log_S, entropy, g_lp, g_h):
    """d (g_lp logp + g_h H) / d logits of one chunk, written over ``logits`` in place."""
    inv = 1.0 / params.temperature
    x0 = logits[:, 0].to(M.dtype) * inv  # the stand-in column, read before the kernel overwrites it
    backward(logits, kernel_labels, params.temperature, _KERNEL_IGNORE, M, log_S, entropy, g_lp, g_h, logits)
    if bool(elsewhere.any()):
        # the kernel gave column 0 the label's one-hot term; the row's label is on another shard
        lp = torch.clamp((x0 - M) - log_S, min=-128.0)
        p = torch.exp(lp)
        a = torch.zeros_like(M) if g_lp is None else g_lp
        b = torch.zeros_like(M) if g_h is None else g_h
        h = torch.zeros_like(M) if entropy is None else entropy
        fixed = inv * (a * (-p) - b * p * (lp + h))
        fixed = torch.where((a == 0) & (b == 0), 0.0, fixed)
        logits[:, 0] = torch.where(elsewhere, fixed.to(logits.dtype), logits[:, 0])


def _upstream(grad, dtype):
    return None if grad is None else grad.to(dtype).contiguous()


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, params: LogprobParams, start: int, group, backend: str):
        N, width = logits.shape
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        kernel_labels, inside, ignored = _local_labels(labels, params, start, width)
        stats = _Stats(N, acc, logits.device, params.return_entropy)
        forward, _ = _launchers(backend)
        if N:
            stats.fill(forward, logits, kernel_labels, inside, params, 0, N)
        logp, entropy, M, log_S = _combine(stats, ignored, group)
        ctx.save_for_backward(logits, kernel_labels, inside, ignored, M, log_S,
                              entropy if entropy is not None else M.new_empty(0))
        ctx.options = (params, backend)
        return logp, (entropy if entropy is not None else logp.new_empty(0))

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, kernel_labels, inside, ignored, M, log_S, entropy = ctx.saved_tensors
        params, backend = ctx.options
        entropy = entropy if entropy.numel() else None
        g_lp = _upstream(grad_logp, M.dtype)
        g_h = _upstream(grad_entropy, M.dtype) if entropy is not None else None
        grad = logits.detach().clone(memory_format=torch.contiguous_format)
        if grad.shape[0]:
            _backward_chunk(_launchers(backend)[1], grad, kernel_labels, ~inside & ~ignored, params, M, log_S, entropy,
                            g_lp, g_h)
        return grad, None, None, None, None, None


def _validate_logprob_options(temperature, ignore_index, return_entropy) -> LogprobParams:
    return LogprobParams(
        temperature=check.positive_float("temperature", temperature),
        ignore_index=check.integer("ignore_index", ignore_index),
        return_entropy=check.boolean("return_entropy", return_entropy),
    )


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    group=None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str | None = None,
):
    r""":func:`fusedrl.token_logprobs` with the vocabulary sharded over ``group``: this rank holds
    the columns ``[vocab_start, vocab_start + V_r)`` of the logits, ``logits [..., V_r]``, and every
    rank passes the same ``labels`` (global ids in ``[0, vocab_size)`` or ``ignore_index``).

    Returns, on every rank, the log-probs (and entropy) of the whole vocabulary, equal to
    ``fusedrl.token_logprobs`` of the concatenated logits; the gradient w.r.t. ``logits`` is this
    rank's columns of the unsharded gradient (no collective in the backward; every rank must
    backpropagate the same upstream gradient, as in tensor parallelism where the loss is
    replicated). ``vocab_start`` / ``vocab_size``: the shard's first column and the vocabulary size;
    both None: derived from the shard widths in rank order (:func:`vocab_range`, one all-gather).
    Collectives in the forward: one MAX and one SUM all-reduce of ``[N]``-sized vectors.

    Args:
        logits: ``[..., V_r]`` float32, bfloat16, float16 or float64 (``V_r >= 1``).
        labels: int64 / int32 shaped like ``logits[..., 0]``.
        group: the tensor-parallel process group (None: the default group, or one process).
        temperature, ignore_index, return_entropy, backend: as :func:`fusedrl.token_logprobs`
            (``backend`` picks the kernel of the local statistics).

    Returns:
        ``logp`` shaped like ``labels`` (float32; float64 for float64 logits), or ``(logp, entropy)``.
    """
    check.tensor("logits", logits, check.FLOAT_DTYPES)
    check.tensor("labels", labels, check.INDEX_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V_r] with V_r >= 1 (this rank's shard), got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}")
    check.same_device("labels", labels, "logits", logits)
    params = _validate_logprob_options(temperature, ignore_index, return_entropy)
    width = logits.shape[-1]
    start, total = vocab_range(width, group=group, vocab_start=vocab_start, vocab_size=vocab_size, device=logits.device)
    _labels_check(labels, params, total)
    from fusedrl.ops import logprobs as op  # noqa: PLC0415

    name = dispatch.select("token_logprobs", op.BACKENDS, logits.device, logits.dtype, backend)
    flat = logits.reshape(-1, width)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    flat_labels = labels.reshape(-1).to(torch.int64)
    logp, entropy = _VocabParallelLogprobs.apply(flat, flat_labels, params, start, group, name)
    logp = logp.view(labels.shape)
    return (logp, entropy.view(labels.shape)) if params.return_entropy else logp


class _VocabParallelLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, params: LogprobParams, start: int, chunk: int, group,
                reduce_hidden_grad: bool, backend: str):
        from fusedrl.linear import _chunk_logits  # noqa: PLC0415

        N, width = hidden.shape[0], weight.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        kernel_labels, inside, ignored = _local_labels(labels, params, start, width)
        stats = _Stats(N, acc, hidden.device, params.return_entropy)
        forward, _ = _launchers(backend)
        buffer = torch.empty(min(chunk, N), width, dtype=hidden.dtype, device=hidden.device)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            stats.fill(forward, _chunk_logits(hidden, weight, bias, s, e, buffer), kernel_labels, inside, params, s, e)
        logp, entropy, M, log_S = _combine(stats, ignored, group)
        ctx.save_for_backward(hidden, weight, bias, kernel_labels, inside, ignored, M, log_S,
                              entropy if entropy is not None else M.new_empty(0))
        ctx.options = (params, chunk, group, reduce_hidden_grad, backend)
        return logp, (entropy if entropy is not None else logp.new_empty(0))

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        from fusedrl.linear import _chunk_logits  # noqa: PLC0415

        hidden, weight, bias, kernel_labels, inside, ignored, M, log_S, entropy = ctx.saved_tensors
        params, chunk, group, reduce_hidden_grad, backend = ctx.options
        entropy = entropy if entropy.numel() else None
        g_lp = _upstream(grad_logp, M.dtype)
        g_h = _upstream(grad_entropy, M.dtype) if entropy is not None else None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        N = hidden.shape[0]
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        d_hidden = torch.zeros_like(hidden) if need_h else None
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        d_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if (need_b and bias is not None) else None
        backward = _launchers(backend)[1]
        elsewhere = ~inside & ~ignored
        buffer = torch.empty(min(chunk, N), weight.shape[0], dtype=hidden.dtype, device=hidden.device)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            logits = _chunk_logits(hidden, weight, bias, s, e, buffer)
            _backward_chunk(backward, logits, kernel_labels[s:e], elsewhere[s:e], params, M[s:e], log_S[s:e],
                            None if entropy is None else entropy[s:e], None if g_lp is None else g_lp[s:e],
                            None if g_h is None else g_h[s:e])
            if d_hidden is not None:
                torch.mm(logits, weight, out=d_hidden[s:e])
            if d_weight is not None:
                d_weight.addmm_(logits.t().to(acc), hidden[s:e].to(acc))
            if d_bias is not None:
                d_bias += logits.sum(0, dtype=acc)
        if d_hidden is not None and reduce_hidden_grad:
            d_hidden = _all_reduce(d_hidden, dist.ReduceOp.SUM, group)
        return (
            d_hidden,
            None if d_weight is None else d_weight.to(weight.dtype),
            None if d_bias is None else d_bias.to(bias.dtype),
            None, None, None, None, None, None, None,
        )


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    group=None,
    bias: torch.Tensor | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    reduce_hidden_grad: bool = True,
    backend: str | None = None,
):
    r""":func:`fusedrl.linear_logprobs` with the head's vocabulary sharded over ``group``: this rank
    holds ``weight [V_r, H]`` (and ``bias [V_r]``), the rows ``[vocab_start, vocab_start + V_r)`` of
    the head; ``hidden [..., H]`` and ``labels`` are the same on every rank.

    Values equal ``fusedrl.linear_logprobs`` with the concatenated weight, without any rank holding
    more than one chunk of ``[chunk_size, V_r]`` logits (the forward and the backward chunk over
    tokens as python/fusedrl/linear.py does: GEMM, kernel, drop; the backward recomputes). Gradients:
    ``weight`` and ``bias`` get this rank's rows of the unsharded gradient; ``hidden`` gets the
    unsharded gradient (the sum over shards, all-reduced in the backward) when
    ``reduce_hidden_grad`` (the default), else this shard's part (when the caller's model reduces
    it, e.g. Megatron's ``copy_to_tensor_model_parallel_region`` before the head).

    Args:
        hidden: ``[..., H]`` float32, bfloat16, float16 (or float64).
        weight: ``[V_r, H]`` this rank's shard, hidden's dtype and device.
        labels: int64 / int32 shaped like ``hidden[..., 0]``, global ids.
        group, vocab_start, vocab_size: as :func:`token_logprobs`.
        bias: optional ``[V_r]`` shard.
        temperature, ignore_index, return_entropy, chunk_size, backend: as
            :func:`fusedrl.linear_logprobs`.
        reduce_hidden_grad: all-reduce d hidden over ``group`` in the backward.

    Returns:
        ``logp`` shaped like ``labels`` (float32; float64 for float64), or ``(logp, entropy)``.
    """
    from fusedrl import linear as _linear  # noqa: PLC0415
    from fusedrl.ops import logprobs as op  # noqa: PLC0415

    check.tensor("labels", labels, check.INDEX_DTYPES)
    # The single-device checks (shapes, dtypes, devices, bias, chunk_size); labels are checked
    # against the whole vocabulary below, not against this shard.
    params = _linear.validate(hidden, weight, torch.zeros_like(labels), bias, temperature, ignore_index, return_entropy,
                              chunk_size)
    start, total = vocab_range(weight.shape[0], group=group, vocab_start=vocab_start, vocab_size=vocab_size,
                               device=hidden.device)
    _labels_check(labels, params, total)
    check.boolean("reduce_hidden_grad", reduce_hidden_grad)
    name = dispatch.select("linear_logprobs", op.BACKENDS, hidden.device, hidden.dtype, backend)
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).to(torch.int64)
    chunk = chunk_size or _linear.default_chunk_size(flat.shape[0], weight.shape[0], hidden.dtype)
    logp, entropy = _VocabParallelLinear.apply(flat, weight, bias, flat_labels, params, start, chunk, group,
                                               reduce_hidden_grad, name)
    logp = logp.view(labels.shape)
    return (logp, entropy.view(labels.shape)) if params.return_entropy else logp

