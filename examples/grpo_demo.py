"""The main job: train a small language model with GRPO on the CPU, once with TRL's stock
GRPOTrainer and once with fusedrl's (``from fusedrl.integrations.trl import GRPOTrainer``), from
the same seed, and draw the two runs side by side.

    python examples/grpo_demo.py [--out DIR] [--steps N] [--quick]

1. A random-init Qwen2 model (config built in code: 2 layers, hidden 128, vocabulary 32,000)
   and a character tokenizer built with ``tokenizers`` (fusedrl.integrations.toy) learn the
   task "add the two numbers then stop a+b=" -> the digits of a + b by a short supervised warm start (the same for both
   runs, saved to DIR/warm); then
2. each trainer runs GRPO on the verifiable reward of fusedrl.integrations.toy.addition_reward
   in a fresh process of its own (so each peak memory is its own): 8 completions per prompt,
   4 prompts per step, temperature 1, KL to the warm model (beta 0.04), loss_type "grpo", plain
   SGD (Adam divides each gradient by its running scale, which turns float32 rounding in
   near-zero gradients into parameter differences of the order of the learning rate, so two
   Adam runs part after some tens of steps; SGD keeps them together);
3. each run's model is scored before and after on every prompt of the task (16 samples each,
   temperature 1: the held-out reward);
4. this process compares the runs step by step (loss and reward), writes DIR/demo.json,
   DIR/demo.png (reward and loss per step, both runs) and DIR/demo.md, and prints the table.

Peak memory is the process's resident-set high-water mark over training (VmHWM, reset just
before ``train()``). The runs match when every step's rewards are identical (the same completions
were sampled, so the two trajectories never parted) and every step's loss agrees within 1e-3
relative (floor 0.1; float32 rounding differences, compounded by Adam over the steps); exit
status 1 when they do not, or a run failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

SIZES = dict(vocab_size=32000, hidden_size=128, layers=2, heads=4, kv_heads=2, intermediate_size=256)
QUICK_SIZES = dict(vocab_size=4096, hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128)
PREFIX = "add the two numbers then stop "  # an instruction: prompt tokens the stock trainer scores on a CPU
COMPLETION = 8
MAX_OPERAND = 4  # answers 0..8: one digit, then <eos>


def rss_peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_rss_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
def warm_start(out: Path, sizes: dict, steps: int, seed: int) -> None:
    """Supervised next-token training on "a+b=c<eos>" (loss on the answer and <eos> only)."""
    import torch  # noqa: PLC0415

    from fusedrl.integrations import toy  # noqa: PLC0415
    from fusedrl.integrations.transformers import token_logprobs  # noqa: PLC0415

    tok = toy.tokenizer(sizes["vocab_size"])
    model = toy.model(seed=seed, **sizes)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        pairs = [(rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)) for _ in range(64)]
        prompts = tok([f"{PREFIX}{a}+{b}=" for a, b in pairs], add_special_tokens=False)["input_ids"]
        answers = [tok(str(a + b), add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a, b in pairs]
        L = max(len(p) + len(a) for p, a in zip(prompts, answers))
        ids = torch.zeros(64, L, dtype=torch.long)
        am = torch.zeros(64, L, dtype=torch.long)
        labels = torch.full((64, L), -100)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            seq = p + a
            ids[i, L - len(seq):] = torch.tensor(seq)  # left padding, as in generation
            am[i, L - len(seq):] = 1
            labels[i, L - len(a):] = torch.tensor(a)
        logp = token_logprobs(model, ids, am, labels)
        loss = -logp.sum() / (labels[:, 1:] != -100).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            print(f"warm start {step + 1}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.save_pretrained(out)


def evaluate(model, tok, seed: int) -> dict:
    """Mean reward over every prompt of the task (all (a, b) pairs), 16 samples each at
    temperature 1, and the greedy accuracy: the held-out view of what training changed."""
    import torch  # noqa: PLC0415

    from fusedrl.integrations import toy  # noqa: PLC0415

    prompts = [f"{PREFIX}{a}+{b}=" for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    n = enc.input_ids.shape[1]
    torch.manual_seed(seed)
    with torch.no_grad():
        sampled = model.generate(**enc, max_new_tokens=COMPLETION, do_sample=True, temperature=1.0, top_k=0,
                                 num_return_sequences=16, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        greedy = model.generate(**enc, max_new_tokens=COMPLETION, do_sample=False, pad_token_id=tok.pad_token_id,
                                eos_token_id=tok.eos_token_id)
    texts = tok.batch_decode(sampled[:, n:], skip_special_tokens=True)
    rewards = toy.addition_reward([p for p in prompts for _ in range(16)], texts)
    exact = toy.addition_reward(prompts, tok.batch_decode(greedy[:, n:], skip_special_tokens=True))
    return dict(mean_reward=sum(rewards) / len(rewards), greedy_accuracy=sum(r == 1.0 for r in exact) / len(exact))


def child(which: str, model_dir: str, steps: int, seed: int, vocab: int, out: str, lr: float) -> None:
    """One GRPO run; writes its per-step log, time and peak memory to ``out``."""
    import torch  # noqa: PLC0415
    import trl  # noqa: PLC0415
    from datasets import Dataset  # noqa: PLC0415
    from transformers import PrinterCallback, TrainerCallback  # noqa: PLC0415

    from fusedrl.integrations import toy  # noqa: PLC0415

    if which == "fusedrl":
        from fusedrl.integrations.trl import GRPOTrainer  # noqa: PLC0415
    else:
        GRPOTrainer = trl.GRPOTrainer  # noqa: N806

    torch.set_num_threads(int(os.environ.get("DEMO_THREADS", "2")))
    args = trl.GRPOConfig(
        output_dir=str(Path(out).parent / f"trainer-{which}"), per_device_train_batch_size=32, num_generations=8,
        max_completion_length=COMPLETION, max_steps=steps, learning_rate=lr, beta=0.04, loss_type="grpo",
        logging_steps=1, report_to=[], use_cpu=True, bf16=False, seed=seed, save_strategy="no", optim="sgd",
        model_init_kwargs={"dtype": torch.float32}, disable_tqdm=True,
    )
    prompts = toy.addition_prompts(32 * steps, max_operand=MAX_OPERAND, seed=seed, prefix=PREFIX)
    step_times = []

    class Progress(TrainerCallback):
        """A progress bar with the reward and loss of the last step (instead of HF's log dicts)."""

        def on_train_begin(self, *a, **k):
            from tqdm.auto import tqdm  # noqa: PLC0415

            self.bar = tqdm(total=steps, desc=which, unit="step", dynamic_ncols=True)

        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t)
            self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "reward" in logs:
                self.bar.set_postfix(reward=f"{logs['reward']:.3f}", loss=f"{logs.get('loss', float('nan')):.4f}")

        def on_train_end(self, *a, **k):
            self.bar.close()

    trainer = GRPOTrainer(model=model_dir, reward_funcs=toy.addition_reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=toy.tokenizer(vocab),
                          callbacks=[Progress()])
    trainer.remove_callback(PrinterCallback)  # the bar shows the reward; the full logs go to the result file
    before = evaluate(trainer.model, trainer.processing_class, seed)
    reset_rss_peak()
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    peak = rss_peak_mb()
    after = evaluate(trainer.model, trainer.processing_class, seed)
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    Path(out).write_text(json.dumps(dict(
        trainer=which, seconds=seconds, peak_rss_mb=peak, step_seconds=step_times, eval_before=before, eval_after=after,
        loss=[h["loss"] for h in logs], reward=[h["reward"] for h in logs], kl=[h.get("kl") for h in logs],
    )))


