"""Evaluation on the built-in task: sampling many prompts, held-out LM loss, gold win rates."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import data
from rlhf_jax.models import CausalLM
from rlhf_jax.sampling import generate
from rlhf_jax.sft import lm_objective


def sample_responses(
    model: CausalLM,
    params: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    key: jax.Array,
    max_prompt_len: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 64,
) -> list[str]:
    """One response per prompt, decoded with its ``<eos>`` when one was emitted
    (:func:`sample_with_tokens`' ``texts``)."""
    return sample_with_tokens(
        model,
        params,
        tokenizer,
        prompts,
        key=key,
        max_prompt_len=max_prompt_len,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
    )["texts"]


def sample_with_tokens(
    model: CausalLM,
    params: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    key: jax.Array,
    max_prompt_len: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 64,
) -> dict:
    """One response per prompt, with its tokens.

    Prompts are batched at a fixed ``batch_size`` (the last batch is padded with copies),
    so generation compiles once. Prompts longer than ``max_prompt_len`` raise.

    Returns:
      ``texts``: the responses, with ``<eos>`` when one was emitted; ``seq`` / ``mask``
      [N, P + R]: the left-padded prompt followed by the response; ``P``: the prompt width.
    """
    records = [{"prompt": p, "example_id": i, "user_id": None} for i, p in enumerate(prompts)]
    ds = data.tokenize_prompts(records, tokenizer, max_prompt_len=max_prompt_len)
    if len(ds) != len(prompts):
        raise ValueError(f"{len(prompts) - len(ds)} prompts do not fit max_prompt_len={max_prompt_len}")
    ids, mask = ds.arrays["input_ids"], ds.arrays["attention_mask"]
    texts: list[str] = []
    seqs, masks = [], []
    for start in range(0, len(ids), batch_size):
        chunk_ids, chunk_mask = ids[start : start + batch_size], mask[start : start + batch_size]
        n = len(chunk_ids)
        if n < batch_size:  # pad the batch with copies of its first row: one compiled shape
            chunk_ids = np.concatenate([chunk_ids, np.repeat(chunk_ids[:1], batch_size - n, 0)])
            chunk_mask = np.concatenate([chunk_mask, np.repeat(chunk_mask[:1], batch_size - n, 0)])
        gen = generate(
            model,
            params,
            jnp.asarray(chunk_ids),
            jnp.asarray(chunk_mask),
            jax.random.fold_in(key, start),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        tokens, gmask = np.asarray(gen.tokens)[:n], np.asarray(gen.mask)[:n]
        texts += [tokenizer.decode(row[m > 0].tolist(), skip_special_tokens=False) for row, m in zip(tokens, gmask)]
        seqs.append(np.concatenate([chunk_ids[:n], tokens], axis=1))
        masks.append(np.concatenate([chunk_mask[:n].astype(np.int32), gmask.astype(np.int32)], axis=1))
    return {"texts": texts, "seq": np.concatenate(seqs), "mask": np.concatenate(masks), "P": ids.shape[1]}


def strip_eos(response: str, eos_token: str) -> tuple[str, bool]:
    """(the response text before its EOS, whether it had one): the format ranking records use."""
    words = response.split()
    if eos_token in words:
        return " ".join(words[: words.index(eos_token)]), True
    return " ".join(words), False


def heldout_lm_loss(model: CausalLM, params: Any, dataset: Any, *, batch_size: int = 32) -> float:
    """Token-weighted next-token loss of ``model`` on a tokenised text set (the alignment tax)."""

    @jax.jit
    def batch_loss(p, ids, attn, loss_mask):
        loss, m = lm_objective(model, p, {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask})
        return loss * m["num_tokens"], m["num_tokens"]

    a = dataset.arrays
    total = tokens = 0.0
    n = (len(dataset) // batch_size) * batch_size or len(dataset)
    for i in range(0, n, batch_size):
        s, t = batch_loss(
            params,
            a["input_ids"][i : i + batch_size],
            a["attention_mask"][i : i + batch_size],
            a["loss_mask"][i : i + batch_size],
        )
        total, tokens = total + float(s), tokens + float(t)
    return total / max(tokens, 1.0)


def win_rate(gold: Callable[[str, str], float], prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> float:
    """Fraction of prompts on which the gold preference scores ``a`` above ``b`` (ties count half)."""
    wins = 0.0
    for p, x, y in zip(prompts, a, b):
        gx, gy = gold(p, x), gold(p, y)
        wins += 1.0 if gx > gy else 0.5 if gx == gy else 0.0
    return wins / max(len(prompts), 1)
