"""The options of the policy and value kernels are each one list of names: the X-macros of
csrc/include/fusedrl/policy.h and value.h (the C++ struct and the binding's reading),
INT_OPTIONS / FLOAT_OPTIONS of python/fusedrl/ops/policy.py and ops/value.py (the packing) and the
Triton kernels' parameters (python/fusedrl/kernels/policy.py, value.py). Each test fails when one of
them gains, loses, renames or reorders an option without the others."""

from __future__ import annotations

import pytest
import torch

from fusedrl import _ext
from fusedrl.ops import policy as op
from fusedrl.ops import value as value_op
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


def test_value_options_by_name():
    ints, floats = _ext.load().value_option_names()
    assert (tuple(ints), tuple(floats)) == (value_op.INT_OPTIONS, value_op.FLOAT_OPTIONS)
    options = value_op.kernel_options(0.2, "verl")
    assert set(options) == set(value_op.INT_OPTIONS) | set(value_op.FLOAT_OPTIONS)
    flags, values = value_op.option_lists(options)
    o = value_op.Operands({}, {}, None, 0, 0, flags, values)
    assert o.options == options


def test_value_binding_rejects_lists_of_another_length():
    flags, values = value_op.option_lists(value_op.kernel_options(None, "clamp"))
    x = torch.zeros(1, 2, dtype=torch.float64)
    with pytest.raises(Exception, match="value options: expected"):
        value_op.VALUE_OBJECTIVE("cpu", x, None, x, torch.ones(1, 2, dtype=torch.bool), None,
                                 torch.ones(1, dtype=torch.float64), flags + [0], values, False)


def test_value_triton_kernel_takes_options_by_name():
    pytest.importorskip("triton")
    from fusedrl.kernels import policy as tk, value as tv  # noqa: PLC0415

    params = set(tk.kernel_parameters(tv._value_kernel))
    # has_clip is resolved on the host into clip = +inf (as Options::resolve)
    assert (set(value_op.INT_OPTIONS) | set(value_op.FLOAT_OPTIONS)) - {"has_clip"} <= params
