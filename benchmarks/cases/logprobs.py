"""Token log-probs + entropy from logits, forward+backward: loss = sum(g1 * logp) + sum(g2 * H)."""

from __future__ import annotations

import torch

CASE = "logprobs"
floor_note = "one read of the logits and one write of the gradient (a copy of [N, V])"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEMPERATURE = 1.0


def configs(quick: bool):
    shapes = [(512, 32000)] if quick else [(4096, 32000), (4096, 151936)]
    return [{"N": N, "V": V, "dtype": dt} for N, V in shapes for dt in ("fp32", "bf16")]


def _inputs(cfg):
    g = torch.Generator().manual_seed(0)
    N, V, dtype = cfg["N"], cfg["V"], DTYPES[cfg["dtype"]]
    logits = torch.randn(N, V, generator=g, dtype=dtype).mul_(3.0).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=g)
    g1, g2 = torch.randn(N, generator=g), torch.randn(N, generator=g)
    return logits, labels, g1, g2


def _step(logits, fwd, g1, g2):
    def step():
        logp, entropy = fwd()
        ((logp.float() * g1).sum() + (entropy.float() * g2).sum()).backward()
        grad = logits.grad
        logits.grad = None
        return grad

    return step


def make_fusedrl(cfg):
    import fusedrl

    z, y, g1, g2 = _inputs(cfg)
    return _step(z, lambda: fusedrl.token_logprobs(z, y, temperature=TEMPERATURE, return_entropy=True, backend="cpu"), g1, g2)


def make_reference(cfg):
    """fusedrl's torch backend: the plain-PyTorch reference (float32 math for bf16 input)."""
    from fusedrl import reference

    z, y, g1, g2 = _inputs(cfg)
    return _step(z, lambda: reference.token_logprobs(z, y, temperature=TEMPERATURE, return_entropy=True), g1, g2)


def make_eager(cfg):
    """The textbook eager path in the logits' dtype: log_softmax -> gather, -(exp * log_softmax).sum."""
    z, y, g1, g2 = _inputs(cfg)

    def fwd():
        ls = torch.log_softmax(z / TEMPERATURE, dim=-1)
        return ls.gather(-1, y.unsqueeze(-1)).squeeze(-1), -(ls.exp() * ls).sum(-1)

    return _step(z, fwd, g1, g2)


def make_trl(cfg):
    """TRL's selective_log_softmax + entropy_from_logits (its CPU path), as GRPOTrainer calls them."""
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    z, y, g1, g2 = _inputs(cfg)

    def fwd():
        scaled = z / TEMPERATURE
        return selective_log_softmax(scaled, y), entropy_from_logits(scaled)

    return _step(z, fwd, g1, g2)


def make_floor(cfg):
    z, _, _, _ = _inputs(cfg)
    src = z.detach()

    def step():
        out = torch.empty_like(src)
        out.copy_(src)
        return out

    return step


IMPLS = {"fusedrl": make_fusedrl, "reference": make_reference, "eager": make_eager, "trl": make_trl, "floor": make_floor}


def extra_buffers_bytes(cfg) -> int:
    """Bytes every implementation must hold beyond its inputs: the [N, V] gradient."""
    return cfg["N"] * cfg["V"] * DTYPES[cfg["dtype"]].itemsize


def targets(cfg, res) -> list[str]:
    """The issue's targets, checked on this run's numbers."""
    from benchmarks.harness import floor_ratio  # noqa: PLC0415

    ours = res.get("fusedrl", {})
    if "median_s" not in ours:
        return ["fusedrl failed: no targets checked"]
    out = []
    for peer in ("reference", "eager", "trl"):
        r = res.get(peer, {})
        if "median_s" in r:
            x = r["median_s"] / ours["median_s"]
            out.append(f"speed vs {peer}: {x:.1f}x (target >= 4x: {'met' if x >= 4 else 'MISSED'})")
    floor = res.get("floor", {})
    if "median_s" in floor:
        x, how = floor_ratio(ours, floor)
        out.append(f"time / floor: {x:.2f}x (target <= 3x: {'met' if x <= 3 else 'MISSED'}{how})")
    grad = extra_buffers_bytes(cfg)
    eager = res.get("eager", {})
    if "peak_extra_bytes" in eager:
        ours_beyond = max(ours["peak_extra_bytes"] - grad, 0)
        eager_beyond = eager["peak_extra_bytes"] - grad
        frac = ours_beyond / eager_beyond if eager_beyond > 0 else float("nan")
        out.append(
            f"memory beyond the gradient: {ours_beyond / 2**20:,.1f} MB vs eager {eager_beyond / 2**20:,.0f} MB = "
            f"{100 * frac:.2f}% (target <= 5%: {'met' if frac <= 0.05 else 'MISSED'})"
        )
    return out