# ---------------------------------------------------------------------------------------------
def compare(stock: dict, fused: dict) -> dict:
    n = min(len(stock["loss"]), len(fused["loss"]))
    rel = [abs(a - b) / max(abs(a), 0.1) for a, b in zip(stock["loss"][:n], fused["loss"][:n])]
    same_reward = [a == b for a, b in zip(stock["reward"][:n], fused["reward"][:n])]
    first_diff = next((i for i, s in enumerate(same_reward) if not s), None)
    return dict(steps=n, max_loss_rel_diff=max(rel) if rel else float("nan"), reward_first_difference=first_diff,
                match=bool(rel) and max(rel) <= 1e-3 and first_diff is None and len(stock["loss"]) == len(fused["loss"]))


def plot(stock: dict, fused: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for run, style, label in ((stock, "-", "TRL GRPOTrainer"), (fused, "--", "fusedrl GRPOTrainer")):
        steps = range(1, len(run["loss"]) + 1)
        ax1.plot(steps, run["reward"], style, alpha=0.45, label=f"{label}, per step")
        k = 10
        smooth = [sum(run["reward"][max(0, i - k + 1):i + 1]) / len(run["reward"][max(0, i - k + 1):i + 1])
                  for i in range(len(run["reward"]))]
        ax1.plot(steps, smooth, style, linewidth=2, label=f"{label}, mean of the last {k}")
        ax2.plot(steps, run["loss"], style, label=label)
    b, e = fused["eval_before"]["mean_reward"], fused["eval_after"]["mean_reward"]
    ax1.set(title=f"reward (32 completions per step); held-out {b:.3f} -> {e:.3f}", xlabel="step")
    ax2.set(title="loss per step", xlabel="step")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def window_mean(values, a, b):
    part = values[a:b]
    return sum(part) / len(part) if part else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    p.add_argument("--steps", type=int, default=None, help="GRPO steps per run (default 60; --quick 6)")
    p.add_argument("--warm-steps", type=int, default=None, help="supervised warm-start steps (default 120; --quick 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.3, help="GRPO (SGD) learning rate (default 0.3)")
    p.add_argument("--quick", action="store_true", help="a small model and a few steps (a smoke run)")
    p.add_argument("--child", choices=("stock", "fusedrl"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    sizes = QUICK_SIZES if a.quick else SIZES
    steps = a.steps if a.steps is not None else (6 if a.quick else 60)
    if a.child:
        child(a.child, a.model, steps, a.seed, a.vocab, a.result, a.lr)
        return 0
    if steps < 1:
        p.error("--steps must be >= 1")
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    warm = out / "warm"
    warm_start(warm, sizes, a.warm_steps or (40 if a.quick else 120), a.seed)
    runs = {}
    for which in ("stock", "fusedrl"):
        print(f"\n== GRPO with the {'TRL' if which == 'stock' else 'fusedrl'} GRPOTrainer, {steps} steps ==", flush=True)
        result = out / f"{which}.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", which, "--model", str(warm), "--steps", str(steps),
               "--seed", str(a.seed), "--lr", str(a.lr), "--vocab", str(sizes["vocab_size"]), "--result", str(result)]
        if subprocess.run(cmd).returncode != 0 or not result.exists():
            print(f"demo: the {which} run failed", file=sys.stderr)
            return 1
        runs[which] = json.loads(result.read_text())
    stock, fused = runs["stock"], runs["fusedrl"]
    cmp = compare(stock, fused)
    plot(stock, fused, out / "demo.png")
    q = max(1, steps // 4)
    rows = [
        ("training time (s)", stock["seconds"], fused["seconds"]),
        ("median step (s)", sorted(stock["step_seconds"])[len(stock["step_seconds"]) // 2],
         sorted(fused["step_seconds"])[len(fused["step_seconds"]) // 2]),
        ("peak RSS during training (MB)", stock["peak_rss_mb"], fused["peak_rss_mb"]),
        (f"reward, first {q} steps", window_mean(stock["reward"], 0, q), window_mean(fused["reward"], 0, q)),
        (f"reward, last {q} steps", window_mean(stock["reward"], -q, None), window_mean(fused["reward"], -q, None)),
        ("held-out reward before training", stock["eval_before"]["mean_reward"], fused["eval_before"]["mean_reward"]),
        ("held-out reward after training", stock["eval_after"]["mean_reward"], fused["eval_after"]["mean_reward"]),
    ]
    lines = ["| | TRL GRPOTrainer | fusedrl GRPOTrainer | fusedrl / TRL |", "|---|---|---|---|"]
    for name, s, f in rows:
        lines.append(f"| {name} | {s:.3f} | {f:.3f} | {f / s if s else math.nan:.3f} |")
    verdict = (f"curves match: {cmp['match']} (max loss difference {cmp['max_loss_rel_diff']:.2e} relative over "
               f"{cmp['steps']} steps; rewards {'identical at every step' if cmp['reward_first_difference'] is None else 'first differ at step ' + str(cmp['reward_first_difference'] + 1)})")
    text = "\n".join(lines) + "\n\n" + verdict + "\n"
    (out / "demo.md").write_text(text)
    import torch  # noqa: PLC0415

    (out / "demo.json").write_text(json.dumps(dict(
        sizes=sizes, steps=steps, seed=a.seed, torch=torch.__version__, threads=os.environ.get("DEMO_THREADS", "2"),
        compare=cmp, stock=stock, fusedrl=fused, total_seconds=time.perf_counter() - t0), indent=1))
    print("\n" + text + f"plot: {out / 'demo.png'}; total {time.perf_counter() - t0:.0f} s")
    return 0 if cmp["match"] else 1


if __name__ == "__main__":
    sys.exit(main())
