"""Every public function and module with inputs on a ``cuda`` device, here, without a GPU.

The tensors are fake (torch's FakeTensorMode: shapes, dtypes and devices, no data), so the Python
glue runs for real and any tensor it makes on another device shows up:
- the kernel backends are made to accept fake CUDA tensors: ``cuda`` and ``triton`` are reported
  available, the extension is replaced by a stand-in whose entry points do nothing, and each
  op's fake implementation is its CUDA (or Triton) kernel, so the launchers run and every
  ``data_ptr()`` they hand to a kernel and every tensor they pass to a Triton launch is recorded
  and must be on ``cuda``;
- outputs and gradients must be on ``cuda``, and a torch op mixing devices raises by itself;
- data-dependent checks (``bool(t.any())``) are skipped for tensors without data, as under
  torch.compile.
A CPU-only torch has no CUDA device guard, which autograd needs to record a graph: the test
registers c10's FakeGuardImpl for CUDA (a tiny C++ extension built here), and runs backward with
a small engine of its own (:func:`fake_backward`), since torch's engine asks for an accelerator.
"""

from __future__ import annotations

import collections
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import fusedrl
from fusedrl import _ext, dispatch
from fusedrl.ops import library, logprobs, policy, scan, segments, value  # noqa: F401  (registers every op)

GUARD_SOURCE = r"""
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>
namespace { C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>); }
bool registered() { return true; }
"""


@pytest.fixture(scope="module")
def cuda_guard(tmp_path_factory):
    """c10's FakeGuardImpl registered for CUDA (a no-op when torch has a CUDA build)."""
    if torch.backends.cuda.is_built():
        return
    from torch.utils.cpp_extension import load_inline  # noqa: PLC0415

    build = tmp_path_factory.mktemp("fake_cuda_guard")
    assert load_inline("fusedrl_fake_cuda_guard", cpp_sources=GUARD_SOURCE, functions=["registered"],
                       build_directory=str(build)).registered()


class _Extension:
    """Stands in for fusedrl._C: every entry point accepts its arguments and does nothing."""

    cuda_compiled = True

    def __getattr__(self, name):
        return lambda *args: None


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for o in vars(obj).values():
            yield from _tensors(o)


@pytest.fixture
def fake_cuda(cuda_guard, monkeypatch):
    """Yields ``record``: the devices of the tensors the launchers handed to a kernel."""
    record = []
    monkeypatch.setitem(dispatch._unavailable, "cuda", None)
    monkeypatch.setitem(dispatch._unavailable, "triton", None)
    monkeypatch.setitem(dispatch._unavailable, "cpu", None)
    monkeypatch.setitem(_ext._state, "module", _Extension())
    monkeypatch.setitem(_ext._state, "error", None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))

    def data_ptr(self):
        record.append(("data_ptr", self.device))
        return 256

    monkeypatch.setattr(FakeTensor, "data_ptr", data_ptr, raising=False)
    monkeypatch.setattr(torch.autograd, "grad", fake_grad)
    for op in library.OPS.values():  # each overload's fake runs the overload's CUDA kernel
        for backend, kernel in op.kernels.items():
            if backend != "cpu":
                monkeypatch.setitem(op.fakes, library.OVERLOAD[backend], kernel)
    triton = pytest.importorskip("triton")

    def launch(self, *args, grid=None, **kwargs):
        record.extend(("triton", t.device) for t in _tensors((args, kwargs)))

    from triton.runtime.interpreter import InterpretedFunction  # noqa: PLC0415

    monkeypatch.setattr(InterpretedFunction, "run", launch)
    monkeypatch.setattr(triton.runtime.jit.JITFunction, "run", launch)
    with FakeTensorMode(allow_non_fake_inputs=False):
        yield record


