"""The compiled ``cuda`` and ``triton`` backends on CUDA tensors against the plain-PyTorch reference
(``backend="torch"``) on float64 CPU copies of the same inputs: token_logprobs, linear_logprobs,
LinearPolicyLoss, policy_loss, value_loss, group / phase / segment advantages, gae, discounted_returns and the
masked prefix sum; values, metrics and gradients; every output must be on the CUDA device.

Runs only with ``pytest tests/gpu --gpu`` on a machine with a CUDA device (tests/gpu/conftest.py
skips it otherwise). There, a backend that cannot run fails its tests: the extension must have been
built with the CUDA kernels and Triton must be installed. Every call is watched through
``fusedrl.dispatch.select``: a call that asked for a backend and fell through to another fails.

Tolerances (the suite's rules, fusedrl.testing): float32 within 1e-5 of the float64 gold relative
to the gold's scale (at least 1); float64 within 1e-10; bfloat16 inputs no worse than twice the
error of the same computation by eager torch / the reference in bfloat16; outputs the kernels
return in float32 (log-probs, losses, metrics, advantages) are also allowed float32's rounding.
"""

from __future__ import annotations

import pytest
import torch

import fusedrl
from fusedrl import dispatch
from fusedrl.testing import assert_close_to_reference, max_error, scale_of
from policy_cases import ENT, GRID, KL_ALL, PACKED, _case_id, _options, make_inputs, pack
from policy_cases import run as policy_run

pytestmark = pytest.mark.gpu

BACKENDS = ["cuda", "triton"]
CUDA = torch.device("cuda")
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(autouse=True)
def _exact_fp32_matmul():
    """TF32 would round the GEMMs of linear_logprobs to 10 mantissa bits (and the reference's)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """The backend under test: fails when it cannot run here; afterwards checks that every call
    that asked for it ran on it (none fell through) and that at least one did."""
    name = request.param
    why = fusedrl.backends()[name]
    if why is not None:
        pytest.fail(f"backend {name!r} cannot run on this GPU machine: {why}")
    calls = []
    real = dispatch.select

    def spy(op, ops, device, dtype, backend=None):
        chosen = real(op, ops, device, dtype, backend)
        calls.append((op, tuple(ops), dispatch.requested_backend(backend), chosen))
        return chosen

    monkeypatch.setattr(dispatch, "select", spy)
    yield name
    fell = [(op, chosen) for op, ops, wanted, chosen in calls if wanted == name and name in ops and chosen != name]
    assert not fell, f"calls that asked for {name!r} ran elsewhere: {fell}"
    assert any(chosen == name for *_, chosen in calls), f"no call ran on {name!r}: {calls}"


def on_cuda(*tensors, what=""):
    for t in tensors:
        if isinstance(t, torch.Tensor):
            assert t.device.type == "cuda", f"{what}: output on {t.device}, expected the CUDA device"
        elif isinstance(t, dict):
            on_cuda(*t.values(), what=what)
        elif isinstance(t, (tuple, list)):
            on_cuda(*t, what=what)


def to(value, device, dtype=None):
    """A tensor (or the tensors of a dict / tuple) on ``device``; floating ones cast to ``dtype``."""
    if isinstance(value, dict):
        return {k: to(v, device, dtype) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to(v, device, dtype) for v in value)
    if not isinstance(value, torch.Tensor):
        return value
    if dtype is not None and value.is_floating_point():
        return value.detach().to(device=device, dtype=dtype)
    return value.detach().to(device)


def gold_copy(value):
    return to(value, CPU, torch.float64)


def close(actual, gold, *, dtype, name, floor=1.0, torch_error=None):
    """assert_close_to_reference on a CPU copy; for bf16 / fp16 ``dtype`` the bound is the larger
    of twice ``torch_error`` and the float32 rule (outputs rounded once from float32 math)."""
    a = actual.detach().cpu()
    if dtype in (torch.bfloat16, torch.float16):
        rule32 = 1e-5 * scale_of(gold, floor)
        err = max_error(a, gold)
        bound = max(2.0 * torch_error, rule32)
        assert err <= bound, f"{name}: max error {err:.3g} exceeds {bound:.3g} (2 x torch's {torch_error:.3g})"
        return
    assert_close_to_reference(a, gold, dtype=dtype, name=name, floor=floor)


def test_backends_available_and_triton_compiled():
    """--gpu mode: both backends run here, and the Triton kernels are compiled (TRITON_INTERPRET
    off), not the interpreter's functions."""
    import os  # noqa: PLC0415

    from triton.runtime.jit import JITFunction  # noqa: PLC0415

    from fusedrl import kernels  # noqa: F401, PLC0415
    from fusedrl.kernels import logprobs, policy, scan, segments  # noqa: PLC0415

    status = fusedrl.backends()
    assert status["cuda"] is None, f"cuda backend unavailable: {status['cuda']}"
    assert status["triton"] is None, f"triton backend unavailable: {status['triton']}"
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "TRITON_INTERPRET is set in --gpu mode"
    for mod in (logprobs, policy, scan, segments):
        jitted = [v for k, v in vars(mod).items() if k.endswith("_kernel") and hasattr(v, "fn")]
        assert jitted, f"no Triton kernels found in {mod.__name__}"
        for k in jitted:
            assert isinstance(k, JITFunction), f"{mod.__name__}.{k}: {type(k).__name__}, not a compiled JITFunction"


