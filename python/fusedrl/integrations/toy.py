"""A toy world built in code, for the demo and the integration tests: no hub, no files.

- :func:`tokenizer`: a character-level ``PreTrainedTokenizerFast`` (``tokenizers`` WordLevel over
  digits, ``+``, ``=``, lower-case letters and space; ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2),
  left-padded as generation wants.
- :func:`model`: a random-init Qwen2 causal LM of that vocabulary (sizes are arguments).
- :func:`addition_prompts` / :func:`addition_reward`: the verifiable task "a+b=" -> the digits of
  a + b, then ``<eos>``; the reward is 1 for the exact answer, with partial credit (per correct
  leading digit, for stopping right after the answer) so that a random model's reward can rise.
"""

from __future__ import annotations

import random

import torch

__all__ = ["tokenizer", "model", "config", "addition_prompts", "addition_reward", "CHARS"]

CHARS = "0123456789+= abcdefghijklmnopqrstuvwxyz"


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    fast.padding_side = "left"
    return fast


def config(*, vocab_size: int | None = None, hidden_size: int = 64, layers: int = 2, heads: int = 4,
           kv_heads: int = 2, intermediate_size: int | None = None, max_positions: int = 128):
    """A Qwen2 config (untied embeddings); ``vocab_size`` defaults to the toy tokenizer's (42)."""
    from transformers import Qwen2Config  # noqa: PLC0415

    return Qwen2Config(
        vocab_size=vocab_size or len(CHARS) + 3, hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        bos_token_id=2,
    )


def model(seed: int = 0, **sizes):
    """A random-init ``Qwen2ForCausalLM`` (float32) drawn from ``seed``; ``sizes``: :func:`config`'s."""
    from transformers import Qwen2ForCausalLM  # noqa: PLC0415

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config(**sizes))


def addition_prompts(n: int, *, max_operand: int = 9, seed: int = 0) -> list[str]:
    """``n`` prompts ``"a+b="`` with a, b drawn uniformly from [0, max_operand]."""
    rng = random.Random(seed)
    return [f"{rng.randint(0, max_operand)}+{rng.randint(0, max_operand)}=" for _ in range(n)]


def addition_reward(prompts, completions, **_) -> list[float]:
    """TRL reward function: 1.0 for exactly the digits of a + b; otherwise 0.25 per correct
    leading digit plus 0.25 if the completion is no longer than the answer (it stopped)."""
    out = []
    for prompt, completion in zip(prompts, completions):
        a, b = prompt.rstrip("=").split("+")
        answer = str(int(a) + int(b))
        got = completion.strip()
        if got == answer:
            out.append(1.0)
            continue
        leading = 0
        for x, y in zip(got, answer):
            if x != y:
                break
            leading += 1
        out.append(0.25 * leading + (0.25 if len(got) <= len(answer) else 0.0))
    return out
