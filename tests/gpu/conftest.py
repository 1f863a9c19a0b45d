"""tests/gpu runs only with ``--gpu`` on a machine where torch sees a CUDA device (the option is
added by tests/conftest.py, which also keeps TRITON_INTERPRET off in that mode). Without both, every
test marked ``gpu`` is skipped with one reason."""

import pytest
import torch

SKIP_REASON = "needs --gpu and a CUDA device"


def pytest_collection_modifyitems(config, items):
    if config.getoption("--gpu") and torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
