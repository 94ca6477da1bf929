"""Sampling from a policy and scoring the samples with a reward model, on the host's schedule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import checkpoint
from rlhf_jax.models import CausalLM
from rlhf_jax.reward import sample_and_score


def make_sample_scorer(
    rm_source: str, policy: CausalLM, tokenizer: Any, prompts: Any, *, max_new_tokens: int, seed: int = 0
) -> Callable[[Any], float]:
    """``score(policy_params) -> mean RM score`` of samples (temperature 1) on fixed prompts:
    InstructGPT's SFT checkpoint selection by reward-model score."""
    rm_model, rm_params, _ = checkpoint.load_model(rm_source, head="scalar")
    ids = jnp.asarray(prompts.arrays["input_ids"])
    mask = jnp.asarray(prompts.arrays["attention_mask"])
    score = jax.jit(bind_sample_and_score(policy, rm_model, max_new_tokens, 1.0, tokenizer))

    def scorer(policy_params: Any) -> float:
        _, scores = score(policy_params, rm_params, ids, mask, jax.random.key(seed))
        return float(jnp.mean(scores))

    return scorer


def bind_sample_and_score(
    policy: CausalLM, rm: CausalLM, max_new_tokens: int, temperature: float, tokenizer: Any
) -> Callable:
    """``(policy_params, rm_params, ids, mask, key) -> (generation, scores)`` with the static settings bound."""

    def fn(policy_params, rm_params, ids, mask, key):
        return sample_and_score(
            policy,
            policy_params,
            rm,
            rm_params,
            ids,
            mask,
            key,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    return fn


def decode_rows(tokenizer: Any, ids: Any, mask: Any, *, skip_special_tokens: bool = True) -> list[str]:
    """The text of each row's real tokens ([B, T] ids and mask)."""
    ids, mask = np.asarray(ids), np.asarray(mask)
    return [tokenizer.decode(r[m > 0], skip_special_tokens=skip_special_tokens) for r, m in zip(ids, mask)]
