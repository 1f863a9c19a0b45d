"""fusedrl.integrations.transformers: log-probs of a Hugging Face causal LM from its hidden state,
against the model's own logits in float64 (values and gradients), TRL's fused head (logit
scaling), PEFT models, bad input; and the lazy import of the integrations."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from fusedrl.integrations import toy  # noqa: E402
from fusedrl.integrations.transformers import add_fused_head, logit_scale, token_logprobs  # noqa: E402

V = 42


def batch(B=3, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, L), generator=g)
    am = torch.ones_like(ids)
    am[0, :3] = 0  # left padding
    labels = ids.masked_fill(am == 0, -100)
    labels[:, :4] = -100  # the prompt
    if B > 2:
        labels[2] = -100  # a row with nothing to score
    return ids, am, labels


def gold(model, ids, am, labels, temperature=1.0):
    """The model's own logits, in float64, log_softmax, gathered; 0 where ignored."""
    logits = model(input_ids=ids, attention_mask=am).logits[:, :-1].double() / temperature
    lab = labels[:, 1:]
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(-1, lab.clamp(min=0)[..., None])[..., 0] * (lab != -100)
    ent = -(logp.exp() * logp).sum(-1) * (lab != -100)
    return lp, ent


def grads(model, fn):
    model.zero_grad()
    lp, ent = fn()
    w = torch.linspace(-1, 1, lp.numel()).view(lp.shape)
    ((lp * w).sum() + (ent * w.flip(0)).sum()).backward()
    return lp.detach(), ent.detach(), [None if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_match_the_models_logits(temperature):
    model = toy.model(seed=1, hidden_size=32).double()
    ids, am, labels = batch()
    got = grads(model, lambda: token_logprobs(model, ids, am, labels, temperature=temperature, return_entropy=True))
    ref = grads(model, lambda: gold(model, ids, am, labels, temperature))
    assert got[0].shape == (3, 8)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-10)
    assert (got[0][2] == 0).all() and (got[0][:, :3] == 0).all()
    for a, b in zip(got[2], ref[2]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_float32_within_1e5_of_the_float64_gold():
    model = toy.model(seed=2, hidden_size=32)
    ids, am, labels = batch(B=4, L=17, seed=3)
    lp = token_logprobs(model, ids, am, labels)
    ref, _ = gold(model.double(), ids, am, labels)
    assert (lp.double() - ref).abs().max() <= 1e-5 * max(ref.abs().max().item(), 1.0)


def test_bfloat16_no_worse_than_twice_torch():
    model = toy.model(seed=3, hidden_size=64)
    ids, am, labels = batch(B=4, L=17, seed=4)
    ref, _ = gold(model.double(), ids, am, labels)
    bf = model.to(torch.bfloat16)
    lp = token_logprobs(bf, ids, am, labels)
    logits = bf(input_ids=ids, attention_mask=am).logits[:, :-1]
    lab = labels[:, 1:]
    eager = torch.log_softmax(logits, -1).gather(-1, lab.clamp(min=0)[..., None])[..., 0] * (lab != -100)
    ours, torch_err = (lp.double() - ref).abs().max(), (eager.double() - ref).abs().max()
    assert lp.dtype == torch.float32 and ours <= 2 * torch_err, (ours, torch_err)


def test_one_token_sequences_and_all_ignored():
    model = toy.model(seed=4, hidden_size=32)
    ids = torch.randint(3, V, (2, 2))
    lp = token_logprobs(model, ids)
    ref, _ = gold(model.double(), ids, torch.ones_like(ids), ids)
    assert lp.shape == (2, 1) and (lp.double() - ref).abs().max() < 1e-5
    none = torch.full_like(ids, -100)
    lp = token_logprobs(model, ids, labels=none)
    assert (lp == 0).all()
    lp.sum().backward()  # connected to the graph though nothing is scored
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())


def test_fused_head_forward_and_removal():
    model = toy.model(seed=5, hidden_size=32)
    ids, am, labels = batch()
    plain = model(input_ids=ids, attention_mask=am).logits
    head = add_fused_head(model, temperature=0.7)
    out = model(input_ids=ids, attention_mask=am, labels=labels, fused_lm_head=True)
    lp, ent = token_logprobs(model, ids, am, labels, temperature=0.7, return_entropy=True)
    torch.testing.assert_close(out.log_probs, lp)
    torch.testing.assert_close(out.entropy, ent)
    assert (out.label_mask == (labels[:, 1:] != -100)).all()
    torch.testing.assert_close(out.loss, -lp.sum() / out.label_mask.sum())
    torch.testing.assert_close(model(input_ids=ids, attention_mask=am).logits, plain)  # unchanged without the flag
    head.remove()
    assert "forward" not in model.__dict__ and not head.installed
    with pytest.raises(RuntimeError, match="no longer the model's forward"):
        head.remove()


