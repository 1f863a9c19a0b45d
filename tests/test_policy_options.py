"""The fused policy objective's options are one list of names: csrc/include/fusedrl/policy.h
(FUSEDRL_POLICY_INT_OPTIONS / FUSEDRL_POLICY_FLOAT_OPTIONS: the C++ struct and the binding's
reading), python/fusedrl/ops/policy.py (INT_OPTIONS / FLOAT_OPTIONS: the packing) and the Triton
kernels' parameters (python/fusedrl/kernels/policy.py). Each test fails when one of them gains,
loses, renames or reorders an option without the others."""

from __future__ import annotations

import pytest
import torch

from fusedrl import _ext
from fusedrl.ops import policy as op
from fusedrl.policy import PolicyParams

ALL = set(op.INT_OPTIONS) | set(op.FLOAT_OPTIONS)


def test_cpp_reads_the_python_names_in_the_python_order():
    ints, floats = _ext.load().policy_option_names()
    assert tuple(ints) == op.INT_OPTIONS
    assert tuple(floats) == op.FLOAT_OPTIONS


def test_every_option_is_resolved_by_name():
    options = op.kernel_options(PolicyParams(), None)
    assert set(options) == ALL
    flags, values = op.option_lists(options)
    assert op.named_options(flags, values) == {k: (int(v) if k in op.INT_OPTIONS else float(v))
                                               for k, v in options.items()}


def test_binding_rejects_lists_of_another_length():
    flags, values = op.option_lists(op.kernel_options(PolicyParams(), None))
    x = torch.zeros(1, 2, dtype=torch.float64)
    stats = torch.empty(1, op.NUM_STATS, dtype=torch.float64)
    args = (x, None, torch.zeros(1, dtype=torch.float64), torch.ones(1, 2, dtype=torch.bool), None, None, None, None)
    with pytest.raises(Exception, match="policy options: expected"):
        o = op._operands(*args, flags[:-1], values)
        o.stats = stats
        op._cpu_stats(o)


def test_triton_kernels_take_options_by_their_names():
    pytest.importorskip("triton")
    from fusedrl.kernels import policy as tk  # noqa: PLC0415

    taken = set()
    for kernel in (tk._stats_kernel, tk._loss_kernel):
        params = set(tk.kernel_parameters(kernel))
        # lower-case parameters that are not operands, strides or lengths are option names
        runtime = {n for n in params if n.islower() and not n.endswith("_ptr") and not n.startswith("s_")}
        assert runtime - {"T", "scr_row"} <= ALL, runtime - ALL
        taken |= {n for n in ALL if n in params or n.upper() in params}
    assert taken == ALL, ALL - taken
