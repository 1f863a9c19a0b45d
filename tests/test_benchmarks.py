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


def test_rounds_pool_the_timed_steps():
    a = {"median_s": 2.0, "min_s": 1.0, "times_s": [1.0, 2.0, 9.0], "peak_extra_bytes": 10}
    b = {"median_s": 5.0, "min_s": 4.0, "times_s": [4.0, 5.0, 6.0], "peak_extra_bytes": 12}
    pooled = harness.pool_rounds([a, b])
    assert pooled["times_s"] == [1.0, 2.0, 4.0, 5.0, 6.0, 9.0]
    assert pooled["median_s"] == 5.0 and pooled["min_s"] == 1.0
    assert pooled["peak_extra_bytes"] == 10 and [r["peak_extra_bytes"] for r in pooled["rounds"]] == [10, 12]
    assert harness.pool_rounds([a]) is a
    assert "error" in harness.pool_rounds([a, {"error": "boom"}])


def test_floor_ratio_pairs_the_rounds():
    ours = [{"median_s": 2.2}, {"median_s": 3.0}, {"median_s": 2.0}]
    floor = [{"median_s": 2.0}, {"median_s": 2.0}, {"median_s": 2.0}]
    median, ratios = harness.pair_with_floor({"fusedrl": ours, "floor": floor})
    assert ratios == [1.0, 1.1, 1.5] and median == 1.1
    assert harness.pair_with_floor({"fusedrl": ours[:1], "floor": floor[:1]}) is None
    assert harness.pair_with_floor({"fusedrl": ours, "floor": floor[:2]}) is None
    x, how = harness.floor_ratio({"median_s": 2.2, "paired_floor_ratio": median, "floor_ratios": ratios},
                                 {"median_s": 2.0})
    assert x == 1.1 and "1.00, 1.10, 1.50" in how
    assert harness.floor_ratio({"median_s": 3.0}, {"median_s": 2.0}) == (1.5, "")