@pytest.mark.parametrize("attr,value", [("logit_scale", 2.0), ("logits_scaling", 4.0), ("lm_head_multiplier", 0.5)])
def test_logit_scaling_matches_trls_fused_head(attr, value):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    model = toy.model(seed=6, hidden_size=32)
    setattr(model.config, attr, value)
    ids, am, labels = batch()
    trl_utils.add_fused_lm_head(model, temperature=0.9, outputs=("log_probs", "entropy"))
    theirs = model(input_ids=ids, attention_mask=am, labels=labels, fused_lm_head=True)
    add_fused_head(model, temperature=0.9)
    ours = model(input_ids=ids, attention_mask=am, labels=labels, fused_lm_head=True)
    assert logit_scale(model.config) == (1 / value if attr == "logits_scaling" else value)
    torch.testing.assert_close(ours.log_probs, theirs.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.entropy, theirs.entropy, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_statistics_match_the_logits_and_trls_fused_head(chunk_size):
    """mean_logits, is_top1, log_sum_sq_probs: the full float64 logits' values and TRL's head's
    (logit scale and temperature folded in; chunks of 5 tokens split the scored tokens unevenly)."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    model = toy.model(seed=9, hidden_size=32)
    model.config.logit_scale = 1.5
    ids, am, labels = batch(B=4, L=11, seed=5)
    with torch.no_grad():
        top = model(input_ids=ids, attention_mask=am).logits[:, :-1].argmax(-1)
    labels[1, 6:9] = top[1, 5:8]  # three scored labels that are the model's argmax
    names = ("mean_logits", "is_top1", "log_sum_sq_probs")
    trl_utils.add_fused_lm_head(model, temperature=0.8, outputs=("log_probs",) + names)
    theirs = model(input_ids=ids, attention_mask=am, labels=labels, fused_lm_head=True)
    add_fused_head(model, temperature=0.8, statistics=names, chunk_size=chunk_size)
    ours = model(input_ids=ids, attention_mask=am, labels=labels, fused_lm_head=True)
    valid = labels[:, 1:] != -100
    z = model.base_model(input_ids=ids, attention_mask=am).last_hidden_state[:, :-1].double()
    z = z @ model.lm_head.weight.double().t() * 1.5 / 0.8
    lab = labels[:, 1:].clamp(min=0)
    gold_stats = dict(mean_logits=z.mean(-1), is_top1=z.argmax(-1) == lab,
                      log_sum_sq_probs=torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1))
    for name in names:
        got = getattr(ours, name)
        assert got.shape == valid.shape and not got.requires_grad
        assert not got[~valid].any()  # 0 / False where nothing is scored
        if name == "is_top1":
            assert torch.equal(got, gold_stats[name] & valid) and torch.equal(got, theirs.is_top1)
        else:
            torch.testing.assert_close(got.double()[valid], gold_stats[name][valid], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got, getattr(theirs, name), rtol=1e-5, atol=1e-5)
    assert ours.is_top1.dtype == torch.bool and ours.is_top1[1, 5:8].all()
    plain = toy.model(seed=9, hidden_size=32)
    add_fused_head(plain)
    assert plain(input_ids=ids, attention_mask=am, labels=labels, fused_lm_head=True).mean_logits is None
    with pytest.raises(ValueError, match="statistics"):
        add_fused_head(plain, statistics=("mean_logit",))


def test_refusals_name_the_argument():
    model = toy.model(seed=7, hidden_size=32)
    ids, am, labels = batch()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        token_logprobs(model, ids, am)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        add_fused_head(model)
    model.config.final_logit_softcapping = None
    with pytest.raises(ValueError, match="input_ids"):
        token_logprobs(model, ids.float(), am)
    with pytest.raises(ValueError, match="attention_mask"):
        token_logprobs(model, ids, am[:, 1:])
    with pytest.raises(ValueError, match="labels"):
        token_logprobs(model, ids, am, labels[:, 1:])
    with pytest.raises(TypeError, match="PreTrainedModel"):
        token_logprobs(torch.nn.Linear(3, 3), ids)
    model.config.logit_scale = 0.0
    with pytest.raises(ValueError, match="logit scale"):
        token_logprobs(model, ids, am)


def test_peft_adapters_apply_and_a_lora_lm_head_is_refused():
    peft = pytest.importorskip("peft")
    base = toy.model(seed=8, hidden_size=32).double()
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids, am, labels = batch()
    got = grads(lora, lambda: token_logprobs(lora, ids, am, labels, return_entropy=True))
    ref = grads(lora, lambda: gold(lora, ids, am, labels))
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-10)
    assert sum(a is not None for a in got[2]) == 8  # the LoRA A and B of q_proj and v_proj, 2 layers
    for a, b in zip(got[2], ref[2]):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    head = peft.get_peft_model(toy.model(seed=8, hidden_size=32), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="lm_head"):
        token_logprobs(head, ids, am, labels)


def test_import_fusedrl_imports_no_trainer():
    code = ("import sys, fusedrl; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('trl', 'transformers', 'verl', 'peft', 'liger_kernel', 'fusedrl.integrations')); "
            "assert not bad and 'fusedrl.integrations' not in sys.modules, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
