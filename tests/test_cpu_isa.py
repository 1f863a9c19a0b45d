"""Every ISA variant of the C++ CPU kernels (baseline, AVX2, AVX-512: csrc/cpu/isa.h) runs and agrees
with the float64 gold. The variant is fixed once per process, so each runs in a child process with
FUSEDRL_CPU_ISA set."""

import os
import subprocess
import sys

import pytest
import torch

import fusedrl
from fusedrl import _ext

CHILD = r"""
import sys, torch, fusedrl
from fusedrl import _ext
torch.manual_seed(0)
out = {"isa": _ext.load().cpu_isa()}
for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    z = (torch.randn(6, 3001, dtype=torch.float64) * 4).to(dt)
    z[1, :700] = float("-inf")
    y = torch.randint(0, 3001, (6,)); y[4] = -100
    z.requires_grad_(True)
    lp, h = fusedrl.token_logprobs(z, y, temperature=0.8, return_entropy=True, backend="cpu")
    (lp.sum() + 0.5 * h.sum()).backward()
    out[str(dt)] = (lp.detach(), h.detach(), z.grad)
torch.save(out, sys.argv[1])
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_isa_variant_agrees_with_gold(isa, tmp_path):
    path = tmp_path / "out.pt"
    env = dict(os.environ, FUSEDRL_CPU_ISA=isa)
    subprocess.run([sys.executable, "-c", CHILD, str(path)], check=True, env=env)
    out = torch.load(path)
    widest = _ext.load().cpu_isa()
    order = ["baseline", "avx2", "avx512"]
    assert out["isa"] == order[min(order.index(isa), order.index(widest))]
    torch.manual_seed(0)
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        z = (torch.randn(6, 3001, dtype=torch.float64) * 4).to(dt)
        z[1, :700] = float("-inf")
        y = torch.randint(0, 3001, (6,))
        y[4] = -100
        zg = z.double().requires_grad_(True)
        lp, h = fusedrl.token_logprobs(zg, y, temperature=0.8, return_entropy=True, backend="torch")
        (lp.sum() + 0.5 * h.sum()).backward()
        got_lp, got_h, got_g = out[str(dt)]
        tol = 1e-10 if dt == torch.float64 else 2e-5
        torch.testing.assert_close(got_lp.double(), lp.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(got_h.double(), h.detach(), rtol=tol, atol=tol)
        gtol = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dt]
        torch.testing.assert_close(got_g.double(), zg.grad, rtol=gtol, atol=gtol)
        assert torch.all(got_g[1, :700] == 0)
