"""Compiled generation with a preallocated KV cache: the whole decode loop runs on device.

One ``jax.jit`` compile per (model, shapes, sampling settings); the prompt is prefilled
once, then a ``lax.while_loop`` samples one token per step for every row until all rows
have emitted EOS or ``max_new_tokens`` is reached. Prompts may be left- or right-padded:
positions come from the attention mask and the first new token is sampled from each
row's last real prompt token.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.models.transformer import CausalLM, init_cache
from rlhf_jax.ops import last_token_index


@flax.struct.dataclass
class GenerationOutput:
    """tokens [B, R] int32 (pad after EOS); mask [B, R] int32 (1 up to and including EOS);
    logprobs [B, R] float32 (log-prob of each sampled token under softmax(logits / T); 0 where mask
    is 0), or None when ``generate(..., with_logprobs=False)``."""

    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array | None


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Top-k then nucleus (top-p) filtering of logits [B, V]; removed entries become -inf.

    ``top_k=0`` and ``top_p=1.0`` switch the filters off. The most likely token is always kept.
    """
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # [B, V] descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of strictly better tokens
        keep_sorted = mass_before < top_p
        # threshold = the smallest kept logit of each row
        threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def first_argmax(x: jax.Array) -> jax.Array:
    """argmax over the last axis (first index on ties), as max + compare: on CPU this is
    several times faster than XLA's variadic argmax reduction. [B, V] -> [B] int32."""
    top = jnp.max(x, axis=-1, keepdims=True)
    iota = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1).astype(jnp.int32)


def sample_categorical(key: jax.Array, logits: jax.Array, *, block: int = 128) -> jax.Array:
    """One exact draw per row from softmax(logits) [B, V] by inverse-CDF, -> [B] int32.

    Uses one uniform number per row instead of V Gumbel numbers (random bits dominate the
    cost of ``jax.random.categorical`` on CPU), with a two-level search: cumulative block
    sums pick the block, a cumulative sum inside it picks the token. Tokens with zero
    probability (filtered by top-k / top-p, or -inf logits) are never drawn.
    """
    b, v = logits.shape
    nb = -(-v // block)
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # [B, V], unnormalised
    probs = jnp.pad(probs, ((0, 0), (0, nb * block - v))).reshape(b, nb, block)  # [B, nb, blk]
    cum_blocks = jnp.cumsum(jnp.sum(probs, axis=-1), axis=-1)  # [B, nb]
    u = jax.random.uniform(key, (b, 1), dtype=logits.dtype) * cum_blocks[:, -1:]  # [B, 1] in [0, total)
    bi = jnp.minimum(jnp.sum(cum_blocks <= u, axis=-1), nb - 1)  # [B] the block where the CDF crosses u
    inside = jnp.take_along_axis(probs, bi[:, None, None], axis=1)[:, 0]  # [B, blk]
    before = jnp.where(bi > 0, jnp.take_along_axis(cum_blocks, jnp.maximum(bi - 1, 0)[:, None], axis=1)[:, 0], 0.0)
    cdf = before[:, None] + jnp.cumsum(inside, axis=-1)  # [B, blk]
    j = jnp.sum(cdf <= u, axis=-1)
    iota = jnp.arange(block)
    first_pos = jnp.min(jnp.where(inside > 0, iota, block), axis=-1)  # rounding guards: stay on a
    last_pos = jnp.max(jnp.where(inside > 0, iota, -1), axis=-1)  # token of positive probability
    j = jnp.clip(j, first_pos, last_pos)
    return (bi * block + j).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "eos_token_id",
        "pad_token_id",
        "with_logprobs",
    ),
)
def generate(
    model: CausalLM,
    params: dict,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    with_logprobs: bool = True,
) -> GenerationOutput:
    """Sample up to ``max_new_tokens`` tokens after each prompt.

    Args:
      model: a CausalLM with an LM head (static: part of the compile key).
      params: its parameters.
      prompt_ids: [B, P] int token ids, left- or right-padded.
      prompt_mask: [B, P], 1 on real prompt tokens.
      key: a PRNG key; the same key gives the same samples.
      max_new_tokens: R, the number of decode steps at most.
      temperature: 0 = greedy; otherwise logits are divided by it before sampling.
      top_k: keep the k most likely tokens (0 = off).
      top_p: nucleus sampling mass (1.0 = off).
      eos_token_id: a row stops after emitting it; None never stops early.
      pad_token_id: written after a row's EOS.
      with_logprobs: also return each sampled token's log-prob (a log-normaliser over the
        vocabulary per step; the PPO rollout recomputes log-probs in its scoring pass instead).

    Returns:
      GenerationOutput with tokens, mask and (with_logprobs) logprobs, each [B, R].
    """
    b, p = prompt_ids.shape
    r = max_new_tokens
    variables = {"params": params}
    cache = init_cache(model.config, batch_size=b, max_length=p + r)
    last = last_token_index(prompt_mask)  # [B]: the next token follows each row's last real prompt token
    out = model.apply(variables, prompt_ids, attention_mask=prompt_mask, cache=cache, head_index=last)
    first_logits = out.logits[:, 0]  # [B, V]
    scale = 1.0 if temperature == 0 else temperature

    def sample(logits, step_key):  # logits [B, V] float32 -> (token [B], logprob [B])
        logits = logits / scale
        if temperature == 0:
            token = first_argmax(logits)
        else:
            token = sample_categorical(step_key, filter_logits(logits, top_k=top_k, top_p=top_p))
        if not with_logprobs:
            return token, jnp.zeros(token.shape, jnp.float32)
        picked = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
        logprob = picked - jax.nn.logsumexp(logits, axis=-1)  # log softmax(logits / T)[token], unfiltered
        return token, logprob

    def cond(state):
        step, _, _, done, *_ = state
        return (step < r) & ~jnp.all(done)

    def body(state):
        step, cache, logits, done, tokens, mask, logprobs, key = state
        key, step_key = jax.random.split(key)
        token, logprob = sample(logits, step_key)
        live = ~done
        token = jnp.where(live, token, pad_token_id)
        tokens = tokens.at[:, step].set(token)
        mask = mask.at[:, step].set(live.astype(jnp.int32))
        logprobs = logprobs.at[:, step].set(jnp.where(live, logprob, 0.0))
        if eos_token_id is not None:
            done = done | (token == eos_token_id)
        out = model.apply(variables, token[:, None], attention_mask=live[:, None].astype(jnp.int32), cache=cache)
        return step + 1, out.cache, out.logits[:, 0], done, tokens, mask, logprobs, key

    state = (
        jnp.zeros((), jnp.int32),
        out.cache,
        first_logits,
        jnp.zeros((b,), bool),
        jnp.full((b, r), pad_token_id, jnp.int32),
        jnp.zeros((b, r), jnp.int32),
        jnp.zeros((b, r), jnp.float32),
        key,
    )
    _, _, _, _, tokens, mask, logprobs, _ = jax.lax.while_loop(cond, body, state)
    return GenerationOutput(tokens=tokens, mask=mask, logprobs=logprobs if with_logprobs else None)