def fake_backward(outputs, grads=None):
    """``torch.autograd.backward(outputs, grads)`` for fake CUDA tensors: each node of the graph is
    called once all its consumers have contributed their gradients; leaves accumulate ``.grad``."""
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    grads = [torch.ones_like(o) for o in outputs] if grads is None else list(grads)
    pending, seen, stack = collections.Counter(), set(), [o.grad_fn for o in outputs if o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                pending[nxt] += 1
                stack.append(nxt)
    buffers = {}

    def add(node, index, g):
        meta = node._input_metadata
        if index < len(meta):  # as the engine's validate_outputs: sum a broadcast gradient, cast the dtype
            shape, dtype = tuple(meta[index].shape), meta[index].dtype
            if tuple(g.shape) != shape:
                g = g.sum_to_size(shape)
            if g.dtype != dtype:
                g = g.to(dtype)
        buf = buffers.setdefault(node, [None] * max(len(meta), 1))
        buf[index] = g if buf[index] is None else buf[index] + g

    for o, g in zip(outputs, grads):
        add(o.grad_fn, o.output_nr, g)
    ready = [n for n in buffers if pending[n] == 0]
    while ready:
        node = ready.pop()
        inputs = buffers.pop(node, None) or [None] * max(len(node._input_metadata), 1)  # no gradient arrived
        if type(node).__name__ == "AccumulateGrad":
            leaf, g = node.variable, inputs[0]
            if g is not None:
                leaf.grad = g if leaf.grad is None else leaf.grad + g
            continue
        with torch.no_grad():  # as torch's engine without create_graph
            if hasattr(node, "_forward_cls"):  # a Python autograd.Function (custom ops included)
                out = node.apply(*inputs)
            else:
                meta = node._input_metadata
                out = node(*[g if g is not None else torch.zeros(m.shape, dtype=m.dtype, device=m.device)
                             for g, m in zip(inputs, meta)])
        out = (out,) if isinstance(out, torch.Tensor) or out is None else out
        for (nxt, index), g in zip(node.next_functions, out):
            if nxt is None:
                continue
            if g is not None:
                add(nxt, index, g)
            pending[nxt] -= 1
            if pending[nxt] == 0:
                ready.append(nxt)


def fake_grad(outputs, inputs, grad_outputs=None, allow_unused=False, **kwargs):
    """``torch.autograd.grad`` for leaf ``inputs`` through :func:`fake_backward` (the library calls it
    to take d loss / d logp of a chunk and the weights of an aggregation)."""
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if any(t.grad_fn is not None for t in inputs) or kwargs.get("create_graph"):
        raise NotImplementedError("fake_grad handles leaf inputs without create_graph only")
    saved = [t.grad for t in inputs]
    for t in inputs:
        t.grad = None
    fake_backward(outputs, None if grad_outputs is None else
                  ([grad_outputs] if isinstance(grad_outputs, torch.Tensor) else grad_outputs))
    grads = tuple(t.grad for t in inputs)
    for t, g in zip(inputs, saved):
        t.grad = g
    if not allow_unused and any(g is None for g in grads):
        raise RuntimeError("fake_grad: an input was not used in the graph")
    return grads


def _on_cuda(what, *tensors):
    for t in tensors:
        if t is not None:
            assert t.device.type == "cuda", f"{what}: a tensor on {t.device}"


def _check_record(record, expect_kernel):
    bad = [(kind, dev) for kind, dev in record if dev.type != "cuda"]
    assert not bad, f"the launchers handed a kernel tensors on other devices: {bad}"
    if expect_kernel:
        assert record, "no kernel was launched (the call did not reach the backend)"


# ---------------------------------------------------------------------------------------------
# the calls: each builds its inputs on `dev` inside fake mode and returns (outputs, leaves)
B, T, V, H = 3, 5, 37, 8
BACKENDS = ("cuda", "triton", None)


def _policy_inputs(dev, per_token=False):
    logp = (torch.randn(B, T, device=dev) - 2).requires_grad_(True)
    old = torch.randn(B, T, device=dev) - 2
    adv = torch.randn(B, T, device=dev) if per_token else torch.randn(B, device=dev)
    mask = torch.ones(B, T, dtype=torch.bool, device=dev)
    return logp, old, adv, mask


def call_token_logprobs(dev, backend):
    logits = torch.randn(B, T, V, device=dev, requires_grad=True)
    labels = torch.randint(0, V, (B, T), device=dev)
    logp, ent = fusedrl.token_logprobs(logits, labels, temperature=0.7, return_entropy=True, backend=backend)
    return (logp.sum() + ent.sum(),), [logits], True


def call_linear_logprobs(dev, backend):
    hidden = torch.randn(B, T, H, device=dev, requires_grad=True)
    weight = torch.randn(V, H, device=dev, requires_grad=True)
    bias = torch.randn(V, device=dev, requires_grad=True)
    labels = torch.randint(0, V, (B, T), device=dev)
    logp, ent = fusedrl.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, chunk_size=4,
                                        backend=backend)
    return (logp.sum() + ent.sum(),), [hidden, weight, bias], True


