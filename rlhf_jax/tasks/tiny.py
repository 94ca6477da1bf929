"""A tiny offline world for smoke runs and tests: a word-level tokenizer, a random model,
and small data sets in the documented formats (nothing is downloaded).

The words are ``w0 .. w{n-1}``; the "instruction" is to repeat the prompt's words in
reverse order. Rankings prefer responses that contain more of the word ``w1`` (a simple,
learnable preference); every file is written in the formats of design.md and read back
through the same loaders as user data.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf_jax.config import ModelConfig
from rlhf_jax.models import CausalLM, save_pretrained
from rlhf_jax.models.params import init_params

SPECIALS = ("<pad>", "<eos>", "<bos>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
    "{% elif m['role'] == 'assistant' %}<|assistant|> {{ m['content'] }} <eos> "
    "{% else %}{{ m['content'] }} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer(out_dir: str | Path, *, num_words: int = 64):
    """A word-level transformers tokenizer (pad, eos, bos distinct) with a chat template, saved to ``out_dir``."""
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"w{i}": len(SPECIALS) + i for i in range(num_words)})
    vocab["<unk>"] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out_dir))
    return tok


def make_model_dir(
    out_dir: str | Path,
    *,
    vocab_size: int,
    family: str = "gpt2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    tokenizer=None,
) -> Path:
    """A randomly initialised model saved as a Hugging Face directory (config.json + safetensors)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        max_position_embeddings=256,
    )
    if family == "gpt2":
        cfg = ModelConfig(
            family="gpt2", qkv_bias=True, out_bias=True, mlp_bias=True, tie_word_embeddings=True, **common
        )
    elif family == "llama":
        cfg = ModelConfig(
            family="llama",
            activation="silu",
            num_kv_heads=max(1, num_heads // 2),
            intermediate_size=2 * hidden_size,
            norm_eps=1e-6,
            **common,
        )
    else:
        raise ValueError(f"make_model_dir: family {family!r} (use 'gpt2' or 'llama')")
    model = CausalLM(cfg)
    params = jax.jit(init_params, static_argnums=0)(model, jax.random.key(seed))  # one compile, not one per op
    return save_pretrained(model, params, out_dir, tokenizer=tokenizer)


def _words(rng: np.random.Generator, n: int, num_words: int) -> list[str]:
    return [f"w{int(i)}" for i in rng.integers(2, num_words, n)]


def write_data(
    out_dir: str | Path, *, num_words: int = 64, n: int = 64, k: int = 4, seed: int = 0, num_users: int = 8
) -> dict[str, Path]:
    """Demonstrations, rankings, prompts and pretraining text as JSONL files; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = {name: out / f"{name}.jsonl" for name in ("demonstrations", "rankings", "prompts", "text")}
    demos, ranks, prompts, texts = [], [], [], []
    for i in range(n):
        user = f"u{i % num_users}"
        words = _words(rng, int(rng.integers(2, 5)), num_words)
        prompt = " ".join(words)
        demos.append({"prompt": prompt, "response": " ".join(reversed(words)), "user_id": user})
        scores = [int(c) for c in rng.permutation(k)]  # number of "w1" words: distinct, so no ties
        responses = [" ".join(_words(rng, 3, num_words) + ["w1"] * c) for c in scores]
        rank = [sum(other > s for other in scores) for s in scores]  # 0 = best
        ranks.append({"prompt": prompt, "responses": responses, "ranks": rank, "user_id": user})
        prompts.append({"prompt": prompt, "user_id": user})
        texts.append({"text": " ".join(_words(rng, int(rng.integers(5, 20)), num_words))})
    for name, rows in zip(("demonstrations", "rankings", "prompts", "text"), (demos, ranks, prompts, texts)):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths
