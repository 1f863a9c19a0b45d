"""The benchmark harness: `python -m benchmarks [--quick] [--cases logprobs] [--out DIR]`.

Every (case, config, implementation) runs in a fresh child process, which
  1. warms up on a tiny config (loads libraries, so code pages do not count as memory),
  2. allocates the inputs, then resets the kernel's peak-RSS counter (/proc/self/clear_refs),
  3. runs one forward+backward and reads the peak RSS (VmHWM): peak extra memory over the inputs,
  4. runs `warmup` more steps and `repeats` timed steps: the median is reported. A slow
     implementation runs fewer (at least 1 warm-up and 3 timed steps) so that its steps take
     about STEP_BUDGET_S seconds: many repeats for the sub-millisecond kernels cost no more than
     the peers' second-long loops.
With --rounds R, each config runs its implementations R times in alternating order (a fresh child
each time) and pools their timed steps, so that a slow phase of a shared machine hits every
implementation alike; the memory is the first round's. fusedrl and the floor run back to back in
each round, and the time / floor target uses the upper median of the rounds' ratios (the larger
of two).
The parent prints a table, writes <case>.json and a PNG plot to --out, and rewrites the case's
section of benchmarks/RESULTS.md with the ratios measured side by side in this one run, the
command, the machine and the versions.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------
# Child: one implementation on one config
# ---------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


STEP_BUDGET_S = 30.0  # the time a slow implementation's timed steps may take (see the docstring)


def child(case_name: str, impl: str, cfg: dict, repeats: int, warmup: int, threads: int) -> dict:
    import torch

    from benchmarks.cases import CASES

    torch.set_num_threads(threads)
    case = CASES[case_name]
    make = case.IMPLS[impl]
    tiny = dict(cfg, **{k: min(v, 8) for k, v in cfg.items() if k in ("N", "B", "T")})
    make(tiny)()  # load code paths first
    step = make(cfg)
    gc.collect()
    base_kb = _status_kb("VmRSS")
    exact = _reset_peak()
    t0 = time.perf_counter()
    out = step()
    first = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM")
    del out
    fit = int(STEP_BUDGET_S / max(first, 1e-9))
    warmup, repeats = min(warmup, max(1, fit // 10)), min(repeats, max(3, fit))
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "median_s": times[len(times) // 2],
        "min_s": times[0],
        "times_s": times,
        "first_s": first,
        "peak_extra_bytes": (peak_kb - base_kb) * 1024,
        "peak_method": "VmHWM after clear_refs" if exact else "VmHWM (process lifetime; not reset)",
    }


# ---------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------
def machine_info(threads: int) -> dict:
    import torch

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
        "cores": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:
        import fusedrl
        from fusedrl import _ext

        info["fusedrl"] = fusedrl.__version__
        info["fusedrl_cpu_isa"] = _ext.load().cpu_isa() if _ext.load() else None
    except ImportError:
        info["fusedrl"] = None
    for pkg in ("trl", "liger_kernel", "verl", "transformers"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg.replace("_", "-"))
        except Exception:  # noqa: BLE001  (not installed: recorded as None)
            info[pkg] = None
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
        info["commit"] = rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        info["commit"] = None
    return info


def run_child(case: str, impl: str, cfg: dict, args) -> dict:
    cmd = [
        sys.executable, "-m", "benchmarks.harness", "--child", case, impl, json.dumps(cfg),
        "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads),
    ]
    proc = subprocess.run(cmd, cwd=ROOT.parent, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pool_rounds(results: list[dict]) -> dict:
    """One implementation's result over the rounds (one child process each): the timed steps pooled
    (median and min over all of them), the first round's peak memory (every round's is kept)."""
    failed = [r for r in results if "error" in r]
    if failed or len(results) == 1:
        return (failed or results)[0]
    times = sorted(t for r in results for t in r["times_s"])
    pooled = dict(results[0], times_s=times, median_s=times[len(times) // 2], min_s=times[0])
    pooled["rounds"] = [{k: r[k] for k in ("median_s", "peak_extra_bytes")} for r in results]
    return pooled


def pair_with_floor(rows_by_impl: dict[str, list]):
    """With rounds, fusedrl and the floor run back to back in every round: (the upper median of
    the per-round ratios fusedrl / floor, the larger of two; the sorted ratios), or None (one
    round, or a failure)."""
    ours, floor = rows_by_impl.get("fusedrl", []), rows_by_impl.get("floor", [])
    if len(ours) < 2 or len(ours) != len(floor) or any("error" in r for r in ours + floor):
        return None
    ratios = sorted(a["median_s"] / b["median_s"] for a, b in zip(ours, floor))
    return ratios[len(ratios) // 2], ratios


def floor_ratio(ours: dict, floor: dict) -> tuple[float, str]:
    """fusedrl's time over the floor's, and how it was formed: the upper median of the per-round
    ratios when the config ran in rounds (fusedrl and the floor back to back), else the ratio of
    the medians."""
    if ours.get("paired_floor_ratio") is not None:
        rounds = ", ".join(f"{r:.2f}" for r in ours["floor_ratios"])
        return ours["paired_floor_ratio"], f"; the upper median of the rounds' back-to-back ratios {rounds}"
    return ours["median_s"] / floor["median_s"], ""


def fmt_mb(b):
    return "-" if b is None else f"{b / 2**20:,.0f}"


def fmt_ms(seconds: float) -> str:
    """A median time in ms with three significant digits below 100 ms (sub-ms kernels stay legible)."""
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:,.0f}"


def config_label(cfg: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in cfg.items())


def render_case(case_mod, rows: list[dict]) -> str:
    """Markdown tables for one case: per config, each impl's time, ratio and memory."""
    out = []
    grad_note = getattr(case_mod, "extra_buffers_bytes", None)
    for cfg_rows in _by_config(rows):
        cfg = cfg_rows[0]["config"]
        res = {r["impl"]: r["result"] for r in cfg_rows}
        ours = res.get("fusedrl", {})
        out.append(f"\n**{config_label(cfg)}**\n")
        out.append("| implementation | median time (ms) | time / fusedrl | peak extra memory (MB) | beyond the required outputs (MB) |")
        out.append("|---|---:|---:|---:|---:|")
        grad = grad_note(cfg) if grad_note else None
        for impl, r in res.items():
            if "error" in r:
                out.append(f"| {impl} | failed: {r['error']} | | | |")
                continue
            ratio = r["median_s"] / ours["median_s"] if ours.get("median_s") else float("nan")
            # RSS is counted in pages: an implementation that holds nothing beyond its required
            # outputs can read a few kB under their size; that shows as 0.
            beyond = max(r["peak_extra_bytes"] - grad, 0) if (impl != "floor" and grad is not None) else None
            out.append(
                f"| {impl} | {fmt_ms(r['median_s'])} | {ratio:.2f}x | {fmt_mb(r['peak_extra_bytes'])} | {fmt_mb(beyond)} |"
            )
        for text in case_mod.targets(cfg, res) if hasattr(case_mod, "targets") else []:
            out.append(f"- {text}")
    if hasattr(case_mod, "summary"):  # conclusions across the configs (e.g. a slope over N)
        lines = case_mod.summary([(g[0]["config"], {r["impl"]: r["result"] for r in g}) for g in _by_config(rows)])
        if lines:
            out.append("\n**Across the configurations**\n")
            out.extend(f"- {text}" for text in lines)
    return "\n".join(out)


