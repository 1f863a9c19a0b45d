"""A short benchmark of fusedrl on one CUDA device: `python -m benchmarks.gpu --out DIR [--quick]
[--device cuda|cpu] [--budget-s S]`.

Cases (the README's shapes; --quick: small ones), each implementation forward+backward unless
the case says otherwise:

- logprobs: token log-probs + entropy from logits [8, N/8, V], N = 4096, V = 32000 / 151936,
  fp32 / bf16: fusedrl cuda and triton, eager torch (log_softmax, gather), TRL's
  selective_log_softmax + entropy_from_logits (GRPOTrainer's calls) and TRL's one-pass
  selective_log_softmax_and_entropy when the installed TRL has it;
- logprobs_fwd: the forward alone without entropy (old / reference log-probs, no_grad) at the same
  shapes, where Liger's fused_selective_log_softmax (forward-only) takes part;
- policy: GRPO clip, token-mean, k3 KL at B = 64, T = 8192 fp32 from log-probs: fusedrl cuda,
  triton and the reference;
- grpo_from_logits: the same objective from logits [8, 512(+1), 32000]: token_logprobs +
  policy_loss vs eager vs Liger's triton_grpo_loss (which takes logits, not log-probs);
- group_advantages: GRPO over N = 65,536 rewards in groups of 16, and shuffled ids;
- gae: GAE + whitening at B = 512, T = 4096 fp32;
- linear_logprobs: log-probs from hidden states N = 4096, H = 1024, V = 32000 fp32 / bf16 vs
  eager (matmul, log_softmax, gather);
- linear_grpo: LinearPolicyLoss (GRPO + k3) vs eager vs Liger's LigerFusedLinearGRPOLoss.

Inputs come from benchmarks/cases/*.py (their builders, run on the device; the logits of the two
log-prob cases are drawn on the device itself, a [N, V] draw on the CPU takes seconds), and the
eager / TRL / Liger baselines are the CPU benchmark's own functions where they exist.

Timing: on CUDA, CUDA events around each step, the median of the timed steps after warm-up
(the first call, which compiles Triton kernels, is never timed); on the CPU, perf_counter. Peak
memory: torch.cuda.max_memory_allocated over one step, reset before it, minus what was allocated
before it (the inputs); on the CPU, the resident-set high-water mark (VmHWM after clear_refs)
over one step. The step's outputs (gradients) are part of the peak.

Writes DIR/gpu.json (machine, versions, per case per implementation: median ms, peak MB, ratio
to fusedrl's primary backend, skips and failures) after every case, and DIR/gpu_summary.md.
Exit status: 0 when every implementation that could run ran, 1 when one failed, 2 on bad
arguments. ``--device cpu`` is a smoke mode for machines without a GPU (backends cpu and torch).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


class Skip(Exception):
    """An implementation that cannot run here (the message says why)."""


# ---------------------------------------------------------------------------------------------
# devices, inputs
# ---------------------------------------------------------------------------------------------
def to_device(value, device):
    """Tensors (also inside tuples / lists) moved to ``device``; leaves keep requires_grad."""
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, torch.Tensor):
        moved = value.detach().to(device)
        return moved.requires_grad_(True) if value.requires_grad else moved
    return value


@contextlib.contextmanager
def inputs_on(module, device):
    """Patches ``module._inputs`` (a benchmarks/cases builder) to return its tensors on ``device``,
    built once per config: the case's own make_* functions then run there unchanged."""
    original = module._inputs
    cache: dict[str, object] = {}

    def on_device(cfg):
        key = json.dumps(cfg, sort_keys=True)
        if key not in cache:
            cache.clear()
            cache[key] = to_device(original(cfg), device)
        return cache[key]

    module._inputs = on_device
    try:
        yield cache
    finally:
        module._inputs = original
        cache.clear()


