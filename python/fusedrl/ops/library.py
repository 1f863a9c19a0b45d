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
overloads: one autograd.Function per overload, for eager calls and compiled graphs alike. In eager
mode :meth:`Op.__call__` skips the dispatcher (it would find the same kernel): it applies that
autograd.Function with the device kernel itself, or, for an op without a formula (statistics,
scans, backward kernels, launches into preallocated buffers: constants of autograd), calls the
kernel; a call on a small batch then costs little more than its kernel. Traced calls
(torch.compile, fake or functional tensors) always go through the operator.
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
        self.functions = {}  # overload -> the autograd.Function of the formula
        for overload in sorted({OVERLOAD[b] for b in kernels}):
            qualname = f"fusedrl::{name}" if overload == "default" else f"fusedrl::{name}.{overload}"
            LIB.define(qualname.split("::")[1] + schema)
            self.fakes[overload] = fake
            torch.library.register_fake(qualname, _deferred(self.fakes, overload), lib=LIB)
            if backward is not None:
                self.functions[overload] = _register_autograd(qualname, overload, setup_context, backward)
        for backend, fn in kernels.items():
            qualname = f"fusedrl::{name}" + ("" if OVERLOAD[backend] == "default" else f".{OVERLOAD[backend]}")
            torch.library.register_kernel(qualname, DEVICES[backend], fn, lib=LIB)
        packet = getattr(torch.ops.fusedrl, name)
        self.overloads = {b: getattr(packet, OVERLOAD[b]) for b in kernels}
        self.backends = (*kernels, "torch")  # what dispatch.select may pick for this primitive
        OPS[name] = self

    def __call__(self, backend: str, *args):
        if torch.compiler.is_compiling() or _any_traced(args):
            return self.overloads[backend](*args)
        # eager: the registered kernel without the dispatcher; a differentiable op through the same
        # autograd.Function that its Autograd kernel applies
        if self.differentiable and torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return self.functions[OVERLOAD[backend]].apply(*args, self.kernels[backend])
        return self.kernels[backend](*args)

    def overload(self, backend: str) -> torch._ops.OpOverload:
        """The torch operator that runs ``backend`` (for torch.library.opcheck and torch.compile)."""
        return self.overloads[backend]


def _deferred(fakes: dict, overload: str):
    def fake(*args):
        return fakes[overload](*args)

    return fake


def _register_autograd(qualname: str, overload: str, setup_context: Callable, backward: Callable):
    """The autograd formula as the operator's Autograd kernel: what ``torch.library.register_autograd``
    registers (an autograd.Function that redispatches below autograd), without its per-call
    re-binding of the arguments to the schema (our schemas have no defaults), which costs more than
    a small kernel. Returns the autograd.Function, whose last input is what runs the forward: the
    redispatch (the Autograd kernel) or the device kernel itself (:meth:`Op.__call__` in eager mode)."""
    op = torch._library.utils.lookup_op(qualname)
    below = torch._C._after_autograd_keyset

    def forward(ctx, *args_run):  # ``run`` last, as register_autograd's metadata: backward returns None for it
        *args, run = args_run
        output = run(*args)
        ctx.set_materialize_grads(False)  # outputs without a gradient (metrics, buffers) get None, not zeros
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
        def redispatch(*a):
            with torch._C._AutoDispatchBelowAutograd():
                return op.redispatch(keyset & below, *a)

        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return function.apply(*args, redispatch)
        return redispatch(*args)

    LIB.impl(qualname.split("::")[1], autograd_kernel, "Autograd", with_keyset=True)
    return function


def backend_of(ctx, tensor: torch.Tensor) -> str:
    """In a backward formula: the backend whose overload ran the forward (``triton``, else the
    device type of ``tensor``: ``cpu`` or ``cuda``)."""
    return "triton" if ctx.overload == "triton" else tensor.device.type


def hand_over(ctx, what: str) -> tuple:
    """In a backward formula: the gradients its setup_context put in ``ctx.handed`` (the kernel's
    d loss / d x for an upstream gradient of 1), released from ``ctx`` so that autograd can take
    them without a copy. A graph therefore supports one backward pass; a second raises a
    RuntimeError naming ``what`` (the public function)."""
    handed = getattr(ctx, "handed", None)
    if handed is None:
        raise RuntimeError(f"{what}: its graph supports one backward pass (the gradient is handed over without a "
                           f"copy); call {what} again for another backward")
    ctx.handed = None
    return handed


def scaled(grad: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """``grad * upstream``: ``grad`` itself for a CPU upstream gradient of exactly 1 in eager mode
    (``loss.backward()``: no copy), else the product (a scaled loss, CUDA, or traced)."""
    if not (_traced(grad) or _traced(upstream)) and upstream.device.type == "cpu" and float(upstream) == 1.0:
        return grad
    return grad * upstream.to(grad.dtype)


def pack_options(options: dict, ints: tuple[str, ...], floats: tuple[str, ...]) -> tuple[list[int], list[float]]:
    """An op's options by name as the binding's two flat lists, in the order of the op's X-macros
    (``ints`` / ``floats``: the names as the C++ header lists them); a missing name raises KeyError."""
    return [int(options[n]) for n in ints], [float(options[n]) for n in floats]


def unpack_options(flags, values, ints: tuple[str, ...], floats: tuple[str, ...]) -> dict:
    """The inverse of :func:`pack_options`: the options by name."""
    return dict(zip(ints, flags)) | dict(zip(floats, values))


_UNTRACED = frozenset({torch.Tensor, int, float, bool, str, type(None), list, tuple})


def _any_traced(args) -> bool:
    """Whether an argument is a tensor subclass (AOTAutograd's fake / functional tensors): the
    types of eager calls are looked up in a set first (this runs on every eager call)."""
    for a in args:
        if type(a) not in _UNTRACED and isinstance(a, torch.Tensor):
            return True
    return False


def _traced(t: torch.Tensor) -> bool:
    # eager tensors are plain torch.Tensor; AOTAutograd traces with fake / functional subclasses
    return type(t) is not torch.Tensor
