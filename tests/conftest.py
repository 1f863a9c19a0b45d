"""Suite-wide settings.

The normal suite runs the Triton kernels on CPU tensors in the Triton interpreter
(TRITON_INTERPRET=1). ``--gpu`` collects tests/gpu only: the compiled cuda and triton backends on
CUDA tensors, so the interpreter must stay off. TRITON_INTERPRET is read when a @triton.jit
decorator runs, i.e. when a module of fusedrl.kernels is first imported; pytest_configure runs
before collection imports any test module, and nothing imported before it (torch, the pytest
plugins) imports those modules: pytest_configure checks that.
"""

import os
import sys
from pathlib import Path

os.environ["FUSEDRL_POISON"] = "1"  # fresh output buffers are NaN-filled: unwritten elements show

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

GPU_HELP = "run tests/gpu on CUDA tensors with the compiled cuda and triton backends"
GPU_DIR = Path(__file__).resolve().parent / "gpu"


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", default=False, help=GPU_HELP)


def pytest_configure(config):
    config.addinivalue_line("markers", f"gpu: needs --gpu and a CUDA device ({GPU_HELP})")
    loaded = sorted(m for m in sys.modules if m.startswith("fusedrl.kernels."))
    if config.getoption("--gpu"):
        if os.environ.pop("TRITON_INTERPRET", None) not in (None, "0"):
            print("tests/conftest.py: --gpu unsets TRITON_INTERPRET (the Triton kernels must be compiled)")
    else:
        os.environ["TRITON_INTERPRET"] = "1"
    if loaded:  # their @triton.jit already ran with whatever TRITON_INTERPRET was then
        raise pytest.UsageError(f"Triton kernel modules {loaded} were imported before tests/conftest.py set "
                                "TRITON_INTERPRET; they must be imported after pytest_configure")


def pytest_ignore_collect(collection_path, config):
    """With --gpu only tests/gpu is collected: the CPU suite's Triton tests import the kernels under
    the interpreter (tests/test_*_triton.py set TRITON_INTERPRET=1 at import)."""
    if not config.getoption("--gpu"):
        return None
    path = Path(collection_path).resolve()
    if path == GPU_DIR or GPU_DIR in path.parents or path in GPU_DIR.parents:
        return None
    return True


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
