"""Invariance checkers of any loss function: micro-batching, permutation, padding (see
:mod:`fusedrl.testing`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import fields

import torch

from fusedrl.testing.tolerances import max_error

# A checker calls ``loss_fn(batch, **counts)`` on the batch and on transformed batches. ``batch``
# is a mapping (or a dataclass such as RLBatch) of tensors whose first dimension is the sequence
# (row); other values are passed through. ``loss_fn`` gets a batch of the same type and returns a
# scalar loss tensor or a tuple whose first element is it. Gradients are taken w.r.t. the floating
# tensors named by ``wrt``.


def default_counts(batch, mask_key: str = "mask") -> dict:
    """The global counts of a padded batch, as keywords of a loss: ``num_tokens`` (the mask's sum),
    ``num_sequences`` (B) and ``max_length`` (T), Python numbers. The keywords of
    :func:`fusedrl.policy_loss` and :func:`fusedrl.aggregate`."""
    mask = _as_dict(batch)[0][mask_key]
    total = mask.sum().item()
    return {"num_tokens": total, "num_sequences": int(mask.shape[0]), "max_length": int(mask.shape[1])}


def _as_dict(batch):
    """(dict of fields, function rebuilding a batch of the caller's type from such a dict)."""
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return {f.name: getattr(batch, f.name) for f in fields(batch)}, lambda d: dataclasses.replace(batch, **d)
    if isinstance(batch, Mapping):
        return dict(batch), dict
    raise TypeError(f"batch must be a mapping or a dataclass of tensors, got {type(batch).__name__}")


def _num_rows(d: dict, mask_key: str) -> int:
    if isinstance(d.get(mask_key), torch.Tensor) and d[mask_key].dim() >= 1:
        return int(d[mask_key].shape[0])
    for v in d.values():
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            return int(v.shape[0])
    raise ValueError("batch holds no tensor with a row dimension")


def _take(d: dict, index: torch.Tensor, B: int) -> dict:
    return {k: (v[index.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == B else v)
            for k, v in d.items()}


def _resolve_counts(counts, batch, mask_key: str) -> dict:
    if counts is None:
        return default_counts(batch, mask_key)
    if callable(counts):
        counts = counts(batch)
    if not isinstance(counts, Mapping):
        raise TypeError(
            f"counts must be None, a mapping of keywords or a callable returning one, got {type(counts).__name__}"
        )
    return dict(counts)


def _loss_and_grads(loss_fn, d: dict, rebuild, counts: dict, wrt) -> tuple[torch.Tensor, dict]:
    d = dict(d)
    leaves = {}
    for key in wrt:
        if key not in d:
            raise ValueError(f"wrt names {key!r}, which the batch does not hold (keys: {', '.join(d)})")
        value = d[key]
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"wrt names {key!r}, which is not a floating-point tensor")
        leaves[key] = d[key] = value.detach().clone().requires_grad_(True)
    out = loss_fn(rebuild(d), **counts)
    loss = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError("loss_fn must return a one-element loss tensor or a tuple whose first element is one")
    loss = loss.reshape(())
    grads = dict.fromkeys(leaves)
    if loss.requires_grad and leaves:
        got = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        grads = dict(zip(leaves, got))
    grads = {k: (torch.zeros_like(leaves[k]) if g is None else g.detach()) for k, g in grads.items()}
    return loss.detach(), grads


def _bound(want: torch.Tensor, rtol: float, atol: float) -> float:
    w = want.detach().double()
    w = w[torch.isfinite(w)]
    return atol + rtol * (float(w.abs().max()) if w.numel() else 0.0)


def _fmt(t: torch.Tensor) -> str:
    return f"{float(t):.10g}" if t.numel() == 1 else str(t)


def _worst(got: torch.Tensor, want: torch.Tensor) -> str:
    diff = (got.detach().double() - want.detach().double()).abs().nan_to_num(nan=float("inf"))
    same = (torch.isnan(got) & torch.isnan(want)) | (got == want)
    diff = diff.masked_fill(same, 0.0)
    at = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    return f"at {at}: {float(got[at]):.10g} vs {float(want[at]):.10g}"


def _compare_all(what: str, loss, want_loss, grads, want_grads, rtol, atol, hint: str) -> None:
    err, bound = max_error(loss, want_loss), _bound(want_loss, rtol, atol)
    if not err <= bound:
        raise AssertionError(
            f"{what}: loss {_fmt(loss)} differs from {_fmt(want_loss)} by {err:.3g} > {bound:.3g} "
            f"(atol {atol:g} + rtol {rtol:g} x |loss|). {hint}"
        )
    for key, g in grads.items():
        err, bound = max_error(g, want_grads[key]), _bound(want_grads[key], rtol, atol)
        if not err <= bound:
            raise AssertionError(
                f"{what}: gradient w.r.t. {key} differs by {err:.3g} > {bound:.3g} "
                f"({_worst(g, want_grads[key])}). {hint}"
            )


def _chunks(index: torch.Tensor, n: int) -> list[torch.Tensor]:
    return [c for c in torch.tensor_split(index, min(n, max(len(index), 1))) if len(c)]


def _group_chunks(index: torch.Tensor, groups: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``index`` cut into at most n pieces, each holding whole groups (order of first appearance)."""
    ids = groups[index]
    order = []
    for gid in ids.tolist():
        if gid not in order:
            order.append(gid)
    pieces = []
    for chunk in _chunks(torch.arange(len(order)), n):
        members = torch.isin(ids, torch.tensor([order[i] for i in chunk.tolist()], dtype=ids.dtype))
        pieces.append(index[members])
    return pieces


def _partition(B: int, splits, ranks: int, groups: torch.Tensor | None) -> list[list[torch.Tensor]]:
    """``[rank][micro-batch] -> row indices``."""
    rows = torch.arange(B)
    if isinstance(splits, int) and not isinstance(splits, bool):
        if splits < 1:
            raise ValueError(f"splits must be >= 1, got {splits}")
        cut = _chunks if groups is None else (lambda idx, n: _group_chunks(idx, groups, n))
        shards = cut(rows, ranks)
        if len(shards) < ranks:
            raise ValueError(f"cannot deal the batch to {ranks} ranks: it holds {B} rows"
                             + ("" if groups is None else f" in {len(shards)} whole groups"))
        return [cut(shard, splits) for shard in shards]
    splits = list(splits)
    if splits and all(isinstance(s, int) and not isinstance(s, bool) for s in splits):
        if ranks != 1:
            raise ValueError("splits as micro-batch sizes apply to ranks=1; pass an int or explicit row indices")
        if any(s < 0 for s in splits) or sum(splits) != B:
            raise ValueError(f"splits as sizes must be >= 0 and sum to the batch's {B} rows, got {splits}")
        pieces = [p for p in torch.split(rows, splits) if len(p)]
    else:
        pieces = [torch.as_tensor(p, dtype=torch.int64).reshape(-1) for p in splits]
        seen = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
        if len(seen) != B or not torch.equal(seen.sort().values, rows):
            raise ValueError(f"splits as row indices must cover each of the {B} rows exactly once")
        pieces = [p for p in pieces if len(p)]
    if groups is not None:
        for p in pieces:
            inside = torch.isin(groups, groups[p]).sum()
            if int(inside) != len(p):
                raise ValueError("keep_groups=True: a micro-batch of splits holds part of a group")
    return [pieces[r::ranks] for r in range(ranks)]


def check_microbatch_invariance(
    loss_fn,
    batch,
    splits=2,
    *,
    ranks: int = 1,
    counts=None,
    wrt=("logp",),
    keep_groups: bool = False,
    group_key: str = "group_ids",
    mask_key: str = "mask",
    rtol: float = 1e-6,
    atol: float = 1e-6,
) -> None:
    """Assert the micro-batch / data-parallel law: with global counts, the losses of the pieces add
    up to the full-batch loss, and their gradients to its gradient.

    The rows are dealt to ``ranks`` simulated ranks (contiguous shards), each rank's shard is cut
    into micro-batches, ``loss_fn(piece, **counts)`` runs on every piece with the full batch's
    counts, and the result is compared with ``loss_fn(batch, **counts)``: loss and gradients (w.r.t.
    ``wrt``, scattered back to the full batch's rows) within ``atol + rtol * max|full|``.

    Args:
        loss_fn: ``loss_fn(batch, **counts) -> loss`` or ``(loss, ...)``.
        batch: a mapping or dataclass of tensors with the rows first (e.g. :class:`RLBatch`).
        splits: micro-batches per rank (int; near-equal contiguous pieces, empty ones dropped), a
            list of micro-batch sizes summing to B (``ranks=1``), or a list of row-index sequences
            partitioning the rows (dealt round-robin to the ranks).
        ranks: number of simulated data-parallel ranks.
        counts: keywords passed to every call: None (:func:`default_counts` of the full batch:
            ``num_tokens``, ``num_sequences``, ``max_length``), a mapping, or a callable of the
            full batch returning one (e.g. to add ``num_groups``).
        wrt: keys of the tensors whose gradients are compared.
        keep_groups: every piece holds whole groups of ``batch[group_key]`` (needed by losses
            normalized per group, e.g. ``aggregation="balanced"``).

    Ranks are summed like micro-batches: fusedrl's convention that losses add up (DDP averages
    gradients over D ranks, so TRL and verl multiply each rank's loss by D; check such a loss
    without that factor).

    Raises:
        AssertionError naming what differs; ValueError for a bad partition.
    """
    d, rebuild = _as_dict(batch)
    B = _num_rows(d, mask_key)
    if not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks must be an int >= 1, got {ranks!r}")
    groups = None
    if keep_groups:
        if not isinstance(d.get(group_key), torch.Tensor):
            raise ValueError(f"keep_groups=True needs the batch's {group_key!r} tensor")
        groups = d[group_key].detach().cpu()
    plan = _partition(B, splits, ranks, groups)
    kw = _resolve_counts(counts, batch, mask_key)
    full_loss, full_grads = _loss_and_grads(loss_fn, d, rebuild, kw, wrt)

    total = torch.zeros((), dtype=torch.float64)
    grads = {k: torch.zeros_like(g, dtype=torch.float64) for k, g in full_grads.items()}
    for shard in plan:
        for index in shard:
            loss, g = _loss_and_grads(loss_fn, _take(d, index, B), rebuild, kw, wrt)
            total = total + loss.double().cpu()
            for k in grads:
                grads[k].index_add_(0, index.to(grads[k].device), g[k].double())
    sizes = [[len(i) for i in shard] for shard in plan]
    where = f"{sum(map(len, sizes))} micro-batches over {ranks} rank(s), rows per micro-batch {sizes}"
    _compare_all(
        f"micro-batch invariance ({where})",
        total, full_loss, grads, full_grads, rtol, atol,
        f"The pieces must add up to the full batch when given its global counts ({', '.join(kw) or 'none'}): "
        "a loss normalized by a count of its own micro-batch (tokens, sequences, groups) instead of the "
        "global one breaks this law.",
    )


def _relabelled(ids: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, dict]:
    unique = torch.unique(ids)
    new = (torch.randperm(3 * len(unique) + 5, generator=g)[: len(unique)] * 7 + 11).to(ids.dtype)
    mapped = new.to(ids.device)[torch.searchsorted(unique, ids)]
    return mapped, dict(zip(unique.tolist(), new.tolist()))


def check_permutation_invariance(
    loss_fn,
    batch,
    *,
    perm=None,
    relabel_groups: bool = True,
    seed: int = 0,
    counts=None,
    wrt=("logp",),
    group_key: str = "group_ids",
    mask_key: str = "mask",
    rtol: float = 1e-6,
    atol: float = 1e-6,
) -> None:
    """Assert that permuting the sequences (rows) and relabelling the group ids changes nothing:
    the loss is the same and each row's gradient moves with its row.

    Args:
        loss_fn, batch, counts, wrt, mask_key: as :func:`check_microbatch_invariance` (counts: the
            batch's own by default).
        perm: the row permutation (default: a random one from ``seed``).
        relabel_groups: map the ids in ``batch[group_key]`` (when present) through a random
            bijection onto other, non-contiguous integers: a loss must depend on which rows share
            a group, not on the ids' values or order.
        seed: seeds the random permutation and relabelling.

    Raises:
        AssertionError naming what differs.
    """
    d, rebuild = _as_dict(batch)
    B = _num_rows(d, mask_key)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(B, generator=g) if perm is None else torch.as_tensor(perm, dtype=torch.int64)
    if len(perm) != B or not torch.equal(perm.sort().values, torch.arange(B)):
        raise ValueError(f"perm must be a permutation of range({B}), got {perm.tolist()}")
    kw = _resolve_counts(counts, batch, mask_key)
    loss, grads = _loss_and_grads(loss_fn, d, rebuild, kw, wrt)
    moved = _take(d, perm, B)
    relabel = ""
    if relabel_groups and isinstance(moved.get(group_key), torch.Tensor):
        moved[group_key], mapping = _relabelled(moved[group_key], g)
        relabel = f" and relabelling {group_key} {mapping}"
    p_loss, p_grads = _loss_and_grads(loss_fn, moved, rebuild, kw, wrt)
    _compare_all(
        f"permutation invariance (rows permuted by {perm.tolist()}{relabel})",
        p_loss, loss, p_grads, {k: v[perm.to(v.device)] for k, v in grads.items()}, rtol, atol,
        "A loss must not depend on the order of the sequences nor on the values of the group ids.",
    )


def _is_token_tensor(v, B: int, T: int) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() >= 2 and tuple(v.shape[:2]) == (B, T)


def _broadcast(where: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B, T] boolean broadcast over the trailing dimensions of ``like``."""
    return where.reshape(tuple(where.shape) + (1,) * (like.dim() - 2)).expand(like.shape)


def check_padding_invariance(
    loss_fn,
    batch,
    *,
    extra: int = 3,
    pad_value="random",
    refill: bool = True,
    seed: int = 0,
    counts=None,
    wrt=("logp",),
    mask_key: str = "mask",
    token_keys=None,
    rtol: float = 1e-6,
    atol: float = 1e-6,
) -> None:
    """Assert that padded tokens change nothing: appending ``extra`` padded positions to every row
    (mask 0) and, with ``refill``, overwriting the values at the existing padded positions leave
    the loss and the gradients at the valid positions unchanged, and give zero gradient at every
    padded position.

    Args:
        loss_fn, batch, wrt, mask_key: as :func:`check_microbatch_invariance`.
        extra: padded positions appended to each row.
        pad_value: the values written at padded positions of the floating token tensors:
            ``"random"`` (finite garbage, standard deviation 10) or a number (``float("nan")`` is
            the strict test: a loss that multiplies padded values by a zero mask fails it, one that
            selects with ``torch.where`` passes). Integer token tensors are padded with 0.
        refill: also overwrite the values at the batch's own padded positions.
        seed: seeds the random garbage.
        counts: keywords passed to both calls; default :func:`default_counts` of the unpadded batch
            (so ``max_length`` stays the original T: a loss normalized by the padded length fails).
        token_keys: the [B, T, ...] tensors to pad; default: every tensor whose first two
            dimensions are the mask's.

    Raises:
        AssertionError naming what differs.
    """
    d, rebuild = _as_dict(batch)
    mask = d[mask_key]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"batch[{mask_key!r}] must be a [B, T] mask tensor")
    if not isinstance(extra, int) or extra < 0:
        raise ValueError(f"extra must be an int >= 0, got {extra!r}")
    B, T = mask.shape
    if token_keys is None:
        token_keys = [k for k, v in d.items() if _is_token_tensor(v, B, T)]
    g = torch.Generator().manual_seed(seed)
    pad = mask == 0
    new_pad = torch.ones(B, extra, dtype=torch.bool, device=pad.device)
    all_pad = torch.cat([pad, new_pad], 1)  # every padded position of the padded batch
    garbage_at = torch.cat([pad if refill else torch.zeros_like(pad), new_pad], 1)
    padded = dict(d)
    for key in token_keys:
        v = d[key]
        wide = torch.cat([v, v.new_zeros((B, extra) + tuple(v.shape[2:]))], 1)
        if key != mask_key:
            where = _broadcast(garbage_at, wide)
            if not v.is_floating_point():
                wide = wide.masked_fill(where, 0)
            elif pad_value == "random":
                garbage = torch.randn(wide.shape, generator=g, dtype=torch.float64) * 10
                wide = torch.where(where, garbage.to(device=v.device, dtype=v.dtype), wide)
            else:
                wide = wide.masked_fill(where, float(pad_value))
        padded[key] = wide
    kw = _resolve_counts(counts, batch, mask_key)
    loss, grads = _loss_and_grads(loss_fn, d, rebuild, kw, wrt)
    p_loss, p_grads = _loss_and_grads(loss_fn, padded, rebuild, kw, wrt)

    desc = "random finite values" if pad_value == "random" else f"{pad_value!r}"
    refilled = f", {int(pad.sum())} existing padded position(s) refilled" if refill else ""
    what = f"padding invariance ({extra} padded position(s) appended per row{refilled}, values {desc})"
    hint = ("A loss must not read padded positions: a mean over T instead of over the mask, a "
            "normalization by the padded length, or (for NaN/inf padding) a product of padded values "
            "with a zero mask breaks this.")
    clean, valid = {}, {}
    for key, gk in p_grads.items():
        if _is_token_tensor(gk, B, T + extra):
            leak = gk[all_pad]
            if leak.numel() and not bool((leak.abs() <= atol).all()):
                worst = float(leak.abs().nan_to_num(nan=float("inf")).max())
                raise AssertionError(
                    f"{what}: gradient w.r.t. {key} is nonzero at padded positions (max |grad| {worst:.3g}). {hint}"
                )
            # compared at the valid positions (the padded ones of the original batch are zero above)
            valid[key] = gk[:, :T].masked_fill(_broadcast(pad, gk[:, :T]), 0.0)
            clean[key] = grads[key].masked_fill(_broadcast(pad, grads[key]), 0.0)
        else:
            valid[key], clean[key] = gk, grads[key]
    _compare_all(what, p_loss, loss, valid, clean, rtol, atol, hint)
