"""The C++ CPU fused policy objective's own paths (csrc/cpu/policy.cpp) against the plain-PyTorch
reference: bfloat16 within twice the reference's own bfloat16 error, rows across 256-token tiles
and all-padding tiles, the local path (token and sequence levels) on long, packed and strided
rows, the padding scan at every block boundary, padding kept exact under an overflowing ratio,
determinism under thread counts, the ops (opcheck, torch.compile), every ISA variant, and bad
packed input. What every backend must do is in tests/test_policy_backends.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import fusedrl
from fusedrl import _ext
from fusedrl.ops import policy as op
from fusedrl.policy import PolicyParams
from policy_cases import ENT, GRID, KL_ALL, _case_id, _options, assert_same, error, gold, make_inputs, pack, run

pytestmark = pytest.mark.skipif(_ext.load() is None, reason="the C++ extension is not built")


def compare(d, *, rtol=1e-10, atol=1e-10, **opts):
    got = run("cpu", d, **opts)
    assert_same(got, run("torch", d, **opts), rtol, atol, f"cpu vs torch {opts}")
    return got


# ---------------------------------------------------------------------------------------------
# bfloat16, tiles and the local path


@pytest.mark.parametrize("case", GRID[::3], ids=[_case_id(c) for c in GRID[::3]])
def test_grid_bfloat16_within_twice_torch(case):
    """bfloat16 operands: the kernel's error against the float64 gold is at most twice the
    reference's own error in bfloat16 (plus a bfloat16 ulp of slack for outputs the reference
    gets exactly)."""
    i = GRID.index(case)
    d = make_inputs(4, 9, torch.bfloat16, seed=90 + i, per_token_adv=i % 2 == 1, mask=("bool", "float")[i % 2])
    opts = _options(case, 4)
    want = run("torch", gold(d), **opts)
    got = run("cpu", d, **opts)
    torch_err = error(run("torch", d, **opts), want)
    assert got[2].dtype == torch.bfloat16
    assert error(got, want) <= 2 * torch_err + 2**-8, (error(got, want), torch_err)


def test_long_rows_cross_tiles():
    """Rows of 1000 tokens (several 256-token tiles: carried prefix / suffix sums, row terms), with
    and without an all-padding tile inside row 0 (skipped by both passes)."""
    for case in (dict(ratio="cumulative", **KL_ALL, **ENT), dict(ratio="hybrid", hybrid_mixing="entropy"),
                 dict(ratio="sequence", rollout_correction="sequence_truncate", rollout_cap=1.5)):
        d = make_inputs(3, 1000, torch.float64, seed=17, per_token_adv=True, mask="float", scale=0.05)
        compare(d, **case)
        d["mask"][0, 256:512] = 0
        assert torch.equal(compare(d, **case)[2][0, 256:512], torch.zeros(256, dtype=torch.float64))


LOCAL_PATH = [  # token ratio level, clip / CISPO: csrc/cpu/policy.cpp local_rows (one instance each)
    dict(surrogate=sur, kl=kl, rollout_correction=rc, rollout_cap=1.5, rollout_cap_low=0.7, **extra, **KL_ALL, **ENT)
    for sur, extra in (("clip", {}), ("clip", dict(clip_ratio_c=2.0)), ("clip", dict(delta=1.1)),
                       ("cispo", dict(clip_high=0.3)), ("cispo", dict(cispo_bounds="upper")))
    for kl in ("k1", "abs", "k2", "k3", "low_var_kl")
    for rc in (None, "token_truncate", "token_mask", "icepop")
][::3]

GSPO = dict(clip_low=3e-4, clip_high=4e-4)
LOCAL_SEQUENCE = [  # the sequence level with the clip surrogates: local_rows<..., SEQ> (k1: the tile path)
    dict(ratio="sequence", kl=kl, rollout_correction=rc, rollout_cap=1.5, rollout_cap_low=0.7, **extra, **KL_ALL,
         **ENT)
    for extra in ({}, GSPO, dict(GSPO, clip_ratio_c=2.0), dict(delta=1.05))
    for kl in ("k3", "low_var_kl", "k1")
    for rc in (None, "token_truncate", "token_mask", "icepop")
][::2]


@pytest.mark.parametrize("case", LOCAL_PATH, ids=[_case_id(c) for c in LOCAL_PATH])
def test_local_path_long_rows_with_a_padded_tile(case):
    """float32 rows of 700 tokens whose second 256-token tile is all padding (skipped: zero
    gradients) between valid tiles, through the token-level path: within 1e-5 of the float64 gold."""
    d = make_inputs(3, 700, torch.float32, seed=23, per_token_adv=True, mask="float", scale=0.3)
    d["mask"][:, 256:512] = 0
    got = run("cpu", d, **case)
    want = run("torch", gold(d), **case)
    assert error(got, want) < 1e-5, error(got, want)
    assert torch.equal(got[2][:, 256:512], torch.zeros(3, 256))


PACKED_AND_STRIDED = LOCAL_PATH[::4] + LOCAL_SEQUENCE[::5]


@pytest.mark.parametrize("case", PACKED_AND_STRIDED, ids=[_case_id(c) for c in PACKED_AND_STRIDED])
def test_local_path_packed_and_strided(case):
    """The local path (token and sequence levels) on the packed layout (int32 offsets) and on
    strided [B, T] views, float32, against the float64 gold to 1e-5."""
    d, cu = pack(make_inputs(4, 300, torch.float32, seed=29, per_token_adv=True, mask="float"))
    got = run("cpu", d, cu_seqlens=cu.to(torch.int32), **case)
    want = run("torch", gold(d), cu_seqlens=cu, **case)
    assert error(got, want) < 1e-5, error(got, want)
    d = make_inputs(3, 600, torch.float32, seed=31, mask="int32")
    s = {k: (v[:, ::2] if v is not None and v.dim() == 2 else v) for k, v in d.items()}
    assert not s["logp"].is_contiguous()
    got, want = run("cpu", s, **case), run("torch", gold(s), **case)
    assert error(got, want) < 1e-5, error(got, want)


@pytest.mark.parametrize("case", LOCAL_SEQUENCE, ids=[_case_id(c) for c in LOCAL_SEQUENCE])
def test_sequence_level_long_rows_with_a_padded_tile(case):
    """GSPO's level in float32: rows of 700 tokens, a padded middle tile, per-token advantages
    and a float mask (the row's share of d s / d x over the scratch row), against the float64
    gold to 1e-5; unclipped (clip 0.2) and clipped (GSPO's 3e-4 / 4e-4) rows."""
    d = make_inputs(6, 700, torch.float32, seed=37, per_token_adv=True, mask="float", scale=0.3)
    d["mask"][:, 256:512] = 0
    d["old_logp"][::2] += 0.01  # half the rows' s outside GSPO's trust region
    for agg in ("token-mean", "seq-mean-token-mean"):
        got = run("cpu", d, aggregation=agg, **case)
        want = run("torch", gold(d), aggregation=agg, **case)
        assert error(got, want) < 1e-5, (agg, error(got, want))
        assert torch.equal(got[2][:, 256:512], torch.zeros(6, 256))


SCAN_LENGTHS = (0, 1, 31, 32, 33, 63, 64, 65, 224, 225, 255, 256, 257, 287, 288, 289, 299, 300)


@pytest.mark.parametrize("mask", ["bool", "float"])
@pytest.mark.parametrize("case", [LOCAL_PATH[9], LOCAL_SEQUENCE[1], dict(ratio="cumulative", **KL_ALL)],
                         ids=["local", "local-sequence", "tile"])
def test_right_padding_at_every_scan_block_boundary(case, mask):
    """The padding scan from a tile's end (blocks of 32 tokens, then one by one): one row per
    valid length around the block and tile boundaries (rows of 300 tokens: tiles of 256 + 44),
    NaN in the padding, a float mask's padding written as -0.0; float32 against the float64 gold,
    exact zero gradients on the padding."""
    B, T = len(SCAN_LENGTHS), 300
    d = make_inputs(B, T, torch.float32, seed=41, per_token_adv=True, mask=mask, empty_row=False)
    lengths = torch.tensor(SCAN_LENGTHS)
    tail = torch.arange(T)[None, :] >= lengths[:, None]
    d["mask"] = d["mask"].masked_fill(tail, -0.0 if mask == "float" else False)
    for k in ("logp", "old_logp", "advantages", "ref_logp", "rollout_logp", "entropy"):
        d[k] = d[k].masked_fill(tail, float("nan"))
    got = run("cpu", d, **case)
    want = run("torch", gold(d), **case)
    assert error(got, want) < 1e-5, error(got, want)
    assert torch.equal(got[2][tail], torch.zeros(int(tail.sum())))


def test_clamp_off_overflow_keeps_padding_exact():
    """log_ratio_clamp=None with an overflowing sequence ratio: padded tokens still get an exact
    zero gradient (selected, never 0 * inf)."""
    for dtype in (torch.float64, torch.float32):  # the tile path, the local path (float32)
        d = make_inputs(3, 5, dtype, seed=4)
        d["old_logp"] = d["logp"] - 800.0
        gx = run("cpu", d, ratio="sequence", log_ratio_clamp=None)[2]
        padded = d["mask"] == 0
        assert torch.equal(gx[padded], torch.zeros_like(gx[padded]))


# ---------------------------------------------------------------------------------------------
# determinism, ops, compile, ISA variants


def test_bitwise_deterministic_under_thread_counts():
    d = make_inputs(16, 300, torch.float32, seed=8, per_token_adv=True, mask="float")
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            outs.append(run("cpu", d, ratio="cumulative", **KL_ALL, **ENT))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        assert torch.equal(outs[0][0], other[0]) and torch.equal(outs[0][2], other[2])
        assert all(torch.equal(outs[0][1][k], other[1][k]) for k in other[1])




def test_opcheck():
    d = make_inputs(3, 5, torch.float64, seed=1, per_token_adv=True)
    p = PolicyParams(ratio="sequence", beta=0.1, entropy_coef=0.01)
    flags, values = op.option_lists(op.kernel_options(p))
    x = d["logp"].clone().requires_grad_()
    h = d["entropy"].clone().requires_grad_()
    stats_args = (x.detach(), d["old_logp"], d["advantages"], d["mask"], d["rollout_logp"], h.detach(), None, flags,
                  values, False)
    torch.library.opcheck(op.POLICY_STATS.overload("cpu"), stats_args)
    stats = op.POLICY_STATS("cpu", *stats_args)
    coef = torch.rand(3, 3, dtype=torch.float64)
    args = (x, d["old_logp"], d["advantages"], d["mask"], d["ref_logp"], d["rollout_logp"], h, None, stats, coef,
            flags, values, True, True)
    torch.library.opcheck(op.POLICY_OBJECTIVE.overload("cpu"), args, test_utils=("test_schema", "test_faketensor",
                                                                     "test_aot_dispatch_static"))


def test_torch_compile_fullgraph():
    d = make_inputs(3, 6, torch.float32, seed=3)

    def f(x):
        loss, metrics = fusedrl.policy_loss(x, d["old_logp"], d["advantages"], d["mask"], ref_logp=d["ref_logp"],
                                            beta=0.04, num_tokens=10, backend="cpu")
        return loss

    x = d["logp"].clone().requires_grad_()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    y = d["logp"].clone().requires_grad_()
    ref = f(y)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x.grad, y.grad)


ISA_CASES = [  # the tile path (cumulative, hybrid, sapo) and the local path (token and sequence levels)
    dict(ratio="cumulative", beta=0.1, entropy_coef=0.01),
    dict(ratio="hybrid", rollout_correction="token_mask", rollout_cap=1.3, beta=0.1, kl="k3"),
    dict(surrogate="sapo", rollout_correction="token_truncate", rollout_cap=1.2),
    dict(rollout_correction="token_truncate", rollout_cap=1.2, beta=0.1, kl="k3", clip_ratio_c=2.0),
    dict(ratio="sequence", clip_low=3e-4, clip_high=4e-4, beta=0.1, kl="low_var_kl", entropy_coef=0.01),
]
CHILD = r"""
import json, sys, torch, fusedrl
sys.path.insert(0, sys.argv[2])
from policy_cases import make_inputs, run
out = {}
for i, case in enumerate(json.loads(sys.argv[3])):
    d = make_inputs(4, 300, torch.float32, seed=i, mask="float", per_token_adv=i % 2 == 1)
    out[i] = run("cpu", d, **case)
torch.save(out, sys.argv[1])
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_isa_variants_agree(isa, tmp_path):
    path = tmp_path / "out.pt"
    here = os.path.dirname(__file__)
    subprocess.run([sys.executable, "-c", CHILD, str(path), here, json.dumps(ISA_CASES)], check=True,
                   env=dict(os.environ, FUSEDRL_CPU_ISA=isa))
    out = torch.load(path)
    for i, case in enumerate(ISA_CASES):
        want = run("torch", gold(make_inputs(4, 300, torch.float32, seed=i, mask="float", per_token_adv=i % 2 == 1)),
                   **case)
        assert error(out[i], want) < 1e-5, (case, error(out[i], want))


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_packed_input():
    d, cu = pack(make_inputs(3, 5, torch.float64, seed=1))
    args = (d["logp"], d["old_logp"], d["advantages"], d["mask"])
    with pytest.raises(ValueError, match="cu_seqlens"):
        fusedrl.policy_loss(*args, cu_seqlens=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        fusedrl.policy_loss(*args, cu_seqlens=torch.tensor([0, 3, 2, 4]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        fusedrl.policy_loss(*args, cu_seqlens=torch.tensor([0, 2, 10**6]))
    with pytest.raises(TypeError, match="cu_seqlens"):
        fusedrl.policy_loss(*args, cu_seqlens=torch.tensor([0.0, 2.0]))
    with pytest.raises(ValueError, match="advantages"):
        fusedrl.policy_loss(d["logp"], d["old_logp"], torch.zeros(7, dtype=torch.float64), d["mask"], cu_seqlens=cu)
    with pytest.raises(ValueError, match="logp"):
        fusedrl.policy_loss(d["logp"].expand(2, -1), None, d["advantages"], d["mask"].expand(2, -1), cu_seqlens=cu)
    with pytest.raises(ValueError, match="max_length"):
        fusedrl.policy_loss(*args, cu_seqlens=cu, aggregation="seq-mean-token-sum-norm", backend="cpu")