def _linear_policy(single_pass, ratio):
    # Modules are built here, outside fake mode: their constructor's dry call runs on real CPU tensors.
    modules = {backend: fusedrl.LinearPolicyLoss(chunk_size=4, single_pass=single_pass, ratio=ratio, beta=0.04,
                                                 entropy_coef=0.01, backend=backend) for backend in BACKENDS}

    def call(dev, backend):
        hidden = torch.randn(B, T, H, device=dev, requires_grad=True)
        weight = torch.randn(V, H, device=dev, requires_grad=True)
        bias = torch.randn(V, device=dev, requires_grad=True)
        labels = torch.randint(0, V, (B, T), device=dev)
        _, old, adv, mask = _policy_inputs(dev)
        ref = torch.randn(B, T, device=dev) - 2
        loss, metrics = modules[backend](hidden, weight, labels, old, adv, mask, bias=bias, ref_logp=ref)
        return (loss, *metrics.values()), [hidden, weight, bias], True

    return call


def _policy(**options):
    def call(dev, backend):
        kw = dict(options)
        logp, old, adv, mask = _policy_inputs(dev, per_token=kw.pop("per_token", False))
        ref = torch.randn(B, T, device=dev) - 2
        roll = torch.randn(B, T, device=dev) - 2
        ent = torch.rand(B, T, device=dev).requires_grad_(True)
        loss, metrics = fusedrl.policy_loss(logp, old, adv, mask, ref_logp=ref, rollout_logp=roll, entropy=ent,
                                            backend=backend, **kw)
        return (loss, *metrics.values()), [logp, ent], True

    return call


def call_policy_packed(dev, backend):
    N = 11
    logp = (torch.randn(1, N, device=dev) - 2).requires_grad_(True)
    old = torch.randn(1, N, device=dev) - 2
    mask = torch.ones(1, N, dtype=torch.bool, device=dev)
    cu = torch.tensor([0, 4, 4, 11], device=dev)
    adv = torch.randn(3, device=dev)
    loss, metrics = fusedrl.policy_loss(logp, old, adv, mask, cu_seqlens=cu, aggregation="seq-mean-token-mean",
                                        backend=backend)
    return (loss, *metrics.values()), [logp], True


POLICY_MODULES = {
    backend: (fusedrl.GRPOLoss(beta=0.04, backend=backend),
              fusedrl.PolicyLoss(surrogate="clip", clip_ratio_c=3.0, aggregation="seq-mean-token-mean", backend=backend),
              fusedrl.DPOLoss(loss_type="sigmoid", beta=0.1, backend=backend))
    for backend in BACKENDS
}


