"""The RL maths of InstructGPT's PPO stage: rewards, advantages, KL control, reward scale.

The environment is a bandit: one prompt, one sampled response, the reward-model score
at the end, episode over. Each response token gets the per-token KL penalty
``-beta * log(pi_RL / pi_SFT)`` and the last real token also gets the score
(Ziegler et al. 2019; Ouyang et al. 2022, eq. 2). Pure functions; they work under
``jax.jit`` and ``jax.vmap``, in float32 whatever the input dtype.

Whitening (lm-human-preferences / TRL conventions) is ``ops.masked_whiten``: rewards
with ``shift_mean=False`` (scale only), advantages with ``shift_mean=True``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rlhf_jax import ops

__all__ = [
    "gae",
    "kl_shaped_rewards",
    "update_kl_coef",
    "reward_bias",
    "reward_gain_bias",
]


def gae(
    rewards: chex.Array,
    values: chex.Array,
    mask: chex.Array,
    *,
    gamma: float,
    lam: float,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over the real tokens of each sequence.

    Schulman et al. 2016 (arXiv 1506.02438), with ``t'`` the next real token after t::

        delta_t = r_t + gamma * V_{t'} - V_t
        A_t     = delta_t + gamma * lam * A_{t'}
        R_t     = A_t + V_t

    The value after the last real token is 0 (the bandit episode ends at EOS). Masked
    positions are skipped entirely: they get advantage and return 0, and their rewards
    and values are ignored, so right padding, a masked prompt prefix (left padding) and
    masks with holes all work; with holes the recursion runs over the real tokens as if
    the masked ones were not there. Computed by a reverse ``lax.scan`` over T.

    Args:
      rewards: ``[B, T]`` per-token rewards.
      values: ``[B, T]`` value estimates V_t.
      mask: ``[B, T]`` float or bool, 1 = response token.
      gamma: discount (1.0 in InstructGPT); may be a traced scalar.
      lam: GAE lambda (0.95 in Ziegler et al.); may be a traced scalar.

    Returns:
      ``(advantages, returns)``, both ``[B, T]`` float32, 0 at masked positions.

    >>> adv, ret = gae(jnp.array([[0.0, 0.0, 1.0, 0.0]]), jnp.array([[0.5, 0.5, 0.5, 9.0]]),
    ...                jnp.array([[1, 1, 1, 0]]), gamma=1.0, lam=1.0)
    >>> print(adv, ret)
    [[0.5 0.5 0.5 0. ]] [[1. 1. 1. 0.]]
    """
    chex.assert_rank([rewards, values, mask], 2)
    chex.assert_equal_shape([rewards, values, mask])
    real = jnp.asarray(mask) != 0
    r = jnp.where(real, jnp.asarray(rewards).astype(jnp.float32), 0.0)
    v = jnp.where(real, jnp.asarray(values).astype(jnp.float32), 0.0)
    gamma = jnp.asarray(gamma, jnp.float32)
    lam = jnp.asarray(lam, jnp.float32)

    def step(carry, xs):
        next_value, next_adv = carry  # [B] each: V and A at the next real token
        r_t, v_t, real_t = xs
        delta = r_t + gamma * next_value - v_t
        adv_t = delta + gamma * lam * next_adv
        carry = (jnp.where(real_t, v_t, next_value), jnp.where(real_t, adv_t, next_adv))
        return carry, jnp.where(real_t, adv_t, 0.0)

    zeros = jnp.zeros(r.shape[:1], jnp.float32)  # [B]
    # scan over time: inputs transposed to [T, B], outputs back to [B, T]
    _, adv = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, real.T), reverse=True)
    adv = adv.T
    returns = jnp.where(real, adv + v, 0.0)
    return adv, returns