# ---------------------------------------------------------------------------------------------
# token_logprobs


def logits_case(N, V, dtype, *, seed=0, scale=3.0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < ignore_frac] = -100
    labels[1] = -100
    g_lp = torch.randn(N, generator=g, dtype=torch.float64)
    g_h = torch.randn(N, generator=g, dtype=torch.float64)
    return logits, labels, g_lp, g_h


def lp_run(backend, logits, labels, g_lp, g_h, device, *, temperature=1.0, entropy=True, ignore_index=-100):
    """Forward and backward of sum(g_lp * logp) + sum(g_h * H): (logp, H or None, d/d logits)."""
    z = logits.detach().to(device).clone().requires_grad_(True)
    out = fusedrl.token_logprobs(z, labels.to(device), temperature=temperature, ignore_index=ignore_index,
                                 return_entropy=entropy, backend=backend)
    logp, h = out if entropy else (out, None)
    loss = (logp * g_lp.to(device, logp.dtype)).sum()
    if entropy:
        loss = loss + (h * g_h.to(device, h.dtype)).sum()
    loss.backward()
    return logp.detach(), (h.detach() if entropy else None), z.grad


def eager_error(logits, labels, g_lp, g_h, temperature, golds, ignore_index=-100):
    """The error of eager torch computing in the logits' own dtype (log_softmax, gather), on CPU."""
    z = logits.detach().clone().requires_grad_(True)
    ls = torch.log_softmax(z / temperature, dim=-1)
    keep = labels != ignore_index
    logp = torch.where(keep, ls.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1), 0)
    h = torch.where(keep, -(ls.exp() * ls).sum(-1), 0)
    entropy = golds[1] is not None
    ((logp * g_lp.to(z.dtype)).sum() + ((h * g_h.to(z.dtype)).sum() if entropy else 0)).backward()
    return [None if b is None else max_error(a, b) for a, b in zip((logp, h, z.grad), golds)]


def check_logprobs(backend, logits, labels, g_lp, g_h, *, temperature=1.0, entropy=True, ignore_index=-100,
                   rows=None):
    got = lp_run(backend, logits, labels, g_lp, g_h, CUDA, temperature=temperature, entropy=entropy,
                 ignore_index=ignore_index)
    on_cuda(*got, what=f"{backend} token_logprobs")
    gold = lp_run("torch", logits.double(), labels, g_lp, g_h, CPU, temperature=temperature, entropy=entropy,
                  ignore_index=ignore_index)
    assert got[0].dtype == torch.float32 and got[2].dtype == logits.dtype and got[2].shape == logits.shape
    terr = None
    if logits.dtype in (torch.bfloat16, torch.float16):
        terr = eager_error(logits, labels, g_lp, g_h, temperature, gold, ignore_index)
    rows = slice(None) if rows is None else rows
    finite = logits.double()[rows][torch.isfinite(logits.double()[rows])]
    floor = max(1.0, float(finite.abs().max()) / temperature) if finite.numel() else 1.0
    for i, (name, a, b) in enumerate(zip(("logp", "entropy", "grad"), got, gold)):
        if b is None:
            assert a is None
            continue
        dt = logits.dtype if i == 2 else torch.float32  # values in float32, the gradient in the logits' dtype
        close(a[rows], b[rows], dtype=dt, name=f"{backend} {name}", floor=floor,
              torch_error=None if terr is None else terr[i])
    ignored = (labels == ignore_index).nonzero().flatten().tolist()
    for r in ignored:
        assert got[0][r] == 0 and torch.all(got[2][r] == 0), f"ignored row {r}: nonzero logp or gradient"
    return got