def call_modules(dev, backend):
    grpo, ppo, dpo = POLICY_MODULES[backend]
    logp, old, adv, mask = _policy_inputs(dev)
    ref = torch.randn(B, T, device=dev) - 2
    loss, metrics = grpo(logp, old, adv, mask, ref_logp=ref, num_tokens=B * T)
    loss2, _ = ppo(logp, old, adv, mask)
    pc, pr = logp.sum(-1), logp[:, :2].sum(-1)
    loss3, _ = dpo(pc, pr, pc.detach() + 0.1, pr.detach() - 0.1)
    return (loss + loss2 + loss3, *metrics.values()), [logp], True


def call_kl_aggregate(dev, backend):
    logp, _, adv, mask = _policy_inputs(dev)
    ref = torch.randn(B, T, device=dev) - 2
    kl = fusedrl.kl_penalty(logp, ref, kind="low_var_kl")
    out = [fusedrl.aggregate(kl, mask, mode, num_tokens=64) for mode in ("token-mean", "seq-mean-token-mean")]
    out.append(fusedrl.aggregate(kl, mask, "balanced", advantages=adv))
    return (sum(out),), [logp], False


def _group(**options):
    def call(dev, backend):
        kw = dict(options)
        K, ids = kw.pop("K", None), kw.pop("ids", False)
        N = 12
        rewards = torch.rand(N, device=dev) if K is None else torch.rand(N, K, device=dev)
        group_ids = torch.tensor([7, 7, 3, 3, 3, 9, 9, 9, 9, 1, 1, 5], device=dev) if ids else None
        if not ids:
            kw["group_size"] = 3
        a = fusedrl.group_advantages(rewards, group_ids, backend=backend, **kw)
        return (a,), [], True

    return call


def call_phase(dev, backend):
    N, P = 4, 2
    phase = torch.randint(0, P, (N, T), device=dev)
    a = fusedrl.phase_advantages(torch.rand(N, P, device=dev), phase, group_size=2, backend=backend)
    return (a,), [], True


def call_gae(dev, backend):
    rewards, values = torch.randn(B, T, device=dev), torch.randn(B, T, device=dev)
    mask = torch.ones(B, T, dtype=torch.bool, device=dev)
    adv, ret = fusedrl.gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=True, backend=backend)
    disc = fusedrl.discounted_returns(rewards, mask, gamma=0.9, backend=backend)
    return (adv, ret, disc), [], True


def call_preference(dev, backend):
    pc, pr = (torch.randn(4, device=dev, requires_grad=True) for _ in range(2))
    rc, rr = torch.randn(4, device=dev), torch.randn(4, device=dev)
    lengths = torch.full((4,), 5, device=dev)
    out = [fusedrl.preference_loss(pc, pr, rc, rr, loss_type=lt, beta=0.1, chosen_lengths=lengths,
                                   rejected_lengths=lengths, backend=backend)[0]
           for lt in ("sigmoid", "ipo", "robust", "apo_zero")]
    out.append(fusedrl.preference_loss(pc, pr, loss_type="simpo", beta=2.0, chosen_lengths=lengths,
                                       rejected_lengths=lengths, backend=backend)[0])
    out.append(fusedrl.orpo_loss(pc - 3, pr - 3, chosen_lengths=lengths, rejected_lengths=lengths, backend=backend)[0])
    out.append(fusedrl.kto_loss(pc, torch.tensor([True, False, True, False], device=dev), rc, backend=backend)[0])
    return (sum(out),), [pc, pr], False


def call_sequence_losses(dev, backend):
    x = torch.randn(4, T, device=dev, requires_grad=True)
    mask = torch.ones(4, T, dtype=torch.bool, device=dev)
    seq = fusedrl.sequence_logps(x, mask, average=True, backend=backend)
    lst = fusedrl.listwise_preference_loss(torch.randn(2, 3, device=dev, requires_grad=True),
                                           torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]], device=dev),
                                           backend=backend)[0]
    cpl = fusedrl.cpl_loss(x[:2], mask[:2], x[2:], mask[2:], backend=backend)[0]
    return (seq.sum() + lst + cpl,), [x], False


