"""The benchmark harness runs every implementation of every case on a tiny config and renders its
tables (the timed runs themselves are a script: `python -m benchmarks`)."""

import pytest

pytest.importorskip("trl")
from benchmarks import harness  # noqa: E402
from benchmarks.cases import CASES  # noqa: E402


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_impl_runs_and_renders(case):
    mod = CASES[case]
    cfg = dict(mod.configs(quick=True)[0])
    cfg.update({k: min(v, 16) for k, v in cfg.items() if k in ("N", "B", "T")})
    cfg.update({k: min(v, 300) for k, v in cfg.items() if k in ("V",)})
    cfg.update({k: min(v, 32) for k, v in cfg.items() if k in ("H",)})
    rows = []
    for impl in mod.IMPLS:
        if impl in getattr(mod, "SLOW_IMPLS", ()):
            continue  # compile-heavy (inductor): exercised by `python -m benchmarks` only
        r = harness.child(case, impl, cfg, repeats=1, warmup=0, threads=1)
        assert r["median_s"] > 0 and r["peak_extra_bytes"] >= 0
        rows.append({"case": case, "impl": impl, "config": cfg, "result": r})
    text = harness.render_case(mod, rows)
    assert "| fusedrl |" in text and "time / fusedrl" in text