def _by_config(rows):
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(json.dumps(r["config"], sort_keys=True), []).append(r)
    return list(groups.values())


def plot(case: str, rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'fusedrl[bench]')")
        return False
    groups = _by_config(rows)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        t, m = [], []
        for g in groups:
            r = next((x["result"] for x in g if x["impl"] == impl), {})
            t.append(r.get("median_s", float("nan")) * 1e3)
            m.append(r.get("peak_extra_bytes", float("nan")) / 2**20)
        xs = [i + j * width for i in range(len(groups))]
        axes[0].bar(xs, t, width, label=impl)
        axes[1].bar(xs, m, width, label=impl)
    labels = [config_label(g[0]["config"]).replace(", ", "\n") for g in groups]
    for ax, title in zip(axes, ("median forward+backward time (ms)", "peak extra memory (MB)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"fusedrl benchmark: {case} (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results_md(sections: dict[str, str], info: dict, command: str, path: Path) -> None:
    """Rewrites the given cases' sections of RESULTS.md and keeps the others."""
    existing: dict[str, str] = {}
    if path.exists():
        text = path.read_text()
        for chunk in text.split("\n## ")[1:]:
            title, _, body = chunk.partition("\n")
            existing[title.strip()] = body
    for case, body in sections.items():
        machine = ", ".join(f"{k}: {v}" for k, v in info.items())
        existing[case] = f"\nCommand: `{command}`\n\nMachine and versions: {machine}\n{body}\n"
    head = (
        "# fusedrl benchmark results\n\n"
        "Written by `python -m benchmarks` (benchmarks/harness.py); every number below comes from the run\n"
        "whose command, machine and versions head its section. Times are medians of repeats (an implementation\n"
        "slower than STEP_BUDGET_S / repeats a step runs fewer, at least 3); memory is the peak resident memory\n"
        "over the inputs, measured in a fresh process per row. Ratios are within one run.\n"
    )
    path.write_text(head + "".join(f"\n## {k}\n{v}" for k, v in existing.items()))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", nargs=3, metavar=("CASE", "IMPL", "CONFIG"), help=argparse.SUPPRESS)
    p.add_argument("--cases", nargs="*", default=None, help="cases to run (default: all)")
    p.add_argument("--impls", nargs="*", default=None, help="implementations to run (default: all)")
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run; RESULTS.md is not touched)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every implementation of a config this many times, in alternating order, each in a "
                        "fresh process with --repeats timed steps; the steps are pooled (a noisy machine's drift "
                        "then hits every implementation alike)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)

    if args.child:
        case, impl, cfg = args.child
        print(json.dumps(child(case, impl, json.loads(cfg), args.repeats, args.warmup, args.threads)))
        return

    from benchmarks.cases import CASES

    names = args.cases or list(CASES)
    unknown = [c for c in names if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {list(CASES)}")
    info = machine_info(args.threads)
    command = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    print("machine:", json.dumps(info))
    args.out.mkdir(parents=True, exist_ok=True)
    all_rows, sections = {}, {}
    for name in names:
        mod = CASES[name]
        rows = []
        for cfg in mod.configs(args.quick):
            impls = [i for i in mod.IMPLS if not args.impls or i in args.impls or i == "fusedrl"]
            if "floor" in impls:  # fusedrl and the floor back to back in every round (reversed or not)
                impls = ["fusedrl", "floor"] + [i for i in impls if i not in ("fusedrl", "floor")]
            results: dict[str, list] = {impl: [] for impl in impls}
            for k in range(args.rounds):  # rounds alternate the order: a drift of the machine hits every impl
                for impl in impls if k % 2 == 0 else impls[::-1]:
                    r = run_child(name, impl, cfg, args)
                    results[impl].append(r)
                    shown = f"{r['median_s'] * 1e3:10.1f} ms  peak +{fmt_mb(r['peak_extra_bytes']):>7} MB" if "error" not in r else f"failed: {r['error']}"
                    tag = f" (round {k + 1})" if args.rounds > 1 else ""
                    print(f"{name:10s} {config_label(cfg):40s} {impl:10s} {shown}{tag}", flush=True)
            pooled = {impl: pool_rounds(results[impl]) for impl in impls}
            paired = pair_with_floor(results)
            if paired and "error" not in pooled["fusedrl"]:
                pooled["fusedrl"] = dict(pooled["fusedrl"], paired_floor_ratio=paired[0], floor_ratios=paired[1])
            for impl in mod.IMPLS:  # the case's order in the tables
                if impl in pooled:
                    rows.append({"case": name, "impl": impl, "config": cfg, "result": pooled[impl]})
        all_rows[name] = rows
        sections[name] = render_case(mod, rows)
        print(sections[name])
        suffix = "-quick" if args.quick else ""
        plot(name, rows, args.out / f"{name}{suffix}.png")
        (args.out / f"{name}{suffix}.json").write_text(
            json.dumps({"machine": info, "command": command, "rows": rows}, indent=1)
        )
    if not args.quick:
        write_results_md(sections, info, command, ROOT / "RESULTS.md")
        print(f"wrote {ROOT / 'RESULTS.md'}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