MODES = {"T1-entropy": (1.0, True), "T0.7-entropy": (0.7, True), "T1-logp-only": (1.0, False)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("V", [7, 1000, 32003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_token_logprobs(backend, dtype, V, mode):
    temperature, entropy = MODES[mode]
    logits, labels, g_lp, g_h = logits_case(37 if V < 32000 else 19, V, dtype, seed=V)
    check_logprobs(backend, logits, labels, g_lp, g_h, temperature=temperature, entropy=entropy)


def test_token_logprobs_edges(backend):
    """Masked vocabulary (-inf), a NaN row and a +inf row (NaN for that row only), a custom
    ignore_index, strided rows, a [B, T, V] batch, many rows (grid over N)."""
    logits, labels, g_lp, g_h = logits_case(6, 5003, torch.float32, seed=3, ignore_frac=0.0)
    logits[0, :4500] = float("-inf")
    labels[0] = 4600
    logits[2, ::3] = float("-inf")
    labels[2] = 1
    logits[3, 4000] = float("nan")
    logits[4, 17] = float("inf")
    lp, h, grad = check_logprobs(backend, logits, labels, g_lp, g_h, rows=[0, 1, 2, 5])
    for r in (3, 4):
        assert torch.isnan(lp[r]) and torch.isnan(h[r]) and torch.isnan(grad[r]).all(), f"row {r} not NaN"
    assert torch.all(grad[0, :4500] == 0) and torch.all(grad[2, ::3] == 0)

    logits, labels, g_lp, g_h = logits_case(8, 300, torch.float32, seed=4, ignore_frac=0.0)
    labels[[0, 1, 5]] = 3
    check_logprobs(backend, logits, labels, g_lp, g_h, ignore_index=3)

    wide = torch.randn(9, 1100, dtype=torch.float64).float()
    z = wide.to(CUDA)[:, :1000]  # row stride 1100
    y = torch.randint(0, 1000, (9,))
    lp, h = fusedrl.token_logprobs(z, y.to(CUDA), return_entropy=True, backend=backend)
    glp, gh = fusedrl.token_logprobs(wide[:, :1000].double(), y, return_entropy=True, backend="torch")
    close(lp, glp, dtype=torch.float32, name="strided logp", floor=5.0)
    close(h, gh, dtype=torch.float32, name="strided entropy", floor=5.0)

    z3 = torch.randn(3, 5, 777)
    y3 = torch.randint(0, 777, (3, 5))
    y3[0, 2] = -100
    lp = fusedrl.token_logprobs(z3.to(CUDA), y3.to(CUDA), backend=backend)
    assert lp.shape == (3, 5) and lp.device.type == "cuda"
    close(lp, fusedrl.token_logprobs(z3.double(), y3, backend="torch"), dtype=torch.float32, name="[B, T, V]",
          floor=5.0)

    logits, labels, g_lp, g_h = logits_case(3000, 130, torch.float32, seed=5)
    check_logprobs(backend, logits, labels, g_lp, g_h, temperature=1.3)


# ---------------------------------------------------------------------------------------------
# linear_logprobs


def linear_case(N, H, V, dtype, *, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[:: max(N // 3, 1)] = -100
    return hidden, weight, b, labels


def linear_run(backend, hidden, weight, bias, labels, device, **kw):
    h = hidden.detach().to(device).clone().requires_grad_(True)
    w = weight.detach().to(device).clone().requires_grad_(True)
    b = None if bias is None else bias.detach().to(device).clone().requires_grad_(True)
    lp, ent = fusedrl.linear_logprobs(h, w, labels.to(device), bias=b, return_entropy=True, backend=backend, **kw)
    g = torch.Generator().manual_seed(1)
    up = torch.randn(lp.shape, generator=g, dtype=torch.float64).to(device, lp.dtype)
    ((lp * up).sum() + (ent * 0.3).sum()).backward()
    return lp.detach(), ent.detach(), h.grad, w.grad, None if b is None else b.grad


LINEAR_NAMES = ("logp", "entropy", "d hidden", "d weight", "d bias")


@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("V", [1003, 32003])
def test_linear_logprobs_fp32(backend, V, bias, chunk_size):
    hidden, weight, b, labels = linear_case(45, 64, V, torch.float32, bias=bias, seed=V)
    got = linear_run(backend, hidden, weight, b, labels, CUDA, temperature=0.8, chunk_size=chunk_size)
    on_cuda(*got, what=f"{backend} linear_logprobs")
    gold = linear_run("torch", hidden.double(), weight.double(), None if b is None else b.double(), labels, CPU,
                      temperature=0.8)
    for name, a, g in zip(LINEAR_NAMES, got, gold):
        if g is None:
            assert a is None, name
            continue
        assert a.dtype == (torch.float32 if name in ("logp", "entropy") else hidden.dtype), name
        close(a, g, dtype=torch.float32, name=f"{backend} {name}", floor=10.0)


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_linear_logprobs_bf16(backend, chunk_size):
    """bf16: no worse than twice the error of the reference in bf16 (bf16 GEMM, full logits) on
    the same device."""
    hidden, weight, b, labels = linear_case(70, 64, 2053, torch.bfloat16, seed=11)
    got = linear_run(backend, hidden, weight, b, labels, CUDA, chunk_size=chunk_size)
    on_cuda(*got, what=f"{backend} linear_logprobs bf16")
    ref = linear_run("torch", hidden, weight, b, labels, CUDA)
    gold = linear_run("torch", hidden.double(), weight.double(), b.double(), labels, CPU)
    for name, a, r, g in zip(LINEAR_NAMES, got, ref, gold):
        assert a.dtype == (torch.float32 if name in ("logp", "entropy") else torch.bfloat16), name
        close(a, g, dtype=torch.bfloat16, name=f"{backend} {name}", floor=10.0, torch_error=max_error(r.cpu(), g))


# ---------------------------------------------------------------------------------------------
# LinearPolicyLoss


def policy_batch(B=3, T=7, H=32, V=301, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 1:] = False
    advantages = torch.randn(B, generator=g, dtype=torch.float64)
    ref_hidden = hidden + 0.05 * torch.randn(B, T, H, generator=g, dtype=torch.float64)
    with torch.no_grad():
        old = fusedrl.token_logprobs(hidden @ weight.t() + bias, labels, temperature=0.9, backend="torch")
    old = old + 0.05 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return dict(hidden=hidden, weight=weight, bias=bias, labels=labels, mask=mask, advantages=advantages,
                ref_hidden=ref_hidden, old_logp=old)


LINEAR_POLICY = {
    # GRPO / DAPO: token ratio, clip-higher, k3 KL from the reference model's hidden states
    "grpo-token-single-pass": (dict(aggregation="token-mean", beta=0.04, clip_high=0.28), None, True),
    "grpo-token-two-pass": (dict(aggregation="token-mean", beta=0.04, clip_high=0.28), False, False),
    # GSPO: sequence ratio couples a row's tokens: the two-pass path
    "gspo-sequence": (dict(ratio="sequence", clip_low=3e-4, clip_high=4e-4, aggregation="seq-mean-token-mean"),
                      None, False),
    "cispo-entropy": (dict(surrogate="cispo", clip_high=4.0, aggregation="token-sum", beta=0.04, kl="low_var_kl",
                           entropy_coef=0.01), None, True),
    "geo-mean-seq-norm": (dict(surrogate="geo_mean", aggregation="seq-mean-token-sum-norm", max_length=7),
                               None, False),
}


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("config", list(LINEAR_POLICY))
def test_linear_policy_loss(backend, config, chunk_size):
    options, single_pass, expect_single = LINEAR_POLICY[config]
    d = policy_batch(seed=len(config))

    def run(be, device, dtype):
        x = to(d, device, dtype)
        h, w, b = (x[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias"))
        module = fusedrl.LinearPolicyLoss(temperature=0.9, chunk_size=chunk_size, single_pass=single_pass,
                                          backend=be, **options)
        extra = dict(ref_hidden=x["ref_hidden"]) if options.get("beta") else {}
        loss, metrics = module(h, w, x["labels"], x["old_logp"], x["advantages"], x["mask"], bias=b, **extra)
        grads = torch.autograd.grad(loss, (h, w, b))
        return module, loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads

    module, loss, metrics, grads = run(backend, CUDA, torch.float32)
    assert module.single_pass == expect_single
    on_cuda(loss, metrics, grads, what=f"{backend} LinearPolicyLoss {config}")
    _, loss_g, metrics_g, grads_g = run("torch", CPU, torch.float64)
    close(loss, loss_g, dtype=torch.float32, name="loss")
    assert metrics.keys() == metrics_g.keys()
    for k in metrics:
        close(metrics[k], metrics_g[k], dtype=torch.float32, name=f"metric {k}")
    for name, a, g in zip(("d hidden", "d weight", "d bias"), grads, grads_g):
        assert a.dtype == torch.float32
        close(a, g, dtype=torch.float32, name=name)


# ---------------------------------------------------------------------------------------------
# policy_loss


def policy_check(backend, d, opts, *, dtype, entropy_grad=True, cu=None):
    """policy_loss on CUDA (operands cast to ``dtype``) against the reference on float64 CPU
    copies of the same rounded operands; bf16: against twice the reference's own bf16 error."""
    x = to(d, CUDA, dtype)
    dev_opts = to(opts, CUDA)
    if cu is not None:
        dev_opts["cu_seqlens"] = cu.to(CUDA)
    got = policy_run(backend, x, entropy_grad=entropy_grad, **dev_opts)
    on_cuda(*got, what=f"{backend} policy_loss {opts}")
    gold_opts = dict(opts, **({"cu_seqlens": cu} if cu is not None else {}))
    gold = policy_run("torch", gold_copy(x), entropy_grad=entropy_grad, **gold_opts)
    ref = None
    if dtype in (torch.bfloat16, torch.float16):
        ref = policy_run("torch", x, entropy_grad=entropy_grad, **dev_opts)
    names = ["loss"] + [f"metric {k}" for k in gold[1]] + ["grad logp", "grad entropy"]
    assert got[1].keys() == gold[1].keys(), (sorted(got[1]), sorted(gold[1]))
    flat_got = [got[0], *got[1].values(), got[2], got[3]]
    flat_gold = [gold[0], *gold[1].values(), gold[2], gold[3]]
    flat_ref = [ref[0], *ref[1].values(), ref[2], ref[3]] if ref is not None else [None] * len(flat_gold)
    for name, a, g, r in zip(names, flat_got, flat_gold, flat_ref):
        assert (a is None) == (g is None), name
        if a is None:
            continue
        assert a.shape == g.shape, (name, a.shape, g.shape)
        assert torch.isfinite(a).all(), f"{name}: not finite"
        if name.startswith("grad"):
            assert a.dtype == dtype, (name, a.dtype)
        if dtype == torch.float64:
            err, bound = max_error(a.cpu(), g), 1e-10 * scale_of(g)
            assert err <= bound, f"{backend} {name}: max error {err:.3g} exceeds {bound:.3g} ({opts})"
        else:
            terr = None if r is None else max_error(r.cpu(), g)
            close(a, g, dtype=dtype, name=f"{backend} {name} {opts}", torch_error=terr)
    return got


MASKS = ("bool", "float", "int32", "uint8", "int64")


@pytest.mark.parametrize("case", GRID, ids=[_case_id(c) for c in GRID])
def test_policy_grid_fp32(backend, case):
    i = GRID.index(case)
    d = make_inputs(4, 6, torch.float64, seed=i, per_token_adv=i % 3 == 1, mask=MASKS[i % 5])
    policy_check(backend, d, _options(case, 4), dtype=torch.float32)


FLOAT64 = GRID[::3]


@pytest.mark.parametrize("case", FLOAT64, ids=[_case_id(c) for c in FLOAT64])
def test_policy_grid_fp64(backend, case):
    i = GRID.index(case)
    d = make_inputs(4, 6, torch.float64, seed=i, per_token_adv=i % 3 == 1, mask=MASKS[i % 5])
    policy_check(backend, d, _options(case, 4), dtype=torch.float64)


@pytest.mark.parametrize("case", PACKED, ids=[_case_id(c) for c in PACKED])
def test_policy_packed(backend, case):
    """verl's remove-padding layout: [1, N] operands with cu_seqlens."""
    i = PACKED.index(case)
    d, cu = pack(make_inputs(4, 5, torch.float64, seed=200 + i, per_token_adv=i % 2 == 1))
    got = policy_check(backend, d, _options(case, 4), dtype=torch.float32, cu=cu)
    assert got[2].shape == d["logp"].shape


LONG = [
    dict(ratio="token", **KL_ALL, **ENT),
    dict(ratio="sequence", aggregation="seq-mean-token-mean", **KL_ALL),
    dict(ratio="cumulative", rollout_correction="token_truncate", rollout_cap=1.2, **ENT),
    dict(ratio="hybrid", hybrid_mixing="entropy", aggregation="balanced", **ENT),
    dict(surrogate="geo_mean", rollout_correction="sequence_mask", rollout_cap=3.0, rollout_cap_low=0.2),
]


@pytest.mark.parametrize("case", LONG, ids=[_case_id(c) for c in LONG])
def test_policy_long_rows(backend, case):
    """Rows of 1,100 tokens over several thread blocks / tiles, padded and packed, with a fully
    masked row and 37 rows (more rows than one block)."""
    i = LONG.index(case)
    d = make_inputs(5, 1100, torch.float64, seed=300 + i, per_token_adv=i % 2 == 0, mask="float", scale=0.05)
    policy_check(backend, d, case, dtype=torch.float32)
    p, cu = pack(d)
    policy_check(backend, p, case, dtype=torch.float32, cu=cu)
    d = make_inputs(37, 300, torch.float64, seed=310 + i, scale=0.1)
    policy_check(backend, d, case, dtype=torch.float32)


BF16 = [
    dict(ratio="token", beta=0.04, kl="k3"),
    dict(ratio="sequence", clip_low=3e-4, clip_high=4e-4, aggregation="seq-mean-token-mean"),
    dict(ratio="cumulative", **KL_ALL, **ENT),
    dict(surrogate="cispo", clip_high=5.0, rollout_correction="token_truncate", rollout_cap=2.0),
]


@pytest.mark.parametrize("case", BF16, ids=[_case_id(c) for c in BF16])
def test_policy_bf16(backend, case):
    i = BF16.index(case)
    d = make_inputs(4, 40, torch.float64, seed=400 + i, mask=("bool", "float")[i % 2])
    policy_check(backend, d, case, dtype=torch.bfloat16)


def test_policy_strided_and_no_old_logp(backend):
    d = make_inputs(3, 12, torch.float64, seed=13, per_token_adv=True)
    x = to(d, CUDA, torch.float32)
    s = {k: (v[:, ::2] if v is not None and v.dim() == 2 else v) for k, v in x.items()}
    assert not s["logp"].is_contiguous()
    got = policy_run(backend, s, ratio="cumulative", **KL_ALL, **ENT)
    gold = policy_run("torch", gold_copy(s), ratio="cumulative", **KL_ALL, **ENT)
    on_cuda(*got, what="strided")
    for a, g in zip((got[0], got[2], got[3]), (gold[0], gold[2], gold[3])):
        close(a, g, dtype=torch.float32, name="strided")
    d = make_inputs(3, 5, torch.float64, seed=9)
    d["old_logp"] = None
    d["ref_logp"] = None
    policy_check(backend, d, dict(ratio="hybrid", hybrid_mixing="entropy", entropy_coef=0.1), dtype=torch.float32,
                 entropy_grad=False)


# ---------------------------------------------------------------------------------------------
# group, phase and segment advantages


def rewards_case(N, K=1, *, seed=0):
    """Rewards with one decimal (exact sums in float64, few ties in float32), raw ids in any
    order, a token mask."""
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(N, K, generator=g, dtype=torch.float64).round(decimals=1)
    ids = torch.randint(-5, 5, (N,), generator=g) * 7
    mask = torch.rand(N, 5, generator=g) > 0.3
    mask[:, 0] = True
    return (R[:, 0] if K == 1 else R), ids, mask


def adv_close(got, gold, what):
    assert got.dtype == torch.float32 and got.device.type == "cuda", (what, got.dtype, got.device)
    scale = max(1.0, float(gold.abs().max())) if gold.numel() else 1.0
    torch.testing.assert_close(got.cpu().double(), gold, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


ESTIMATORS = ["grpo", "rloo", "reinforce++", "reinforce++-baseline", "grpo_passk", "opo", "remax", "gpg"]


@pytest.mark.parametrize("layout", ["ids", "size"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_group_advantages_estimators(backend, estimator, layout):
    for N in (48, 4096):
        R, ids, mask = rewards_case(N, seed=N)
        if layout == "size" or estimator == "grpo_passk":
            group = dict(group_size=8)
        else:
            group = dict(group_ids=ids if N < 1000 else torch.randperm(N, generator=torch.Generator().manual_seed(1)) % 300)
        if N >= 1000:
            R[:16] = 0.5  # zero-variance groups (exact in float32)
        kw = {}
        if estimator in ("opo", "reinforce++", "reinforce++-baseline"):
            kw["mask"] = mask
        if estimator == "remax":
            kw["baseline"] = R.flip(0)
        scales = ["group", "batch", "none"] if estimator in ("grpo", "grpo_passk") else ["group"]
        x = R.float()
        for scale in scales:
            for singleton in ("verl", "zero"):
                opts = dict(estimator=estimator, scale=scale, singleton=singleton)
                got = fusedrl.group_advantages(x.to(CUDA), **to(group, CUDA), **opts, backend=backend,
                                               **to(kw, CUDA, torch.float32))
                gold = fusedrl.group_advantages(x.double(), **group, **opts, backend="torch", **gold_copy(
                    to(kw, CPU, torch.float32)))
                adv_close(got, gold, f"{backend} {opts} N={N} {layout}")
        if estimator == "grpo" and N >= 1000:
            bf = R.bfloat16()
            got = fusedrl.group_advantages(bf.to(CUDA), **to(group, CUDA), backend=backend)
            adv_close(got, fusedrl.group_advantages(bf.double(), **group, backend="torch"), f"{backend} bf16")


COMBINES = ["sum_then_normalize", "normalize_then_sum", "chebyshev", "min", "mean_minus_var"]


@pytest.mark.parametrize("layout", ["ids", "size"])
@pytest.mark.parametrize("combine", COMBINES)
def test_group_advantages_multi_objective(backend, combine, layout):
    R, ids, mask = rewards_case(2048, K=3, seed=7)
    group = dict(group_ids=ids) if layout == "ids" else dict(group_size=16)
    kw = dict(weights=[1.0, 0.5, 2.0], combine=combine)
    if combine == "chebyshev":
        kw["ideal"] = [1.0, 1.0, 1.0]
    for m in (None, mask):
        got = fusedrl.group_advantages(R.float().to(CUDA), **to(group, CUDA), mask=to(m, CUDA), backend=backend,
                                       **kw)
        gold = fusedrl.group_advantages(R, **group, mask=m, backend="torch", **kw)
        adv_close(got, gold, f"{backend} {combine} {layout} mask={m is not None}")


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_phase_and_segment_advantages(backend, estimator):
    R, ids, mask = rewards_case(24, K=3, seed=3)
    g = torch.Generator().manual_seed(4)
    phase_ids = torch.randint(0, 3, mask.shape, generator=g)
    got = fusedrl.phase_advantages(R.float().to(CUDA), phase_ids.to(CUDA), ids.to(CUDA), mask=mask.to(CUDA),
                                   estimator=estimator, backend=backend)
    gold = fusedrl.phase_advantages(R, phase_ids, ids, mask=mask, estimator=estimator, backend="torch")
    adv_close(got, gold, f"{backend} phase_advantages")
    seg_ids = torch.randint(-1, 3, mask.shape, generator=g)
    for group in (dict(group_ids=ids), dict(group_size=6)):
        got = fusedrl.segment_advantages(R[:, 0].float().to(CUDA), R.float().to(CUDA), seg_ids.to(CUDA),
                                         **to(group, CUDA), mask=mask.to(CUDA), lam=0.5, estimator=estimator,
                                         backend=backend)
        gold = fusedrl.segment_advantages(R[:, 0], R, seg_ids, **group, mask=mask, lam=0.5, estimator=estimator,
                                          backend="torch")
        adv_close(got, gold, f"{backend} segment_advantages {group.keys()}")


# ---------------------------------------------------------------------------------------------
# gae, discounted_returns, masked prefix sum


def scan_case(B, T, dtype, kind="holes", seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    r = (torch.randn(B, T, generator=g, dtype=torch.float64) * scale).to(dtype)
    v = (torch.randn(B, T, generator=g, dtype=torch.float64) * scale).to(dtype)
    boot = torch.randn(B, generator=g, dtype=torch.float64).to(dtype)
    if kind == "right":
        mask = torch.arange(T) < torch.randint(0, T + 1, (B,), generator=g)[:, None]
    else:
        mask = torch.rand(B, T, generator=g) < 0.6
    return r, v, mask, boot


def check_gae(backend, r, v, mask, boot, gamma, lam, whiten):
    """gae on CUDA against the reference on float64 copies; inputs exact in float64, so the only
    error is the accumulation's (float32 for float32 and bf16 inputs)."""
    dev = to((r, v, mask, boot), CUDA)
    adv, ret = fusedrl.gae(dev[0], dev[1], dev[2], gamma=gamma, lam=lam, bootstrap=dev[3], whiten=whiten,
                           backend=backend)
    on_cuda(adv, ret, what=f"{backend} gae")
    out = torch.float64 if r.dtype == torch.float64 else torch.float32
    assert adv.dtype == out and ret.dtype == out and adv.shape == r.shape
    gb = None if boot is None else boot.double()
    g_adv, g_ret = fusedrl.gae(r.double(), v.double(), mask, gamma=gamma, lam=lam, bootstrap=gb, whiten=whiten,
                               backend="torch")
    floor = 1.0
    valid = mask != 0
    if whiten:  # whitening multiplies the advantages' rounding by 1 / std
        raw, _ = fusedrl.gae(r.double(), v.double(), mask, gamma=gamma, lam=lam, bootstrap=gb, backend="torch")
        x = raw[valid]
        if x.numel() > 1:
            floor = max(1.0, float(x.abs().max()) / float(torch.sqrt(x.var() + 1e-8)))
    dt = torch.float64 if r.dtype == torch.float64 else torch.float32
    assert_close_to_reference(adv.cpu(), g_adv, dtype=dt, name=f"{backend} advantages", floor=floor)
    assert_close_to_reference(ret.cpu(), g_ret, dtype=dt, name=f"{backend} returns")
    assert torch.all(adv.cpu()[~valid] == 0) and torch.all(ret.cpu()[~valid] == 0)
    return adv, ret


@pytest.mark.parametrize("whiten", [False, True], ids=["raw", "whiten"])
@pytest.mark.parametrize("kind", ["holes", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_gae(backend, dtype, kind, whiten):
    for B, T in ((6, 37), (700, 64), (3, 3000)):
        r, v, mask, boot = scan_case(B, T, dtype, kind, seed=B + T)
        check_gae(backend, r, v, mask, boot, 0.99, 0.95, whiten)
        check_gae(backend, r, v, mask, None, 1.0, 1.0, whiten)


def test_gae_masks_strides_and_nan_padding(backend):
    r, v, mask, boot = scan_case(9, 150, torch.float32, seed=3)
    mask[0] = False
    for mdt in (torch.bool, torch.uint8, torch.int64, torch.float32):
        check_gae(backend, r, v, mask.to(mdt), boot, 0.99, 0.95, True)
    wide = torch.randn(9, 170)
    check_gae(backend, wide[:, 5:155], v, mask[:1].expand(9, 150), boot, 0.9, 0.8, True)  # strided, stride-0 mask
    clean = fusedrl.gae(*to((r, v, mask), CUDA), gamma=0.9, lam=0.9, bootstrap=boot.to(CUDA), whiten=True,
                        backend=backend)
    r2, v2 = r.clone(), v.clone()
    r2[~mask] = float("nan")
    v2[~mask] = float("inf")
    dirty = fusedrl.gae(*to((r2, v2, mask), CUDA), gamma=0.9, lam=0.9, bootstrap=boot.to(CUDA), whiten=True,
                        backend=backend)
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b), "NaN / inf in masked positions changed the result"
    empty = torch.zeros(0, 5, device=CUDA)
    adv, ret = fusedrl.gae(empty, empty, empty.bool(), whiten=True, backend=backend)
    assert adv.shape == (0, 5) and adv.device.type == "cuda"


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_discounted_returns_and_prefix_sum(backend, dtype, gamma):
    from fusedrl.ops import scan  # noqa: PLC0415

    dt = torch.float64 if dtype == torch.float64 else torch.float32
    for B, T in ((5, 29), (600, 50), (2, 2500)):
        r, _, mask, _ = scan_case(B, T, dtype, "right", seed=B * T)
        got = fusedrl.discounted_returns(r.to(CUDA), mask.to(CUDA), gamma=gamma, backend=backend)
        on_cuda(got, what=f"{backend} discounted_returns")
        assert got.dtype == dt
        gold = fusedrl.discounted_returns(r.double(), mask, gamma=gamma, backend="torch")
        assert_close_to_reference(got.cpu(), gold, dtype=dt, name=f"{backend} discounted_returns")
        p = scan.masked_prefix_sum(r.to(CUDA), mask.to(CUDA), backend=backend)
        on_cuda(p, what=f"{backend} masked_prefix_sum")
        gold_p = scan.masked_prefix_sum(r.double(), mask, backend="torch")
        assert_close_to_reference(p.cpu(), gold_p, dtype=dt, name=f"{backend} masked_prefix_sum")


# ---------------------------------------------------------------------------------------------
# value loss


def value_case(B, T, *, seed, mask="bool"):
    """values / old_values / returns [B, T] (float64, CPU), a right-padded mask with a fully
    masked row, NaN in the padding."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    old = v + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ret = v + torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[min(1, B - 1)] = 0
    valid = torch.arange(T)[None, :] < lengths[:, None]
    m = torch.where(valid, torch.rand(B, T, generator=g, dtype=torch.float64) + 0.25, 0.0) if mask == "float" else valid
    d = {k: t.masked_fill(~valid, float("nan")) for k, t in dict(values=v, old_values=old, returns=ret).items()}
    return d | dict(mask=m)


def value_run(d, device, dtype, backend, **opts):
    x = to(d["values"], device, dtype).requires_grad_(True)
    loss, metrics = fusedrl.value_loss(x, to(d["old_values"], device, dtype), to(d["returns"], device, dtype),
                                       to(d["mask"], device), backend=backend, **opts)
    (grad,) = torch.autograd.grad(loss, x)
    return dict(loss=loss, grad=grad, **metrics)


def value_check(backend, d, opts, *, dtype):
    got = value_run(d, CUDA, dtype, backend, **opts)
    on_cuda(got, what=f"{backend} value_loss")
    gold = value_run(d, CPU, torch.float64, "torch", **opts)
    ref = value_run(d, CPU, dtype, "torch", **opts) if dtype == torch.bfloat16 else None
    for name, g in gold.items():
        a = got[name]
        assert torch.isfinite(a).all(), f"{name}: not finite"
        if name == "grad":
            assert a.dtype == dtype
        if dtype == torch.float64:
            err, bound = max_error(a.cpu(), g), 1e-10 * scale_of(g)
            assert err <= bound, f"{backend} {name}: max error {err:.3g} exceeds {bound:.3g} ({opts})"
        else:
            terr = None if ref is None else max_error(ref[name].detach().cpu(), g)
            close(a, g, dtype=dtype, name=f"{backend} {name} {opts}", torch_error=terr)
    return got


VALUE_CASES = [dict(clip=None), dict(clip=0.2), dict(clip=0.2, clip_ties="verl", aggregation="seq-mean-token-mean",
                                                       exclude_empty_rows=True),
               dict(clip=0.5, aggregation="seq-mean-token-sum-norm", num_sequences=7, max_length=1200),
               dict(clip=0.0, aggregation="token-sum")]


@pytest.mark.parametrize("case", VALUE_CASES, ids=[_case_id(c) for c in VALUE_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_value_loss(backend, case, dtype):
    """Short and long rows (several blocks), 37 rows, float and bool masks, the packed layout."""
    for i, (B, T, mask) in enumerate(((4, 7, "bool"), (5, 1100, "float"), (37, 300, "bool"))):
        d = value_case(B, T, seed=500 + i, mask=mask)
        value_check(backend, d, case, dtype=dtype)
    d = value_case(4, 9, seed=510)
    valid = d["mask"] != 0
    lengths = valid.sum(-1)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(CUDA)
    p = {k: t[valid][None] for k, t in d.items()}
    opts = dict(case, max_length=case.get("max_length", 9))
    got = value_run(p, CUDA, torch.float32, backend, cu_seqlens=cu, **opts)
    gold = value_run(d, CPU, torch.float64, "torch", **opts)
    for name in ("loss", "values_mean"):
        assert_close_to_reference(got[name].detach().cpu(), gold[name], dtype=torch.float32, name=name)
    assert_close_to_reference(got["grad"][0].cpu(), gold["grad"][valid], dtype=torch.float32, name="packed grad")
