"""fusedrl imports and runs without its compiled extension: the cpu backend says why it declines and
the call falls through to the reference (a source checkout that was never built)."""

import shutil
import subprocess
import sys
from pathlib import Path

import fusedrl

CHILD = r"""
import warnings, torch, fusedrl
report = fusedrl.backends()
assert report["cpu"] and "fusedrl._C could not be imported" in report["cpu"], report
assert report["cuda"] and "fusedrl._C" in report["cuda"], report
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    logp = fusedrl.token_logprobs(torch.zeros(2, 4), torch.tensor([0, 3]))
assert any("backend 'cpu' declined token_logprobs" in str(w.message) for w in caught), [str(w.message) for w in caught]
assert torch.allclose(logp, torch.full((2,), -torch.log(torch.tensor(4.0))))
print("ok")
"""


def test_import_and_fallback_without_extension(tmp_path):
    src = Path(fusedrl.__file__).resolve().parent
    shutil.copytree(src, tmp_path / "fusedrl", ignore=shutil.ignore_patterns("_C*", "__pycache__", "kernels"))
    out = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=tmp_path, capture_output=True, text=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


CHILD_NO_TRITON = r"""
import sys, warnings
sys.modules["triton"] = None  # as if triton were not installed
import torch, fusedrl
report = fusedrl.backends()
assert report["triton"] and "triton is not installed" in report["triton"], report
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    logp = fusedrl.token_logprobs(torch.zeros(2, 4), torch.tensor([0, 3]), backend="triton")
assert any("backend 'triton' declined" in str(w.message) for w in caught)
assert torch.allclose(logp, torch.full((2,), -torch.log(torch.tensor(4.0))))
print("ok")
"""


def test_import_and_fallback_without_triton():
    out = subprocess.run([sys.executable, "-c", CHILD_NO_TRITON], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
