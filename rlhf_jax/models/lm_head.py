"""The LM head chunk by chunk: per-token statistics without holding [B, T, V] logits.

A 49k-token vocabulary (SmolLM2) turns 8 rows of 512 tokens into 0.8 GB of float32 logits,
and the backward pass of a loss keeps them (and their gradient) alive. :func:`token_stats`
applies the unembedding to ``chunk`` positions at a time under ``jax.checkpoint``, reduces
each chunk to what the losses need (the target's log-prob, the log-normaliser, whether the
target is the top token, the entropy), and recomputes the chunk's logits in the backward
pass: peak memory holds [B, chunk, V]. With ``chunk=None`` the whole sequence is one chunk
(the fastest for small vocabularies); :func:`auto_chunk` picks by the logits' size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.config import ModelConfig
from rlhf_jax.models.transformer import lm_logits

Array = jax.Array

CHUNK_BYTES = 64 * 2**20  # logits of one chunk (float32) at most; larger heads are chunked


def auto_chunk(batch: int, length: int, vocab: int, *, max_bytes: int | None = None) -> int | None:
    """Positions per chunk so that [batch, chunk, vocab] float32 fits ``max_bytes`` (default
    :data:`CHUNK_BYTES`, read at call time); None if the whole [batch, length, vocab] fits.

    >>> auto_chunk(8, 64, 512) is None
    True
    >>> auto_chunk(8, 512, 49152)
    32
    """
    max_bytes = CHUNK_BYTES if max_bytes is None else max_bytes
    if batch * length * vocab * 4 <= max_bytes:
        return None
    chunk = 1
    while 2 * chunk * batch * vocab * 4 <= max_bytes and 2 * chunk < length:
        chunk *= 2
    return max(chunk, 1)


def _stats(hidden: Array, unembed: Array, targets: Array, config: ModelConfig, temperature: float) -> dict:
    logits = lm_logits(hidden, unembed, config) / temperature  # [B, C, V] float32
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, C]
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]  # [B, C]
    probs = jnp.exp(logits - lse[..., None])
    return {
        "logprob": picked - lse,
        "logsumexp": lse,
        "is_top": (picked >= jnp.max(logits, axis=-1)).astype(jnp.float32),
        "entropy": lse - jnp.sum(probs * logits, axis=-1),
    }


def token_stats(
    hidden: Array,
    unembed: Array,
    targets: Array,
    config: ModelConfig,
    *,
    temperature: float = 1.0,
    chunk: int | None = None,
) -> dict[str, Array]:
    """Per-position statistics of ``softmax(logits / temperature)`` with logits = the LM head of ``hidden``.

    Args:
      hidden: [B, T, D] final hidden states (``CausalLM(...).apply(..., compute_logits=False)``).
      unembed: [D, V] (``models.transformer.unembedding``).
      targets: [B, T] int token ids; position t is scored on ``targets[:, t]``.
      config: the model's config (compute dtype, final soft-capping).
      temperature: divides the logits (sampling temperature; 1 for the LM loss).
      chunk: positions per chunk, each recomputed in the backward pass; None = all at once.

    Returns:
      ``{"logprob", "logsumexp", "is_top", "entropy"}``, each [B, T] float32:
      ``log softmax[target]``, the log-normaliser, 1.0 where the target has the highest
      logit (ties count), and the distribution's entropy.
    """
    b, t, d = hidden.shape
    if chunk is None or chunk >= t:
        return _stats(hidden, unembed, targets, config, temperature)
    n = -(-t // chunk)
    pad = n * chunk - t
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)  # [n, B, C, D]
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)  # [n, B, C]
    body = jax.checkpoint(lambda xs: _stats(xs[0], unembed, xs[1], config, temperature))
    out = jax.lax.map(body, (h, y))  # each [n, B, C]
    return {k: v.swapaxes(0, 1).reshape(b, n * chunk)[:, :t] for k, v in out.items()}  # [B, T]
