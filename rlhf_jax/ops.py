"""Masked reductions and log-prob helpers shared by the losses and the RL maths.

Every function here is pure, works under ``jax.jit`` and ``jax.vmap``, and computes in
float32 whatever the input dtype (bfloat16 activations included).

Masks are float or bool arrays of the same shape as the data, with 1 (or True) marking
a real token and 0 a pad / prompt / ignored token. A float mask acts as per-token
weights. Masked reductions never produce NaN: an all-zero mask gives 0 and finite
(zero) gradients, and non-finite values at masked positions do not leak into the
result or its gradient.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "gather_logprobs",
    "entropy_from_logits",
    "last_token_index",
]

# Floor of a mask's total weight; keeps ``sum / count`` at 0 (not NaN) for empty masks.
_COUNT_EPS = 1e-8
# Added to the variance before the inverse square root in ``masked_whiten``.
_WHITEN_EPS = 1e-8


def _as_mask(x: chex.Array, mask: chex.Array) -> tuple[jax.Array, jax.Array]:
    """Checks shapes; returns (x as float32, mask as float32 weights)."""
    chex.assert_equal_shape([x, mask])
    return jnp.asarray(x).astype(jnp.float32), jnp.asarray(mask).astype(jnp.float32)


def masked_sum(x: chex.Array, mask: chex.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """Sum of ``x * mask``; masked entries contribute exactly 0 (even if inf/NaN).

    Args:
      x: values, any shape.
      mask: same shape as ``x``; 1 = real entry, 0 = ignored (float weights allowed).
      axis: axis or axes to reduce; None reduces everything.

    Returns:
      float32 array: ``sum_t mask_t * x_t`` over ``axis``.

    >>> print(float(masked_sum(jnp.array([1.0, 2.0, jnp.nan]), jnp.array([1, 1, 0]))))
    3.0
    """
    x, mask = _as_mask(x, mask)
    return jnp.sum(jnp.where(mask != 0, x * mask, 0.0), axis=axis)


def masked_mean(x: chex.Array, mask: chex.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """Mean of ``x`` over the entries where ``mask`` is 1.

    ``sum(mask * x) / max(sum(mask), eps)``: an all-zero mask gives 0 with a finite
    (zero) gradient, never NaN.

    Args:
      x: values, any shape.
      mask: same shape as ``x``; 1 = real entry, 0 = ignored (float weights allowed).
      axis: axis or axes to reduce; None reduces everything.

    Returns:
      float32 array: the masked mean over ``axis``.

    >>> x = jnp.array([[1.0, 2.0, 9.0], [4.0, 0.0, 0.0]])
    >>> m = jnp.array([[1, 1, 0], [0, 0, 0]])
    >>> print(masked_mean(x, m, axis=1))
    [1.5 0. ]
    """
    x, mask = _as_mask(x, mask)
    count = jnp.sum(mask, axis=axis)
    return masked_sum(x, mask, axis=axis) / jnp.maximum(count, _COUNT_EPS)


def masked_var(x: chex.Array, mask: chex.Array, *, unbiased: bool = True) -> jax.Array:
    """Variance of ``x`` over all entries where ``mask`` is 1 (a scalar).

    ``var = mean_m((x - mean_m(x))^2)``, times ``n / (n - 1)`` when ``unbiased`` (Bessel's
    correction, as TRL's ``masked_var``), with ``n = sum(mask)``. Fewer than two real
    entries give 0, not NaN.

    Args:
      x: values, any shape.
      mask: same shape as ``x``; 1 = real entry, 0 = ignored.
      unbiased: apply Bessel's correction.

    Returns:
      float32 scalar.

    >>> x = jnp.array([1.0, 2.0, 3.0, 100.0])
    >>> m = jnp.array([1, 1, 1, 0])
    >>> print(round(float(masked_var(x, m)), 4), round(float(masked_var(x, m, unbiased=False)), 4))
    1.0 0.6667
    """
    x, mask = _as_mask(x, mask)
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    if unbiased:
        n = jnp.sum(mask)
        var = var * jnp.where(n > 1, n / jnp.where(n > 1, n - 1, 1.0), 1.0)
    return var


def masked_whiten(x: chex.Array, mask: chex.Array, *, shift_mean: bool = True) -> jax.Array:
    """Whitens ``x`` to unit variance over the entries where ``mask`` is 1.

    ``(x - mean) / sqrt(var + 1e-8)``, with mean and (population) variance taken over the
    real entries of the whole array. With ``shift_mean=False`` the mean is added back
    (``(x - mean) / std + mean``), as lm-human-preferences and TRL do for rewards;
    ``shift_mean=True`` is the usual advantage whitening. Masked entries of the output
    are 0. An empty or constant selection gives 0 (or the mean), never NaN.

    Args:
      x: values, any shape (e.g. ``[B, T]`` advantages).
      mask: same shape as ``x``; 1 = real entry, 0 = ignored.
      shift_mean: subtract the mean (True) or keep it (False).

    Returns:
      float32 array of ``x``'s shape.

    >>> x = jnp.array([1.0, 3.0, 7.0])
    >>> m = jnp.array([1, 1, 0])
    >>> print(jnp.round(masked_whiten(x, m), 4))
    [-1.  1.  0.]
    >>> print(jnp.round(masked_whiten(x, m, shift_mean=False), 4))
    [1. 3. 0.]
    """
    x, mask = _as_mask(x, mask)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=False)
    whitened = (x - mean) * jax.lax.rsqrt(var + _WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask != 0, whitened, 0.0)


def gather_logprobs(logits: chex.Array, tokens: chex.Array, *, temperature: float = 1.0) -> jax.Array:
    """Log-probability of each token under ``softmax(logits / temperature)``.

    ``log pi(y_t) = logits[y_t] / tau - logsumexp(logits / tau)``. Use the sampling
    temperature so that PPO ratios and KL terms match the rollout distribution. The
    caller aligns logits and tokens (logits at position t predict ``tokens[:, t]``).

    Args:
      logits: ``[B, T, V]`` unnormalised scores, any float dtype.
      tokens: ``[B, T]`` integer token ids in ``[0, V)``.
      temperature: softmax temperature (> 0); may be a traced scalar.

    Returns:
      ``[B, T]`` float32 log-probabilities.

    >>> logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25]]]))
    >>> print(round(float(gather_logprobs(logits, jnp.array([[1]]))[0, 0]), 4))
    -1.3863
    """
    chex.assert_rank([logits, tokens], [3, 2])
    chex.assert_equal_shape_prefix([logits, tokens], 2)
    logits = jnp.asarray(logits).astype(jnp.float32) / temperature
    picked = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def entropy_from_logits(logits: chex.Array) -> jax.Array:
    """Entropy of the categorical distribution ``softmax(logits)`` at each position.

    ``H_t = -sum_v p_v log p_v``; vocabulary entries with logit ``-inf`` (banned tokens)
    contribute 0.

    Args:
      logits: ``[B, T, V]`` unnormalised scores, any float dtype.

    Returns:
      ``[B, T]`` float32 entropies in nats.

    >>> print(round(float(entropy_from_logits(jnp.zeros((1, 1, 4)))[0, 0]), 4))  # ln 4
    1.3863
    """
    chex.assert_rank(logits, 3)
    logp = jax.nn.log_softmax(jnp.asarray(logits).astype(jnp.float32), axis=-1)
    p = jnp.exp(logp)
    safe_logp = jnp.where(p > 0, logp, 0.0)
    return -jnp.sum(p * safe_logp, axis=-1)


def last_token_index(mask: chex.Array) -> jax.Array:
    """Index of the last nonzero entry of each row of ``mask`` (0 for an empty row).

    Correct for right padding, left padding and masks with holes: it is the largest
    ``t`` with ``mask[b, t] != 0``. This is where the reward model's score is read and
    where the PPO score is added (the EOS position).

    Args:
      mask: ``[B, T]`` float or bool, 1 = real token.

    Returns:
      ``[B]`` int32 indices.

    >>> m = jnp.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]])
    >>> print(last_token_index(m))
    [1 3 2 0]
    """
    chex.assert_rank(mask, 2)
    positions = jnp.arange(mask.shape[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(jnp.asarray(mask) != 0, positions, 0), axis=-1)
