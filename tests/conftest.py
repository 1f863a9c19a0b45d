# Set before anything imports triton or a kernel module: the Triton kernels then run on CPU
# tensors in the interpreter.
import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ["FUSEDRL_POISON"] = "1"  # fresh output buffers are NaN-filled: unwritten elements show

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
