"""How fusedrl's kernels become torch operators: one :class:`Op` per primitive.

An ``Op`` is defined once (name, schema, fake function, optional autograd formula) and becomes two
overloads of one torch.library operator, which differ only in which kernels are registered:

==========================  =============================================  =====================
overload                    kernels (registered per device)                backend names
==========================  =============================================  =====================
``fusedrl::NAME``           C++ of ``fusedrl._C``: CPU (OpenMP), CUDA      ``cpu``, ``cuda``
``fusedrl::NAME.triton``    Triton (``fusedrl.kernels``): CUDA, and CPU     ``triton``
                            tensors under ``TRITON_INTERPRET=1``
==========================  =============================================  =====================

The backend is chosen once, by :func:`fusedrl.dispatch.select`, before the call; it names the
overload, and torch's dispatcher picks the device kernel from the tensors (so a schema carries no
backend string, and torch.compile sees one opaque operator with a fake implementation: no graph
break). The ``torch`` backend is the plain-PyTorch reference, which needs no operator.

Autograd: an op with a formula (:meth:`Op.__init__` ``backward`` / ``setup_context``, with the
signatures of ``torch.library.register_autograd``) has it registered as the Autograd kernel of both
overloads; eager calls and compiled graphs run the same formula. An op without one (statistics, scans, backward kernels, launches into
preallocated buffers) is a constant of autograd; in eager mode its call goes straight to the
registered kernel function (the dispatcher would find the same one), which keeps a small call at
the cost of the kernel itself; traced calls (torch.compile, fake or functional tensors) always go
through the operator.
"""

from __future__ import annotations

from typing import Callable

import torch

LIB = torch.library.Library("fusedrl", "FRAGMENT")
OVERLOAD = {"cpu": "default", "cuda": "default", "triton": "triton"}
DEVICES = {"cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cpu", "cuda")}
OPS: dict[str, Op] = {}


class Op:
    """A primitive's torch operator: ``op(backend, *args)`` runs ``kernels[backend]`` through the
    operator ``fusedrl::name`` (``cpu``, ``cuda``) or ``fusedrl::name.triton``.

    Args:
        name: the operator's name in the ``fusedrl`` namespace.
        schema: its arguments and returns in torch's schema syntax, e.g.
            ``"(Tensor x, float gamma, Tensor? mask) -> (Tensor, Tensor)"``; an argument written into
            is annotated ``Tensor(a!)`` and the op returns ``()``.
        fake: the fake (meta) function: outputs of the right shapes, dtypes and devices.
        kernels: ``{backend: function}`` for the backends that implement the primitive; each
            function takes the schema's arguments.
        setup_context, backward: the autograd formula (``torch.library.register_autograd``), or
            None for an op whose outputs are constants.
    """

    def __init__(self, name: str, schema: str, *, fake: Callable, kernels: dict[str, Callable],
                 setup_context: Callable | None = None, backward: Callable | None = None):
        unknown = set(kernels) - set(OVERLOAD)
        if unknown:
            raise ValueError(f"kernels: backends must be among {tuple(OVERLOAD)}, got {sorted(unknown)}")
        if (setup_context is None) != (backward is None):
            raise ValueError("setup_context and backward come together")
        self.name = name
        self.kernels = dict(kernels)
        self.differentiable = backward is not None
        # the fake of each overload, looked up at call time (tests replace it to run kernels on fake tensors)
        self.fakes = {}
        for overload in sorted({OVERLOAD[b] for b in kernels}):
            qualname = f"fusedrl::{name}" if overload == "default" else f"fusedrl::{name}.{overload}"
            LIB.define(qualname.split("::")[1] + schema)
            self.fakes[overload] = fake
            torch.library.register_fake(qualname, _deferred(self.fakes, overload), lib=LIB)
            if backward is not None:
                _register_autograd(qualname, overload, setup_context, backward)
        for backend, fn in kernels.items():
            qualname = f"fusedrl::{name}" + ("" if OVERLOAD[backend] == "default" else f".{OVERLOAD[backend]}")
            torch.library.register_kernel(qualname, DEVICES[backend], fn, lib=LIB)
        packet = getattr(torch.ops.fusedrl, name)
        self.overloads = {b: getattr(packet, OVERLOAD[b]) for b in kernels}
        self.backends = (*kernels, "torch")  # what dispatch.select may pick for this primitive
        OPS[name] = self

    def __call__(self, backend: str, *args):
        if not self.differentiable and not torch.compiler.is_compiling() and not any(map(_traced_arg, args)):
            return self.kernels[backend](*args)
        return self.overloads[backend](*args)

    def overload(self, backend: str) -> torch._ops.OpOverload:
        """The torch operator that runs ``backend`` (for torch.library.opcheck and torch.compile)."""
        return self.overloads[backend]


def _deferred(fakes: dict, overload: str):
    def fake(*args):
        return fakes[overload](*args)

    return fake


def _register_autograd(qualname: str, overload: str, setup_context: Callable, backward: Callable) -> None:
    """The autograd formula as the operator's Autograd kernel: what ``torch.library.register_autograd``
    registers (an autograd.Function that redispatches below autograd), without its per-call
    re-binding of the arguments to the schema (our schemas have no defaults), which costs more than
    a small kernel."""
    op = torch._library.utils.lookup_op(qualname)
    below = torch._C._after_autograd_keyset

    def forward(ctx, *args_keyset):  # the keyset last, as register_autograd's: backward returns None for it
        *args, keyset = args_keyset
        with torch._C._AutoDispatchBelowAutograd():
            output = op.redispatch(keyset & below, *args)
        ctx.overload = overload
        setup_context(ctx, args, output)
        return output

    def backward_(ctx, *grads):
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = needs[:-1]  # the formula sees the schema's inputs only
        try:
            return (*backward(ctx, *grads), None)
        finally:
            ctx.needs_input_grad = needs

    function = type(f"{op._opname}_{overload}_backward", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward_)})

    def autograd_kernel(keyset, *args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return function.apply(*args, keyset)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & below, *args)

    LIB.impl(qualname.split("::")[1], autograd_kernel, "Autograd", with_keyset=True)


def backend_of(ctx, tensor: torch.Tensor) -> str:
    """In a backward formula: the backend whose overload ran the forward (``triton``, else the
    device type of ``tensor``: ``cpu`` or ``cuda``)."""
    return "triton" if ctx.overload == "triton" else tensor.device.type


def hand_over(grad: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """``grad * upstream`` for a kernel's d loss / d x written in the forward (for an upstream
    gradient of 1). In eager mode a CPU upstream gradient of exactly 1 (``loss.backward()``) hands
    the saved tensor itself to autograd: no copy, and nothing is modified, so a retained graph can
    run backward again. Otherwise (a scaled loss, CUDA, or traced by torch.compile) the product."""
    if not (_traced(grad) or _traced(upstream)) and upstream.device.type == "cpu" and float(upstream) == 1.0:
        return grad
    return grad * upstream.to(grad.dtype)


def _traced_arg(a) -> bool:
    return isinstance(a, torch.Tensor) and type(a) is not torch.Tensor


def _traced(t: torch.Tensor) -> bool:
    # eager tensors are plain torch.Tensor; AOTAutograd traces with fake / functional subclasses
    return type(t) is not torch.Tensor
