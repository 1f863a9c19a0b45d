"""Every ISA variant of the C++ segment-statistics kernel and of the group_advantages kernel's runs
and keyed passes (baseline, AVX2, AVX-512: csrc/cpu/isa.h) runs and agrees with the float64 gold. The variant is fixed once per process, so each runs in a
child process with FUSEDRL_CPU_ISA set."""

import os
import subprocess
import sys

import torch

import fusedrl
from fusedrl import _ext
from fusedrl.reference import advantages as ref

CHILD = r"""
import sys, torch
from fusedrl import _ext
from fusedrl.ops import segments as seg
g = torch.Generator().manual_seed(0)
out = {"isa": _ext.load().cpu_isa()}
index = torch.randint(0, 9, (200,), generator=g)
index[:9] = torch.arange(9)
for dt in (torch.float32, torch.bfloat16, torch.float64):
    x = (torch.randn(200, 2, generator=g, dtype=torch.float64) * 5).to(dt)
    out[str(dt)] = (x, tuple(seg.group_stats(x, index, 9, weight=torch.rand(200, generator=g), backend="cpu")))
out["index"] = index
import fusedrl
R = torch.randn(222, 5, generator=g, dtype=torch.float64) * 3
ids = torch.randint(0, 30, (222,), generator=g) * 3
for dt in (torch.float32, torch.bfloat16, torch.float64):  # runs of 37 rows: a block of 4 and 2 runs alone
    x = R.to(dt)
    out["adv", str(dt)] = [
        fusedrl.group_advantages(x[:, 0], group_size=37, scale="batch", backend="cpu"),
        fusedrl.group_advantages(x, group_size=37, combine="normalize_then_sum", backend="cpu"),
        fusedrl.group_advantages(x[:, 0], group_size=37, estimator="rloo", backend="cpu"),
        fusedrl.group_advantages(x[:216, 0], group_size=36, backend="cpu"),  # runs of 4k rows, 4 at a time
        fusedrl.group_advantages(x, group_size=37, combine="sum_then_normalize", backend="cpu"),  # rows 4 x 4
        fusedrl.group_advantages(x, ids, combine="normalize_then_sum", backend="cpu"),  # keyed, 5 columns
    ]
out["R"] = R
out["ids"] = ids
torch.save(out, sys.argv[1])
"""


def test_isa_variants_agree_with_gold(tmp_path):
    procs = {}
    for isa in ("baseline", "avx2", "avx512"):  # the children run at once (their start-up dominates)
        env = dict(os.environ, FUSEDRL_CPU_ISA=isa)
        procs[isa] = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / f"{isa}.pt")], env=env)
    for isa, proc in procs.items():
        assert proc.wait() == 0, isa
        check(isa, torch.load(tmp_path / f"{isa}.pt"))


def check(isa, out):
    order = ["baseline", "avx2", "avx512"]
    widest = _ext.load().cpu_isa()
    assert out["isa"] == order[min(order.index(isa), order.index(widest))]
    g = torch.Generator().manual_seed(0)
    torch.randint(0, 9, (200,), generator=g)
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        x, got = out[str(dt)]
        torch.randn(200, 2, generator=g, dtype=torch.float64)
        w = torch.rand(200, generator=g)
        gold = ref.group_stats(x.double(), out["index"], 9, weight=w.double())
        tol = 1e-12 if dt == torch.float64 else 1e-5
        for name, a, b in zip(ref.GroupStats._fields, got, gold):
            if name == "argmax":
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * 25, msg=name)
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        x = out["R"].to(dt).double()
        ids = out["ids"]
        gold = [
            fusedrl.group_advantages(x[:, 0], group_size=37, scale="batch", backend="torch"),
            fusedrl.group_advantages(x, group_size=37, combine="normalize_then_sum", backend="torch"),
            fusedrl.group_advantages(x[:, 0], group_size=37, estimator="rloo", backend="torch"),
            fusedrl.group_advantages(x[:216, 0], group_size=36, backend="torch"),
            fusedrl.group_advantages(x, group_size=37, combine="sum_then_normalize", backend="torch"),
            fusedrl.group_advantages(x, ids, combine="normalize_then_sum", backend="torch"),
        ]
        assert len(gold) == len(out["adv", str(dt)])
        tol = 1e-12 if dt == torch.float64 else 1e-5
        for a, b in zip(out["adv", str(dt)], gold):
            torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * 5)
