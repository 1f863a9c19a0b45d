"""A toy world built in code, for the demo and the integration tests: no hub, no files.

- :func:`tokenizer`: a character-level ``PreTrainedTokenizerFast`` (``tokenizers`` WordLevel over
  digits, ``+``, ``=``, lower-case letters and space; ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2;
  optionally padded to a larger vocabulary), left-padded as generation wants.
- :func:`model`: a random-init Qwen2 causal LM of that vocabulary (sizes are arguments).
- :func:`addition_prompts` / :func:`addition_reward`: the verifiable task "a+b=" -> the digits of
  a + b, then ``<eos>``; the reward is 1 for the exact answer, 0.25 for a wrong number of the
  right length.
"""

from __future__ import annotations

import random
import re

import torch

__all__ = ["tokenizer", "model", "config", "addition_prompts", "addition_reward", "CHARS"]

CHARS = "0123456789+= abcdefghijklmnopqrstuvwxyz"


def tokenizer(vocab_size: int | None = None):
    """The character tokenizer; ``vocab_size`` > 42 pads the vocabulary with tokens ``<f42>``,
    ``<f43>``, ... (a model over a realistic vocabulary, whose extra tokens the task never uses)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    for c in CHARS:
        vocab[c] = len(vocab)
    for i in range(len(vocab), vocab_size or 0):
        vocab[f"<f{i}>"] = i
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


def addition_prompts(n: int, *, max_operand: int = 9, seed: int = 0, prefix: str = "") -> list[str]:
    """``n`` prompts ``prefix + "a+b="`` with a, b drawn uniformly from [0, max_operand]
    (``prefix``: an instruction in the tokenizer's characters, e.g. ``"add the numbers "``)."""
    rng = random.Random(seed)
    return [f"{prefix}{rng.randint(0, max_operand)}+{rng.randint(0, max_operand)}=" for _ in range(n)]


def addition_reward(prompts, completions, **_) -> list[float]:
    """TRL reward function: 1.0 for exactly the digits of a + b; 0.25 for another number of the
    right length (the format without the answer); 0 otherwise (empty, other tokens, too long)."""
    out = []
    for prompt, completion in zip(prompts, completions):
        a, b = re.fullmatch(r".*?(\d+)\+(\d+)=", prompt).groups()
        answer = str(int(a) + int(b))
        got = completion.strip()
        if got == answer:
            out.append(1.0)
        elif got.isdigit() and len(got) == len(answer):
            out.append(0.25)
        else:
            out.append(0.0)
    return out
