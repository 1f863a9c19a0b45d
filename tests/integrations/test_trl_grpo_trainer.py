"""fusedrl.integrations.trl.GRPOTrainer against trl.GRPOTrainer: the same toy model (saved to a
folder, so TRL builds the reference model itself), seed and data; a few optimizer steps with
generation, num_iterations=2 (old log-probs differ from the current ones), gradient accumulation
1 and 2, every supported loss type; per-step losses within 1e-5 relative and the final parameters
within 1e-5. Also: every unsupported GRPOConfig option raises a ValueError naming it, and the
fused heads are removable."""

from __future__ import annotations

import math

import pytest
import torch

trl = pytest.importorskip("trl")

from fusedrl.integrations import toy  # noqa: E402
from fusedrl.integrations.trl import UNSUPPORTED, GRPOTrainer  # noqa: E402

PROMPTS = toy.addition_prompts(32, seed=1)


def dense_reward(prompts, completions, **_):
    """Varies within every group of a random model's completions (the addition reward is mostly
    0 there, which would make the advantages, and so the policy gradient, zero)."""
    return [sum(c.isdigit() for c in text) / 6 + 0.1 * toy.addition_reward([p], [text])[0]
            for p, text in zip(prompts, completions)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy-model")
    toy.model(seed=0, hidden_size=48, layers=2).save_pretrained(path)
    return str(path)


def config(tmp_path, **overrides):
    options = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        max_steps=3, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, seed=0, save_strategy="no",
        disable_tqdm=True, num_iterations=2, bf16=False, model_init_kwargs={"dtype": torch.float32},
    )
    options.update(overrides)
    return trl.GRPOConfig(**options)


def train(cls, model_dir, args):
    from datasets import Dataset  # noqa: PLC0415

    trainer = cls(model=model_dir, reward_funcs=dense_reward, args=args,
                  train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=toy.tokenizer())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    return trainer, logs, params


CASES = [
    dict(loss_type="grpo", beta=0.04),
    dict(loss_type="dapo", gradient_accumulation_steps=2, entropy_coef=0.01),
    dict(loss_type="bnpo", gradient_accumulation_steps=2, beta=0.04, epsilon_high=0.28),
    dict(loss_type="dr_grpo", delta=1.5),
    dict(loss_type="cispo", epsilon_high=3.0, gradient_accumulation_steps=2),
    dict(loss_type="sapo", beta=0.04, entropy_coef=0.02),
    dict(loss_type="luspo", importance_sampling_level="sequence"),
    dict(loss_type="grpo", importance_sampling_level="sequence", gradient_accumulation_steps=2, beta=0.04,
         use_bias_correction_kl=False, temperature=0.8),
    dict(loss_type="vespo", gradient_accumulation_steps=2, beta=0.04),
    dict(loss_type="dapo", off_policy_mask_threshold=0.0, top_entropy_quantile=0.5, entropy_coef=0.01),
    dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_neg=1.0, off_policy_mask_threshold=-0.01,
         top_entropy_quantile=0.3, gradient_accumulation_steps=2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_stock_trainer(model_dir, tmp_path, case):
    _, stock_logs, stock_params = train(trl.GRPOTrainer, model_dir, config(tmp_path, **case))
    fused, logs, params = train(GRPOTrainer, model_dir, config(tmp_path, **case))
    assert len(logs) == len(stock_logs) == 3
    for step, (a, b) in enumerate(zip(stock_logs, logs)):
        assert math.isfinite(b["loss"])
        # relative, floored at 0.1 (the scale of the per-token terms, |A| ~ 1): on-policy steps have
        # a loss of 0 up to float32 rounding of those terms
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(abs(a["loss"]), 0.1), (step, a["loss"], b["loss"])
        assert a.get("reward") == b.get("reward"), step  # the same completions were generated
        for key in ("kl", "entropy", "clip_ratio/region_mean", "cispo_clip_ratio", "policy_loss", "vespo/phi_seq_mean"):
            assert (key in a) == (key in b), key
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-4 * max(abs(a[key]), 1.0), (step, key, a[key], b[key])
    assert any(abs(b["loss"]) > 1e-3 for b in logs) and all(b["grad_norm"] > 0 for b in logs)
    assert all(a.get("frac_reward_zero_std", 0) < 1 for a in stock_logs)
    assert (params - stock_params).abs().max().item() <= 1e-5
    assert (params - stock_params).abs().max().item() < (params - torch.cat(
        [p.flatten() for p in toy.model(seed=0, hidden_size=48, layers=2).parameters()])).abs().max().item()


def test_loss_reaches_the_fused_head(model_dir, tmp_path, monkeypatch):
    """The policy's and the reference's log-probs come from fusedrl.linear_logprobs, never from
    TRL's chunked head or full logits."""
    import fusedrl  # noqa: PLC0415
    from trl.trainer import utils as trl_utils  # noqa: PLC0415

    calls = []
    real = fusedrl.linear_logprobs
    monkeypatch.setattr(fusedrl, "linear_logprobs", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "forward",
                        staticmethod(lambda *a, **k: pytest.fail("TRL's chunked head ran")))
    _, logs, _ = train(GRPOTrainer, model_dir, config(tmp_path, beta=0.04, max_steps=1))
    assert logs and calls
    assert max(shape[0] for shape in calls) <= 4 * 6 * 2  # only completion tokens are scored


UNSUPPORTED_CASES = {
    "use_adaptive_entropy=True": dict(use_adaptive_entropy=True),
    "use_vllm=True": dict(use_vllm=True),
    "use_liger_kernel=True": dict(use_liger_kernel=True),
}


@pytest.mark.parametrize("option", list(UNSUPPORTED_CASES))
def test_unsupported_options_raise_naming_them(model_dir, tmp_path, option):
    with pytest.raises(ValueError, match=f"GRPOConfig {option}".replace("(", r"\(").replace(")", r"\)")):
        GRPOTrainer(model=model_dir, reward_funcs=toy.addition_reward, args=config(tmp_path, **UNSUPPORTED_CASES[option]),
                    train_dataset=None, processing_class=toy.tokenizer())


def test_every_unsupported_option_has_a_test():
    assert set(UNSUPPORTED) - set(UNSUPPORTED_CASES) == {"router_aux_loss_coef (MoE models)"}


def test_remove_fused_heads_restores_trl_forward(model_dir, tmp_path):
    from datasets import Dataset  # noqa: PLC0415

    trainer = GRPOTrainer(model=model_dir, reward_funcs=toy.addition_reward, args=config(tmp_path, beta=0.04),
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=toy.tokenizer())
    trl_forward = [h._previous for h in trainer._fused_heads]
    assert all(h.installed for h in trainer._fused_heads) and len(trainer._fused_heads) == 2
    trainer.remove_fused_heads()
    assert trainer.model.__dict__["forward"] is trl_forward[0] and trainer.ref_model.__dict__["forward"] is trl_forward[1]
