"""fusedrl.integrations.trl.DPOTrainer against trl.DPOTrainer: the same toy model (saved to a
folder, so TRL builds the reference model itself, or a reference passed in), seed and preference
data (completions of different lengths); a few optimizer steps with gradient accumulation 1 and 2,
several loss types, loss-type lists with loss_weights (MPO / RPO), ld_alpha, use_weighting,
f-divergences, a reference model and precomputed reference log-probs; per-step losses within 1e-5
relative, TRL's metrics and the final parameters within 1e-5. Also: every unsupported DPOConfig
option raises a ValueError naming it, the log-probs come from fusedrl (precompute included), and
the fused heads are removable."""

from __future__ import annotations

import math
import random

import pytest
import torch

trl = pytest.importorskip("trl")

from fusedrl.integrations import toy  # noqa: E402
from fusedrl.integrations._trl_dpo import UNSUPPORTED  # noqa: E402
from fusedrl.integrations.trl import DPOTrainer  # noqa: E402

SIZES = dict(hidden_size=32, layers=2)


def preference_data(n, seed=0):
    """Addition prompts; chosen: the answer; rejected: 1-4 random digits/letters (lengths differ, so
    padding, IPO's length normalization and LD-DPO's tail are exercised)."""
    from datasets import Dataset  # noqa: PLC0415

    rng = random.Random(seed)
    prompts = toy.addition_prompts(n, seed=seed)
    chosen = [str(sum(map(int, p[:-1].split("+")))) for p in prompts]
    rejected = ["".join(rng.choice("0123456789abc") for _ in range(rng.randint(1, 4))) for _ in prompts]
    return Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy-model")
    toy.model(seed=0, **SIZES).save_pretrained(path)
    return str(path)


def config(tmp_path, **overrides):
    options = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, save_strategy="no", disable_tqdm=True, bf16=False,
        gradient_checkpointing=False, model_init_kwargs={"dtype": torch.float32}, beta=0.5, max_length=16,
    )
    options.update(overrides)
    return trl.DPOConfig(**options)


def train(cls, model_dir, args, *, ref_seed=None, lora=False, evaluate=False):
    ref_model = None if ref_seed is None else toy.model(seed=ref_seed, **SIZES)
    peft_config = None
    if lora:  # no reference model: TRL disables the adapter for the reference log-probs
        peft = pytest.importorskip("peft")
        peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = cls(model=model_dir, ref_model=ref_model, args=args, train_dataset=preference_data(24),
                  eval_dataset=preference_data(8, seed=5) if evaluate else None, processing_class=toy.tokenizer(),
                  peft_config=peft_config)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    if evaluate:
        logs.append(trainer.evaluate())
    params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    return trainer, logs, params


CASES = [
    dict(loss_type="sigmoid", evaluate=True),
    dict(loss_type="ipo", gradient_accumulation_steps=2, ref_seed=1, sync_ref_model=True, ref_model_sync_steps=1,
         ref_model_mixup_alpha=0.5),
    dict(loss_type=["hinge", "discopop"], lora=True),
    # MPO; with "sft", RPO as TRL 1.16 spells it (DPOConfig 1.16 has no rpo_alpha: loss_type=[..., "sft"])
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 0.5], ld_alpha=0.5, ref_seed=1,
         gradient_accumulation_steps=2),
    dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.1], use_weighting=True, precompute_ref_log_probs=True,
         ref_seed=1),
    dict(loss_type="sigmoid_norm", f_divergence_type="js_divergence", ld_alpha=0.0, precompute_ref_log_probs=True),
    dict(loss_type=["robust", "apo_zero", "aot"], label_smoothing=0.1, ref_seed=2, gradient_accumulation_steps=2),
]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "num_tokens")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_stock_trainer(model_dir, tmp_path, case):
    case = dict(case)
    options = {k: case.pop(k) for k in ("ref_seed", "lora", "evaluate") if k in case}
    _, stock_logs, stock_params = train(trl.DPOTrainer, model_dir, config(tmp_path, **case), **options)
    fused, logs, params = train(DPOTrainer, model_dir, config(tmp_path, **case), **options)
    assert all(h.installed for h in fused._fused_heads)
    assert len(logs) == len(stock_logs) == 3 + options.get("evaluate", False)
    for step, (a, b) in enumerate(zip(stock_logs, logs)):
        prefix = "eval_" if step == 3 else ""
        assert math.isfinite(b[prefix + "loss"])
        assert abs(a[prefix + "loss"] - b[prefix + "loss"]) <= 1e-5 * abs(a[prefix + "loss"]), (step, a, b)
        for key in METRICS:
            if prefix and key == "num_tokens":
                continue
            key = prefix + key
            assert key in a and key in b, key
            if key.endswith("rewards/accuracies") and max(abs(a[prefix + "rewards/chosen"]),
                                                          abs(a[prefix + "rewards/rejected"])) < 1e-6:
                continue  # policy == reference: the rewards are float32 rounding noise, their order is arbitrary
            assert abs(a[key] - b[key]) <= 1e-4 * max(abs(a[key]), 1.0), (step, key, a[key], b[key])
    assert all(b["grad_norm"] > 0 for b in logs[:3])
    assert any(b["rewards/margins"] != 0 for b in logs[:3])  # the policy moved away from the reference
    assert (params - stock_params).abs().max().item() <= 1e-5
    if not options.get("lora"):
        initial = torch.cat([p.flatten() for p in toy.model(seed=0, **SIZES).parameters()])
        assert (params - initial).abs().max().item() > 1e-3  # three Adam steps of lr 1e-3 moved the parameters


