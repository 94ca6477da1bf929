"""The RL maths of InstructGPT's PPO stage: rewards, advantages, KL control, reward scale.

The environment is a bandit: one prompt, one sampled response, the reward-model score
at the end, episode over. Each response token gets the per-token KL penalty
``-beta * log(pi_RL / pi_SFT)`` and the last real token also gets the score
(Ziegler et al. 2019; Ouyang et al. 2022, eq. 2). Pure functions; they work under
``jax.jit`` and ``jax.vmap``, in float32 whatever the input dtype.

Whitening (lm-human-preferences / TRL conventions) is ``ops.masked_whiten``: rewards
with ``shift_mean=False`` (scale only), advantages with ``shift_mean=True``.

Besides GAE (which needs a value function), the critic-free estimators: group baselines
over G responses to one prompt (GRPO, Dr. GRPO, RLOO) and REINFORCE++'s batch-whitened
reward-to-go. The per-token KL estimators are ``losses.kl_penalty``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rlhf_jax import losses, ops

__all__ = [
    "gae",
    "group_advantages",
    "reinforce_pp_advantages",
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


_GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")


def group_advantages(rewards: chex.Array, *, estimator: str = "grpo", eps: float = 1e-6) -> jax.Array:
    """Critic-free advantages from G sampled responses per prompt (a group baseline).

    For the G scalar rewards ``r_1..r_G`` of one prompt:

    * ``"grpo"`` (DeepSeekMath, Shao et al. 2024, sec. 4.1.2; TRL's GRPO):
      ``(r_i - mean(r)) / (std(r) + eps)``, with the unbiased (G - 1) standard deviation.
    * ``"dr_grpo"`` (Dr. GRPO, Liu et al. 2025): ``r_i - mean(r)``, no std scaling.
    * ``"rloo"`` (REINFORCE leave-one-out, Ahmadian et al. 2024):
      ``r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r))``.

    A group whose rewards are all equal gets advantage exactly 0. The result is one
    advantage per sequence; broadcast it over the response tokens for
    ``losses.ppo_policy_loss``.

    Args:
      rewards: ``[N, G]`` scalar rewards: N prompts x G sampled responses each (G >= 2).
      estimator: ``"grpo"``, ``"dr_grpo"`` or ``"rloo"`` (static).
      eps: added to the std for ``"grpo"``; may be traced.

    Returns:
      ``[N, G]`` float32 advantages.

    Raises:
      ValueError: unknown ``estimator``, or G < 2 (no baseline from the other samples).

    >>> r = jnp.array([[1.0, 0.0, 0.0, 1.0]])
    >>> print(group_advantages(r, estimator="dr_grpo"), group_advantages(r, estimator="rloo"))
    [[ 0.5 -0.5 -0.5  0.5]] [[ 0.6666666 -0.6666666 -0.6666666  0.6666666]]
    >>> print(jnp.round(group_advantages(r), 4))  # std = sqrt(1/3)
    [[ 0.866 -0.866 -0.866  0.866]]
    """
    chex.assert_rank(rewards, 2)
    if estimator not in _GROUP_ESTIMATORS:
        raise ValueError(f"estimator must be one of {_GROUP_ESTIMATORS}, got {estimator!r}")
    group = rewards.shape[1]
    if group < 2:
        raise ValueError(f"group_advantages needs G >= 2 responses per prompt, got rewards of shape {rewards.shape}")
    r = jnp.asarray(rewards).astype(jnp.float32)  # [N, G]
    # Shift by each group's first reward (the result does not depend on it): a constant
    # group is then exactly 0 before the mean, whose rounding error (up to ~1e-5 for
    # rewards ~100) would otherwise be divided by std + eps ~ 1e-6 in "grpo".
    x = r - jax.lax.stop_gradient(r[:, :1])  # [N, G]
    if estimator == "rloo":
        # minus the mean of the other G - 1 rewards: (sum - x_i) / (G - 1)
        return x - (jnp.sum(x, axis=1, keepdims=True) - x) / (group - 1)
    centred = x - jnp.mean(x, axis=1, keepdims=True)  # [N, G]
    if estimator == "dr_grpo":
        return centred
    std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1, keepdims=True) / (group - 1))  # [N, 1]
    return centred / (std + eps)


def reinforce_pp_advantages(rewards: chex.Array, mask: chex.Array) -> jax.Array:
    """REINFORCE++ advantages: undiscounted reward-to-go, whitened over the batch.

    REINFORCE++ (Hu 2025, arXiv 2501.03262) with discount 1, over the real tokens::

        G_t = sum_{u >= t, m_u = 1} r_u
        A_t = (G_t - mean_m(G)) / sqrt(var_m(G) + 1e-8)

    with mean and population variance over all real tokens of the batch
    (``ops.masked_whiten(G, mask, shift_mean=True)``). ``rewards`` are the per-token
    KL-shaped rewards of ``kl_shaped_rewards`` (score at the last real token). Masked
    positions are skipped (prompt prefix, padding, holes) and get 0; whatever sits there
    is ignored. An all-zero mask gives zeros.

    Args:
      rewards: ``[B, T]`` per-token rewards.
      mask: ``[B, T]`` float or bool, 1 = response token.

    Returns:
      ``[B, T]`` float32 advantages, 0 at masked positions.

    >>> adv = reinforce_pp_advantages(jnp.array([[0.0, 1.0, 9.0], [0.0, -1.0, 0.0]]),
    ...                               jnp.array([[1, 1, 0], [1, 1, 0]]))
    >>> print(jnp.round(adv, 4))  # reward-to-go [[1, 1, -], [-1, -1, -]]
    [[ 1.  1.  0.]
     [-1. -1.  0.]]
    """
    chex.assert_rank([rewards, mask], 2)
    chex.assert_equal_shape([rewards, mask])
    real = jnp.asarray(mask) != 0
    r = jnp.where(real, jnp.asarray(rewards).astype(jnp.float32), 0.0)  # [B, T]
    to_go = jax.lax.cumsum(r, axis=1, reverse=True)  # [B, T]: sum_{u >= t} r_u over real u
    return ops.masked_whiten(to_go, mask, shift_mean=True)


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
      kind: KL estimator, see ``losses.kl_penalty``: ``"k1"``, ``"k2"`` or ``"k3"``.

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
    kl = jnp.where(real, losses.kl_penalty(logprobs, ref_logprobs, kind=kind), 0.0)
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
