"""The main job's smoke mode (`examples/grpo_demo.py --quick`) in a fresh process: both runs train,
their curves match step for step, and the plot, table and JSON are written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("matplotlib")

DEMO = Path(__file__).resolve().parents[2] / "examples" / "grpo_demo.py"


def test_quick_demo_trains_both_and_matches(tmp_path):
    proc = subprocess.run([sys.executable, str(DEMO), "--quick", "--out", str(tmp_path)], cwd="/", capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["compare"]["match"] and report["compare"]["steps"] == 6
    for run in ("stock", "fusedrl"):
        r = report[run]
        assert len(r["loss"]) == len(r["reward"]) == len(r["step_seconds"]) == 6
        assert r["seconds"] > 0 and r["peak_rss_mb"] > 0 and any(abs(x) > 1e-4 for x in r["loss"])
        assert 0 <= r["eval_before"]["mean_reward"] <= 1 and 0 <= r["eval_after"]["mean_reward"] <= 1
    assert report["stock"]["reward"] == report["fusedrl"]["reward"]
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert "curves match: True" in (tmp_path / "demo.md").read_text()


def test_bad_steps_exits_2():
    proc = subprocess.run([sys.executable, str(DEMO), "--steps", "0"], cwd="/", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--steps must be >= 1" in proc.stderr