def logits_builder(device, extra_position=False):
    """benchmarks/cases/logprobs._inputs drawn on ``device``: logits [8, N/8 (+1), V] * 3, labels,
    upstream gradients g1, g2 shaped like labels (the CPU case uses [N, V]; [B, T, V] is what GRPO
    trainers pass, and TRL's CPU path loops over the first dimension)."""
    from benchmarks.cases import logprobs as lp

    cache: dict[str, object] = {}

    def build(cfg):
        key = json.dumps(cfg, sort_keys=True)
        if key not in cache:
            cache.clear()
            gc.collect()
            g = torch.Generator(device=device).manual_seed(0)
            N, V, dtype = cfg["N"], cfg["V"], lp.DTYPES[cfg["dtype"]]
            B = cfg.get("B", 8 if N % 8 == 0 else 1)
            T = N // B + (1 if extra_position else 0)
            logits = torch.randn(B, T, V, generator=g, device=device, dtype=torch.float32).mul_(3.0).to(dtype)
            labels = torch.randint(0, V, (B, N // B), generator=g, device=device)
            g1 = torch.randn(B, N // B, generator=g, device=device)
            g2 = torch.randn(B, N // B, generator=g, device=device)
            cache[key] = (logits.requires_grad_(True), labels, g1, g2)
        return cache[key]

    return build, cache


# ---------------------------------------------------------------------------------------------
# implementations
# ---------------------------------------------------------------------------------------------
def fusedrl_backend(impl: str) -> str:
    return impl.split("_", 1)[1]


def check_backend(impl: str, device: torch.device) -> str:
    """The fusedrl backend an implementation named fusedrl_<backend> runs, or Skip."""
    import fusedrl

    name = fusedrl_backend(impl)
    if name in ("cuda", "triton") and device.type != "cuda":
        raise Skip(f"the {name} backend runs on CUDA tensors (this run is --device {device.type})")
    if name == "cpu" and device.type != "cpu":
        raise Skip("the cpu backend runs on CPU tensors")
    why = fusedrl.backends().get(name, f"unknown backend {name!r}")
    if why is not None:
        raise Skip(f"backend {name!r} unavailable: {why}")
    return name


def need_cuda(device: torch.device, what: str):
    if device.type != "cuda":
        raise Skip(f"{what} needs a CUDA device")


def optional(module: str, attr: str | None = None):
    """An installed peer's module (or attribute), else Skip naming what is missing."""
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001  (ImportError, or a peer failing at import: a skip, with why)
        raise Skip(f"{module} is not importable ({type(exc).__name__}: {exc})") from None
    if attr is None:
        return mod
    if not hasattr(mod, attr):
        raise Skip(f"{module}.{attr} does not exist in the installed version")
    return getattr(mod, attr)


# --- logprobs (fwd+bwd, with entropy) --------------------------------------------------------
def logprobs_impls(device):
    from benchmarks.cases import logprobs as lp

    def fusedrl_impl(impl):
        def make(cfg):
            import fusedrl

            backend = check_backend(impl, device)
            z, y, g1, g2 = lp._inputs(cfg)
            return lp._step(z, lambda: fusedrl.token_logprobs(z, y, temperature=lp.TEMPERATURE, return_entropy=True,
                                                              backend=backend), g1, g2)

        return make

    def trl_fused(cfg):
        fn = optional("trl.trainer.utils", "selective_log_softmax_and_entropy")
        z, y, g1, g2 = lp._inputs(cfg)
        return lp._step(z, lambda: fn(z, y, temperature=lp.TEMPERATURE), g1, g2)

    def trl(cfg):
        optional("trl.trainer.utils", "selective_log_softmax")
        return lp.make_trl(cfg)

    def liger(cfg):
        raise Skip("Liger's fused_selective_log_softmax is forward-only (no_grad, no entropy): see logprobs_fwd")

    return {**{i: fusedrl_impl(i) for i in FUSEDRL_IMPLS[device.type]}, "eager": lp.make_eager, "trl": trl,
            "trl_fused": trl_fused, "liger": liger}


# --- logprobs_fwd (forward only, no entropy) ---------------------------------------------------
def logprobs_fwd_impls(device, liger_inputs):
    from benchmarks.cases import logprobs as lp

    def no_grad_step(fn):
        def step():
            with torch.no_grad():
                return fn()

        return step

    def fusedrl_impl(impl):
        def make(cfg):
            import fusedrl

            backend = check_backend(impl, device)
            z, y, _, _ = lp._inputs(cfg)
            return no_grad_step(lambda: fusedrl.token_logprobs(z, y, temperature=lp.TEMPERATURE, backend=backend))

        return make

    def eager(cfg):
        z, y, _, _ = lp._inputs(cfg)
        return no_grad_step(lambda: torch.log_softmax(z / lp.TEMPERATURE, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1))

    def trl(cfg):
        fn = optional("trl.trainer.utils", "selective_log_softmax")
        z, y, _, _ = lp._inputs(cfg)
        return no_grad_step(lambda: fn(z / lp.TEMPERATURE, y))

    def liger(cfg):
        need_cuda(device, "Liger's fused_selective_log_softmax (a Triton kernel)")
        fn = optional("liger_kernel.ops.grpo_loss", "fused_selective_log_softmax")
        z, y, _, _ = liger_inputs(cfg)  # [B, T + 1, V]: Liger drops the last position
        return no_grad_step(lambda: fn(z.detach(), y, temperature=lp.TEMPERATURE))

    return {**{i: fusedrl_impl(i) for i in FUSEDRL_IMPLS[device.type]}, "eager": eager, "trl": trl, "liger": liger}


# --- policy (from log-probs) -----------------------------------------------------------------
def policy_impls(device):
    from benchmarks.cases import policy as pc

    def fusedrl_impl(impl):
        def make(cfg):
            return pc._fusedrl(cfg, check_backend(impl, device))

        return make

    def liger(cfg):
        raise Skip("Liger's triton_grpo_loss takes logits [B, T+1, V], not log-probs: see grpo_from_logits")

    return {**{i: fusedrl_impl(i) for i in FUSEDRL_IMPLS[device.type]}, "reference": pc.make_reference,
            "liger": liger}


# --- grpo_from_logits ------------------------------------------------------------------------
def grpo_from_logits_impls(device, logits_inputs, liger_inputs):
    """GRPO clip 0.2, token-mean over the batch, k3 KL (beta 0.04) from logits: the log-probs of the
    first T positions' labels, the operands of benchmarks/cases/policy._inputs at [B, T]."""
    from benchmarks.cases import policy as pc

    def operands(cfg):
        pcfg = {"objective": "grpo_k3", "tis": False, "B": cfg["B"], "T": cfg["T"], "dtype": "fp32"}
        _, old, ref, _, adv, mask = to_device(pc._inputs(pcfg), device)
        return old, ref, adv, mask

    def lcfg(cfg):
        return {"N": cfg["B"] * cfg["T"], "B": cfg["B"], "V": cfg["V"], "dtype": cfg["dtype"]}

    def backward_step(z, loss_fn):
        def step():
            loss = loss_fn()
            loss.backward()
            grad = z.grad
            z.grad = None
            return grad

        return step

    def fusedrl_impl(impl):
        def make(cfg):
            import fusedrl

            backend = check_backend(impl, device)
            z, y, _, _ = logits_inputs(lcfg(cfg))
            old, ref, adv, mask = operands(cfg)
            kw = pc.fusedrl_kwargs({"objective": "grpo_k3", "tis": False}, num_tokens=None)

            def loss():
                logp = fusedrl.token_logprobs(z, y, backend=backend)
                return fusedrl.policy_loss(logp, old, adv, mask, ref_logp=ref, backend=backend, **kw)[0]

            return backward_step(z, loss)

        return make

    def eager(cfg):
        import fusedrl

        z, y, _, _ = logits_inputs(lcfg(cfg))
        old, ref, adv, mask = operands(cfg)
        kw = pc.fusedrl_kwargs({"objective": "grpo_k3", "tis": False}, num_tokens=None)

        def loss():
            logp = torch.log_softmax(z.float(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
            return fusedrl.policy_loss(logp, old, adv, mask, ref_logp=ref, backend="torch", **kw)[0]

        return backward_step(z, loss)

    def liger(cfg):
        need_cuda(device, "Liger's triton_grpo_loss (a Triton kernel)")
        fn = optional("liger_kernel.transformers.grpo_loss", "triton_grpo_loss")
        z, y, _, _ = liger_inputs(lcfg(cfg))
        old, ref, adv, mask = operands(cfg)

        # inplace=True (Liger's default): the backward writes the gradient over the logits.
        def loss():
            out = fn(z, old, ref, y, adv, mask.to(torch.int32), temperature=1.0, beta=pc.BETA, eps_low=0.2,
                     eps_high=0.2, loss_type="bnpo", reduce=True)
            return out[0]

        return backward_step(z, loss)

    return {**{i: fusedrl_impl(i) for i in FUSEDRL_IMPLS[device.type]}, "eager": eager, "liger": liger}


# --- group_advantages, gae -------------------------------------------------------------------
def advantages_impls(device):
    from benchmarks.cases import advantages as ad

    def fusedrl_impl(impl):
        def make(cfg):
            return ad._fusedrl(cfg, check_backend(impl, device))

        return make

    return {**{i: fusedrl_impl(i) for i in FUSEDRL_IMPLS[device.type]}, "reference": ad.make_reference}


def gae_impls(device):
    from benchmarks.cases import gae as ga

    def fusedrl_impl(impl):
        def make(cfg):
            return ga._fusedrl(cfg, check_backend(impl, device))

        return make

    return {**{i: fusedrl_impl(i) for i in FUSEDRL_IMPLS[device.type]}, "reference": ga.make_reference}


# --- linear ----------------------------------------------------------------------------------
def linear_logprobs_impls(device):
    """loss = sum(logp) of the labels under softmax(hidden @ weight.T), gradients to hidden and weight
    (the inputs of benchmarks/cases/linear._inputs)."""
    from benchmarks.cases import linear as li

    def fusedrl_impl(impl):
        def make(cfg):
            import fusedrl

            backend = check_backend(impl, device)
            h, w, y, _, _, _, _ = li._inputs(cfg)
            return li._step([h, w], lambda: fusedrl.linear_logprobs(h, w, y, backend=backend).sum())

        return make

    def eager(cfg):
        h, w, y, _, _, _, _ = li._inputs(cfg)
        return li._step([h, w], lambda: torch.log_softmax((h @ w.t()).float(), -1).gather(-1, y.unsqueeze(-1)).sum())

    def liger(cfg):
        raise Skip("Liger has no log-probs-from-hidden-states op (LigerFusedLinearGRPOLoss is a loss: see linear_grpo)")

    return {**{i: fusedrl_impl(i) for i in FUSEDRL_IMPLS[device.type]}, "eager": eager, "liger": liger}


def linear_grpo_impls(device):
    from benchmarks.cases import linear as li

    def fusedrl_impl(impl):
        def make(cfg):
            import fusedrl

            backend = check_backend(impl, device)
            h, w, y, m, a, old, ref = li._inputs(cfg)
            module = fusedrl.LinearPolicyLoss(backend=backend, **fusedrl.presets.trl("grpo", beta=li.BETA))
            return li._step([h, w], lambda: module(h, w, y, old, a, m, ref_logp=ref)[0])

        return make

    def liger(cfg):
        optional("liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss")
        return li._make_liger(False)(cfg)

    return {**{i: fusedrl_impl(i) for i in FUSEDRL_IMPLS[device.type]}, "eager": li.make_eager, "liger": liger}


# The fusedrl implementations of each mode (the ones that cannot run there are listed as skipped), and
# the order in which one is taken as the reference of the ratios.
FUSEDRL_IMPLS = {"cuda": ("fusedrl_cuda", "fusedrl_triton"), "cpu": ("fusedrl_cpu", "fusedrl_cuda", "fusedrl_triton")}
PRIMARY = {"cuda": ("fusedrl_cuda", "fusedrl_triton"), "cpu": ("fusedrl_cpu",)}


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    what: str
    configs: list
    impls: dict
    patch: list = field(default_factory=list)  # benchmarks/cases modules whose _inputs run on the device


def shapes(quick: bool, device: torch.device) -> dict:
    """The configs of every case: the README's shapes; --quick: small ones (tiny on the CPU)."""
    if not quick:
        big = dict(
            logprobs=[{"N": 4096, "V": V, "dtype": dt} for V in (32000, 151936) for dt in ("fp32", "bf16")],
            policy=[{"objective": "grpo_k3", "tis": False, "B": 64, "T": 8192, "dtype": "fp32"}],
            grpo_from_logits=[{"B": 8, "T": 512, "V": 32000, "dtype": dt} for dt in ("fp32", "bf16")],
            group_advantages=[{"N": 65536, "layout": lay, "K": 1, "combine": "none"} for lay in ("size16", "random")],
            gae=[{"scan": "gae", "B": 512, "T": 4096, "dtype": "fp32"}],
            linear=[{"N": 4096, "H": 1024, "V": 32000, "dtype": dt} for dt in ("fp32", "bf16")],
        )
    elif device.type == "cuda":
        big = dict(
            logprobs=[{"N": 1024, "V": 32000, "dtype": dt} for dt in ("fp32", "bf16")],
            policy=[{"objective": "grpo_k3", "tis": False, "B": 16, "T": 2048, "dtype": "fp32"}],
            grpo_from_logits=[{"B": 4, "T": 256, "V": 32000, "dtype": "fp32"}],
            group_advantages=[{"N": 8192, "layout": lay, "K": 1, "combine": "none"} for lay in ("size16", "random")],
            gae=[{"scan": "gae", "B": 128, "T": 1024, "dtype": "fp32"}],
            linear=[{"N": 1024, "H": 512, "V": 32000, "dtype": "fp32"}],
        )
    else:
        big = dict(
            logprobs=[{"N": 64, "V": 1000, "dtype": dt} for dt in ("fp32", "bf16")],
            policy=[{"objective": "grpo_k3", "tis": False, "B": 4, "T": 256, "dtype": "fp32"}],
            grpo_from_logits=[{"B": 2, "T": 32, "V": 1000, "dtype": "fp32"}],
            group_advantages=[{"N": 2048, "layout": lay, "K": 1, "combine": "none"} for lay in ("size16", "random")],
            gae=[{"scan": "gae", "B": 16, "T": 64, "dtype": "fp32"}],
            linear=[{"N": 128, "H": 64, "V": 1000, "dtype": "fp32"}],
        )
    return big


def build_cases(quick: bool, device: torch.device) -> tuple[list[Case], list[dict]]:
    """The cases, and the caches of the device-drawn logits (cleared after each case)."""
    from benchmarks.cases import advantages, gae, linear, logprobs, policy

    s = shapes(quick, device)
    logits_inputs, logits_cache = logits_builder(device)
    liger_inputs, liger_cache = logits_builder(device, extra_position=True)
    return [
        Case("logprobs", "token_logprobs + entropy, forward+backward, logits [8, N/8, V]", s["logprobs"],
             logprobs_impls(device), patch=[(logprobs, logits_inputs)]),
        Case("policy", "policy_loss GRPO clip 0.2, token-mean, k3 KL (beta 0.04), forward+backward w.r.t. logp",
             s["policy"], policy_impls(device), patch=[(policy, None)]),
        Case("group_advantages", "group_advantages GRPO (groups of 16, or shuffled ids of sizes 1-64)",
             s["group_advantages"], advantages_impls(device), patch=[(advantages, None)]),
        Case("gae", "gae + whitening (gamma 1, lambda 0.95), int64 mask, right-padded", s["gae"], gae_impls(device),
             patch=[(gae, None)]),
        Case("linear_logprobs", "linear_logprobs (hidden [8, N/8, H], head [V, H]), sum(logp), d hidden and d weight",
             s["linear"], linear_logprobs_impls(device), patch=[(linear, None)]),
        Case("linear_grpo", "LinearPolicyLoss GRPO + k3 (ref_logp precomputed) vs Liger LigerFusedLinearGRPOLoss",
             [c for c in s["linear"] if c["dtype"] == "fp32"], linear_grpo_impls(device), patch=[(linear, None)]),
        Case("logprobs_fwd", "token_logprobs forward only, no entropy, no_grad (old / reference log-probs)",
             s["logprobs"], logprobs_fwd_impls(device, liger_inputs), patch=[(logprobs, logits_inputs)]),
        Case("grpo_from_logits", "GRPO + k3 from logits: token_logprobs + policy_loss vs Liger triton_grpo_loss",
             s["grpo_from_logits"], grpo_from_logits_impls(device, logits_inputs, liger_inputs)),
    ], [logits_cache, liger_cache]


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_start(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device), "torch.cuda.max_memory_allocated"
    from benchmarks.harness import _reset_peak, _status_kb

    exact = _reset_peak()
    return _status_kb("VmRSS") * 1024, "VmHWM after clear_refs" if exact else "VmHWM (process lifetime; not reset)"


def _peak_end(device, base):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from benchmarks.harness import _status_kb

    return _status_kb("VmHWM") * 1024 - base


def measure(step, device, *, warmup: int, repeats: int, min_repeats: int, step_budget_s: float) -> dict:
    """First call (compiles / loads; not timed), one step for the peak memory, warm-up, then the
    timed steps: as many as fit in step_budget_s (between min_repeats and repeats)."""
    t0 = time.perf_counter()
    out = step()
    _sync(device)
    first_s = time.perf_counter() - t0
    del out
    base, method = _peak_start(device)
    t0 = time.perf_counter()
    out = step()
    peak = _peak_end(device, base)
    one_s = time.perf_counter() - t0
    del out
    n = max(min_repeats, min(repeats, int(step_budget_s / max(one_s, 1e-6))))
    for _ in range(min(warmup, max(1, n // 5))):
        step()
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        times = sorted(start.elapsed_time(end) for start, end in events)
    else:
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
    return {
        "median_ms": times[len(times) // 2],
        "min_ms": times[0],
        "repeats": n,
        "first_call_s": first_s,
        "peak_mb": max(peak, 0) / 2**20,
        "peak_method": method,
        "timing": "CUDA events" if device.type == "cuda" else "perf_counter",
    }


def release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# machine, report
# ---------------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict:
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": device.type,
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    else:
        try:
            with open("/proc/cpuinfo") as f:
                info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            info["cpu"] = platform.processor()
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("fusedrl", "triton", "trl", "liger-kernel", "transformers"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    try:
        import fusedrl

        info["fusedrl_backends"] = fusedrl.backends()
    except ImportError as exc:
        info["fusedrl_backends"] = f"import fusedrl failed: {exc}"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        info["commit"] = (rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")) if rev.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        info["commit"] = None
    return info


def label(cfg: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in cfg.items())


def add_ratios(results: dict, primary_order: tuple) -> str | None:
    """ratio_vs_fusedrl = median / the median of the first fusedrl implementation that ran."""
    primary = next((i for i in primary_order if "median_ms" in results.get(i, {})), None)
    for r in results.values():
        if "median_ms" in r:
            r["ratio_vs_fusedrl"] = r["median_ms"] / results[primary]["median_ms"] if primary else None
    return primary


def summary_md(report: dict) -> str:
    m = report["machine"]
    where = m.get("gpu") or m.get("cpu") or m["device"]
    lines = [
        "# fusedrl GPU benchmark" if report["device"] == "cuda" else "# fusedrl benchmark (CPU smoke mode)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {where}; torch {m['torch']} (CUDA {m['torch_cuda']}), triton {m.get('triton')}, "
        f"trl {m.get('trl')}, liger-kernel {m.get('liger-kernel')}; commit {m.get('commit')}.",
        "",
        f"Timing: {'CUDA events' if report['device'] == 'cuda' else 'perf_counter'}, median of the timed steps after "
        "warm-up. Peak: memory beyond the inputs over one step (the outputs included). x fusedrl: time over the "
        f"first fusedrl backend that ran ({', '.join(PRIMARY[report['device']])}).",
        "",
        "| case | config | implementation | median ms | peak MB | x fusedrl |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in report["cases"]:
        for impl, r in row["results"].items():
            if "median_ms" in r:
                ratio = "-" if r.get("ratio_vs_fusedrl") is None else f"{r['ratio_vs_fusedrl']:.2f}x"
                lines.append(f"| {row['case']} | {row['label']} | {impl} | {r['median_ms']:.3f} | {r['peak_mb']:,.1f} "
                             f"| {ratio} |")
            elif "error" in r:
                lines.append(f"| {row['case']} | {row['label']} | {impl} | failed: {r['error']} | | |")
    if report["skipped"]:
        lines += ["", "Skipped:", ""] + [f"- {s}" for s in report["skipped"]]
    if report["failed"]:
        lines += ["", "Failed:", ""] + [f"- {s}" for s in report["failed"]]
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path):
    (out / "gpu.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_summary.md").write_text(summary_md(report))


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu.json and gpu_summary.md")
    p.add_argument("--quick", action="store_true", help="small shapes (tiny with --device cpu)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default): fusedrl's cuda and triton backends; cpu: a smoke mode, backends cpu and torch")
    p.add_argument("--cases", nargs="*", default=None, help="cases to run (default: all)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting implementations after this many seconds (the rest are listed as skipped)")
    p.add_argument("--repeats", type=int, default=20, help="most timed steps per implementation (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="most warm-up steps after the first call (default 3)")
    p.add_argument("--step-budget-s", type=float, default=0.25,
                   help="time the timed steps of one implementation may take (default 0.25 s; at least 3 steps)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.step_budget_s <= 0:
        p.error("--repeats must be >= 1, --warmup >= 0 and --step-budget-s > 0")
    if args.budget_s is not None and args.budget_s <= 0:
        p.error("--budget-s must be > 0")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} exists and is not a folder")
    return p, args


def main(argv=None) -> int:
    p, args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device (use --device cpu for the CPU smoke mode)")
    args.out.mkdir(parents=True, exist_ok=True)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    cases, caches = build_cases(args.quick, device)
    known = [c.name for c in cases]
    if args.cases:
        unknown = [c for c in args.cases if c not in known]
        if unknown:
            p.error(f"unknown case(s) {unknown}; known: {known}")
        cases = [c for c in cases if c.name in args.cases]
    command = "python -m benchmarks.gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"machine": machine_info(device), "command": command, "device": device.type, "quick": args.quick,
              "cases": [], "skipped": [], "failed": []}
    print("machine:", json.dumps(report["machine"], default=str), flush=True)
    for case in cases:
        with contextlib.ExitStack() as stack:
            for module, builder in case.patch:
                if builder is None:
                    stack.enter_context(inputs_on(module, device))
                else:
                    original = module._inputs
                    module._inputs = builder
                    stack.callback(setattr, module, "_inputs", original)
            for cfg in case.configs:
                row = {"case": case.name, "what": case.what, "config": cfg, "label": label(cfg), "results": {}}
                for impl, make in case.impls.items():
                    tag = f"{case.name}/{impl}"
                    if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                        why = f"the time budget of {args.budget_s:g} s is spent"
                    else:
                        why = None
                        try:
                            step = make(cfg)
                            r = measure(step, device, warmup=args.warmup, repeats=args.repeats, min_repeats=3,
                                        step_budget_s=args.step_budget_s)
                            del step
                        except Skip as exc:
                            why = str(exc)
                        except Exception as exc:  # noqa: BLE001  (recorded: the other implementations still run)
                            msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                            row["results"][impl] = {"error": msg}
                            report["failed"].append(f"{tag} [{row['label']}]: {msg}")
                            print(f"FAILED {tag} [{row['label']}]: {msg}", flush=True)
                        else:
                            row["results"][impl] = r
                            print(f"{case.name:17s} {row['label']:45s} {impl:15s} {r['median_ms']:10.3f} ms  "
                                  f"peak {r['peak_mb']:9.1f} MB  ({r['repeats']} steps)", flush=True)
                        release(device)
                    if why is not None:
                        row["results"][impl] = {"skipped": why}
                        line = f"{tag}: {why}"
                        if line not in report["skipped"]:
                            report["skipped"].append(line)
                            print(f"skipped {line}", flush=True)
                add_ratios(row["results"], PRIMARY[device.type])
                report["cases"].append(row)
        for cache in caches:
            cache.clear()
        release(device)
        write(report, args.out)
    report["total_s"] = time.perf_counter() - started
    write(report, args.out)
    print(summary_md(report))
    print(f"wrote {args.out / 'gpu.json'} and {args.out / 'gpu_summary.md'} ({report['total_s']:.0f} s)")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
