"""The GPU benchmark's CPU smoke mode (`python -m benchmarks.gpu --device cpu --quick`) in a fresh
process: it writes gpu.json and gpu_summary.md with every case, finite times for what ran, and a
reason for every implementation that could not run; bad arguments exit 2 with a message."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {"logprobs", "logprobs_fwd", "policy", "grpo_from_logits", "group_advantages", "gae", "linear_logprobs",
         "linear_grpo"}


def bench(*args, timeout=240):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # as on a user's machine: CPU tensors never reach Triton there
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cpu_smoke_run_writes_json_and_summary(tmp_path):
    proc = bench("--device", "cpu", "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    summary = (tmp_path / "gpu_summary.md").read_text()
    assert report["device"] == "cpu" and report["quick"] is True
    for key in ("torch", "python", "commit", "fusedrl_backends"):
        assert key in report["machine"], key
    assert {row["case"] for row in report["cases"]} == CASES
    for row in report["cases"]:
        ours = row["results"]["fusedrl_cpu"]
        assert math.isfinite(ours["median_ms"]) and ours["median_ms"] > 0, row
        assert ours["ratio_vs_fusedrl"] == 1.0
        assert math.isfinite(ours["peak_mb"])
        for impl, r in row["results"].items():
            assert ("median_ms" in r) != ("skipped" in r), (row["case"], impl, r)
            if "median_ms" in r:
                assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0 and math.isfinite(r["ratio_vs_fusedrl"])
                assert f"| {row['case']} | {row['label']} | {impl} |" in summary
            else:
                assert f"{row['case']}/{impl}: {r['skipped']}" in report["skipped"]
                assert f"skipped {row['case']}/{impl}: {r['skipped']}" in proc.stdout
        assert "reference" in row["results"] or "eager" in row["results"], row["case"]
    assert report["failed"] == []
    assert any(s.startswith("logprobs/fusedrl_cuda: ") for s in report["skipped"])
    assert "| case | config | implementation | median ms | peak MB | x fusedrl |" in summary


def test_bad_arguments_exit_2_with_a_message(tmp_path):
    proc = bench("--device", "cpu", "--quick", "--out", str(tmp_path), "--cases", "nope", timeout=120)
    assert proc.returncode == 2 and "unknown case(s) ['nope']" in proc.stderr
    proc = bench("--device", "tpu", "--out", str(tmp_path), timeout=60)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        proc = bench("--out", str(tmp_path), timeout=60)
        assert proc.returncode == 2 and "torch sees no CUDA device" in proc.stderr
    (tmp_path / "file").write_text("")
    proc = bench("--device", "cpu", "--out", str(tmp_path / "file"), timeout=60)
    assert proc.returncode == 2 and "is not a folder" in proc.stderr