def _value(packed=False, **options):
    module = fusedrl.ValueLoss(**options)  # built outside fake mode (its dry call runs on CPU tensors)

    def call(dev, backend):
        shape = (1, 11) if packed else (B, T)
        v = torch.randn(*shape, device=dev).requires_grad_(True)
        old, ret = torch.randn(*shape, device=dev), torch.randn(*shape, device=dev)
        mask = torch.ones(*shape, dtype=torch.bool, device=dev)
        extra = dict(cu_seqlens=torch.tensor([0, 4, 4, 11], device=dev), max_length=7) if packed else {}
        loss, metrics = fusedrl.value_loss(v, old, ret, mask, backend=backend, **options, **extra)
        loss2, _ = module(v, old, ret, mask, **extra)
        return (loss + loss2, *metrics.values()), [v], True

    return call


CALLS = {
    "token_logprobs": call_token_logprobs,
    "linear_logprobs": call_linear_logprobs,
    "LinearPolicyLoss-single-pass": _linear_policy(True, "token"),
    "LinearPolicyLoss-two-pass": _linear_policy(False, "sequence"),
    "policy_loss-grpo": _policy(beta=0.04, entropy_coef=0.01, aggregation="token-mean"),
    "policy_loss-gspo": _policy(ratio="sequence", aggregation="seq-mean-token-mean"),
    "policy_loss-cispo-rollout": _policy(surrogate="cispo", rollout_correction="token_truncate", per_token=True),
    "policy_loss-balanced": _policy(aggregation="balanced"),
    "policy_loss-packed": call_policy_packed,
    "value_loss-token-mean": _value(clip=0.2),
    "value_loss-seq-mean-verl-ties": _value(clip=0.2, clip_ties="verl", aggregation="seq-mean-token-mean",
                                            exclude_empty_rows=True),
    "value_loss-packed": _value(packed=True, clip=0.2, aggregation="seq-mean-token-sum-norm"),
    "GRPOLoss-PolicyLoss-DPOLoss": call_modules,
    "kl_penalty-aggregate": call_kl_aggregate,
    "group_advantages-grpo": _group(),
    "group_advantages-rloo": _group(estimator="rloo"),
    "group_advantages-gdpo": _group(K=2, weights=[1.0, 0.5], combine="normalize_then_sum"),
    "phase_advantages": call_phase,
    "gae-discounted_returns": call_gae,
    "preference": call_preference,
    "sequence-listwise-cpl": call_sequence_losses,
}


@pytest.mark.parametrize("backend", BACKENDS, ids=["cuda", "triton", "default"])
@pytest.mark.parametrize("name", list(CALLS))
def test_public_call_stays_on_cuda(fake_cuda, name, backend):
    dev = torch.device("cuda")
    outputs, leaves, kernel = CALLS[name](dev, backend)
    outputs = [o for o in outputs if isinstance(o, torch.Tensor)]
    _on_cuda(f"{name}: an output", *outputs)
    scalar = [o for o in outputs if o.requires_grad]
    if leaves:
        assert scalar, f"{name}: nothing differentiable came back"
        fake_backward(scalar[0])
        for leaf in leaves:
            assert leaf.grad is not None, f"{name}: no gradient reached a leaf"
            _on_cuda(f"{name}: a gradient", leaf.grad)
    _check_record(fake_cuda, expect_kernel=kernel)


def test_fake_backward_matches_autograd_on_cpu():
    """The small engine above computes what torch's does (on real CPU tensors)."""
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = (x @ w).tanh()
    loss = y.pow(2).sum() + (x.exp() * 2).mean() + y[:, 0].sum()
    gx, gw = torch.autograd.grad(loss, (x, w), retain_graph=True)
    fake_backward(loss)
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(w.grad, gw)