def test_log_probs_come_from_fusedrl(model_dir, tmp_path, monkeypatch):
    """The policy's and the (precomputed) reference's log-probs come from fusedrl.linear_logprobs,
    never from TRL's chunked head or full logits; only completion tokens are scored."""
    import fusedrl  # noqa: PLC0415
    from trl.trainer import utils as trl_utils  # noqa: PLC0415

    calls = []
    real = fusedrl.linear_logprobs
    monkeypatch.setattr(fusedrl, "linear_logprobs", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "forward",
                        staticmethod(lambda *a, **k: pytest.fail("TRL's chunked head ran")))
    args = config(tmp_path, max_steps=1, precompute_ref_log_probs=True, use_weighting=True)
    trainer = DPOTrainer(model=model_dir, args=args, train_dataset=preference_data(8), processing_class=toy.tokenizer())
    precomputed = len(calls)
    assert precomputed == 2  # 8 pairs, batches of 4
    trainer.train()
    assert len(calls) == precomputed + 1
    assert max(shape[0] for shape in calls) <= 2 * 4 * 5  # completions: at most 4 characters and <eos>


def test_no_token_metrics(model_dir, tmp_path):
    _, logs, _ = train(DPOTrainer, model_dir, config(tmp_path, max_steps=1))
    trainer = DPOTrainer(model=model_dir, args=config(tmp_path, max_steps=1), train_dataset=preference_data(8),
                         processing_class=toy.tokenizer(), fusedrl_token_metrics=False)
    trainer.train()
    quiet = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    assert "mean_token_accuracy" in logs[0] and "mean_token_accuracy" not in quiet[0]
    assert quiet[0]["loss"] == pytest.approx(logs[0]["loss"], rel=1e-6)


UNSUPPORTED_CASES = {
    "use_liger_kernel=True": dict(use_liger_kernel=True),
    "activation_offloading=True": dict(activation_offloading=True),
    "label_smoothing >= 0.5 with loss_type 'robust'": dict(loss_type="robust", label_smoothing=0.5),
}


@pytest.mark.parametrize("option", list(UNSUPPORTED_CASES))
def test_unsupported_options_raise_naming_them(model_dir, tmp_path, option):
    with pytest.raises(ValueError, match=f"DPOConfig {option}".replace("(", r"\(").replace(")", r"\)")):
        DPOTrainer(model=model_dir, args=config(tmp_path, **UNSUPPORTED_CASES[option]),
                   train_dataset=preference_data(4), processing_class=toy.tokenizer())


def test_unknown_loss_type_raises(model_dir, tmp_path):
    with pytest.raises(ValueError, match="DPOConfig loss_type"):
        DPOTrainer(model=model_dir, args=config(tmp_path, loss_type=["sigmoid", "simpo"]),
                   train_dataset=preference_data(4), processing_class=toy.tokenizer())


def test_moe_aux_loss_raises(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM  # noqa: PLC0415

    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(vocab_size=42, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                                     num_experts_per_tok=1, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                                     )).save_pretrained(tmp_path / "moe")
    with pytest.raises(ValueError, match=r"DPOConfig router_aux_loss_coef \(MoE models\)"):
        DPOTrainer(model=str(tmp_path / "moe"), args=config(tmp_path), train_dataset=preference_data(4),
                   processing_class=toy.tokenizer())


def test_every_unsupported_option_has_a_test():
    assert set(UNSUPPORTED) - set(UNSUPPORTED_CASES) == {"router_aux_loss_coef (MoE models)", "vision-language models"}


def test_remove_fused_heads_restores_trl_forward(model_dir, tmp_path):
    trainer = DPOTrainer(model=model_dir, args=config(tmp_path), train_dataset=preference_data(4),
                         processing_class=toy.tokenizer())
    trl_forward = [h._previous for h in trainer._fused_heads]
    assert all(h.installed for h in trainer._fused_heads) and len(trainer._fused_heads) == 2
    trainer.remove_fused_heads()
    assert trainer.model.__dict__["forward"] is trl_forward[0]
    assert trainer.ref_model.__dict__["forward"] is trl_forward[1]
