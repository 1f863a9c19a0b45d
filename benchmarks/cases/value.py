"""The clipped value loss of a PPO critic, forward+backward of the loss w.r.t. the predicted values
at B x T: fusedrl.value_loss (cpu kernel) vs the reference (fusedrl's torch backend) vs verl's
core_algos.compute_value_loss (the function verl's critic calls) vs the memory floor.

Configurations: ``token-mean`` (verl's default, with the global token count ``batch_num_tokens``)
and ``seq-mean-token-mean``, cliprange_value 0.5 (verl's default). Inputs: predicted values (the
leaf), the rollout's values and the returns [B, T] in the config's dtype, and a bool mask (random
lengths, right padded), the same tensors for every implementation.
"""

from __future__ import annotations

import torch

CASE = "value"
floor_note = "one read of the values, old values, returns and the mask, one write of the gradient"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CLIP = 0.5
AGGREGATIONS = ("token-mean", "seq-mean-token-mean")


def configs(quick: bool):
    shapes = [(4, 256)] if quick else [(64, 8192), (512, 1024)]
    dtypes = ["fp32"] if quick else ["fp32", "bf16"]
    return [{"aggregation": a, "B": B, "T": T, "dtype": dt} for (B, T) in shapes for dt in dtypes for a in AGGREGATIONS]


def _inputs(cfg):
    g = torch.Generator().manual_seed(0)
    B, T, dtype = cfg["B"], cfg["T"], DTYPES[cfg["dtype"]]
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    values = torch.randn(B, T, generator=g)
    old = values + 0.5 * torch.randn(B, T, generator=g)
    returns = values + torch.randn(B, T, generator=g)
    to = lambda t: t.to(dtype)  # noqa: E731
    return to(values).requires_grad_(True), to(old), to(returns), mask


def _step(values, loss_fn):
    def step():
        loss = loss_fn()
        loss.backward()
        grad = values.grad
        values.grad = None
        return grad

    return step


def _fusedrl(cfg, backend):
    import fusedrl

    v, old, ret, mask = _inputs(cfg)
    counts = dict(num_tokens=int(mask.sum())) if cfg["aggregation"] == "token-mean" else {}
    return _step(v, lambda: fusedrl.value_loss(v, old, ret, mask, clip=CLIP, aggregation=cfg["aggregation"],
                                               exclude_empty_rows=True, backend=backend, **counts)[0])


def make_fusedrl(cfg):
    return _fusedrl(cfg, "cpu")


def make_reference(cfg):
    return _fusedrl(cfg, "torch")


def make_verl(cfg):
    """verl core_algos.compute_value_loss (clip_by_value, two squares, max, agg_loss, clipfrac)."""
    from verl.trainer.ppo import core_algos

    v, old, ret, mask = _inputs(cfg)
    glob = dict(batch_num_tokens=int(mask.sum())) if cfg["aggregation"] == "token-mean" else {}
    return _step(v, lambda: core_algos.compute_value_loss(v, ret, old, mask, CLIP, cfg["aggregation"], **glob)[0])


def make_floor(cfg):
    """One read of each input and one write of the gradient: addcmul(values, old, returns) into the
    gradient buffer and the mask's sum."""
    v, old, ret, mask = _inputs(cfg)
    x = v.detach()

    def step():
        g = torch.empty_like(x)
        torch.addcmul(x, old, ret, out=g)
        return g, mask.sum()

    return step


IMPLS = {"fusedrl": make_fusedrl, "reference": make_reference, "verl": make_verl, "floor": make_floor}


def extra_buffers_bytes(cfg) -> int:
    """Bytes every implementation must hold beyond its inputs: d loss / d values."""
    return cfg["B"] * cfg["T"] * DTYPES[cfg["dtype"]].itemsize


def targets(cfg, res) -> list[str]:
    """Speed against verl and the reference, time over the floor."""
    from benchmarks.harness import floor_ratio  # noqa: PLC0415

    ours = res.get("fusedrl", {})
    if "median_s" not in ours:
        return ["fusedrl failed: no targets checked"]
    out = []
    for peer in ("verl", "reference"):
        r = res.get(peer, {})
        if "median_s" in r:
            out.append(f"speed vs {peer}: {r['median_s'] / ours['median_s']:.1f}x")
    floor = res.get("floor", {})
    if "median_s" in floor:
        x, how = floor_ratio(ours, floor)
        out.append(f"time / floor: {x:.2f}x{how}")
    return out
