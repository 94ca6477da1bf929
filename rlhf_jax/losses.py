"""The reusable RLHF losses: pure ``array -> array`` functions.

No model, no config: hyperparameters are keyword-only, computation is float32 inside
whatever the input dtype, and everything works under ``jax.jit`` / ``jax.vmap``.
Functions that return ``(scalar, metrics)`` reduce with the given mask; the others are
unreduced so that the caller's mask decides the reduction. Masks are float or bool,
1 = real token; an all-zero mask gives 0 loss with finite gradients.

Equations follow InstructGPT (Ouyang et al. 2022, arXiv 2203.02155), PPO (Schulman et
al. 2017, arXiv 1707.06347) and the clipping conventions of openai/lm-human-preferences.
The preference-optimisation losses (``dpo_loss``, ``plackett_luce_dpo_loss``) live in
``rlhf_jax.losses_preference`` and are re-exported here, their public home.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rlhf_jax import ops
from rlhf_jax.losses_preference import dpo_loss, plackett_luce_dpo_loss  # re-exports
from rlhf_jax.ops import entropy_from_logits as entropy  # re-export: [B,T,V] -> [B,T]

__all__ = [
    "token_cross_entropy",
    "masked_lm_loss",
    "pairwise_ranking_loss",
    "k_way_ranking_loss",
    "ppo_policy_loss",
    "value_loss",
    "kl_penalty",
    "entropy",
    "dpo_loss",
    "plackett_luce_dpo_loss",
]

Metrics = dict[str, jax.Array]

_AGGREGATIONS = ("token_mean", "sequence_mean", "token_sum")


def token_cross_entropy(logits: chex.Array, targets: chex.Array) -> jax.Array:
    """Per-token cross-entropy ``-log softmax(logits)[target]``, unreduced.

    Args:
      logits: ``[B, T, V]``; position t predicts ``targets[:, t]`` (shift beforehand).
      targets: ``[B, T]`` integer token ids.

    Returns:
      ``[B, T]`` float32 negative log-likelihoods.

    >>> logits = jnp.zeros((1, 2, 4))
    >>> print(jnp.round(token_cross_entropy(logits, jnp.array([[0, 3]])), 4))  # ln 4
    [[1.3863 1.3863]]
    """
    chex.assert_rank([logits, targets], [3, 2])
    return -ops.gather_logprobs(logits, targets)


def masked_lm_loss(logits: chex.Array, targets: chex.Array, loss_mask: chex.Array) -> tuple[jax.Array, Metrics]:
    """Token-averaged language-modelling loss (SFT, and the ptx term of PPO-ptx).

    ``L = sum_t m_t * (-log pi(y_t | y_<t)) / sum_t m_t`` over all real tokens of the
    batch. For SFT the mask covers response tokens only; for ptx it covers all text.

    Args:
      logits: ``[B, T, V]``; position t predicts ``targets[:, t]``.
      targets: ``[B, T]`` integer token ids.
      loss_mask: ``[B, T]``, 1 = token counted in the loss.

    Returns:
      ``(loss, metrics)``: float32 scalar loss; metrics ``loss``, ``accuracy`` (masked
      fraction of targets with the highest logit; a target tied for the highest counts as
      correct) and ``num_tokens``.

    >>> logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1], [0.1, 0.9]]]))
    >>> loss, m = masked_lm_loss(logits, jnp.array([[0, 0, 0]]), jnp.array([[0, 1, 1]]))
    >>> print(round(float(loss), 4), float(m["accuracy"]), float(m["num_tokens"]))
    1.204 0.5 2.0
    """
    chex.assert_rank([logits, targets, loss_mask], [3, 2, 2])
    chex.assert_equal_shape([targets, loss_mask])
    chex.assert_equal_shape_prefix([logits, targets], 2)
    logits = jnp.asarray(logits).astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]  # [B, T]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked  # [B, T]
    loss = ops.masked_mean(nll, loss_mask)
    # "the target has the highest logit": one max-reduction, where argmax costs a (value,
    # index) pair reduction over [B, T, V] that is several times slower on CPU.
    correct = (picked >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    metrics = {
        "loss": loss,
        "accuracy": ops.masked_mean(correct, loss_mask),
        "num_tokens": jnp.sum(jnp.asarray(loss_mask).astype(jnp.float32)),
    }
    return loss, metrics


def pairwise_ranking_loss(chosen: chex.Array, rejected: chex.Array) -> jax.Array:
    """Bradley-Terry pairwise loss ``-log sigmoid(r_chosen - r_rejected)``, unreduced.

    InstructGPT eq. 1 for one comparison. Computed as ``softplus(rejected - chosen)``,
    which is finite with finite gradients for any finite difference. A tied pair
    (``chosen == rejected``) costs ``ln 2``.

    Args:
      chosen: ``[N]`` rewards of the preferred responses.
      rejected: ``[N]`` rewards of the other responses.

    Returns:
      ``[N]`` float32 losses.

    >>> print(jnp.round(pairwise_ranking_loss(jnp.array([0.0, 2.0]), jnp.array([0.0, 0.0])), 4))
    [0.6931 0.1269]
    """
    chex.assert_rank([chosen, rejected], 1)
    chex.assert_equal_shape([chosen, rejected])
    diff = jnp.asarray(chosen).astype(jnp.float32) - jnp.asarray(rejected).astype(jnp.float32)
    return -jax.nn.log_sigmoid(diff)


def k_way_ranking_loss(
    rewards: chex.Array,
    ranks: chex.Array,
    valid: chex.Array,
    *,
    margin: float = 0.0,
    center_coef: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """InstructGPT's K-way reward-model loss: all C(K,2) pairs of a prompt in one element.

    InstructGPT eq. 1::

        loss(theta) = -1/C(K,2) * E_{(x, y_w, y_l)} [log sigmoid(r(x, y_w) - r(x, y_l))]

    For each prompt b the pairs are all ordered ``(i, j)`` with both slots valid and
    ``ranks[b, i] < ranks[b, j]`` (rank 0 = best; ties carry no order and are skipped).
    The per-prompt loss is the mean over its pairs; the batch loss is the mean over the
    prompts that have at least one pair (a prompt with none contributes nothing, and a
    batch with no pair gives 0 with a finite gradient). Rewards in invalid slots are
    ignored, even if non-finite.

    Extensions beyond the paper, off by default: ``margin`` subtracts a constant inside
    the sigmoid (``-log sigmoid(r_i - r_j - margin)``); ``center_coef`` adds
    ``center_coef * mean_valid(r^2)``, a penalty that keeps rewards centred at 0.

    Args:
      rewards: ``[B, K]`` scalar rewards, one per response slot.
      ranks: ``[B, K]`` integer (or float) ranks, 0 = best, ties allowed.
      valid: ``[B, K]`` float or bool, 1 = a real response in that slot.
      margin: constant margin inside the sigmoid.
      center_coef: weight of the reward-centring penalty.

    Returns:
      ``(loss, metrics)``: float32 scalar; metrics ``loss``, ``ranking_loss`` (without
      the centring term), ``accuracy`` (fraction of pairs with ``r_i > r_j``, pair
      weighted), ``num_pairs``, ``num_prompts_with_pairs``, ``reward_mean`` and
      ``reward_std`` (over valid slots), ``margin`` (mean ``r_i - r_j`` over pairs).

    >>> rewards = jnp.array([[2.0, 1.0, 0.0, 5.0]])
    >>> ranks = jnp.array([[0, 1, 2, 0]])
    >>> valid = jnp.array([[1, 1, 1, 0]])
    >>> loss, m = k_way_ranking_loss(rewards, ranks, valid)
    >>> print(round(float(loss), 4), float(m["num_pairs"]), float(m["accuracy"]))
    0.2512 3.0 1.0
    """
    chex.assert_rank([rewards, ranks, valid], 2)
    chex.assert_equal_shape([rewards, ranks, valid])
    is_valid = jnp.asarray(valid) != 0
    r = jnp.where(is_valid, jnp.asarray(rewards).astype(jnp.float32), 0.0)  # [B, K]
    ranks = jnp.asarray(ranks)
    # pairs[b, i, j]: slot i is ranked strictly better than slot j, both valid.  [B, K, K]
    pairs = (is_valid[:, :, None] & is_valid[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])).astype(jnp.float32)
    diff = r[:, :, None] - r[:, None, :]  # [B, K, K]: r_i - r_j
    pair_loss = -jax.nn.log_sigmoid(diff - margin)  # [B, K, K]

    pairs_per_prompt = jnp.sum(pairs, axis=(1, 2))  # [B]
    per_prompt = ops.masked_mean(pair_loss, pairs, axis=(1, 2))  # [B], 0 if no pair
    has_pairs = (pairs_per_prompt > 0).astype(jnp.float32)  # [B]
    ranking = ops.masked_mean(per_prompt, has_pairs)

    valid_f = is_valid.astype(jnp.float32)
    loss = ranking
    if not (isinstance(center_coef, (int, float)) and center_coef == 0):  # may be traced
        loss = loss + center_coef * ops.masked_mean(jnp.square(r), valid_f)
    metrics = {
        "loss": loss,
        "ranking_loss": ranking,
        "accuracy": ops.masked_mean((diff > 0).astype(jnp.float32), pairs),
        "num_pairs": jnp.sum(pairs_per_prompt),
        "num_prompts_with_pairs": jnp.sum(has_pairs),
        "reward_mean": ops.masked_mean(r, valid_f),
        "reward_std": jnp.sqrt(ops.masked_var(r, valid_f, unbiased=False)),
        "margin": ops.masked_mean(diff, pairs),
    }
    return loss, metrics


def ppo_policy_loss(
    logprobs: chex.Array,
    old_logprobs: chex.Array,
    advantages: chex.Array,
    mask: chex.Array,
    *,
    clip_eps: float,
    aggregation: str = "token_mean",
) -> tuple[jax.Array, Metrics]:
    """PPO's clipped surrogate policy loss over real tokens.

    PPO (Schulman et al. 2017) eq. 7, negated for minimisation, per token t::

        rho_t = exp(logp_t - logp_old_t)
        l_t   = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))

    reduced over the real tokens by ``aggregation`` (m = mask, n_b = sum_t m_bt):

    * ``"token_mean"`` (InstructGPT / TRL PPO): ``sum_bt m l / sum_bt m``, every real
      token of the batch weighs the same.
    * ``"sequence_mean"`` (GRPO, DeepSeekMath eq. 3): ``mean_b( sum_t m l / n_b )``, every
      sequence weighs the same. A sequence with no real token contributes 0 and is not
      counted in the mean over sequences (a batch of empty sequences gives 0).
    * ``"token_sum"`` (Dr. GRPO, Liu et al. 2025): ``sum_bt m l / (B * T)``, a constant
      normaliser, so that the per-token weight does not depend on response length.

    The gradient is exactly 0 where the clipped term is active (A > 0 and
    rho > 1 + eps, or A < 0 and rho < 1 - eps) and ``-A_t rho_t`` times the token's
    weight elsewhere. ``advantages`` and ``old_logprobs`` are data: gradients are stopped
    through them (rlax's ``use_stop_gradient``).

    Args:
      logprobs: ``[B, T]`` log-probs of the taken tokens under the current policy.
      old_logprobs: ``[B, T]`` log-probs under the rollout policy.
      advantages: ``[B, T]`` advantage estimates (e.g. whitened GAE; a GRPO sequence
        advantage broadcast over its tokens).
      mask: ``[B, T]``, 1 = response token.
      clip_eps: PPO clip range epsilon (0.2 in InstructGPT).
      aggregation: ``"token_mean"``, ``"sequence_mean"`` or ``"token_sum"`` (static).

    Returns:
      ``(loss, metrics)``: metrics ``policy_loss`` (the loss), ``clipfrac`` (fraction of
      tokens where the clipped term is the active max, as in lm-human-preferences / TRL)
      and ``approx_kl`` (``mean_m(0.5 * (logp - logp_old)^2)``); both are token means
      whatever the aggregation.

    Raises:
      ValueError: unknown ``aggregation``.

    >>> lp = jnp.log(jnp.array([[1.5, 1.0, 0.5]]))  # ratios 1.5, 1.0, 0.5 vs old = 0
    >>> loss, m = ppo_policy_loss(lp, jnp.zeros((1, 3)), jnp.ones((1, 3)),
    ...                           jnp.ones((1, 3)), clip_eps=0.2)
    >>> print(round(float(loss), 4), round(float(m["clipfrac"]), 4))
    -0.9 0.3333
    >>> mask = jnp.array([[1, 1, 0]])  # two real tokens out of B * T = 3
    >>> loss, _ = ppo_policy_loss(lp, jnp.zeros((1, 3)), jnp.ones((1, 3)), mask,
    ...                           clip_eps=0.2, aggregation="token_sum")
    >>> print(round(float(loss), 4))  # (-1.2 - 1.0) / 3
    -0.7333
    """
    chex.assert_rank([logprobs, old_logprobs, advantages, mask], 2)
    chex.assert_equal_shape([logprobs, old_logprobs, advantages, mask])
    if aggregation not in _AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {_AGGREGATIONS}, got {aggregation!r}")
    logprobs = jnp.asarray(logprobs).astype(jnp.float32)
    old = jax.lax.stop_gradient(jnp.asarray(old_logprobs).astype(jnp.float32))
    adv = jax.lax.stop_gradient(jnp.asarray(advantages).astype(jnp.float32))
    log_ratio = logprobs - old
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    is_clipped = clipped > unclipped
    per_token = jnp.where(is_clipped, clipped, unclipped)  # = max(unclipped, clipped)
    if aggregation == "token_mean":
        loss = ops.masked_mean(per_token, mask)
    elif aggregation == "sequence_mean":
        per_seq = ops.masked_mean(per_token, mask, axis=1)  # [B], 0 for an empty row
        has_tokens = (jnp.sum(jnp.asarray(mask) != 0, axis=1) > 0).astype(jnp.float32)  # [B]
        loss = ops.masked_mean(per_seq, has_tokens)
    else:  # "token_sum"
        loss = ops.masked_sum(per_token, mask) / (per_token.shape[0] * per_token.shape[1])
    metrics = {
        "policy_loss": loss,
        "clipfrac": ops.masked_mean(is_clipped.astype(jnp.float32), mask),
        "approx_kl": ops.masked_mean(0.5 * jnp.square(log_ratio), mask),
    }
    return loss, metrics


def value_loss(
    values: chex.Array,
    old_values: chex.Array,
    returns: chex.Array,
    mask: chex.Array,
    *,
    clip_eps: float,
) -> tuple[jax.Array, Metrics]:
    """Clipped value-function loss, as in lm-human-preferences, over real tokens.

        ``v_clip = v_old + clip(v - v_old, -eps, eps)`` and
        ``L = 0.5 * mean_m( max((v - R)^2, (v_clip - R)^2) )``. Where the clipped error is the
        larger one the gradient is 0 (the update is already out of the trust region).
    ``old_values`` and ``returns`` are data: gradients are stopped through them.

        Args:
          values: ``[B, T]`` current value predictions.
          old_values: ``[B, T]`` value predictions at rollout time.
          returns: ``[B, T]`` regression targets (advantages + old values).
          mask: ``[B, T]``, 1 = response token.
          clip_eps: value clip range (0.2 in Ziegler et al.).

        Returns:
          ``(loss, metrics)``: metrics ``value_loss`` and ``vf_clipfrac`` (fraction of tokens
          where the clipped error is the larger).

        >>> loss, m = value_loss(jnp.array([[1.0, 0.1]]), jnp.zeros((1, 2)), jnp.ones((1, 2)),
        ...                      jnp.ones((1, 2)), clip_eps=0.2)
        >>> print(round(float(loss), 4), float(m["vf_clipfrac"]))
        0.3625 0.5
    """
    chex.assert_rank([values, old_values, returns, mask], 2)
    chex.assert_equal_shape([values, old_values, returns, mask])
    v = jnp.asarray(values).astype(jnp.float32)
    v_old = jax.lax.stop_gradient(jnp.asarray(old_values).astype(jnp.float32))
    ret = jax.lax.stop_gradient(jnp.asarray(returns).astype(jnp.float32))
    v_clipped = v_old + jnp.clip(v - v_old, -clip_eps, clip_eps)
    err = jnp.square(v - ret)
    err_clipped = jnp.square(v_clipped - ret)
    is_clipped = err_clipped > err
    loss = 0.5 * ops.masked_mean(jnp.where(is_clipped, err_clipped, err), mask)
    metrics = {
        "value_loss": loss,
        "vf_clipfrac": ops.masked_mean(is_clipped.astype(jnp.float32), mask),
    }
    return loss, metrics


def kl_penalty(logprobs: chex.Array, ref_logprobs: chex.Array, *, kind: str = "k1") -> jax.Array:
    """Per-token estimate of ``KL(pi || pi_ref)`` from samples of ``pi``, unreduced.

    With ``d = logp - logp_ref`` (Schulman's "Approximating KL divergence" estimators):

    * ``"k1"``: ``d``; unbiased, the InstructGPT / Ziegler per-token penalty
      ``log(pi_RL / pi_SFT)``; a single sample can be negative.
    * ``"k2"``: ``0.5 * d^2``; biased, always >= 0.
    * ``"k3"``: ``exp(-d) - 1 + d``; unbiased and always >= 0.

    Args:
      logprobs: ``[B, T]`` (any shape) log-probs of sampled tokens under the policy.
      ref_logprobs: same shape, under the reference (SFT) policy.
      kind: ``"k1"``, ``"k2"`` or ``"k3"`` (static).

    Returns:
      float32 array of the input shape.

    Raises:
      ValueError: unknown ``kind``.

    >>> lp, ref = jnp.array([0.0, -1.0]), jnp.array([-1.0, 0.0])
    >>> print(kl_penalty(lp, ref), kl_penalty(lp, ref, kind="k2"))
    [ 1. -1.] [0.5 0.5]
    >>> print([round(float(k), 4) for k in kl_penalty(lp, ref, kind="k3")])
    [0.3679, 0.7183]
    """
    chex.assert_equal_shape([logprobs, ref_logprobs])
    if kind not in ("k1", "k2", "k3"):
        raise ValueError(f"KL estimator kind must be 'k1', 'k2' or 'k3', got {kind!r}")
    d = jnp.asarray(logprobs).astype(jnp.float32) - jnp.asarray(ref_logprobs).astype(jnp.float32)
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * jnp.square(d)
    # exp(-d) - 1 + d via expm1 (accurate near 0); the clamp guards rounding below 0.
    return jnp.maximum(jnp.expm1(-d) + d, 0.0)