def kl_shaped_rewards(
    scores: chex.Array,
    logprobs: chex.Array,
    ref_logprobs: chex.Array,
    mask: chex.Array,
    *,
    kl_coef: float | jax.Array,
    kind: str = "k1",
) -> tuple[jax.Array, jax.Array]:
    """Per-token rewards: KL penalty at every response token, RM score at the last one.

    ``r_t = -beta * KL_t`` for each real token, plus the reward-model score at the last
    real token ``last_token_index(mask)`` (the EOS position); 0 at masked positions.
    With ``kind="k1"``, ``KL_t = log pi_RL(y_t) - log pi_SFT(y_t)``: the InstructGPT
    objective ``r(x, y) - beta * log(pi_RL(y|x) / pi_SFT(y|x))`` spread over tokens.

    Args:
      scores: ``[B]`` reward-model scores (after any normalisation / EOS penalty).
      logprobs: ``[B, T]`` policy log-probs of the sampled tokens (sampling temperature).
      ref_logprobs: ``[B, T]`` reference (SFT) log-probs of the same tokens.
      mask: ``[B, T]``, 1 = response token.
      kl_coef: beta; a traced scalar (the adaptive controller's state) or a float.
      kind: KL estimator, see ``ops.kl_estimate``: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
      ``(rewards, kl)``: both ``[B, T]`` float32; ``kl`` is the masked per-token estimate.

    >>> rewards, kl = kl_shaped_rewards(jnp.array([2.0]), jnp.array([[-1.0, -1.0, 0.0]]),
    ...                                 jnp.array([[-2.0, -1.0, 0.0]]), jnp.array([[1, 1, 0]]),
    ...                                 kl_coef=0.1)
    >>> print(rewards, kl)
    [[-0.1  2.   0. ]] [[1. 0. 0.]]
    """
    chex.assert_rank([scores, logprobs, ref_logprobs, mask], [1, 2, 2, 2])
    chex.assert_equal_shape([logprobs, ref_logprobs, mask])
    chex.assert_equal_shape_prefix([scores, mask], 1)
    real = jnp.asarray(mask) != 0
    kl = jnp.where(real, ops.kl_estimate(logprobs, ref_logprobs, kind=kind), 0.0)
    last = jax.nn.one_hot(ops.last_token_index(mask), real.shape[1], dtype=jnp.bool_)
    # An all-zero row has no last token (index 0 is not real), so its score is dropped.
    scores = jnp.asarray(scores).astype(jnp.float32)[:, None]  # [B, 1]
    score_at_end = jnp.where(last & real, scores, 0.0)
    rewards = -jnp.asarray(kl_coef, jnp.float32) * kl + score_at_end
    return rewards, kl


def update_kl_coef(
    kl_coef: float | jax.Array,
    observed_kl: float | jax.Array,
    n_episodes: int | jax.Array,
    *,
    target: float | jax.Array,
    horizon: float | jax.Array,
) -> jax.Array:
    """One step of Ziegler et al.'s adaptive KL controller (proportional, clipped).

    ``e = clip(KL / KL_target - 1, -0.2, 0.2)`` and
    ``beta <- beta * (1 + e * n_episodes / horizon)``: beta grows when the observed KL
    is above target and shrinks when below. Pure: keep beta as a traced array in the
    training state, never as a Python constant in a compiled step.

    Args:
      kl_coef: current beta (scalar).
      observed_kl: mean per-sequence KL of the latest batch (scalar).
      n_episodes: episodes in that batch.
      target: KL target.
      horizon: controller horizon in episodes (10,000 in Ziegler et al.).

    Returns:
      float32 scalar: the new beta.

    >>> print(round(float(update_kl_coef(0.1, 12.0, 512, target=6.0, horizon=10000)), 6))
    0.101024
    """
    chex.assert_rank([kl_coef, observed_kl, n_episodes], 0)
    error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    n = jnp.asarray(n_episodes, jnp.float32)
    return jnp.asarray(kl_coef, jnp.float32) * (1.0 + error * n / horizon)


def reward_bias(demo_scores: chex.Array) -> jax.Array:
    """InstructGPT's reward bias: ``b`` such that the demonstrations score mean 0.

    After RM training a bias is added so that ``r(x, y_demo) + b`` has mean 0 over the
    labelers' demonstrations: ``b = -mean(demo_scores)``. The ranking loss is
    shift-invariant, so this only sets the scale the KL coefficient is measured against.

    Args:
      demo_scores: ``[N]`` reward-model scores of demonstrations.

    Returns:
      float32 scalar bias.

    >>> print(float(reward_bias(jnp.array([1.0, 2.0, 6.0]))))
    -3.0
    """
    chex.assert_rank(demo_scores, 1)
    return -jnp.mean(jnp.asarray(demo_scores).astype(jnp.float32))


def reward_gain_bias(
    ref_scores: chex.Array, *, target_mean: float = 0.0, target_std: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Ziegler et al.'s reward normalisation: ``gain * s + bias`` has the target moments.

    On scores of reference-policy samples, ``gain = target_std / std(s)`` and
    ``bias = target_mean - gain * mean(s)`` (population std, as lm-human-preferences).
    Constant scores (std 0) give ``gain = 1``.

    Args:
      ref_scores: ``[N]`` reward-model scores of samples from the reference policy.
      target_mean: desired mean of the normalised scores.
      target_std: desired standard deviation of the normalised scores.

    Returns:
      ``(gain, bias)``, float32 scalars.

    >>> gain, bias = reward_gain_bias(jnp.array([1.0, 3.0]))
    >>> print(float(gain), float(bias))
    1.0 -2.0
    """
    chex.assert_rank(ref_scores, 1)
    s = jnp.asarray(ref_scores).astype(jnp.float32)
    mean = jnp.mean(s)
    std = jnp.std(s)
    gain = jnp.where(std > 0, target_std / jnp.where(std > 0, std, 1.0), 1.0)
    return gain, target_mean - gain * mean
