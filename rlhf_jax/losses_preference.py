"""Direct preference optimisation losses: DPO (and its IPO / hinge variants) and the
Plackett-Luce ranking objective. Public through ``rlhf_jax.losses``.

Same contract as ``rlhf_jax.losses``: pure, keyword-only hyperparameters, float32 inside,
jit- and vmap-able. Inputs are the *summed* log-probs of whole responses (sum over the
response tokens of ``ops.gather_logprobs``), under the policy and under the frozen
reference; the reference log-probs are data (compute them without gradient).

With ``h = (log pi(y) - log pi_ref(y))`` the implicit reward of a response is ``beta * h``
(Rafailov et al. 2023, "Direct Preference Optimization", arXiv 2305.18290). Metric names
follow TRL's ``DPOTrainer``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rlhf_jax import ops

__all__ = ["dpo_loss", "plackett_luce_dpo_loss"]

Metrics = dict[str, jax.Array]

_DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
# Stands in for log(0) in the reverse cumulative logsumexp: exp(_LOG_ZERO - s) is exactly
# 0 in float32 and, unlike -inf, it gives no inf - inf in the forward or backward pass.
_LOG_ZERO = -1e30


def _check_beta(beta) -> None:
    if isinstance(beta, (int, float)) and not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")


def dpo_loss(
    chosen_logps: chex.Array,
    rejected_logps: chex.Array,
    ref_chosen_logps: chex.Array,
    ref_rejected_logps: chex.Array,
    *,
    beta: float | jax.Array,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """DPO loss on pairs, with the IPO and hinge (SLiC) variants; mean over the batch.

    With ``h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``:

    * ``"sigmoid"``: DPO eq. 7, ``-log sigma(beta h)``; with label smoothing ``ls``
      (conservative DPO, ``ls`` = assumed probability that a label is flipped)
      ``-(1 - ls) log sigma(beta h) - ls log sigma(-beta h)``.
    * ``"ipo"``: IPO (Azar et al. 2023, eq. 17), ``(h - 1 / (2 beta))^2``; here ``beta``
      is IPO's tau. (TRL feeds IPO length-averaged log-probs; pass those if you want that.)
    * ``"hinge"``: SLiC (Zhao et al. 2023), ``relu(1 - beta h)``.

    Args:
      chosen_logps: ``[B]`` summed policy log-probs of the preferred responses.
      rejected_logps: ``[B]`` summed policy log-probs of the other responses.
      ref_chosen_logps: ``[B]`` the same under the reference (SFT) model.
      ref_rejected_logps: ``[B]`` the same under the reference model.
      beta: inverse temperature of the implicit reward (> 0); may be traced.
      loss_type: ``"sigmoid"``, ``"ipo"`` or ``"hinge"`` (static).
      label_smoothing: in ``[0, 1]``; only for ``"sigmoid"``, may be traced there.

    Returns:
      ``(loss, metrics)``: float32 scalar; metrics ``loss``, ``rewards/chosen`` and
      ``rewards/rejected`` (batch means of ``beta * (logp - ref_logp)``),
      ``rewards/accuracies`` (fraction of pairs whose chosen reward is strictly the
      larger) and ``rewards/margins`` (mean of chosen minus rejected reward).

    Raises:
      ValueError: unknown ``loss_type``; a Python ``beta <= 0``; a Python
        ``label_smoothing`` outside ``[0, 1]``, or nonzero with a loss type other than
        ``"sigmoid"`` (TRL ignores it there with a warning; here it is an error).

    >>> loss, m = dpo_loss(jnp.array([-1.0]), jnp.array([-2.0]), jnp.array([-1.5]),
    ...                    jnp.array([-1.5]), beta=0.5)
    >>> print(round(float(loss), 4), float(m["rewards/margins"]))  # -log sigmoid(0.5 * 1)
    0.4741 0.5
    >>> loss, _ = dpo_loss(jnp.array([-1.0]), jnp.array([-2.0]), jnp.array([-1.5]),
    ...                    jnp.array([-1.5]), beta=0.5, loss_type="ipo")
    >>> print(float(loss))  # (1 - 1 / (2 * 0.5))^2
    0.0
    """
    chex.assert_rank([chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps], 1)
    chex.assert_equal_shape([chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps])
    if loss_type not in _DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {_DPO_LOSS_TYPES}, got {loss_type!r}")
    _check_beta(beta)
    if isinstance(label_smoothing, (int, float)):
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
        if label_smoothing != 0 and loss_type != "sigmoid":
            raise ValueError(f"label_smoothing is only defined for loss_type='sigmoid', got {loss_type!r}")
    f32 = lambda x: jnp.asarray(x).astype(jnp.float32)  # noqa: E731
    beta = jnp.asarray(beta, jnp.float32)
    chosen_logratio = f32(chosen_logps) - f32(ref_chosen_logps)  # [B]
    rejected_logratio = f32(rejected_logps) - f32(ref_rejected_logps)  # [B]
    h = chosen_logratio - rejected_logratio  # [B]
    if loss_type == "sigmoid":
        logit = beta * h
        per_pair = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logit) - label_smoothing * jax.nn.log_sigmoid(-logit)
    elif loss_type == "ipo":
        per_pair = jnp.square(h - 1.0 / (2.0 * beta))
    else:  # "hinge"
        per_pair = jax.nn.relu(1.0 - beta * h)
    loss = jnp.mean(per_pair)
    chosen_rewards = beta * chosen_logratio  # [B]
    rejected_rewards = beta * rejected_logratio  # [B]
    metrics = {
        "loss": loss,
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
    }
    return loss, metrics


def plackett_luce_dpo_loss(
    logps: chex.Array,
    ref_logps: chex.Array,
    ranks: chex.Array,
    valid: chex.Array,
    *,
    beta: float | jax.Array,
) -> tuple[jax.Array, Metrics]:
    """DPO for K ranked responses: the Plackett-Luce negative log-likelihood.

    DPO paper, Appendix A.3 (eq. 20): with ``s = beta * (log pi(y) - log pi_ref(y))`` and
    the n valid responses of a prompt in rank order ``tau(1) (best), ..., tau(n)``::

        L = -sum_{k=1}^{n} log( exp(s_tau(k)) / sum_{j=k}^{n} exp(s_tau(j)) )

    (the k = n term is 0). Computed stably: slots are sorted by rank with invalid slots
    last, then ``s_tau(k) - logcumsumexp_reverse(s)_k``. The loss is the mean over the
    prompts with at least 2 valid responses; a prompt with fewer contributes 0 and is
    not counted, and a batch without any such prompt gives 0 with zero gradients.
    Values in invalid slots are ignored, even if non-finite. For K = 2 this is
    ``dpo_loss`` with ``loss_type="sigmoid"``.

    Ranks are expected to be a strict order among the valid slots; tied ranks are
    ordered by slot index in the loss (and count as no pair in the metrics).

    Args:
      logps: ``[B, K]`` summed policy log-probs of the K responses of each prompt.
      ref_logps: ``[B, K]`` the same under the reference (SFT) model.
      ranks: ``[B, K]`` integer (or float) ranks, 0 = best.
      valid: ``[B, K]`` float or bool, 1 = a real response in that slot.
      beta: inverse temperature of the implicit reward (> 0); may be traced.

    Returns:
      ``(loss, metrics)``: float32 scalar; metrics (rewards are ``s = beta * h``):
      ``loss``; ``rewards/accuracies``: fraction of ordered pairs (both valid,
      ``rank_i < rank_j``) with ``s_i > s_j``, over all pairs of the batch;
      ``rewards/margins``: mean of ``s_i - s_j`` over the same pairs;
      ``rewards/chosen`` and ``rewards/rejected``: mean reward of the best and of the
      worst valid response over the counted prompts (for K = 2 these four equal
      ``dpo_loss``'s); ``num_pairs``; ``num_prompts``: prompts counted in the loss.

    Raises:
      ValueError: a Python ``beta <= 0``.

    >>> logps = jnp.array([[-1.0, -3.0, -2.0, 0.0]])
    >>> ranks = jnp.array([[0, 2, 1, 3]])  # slot 3 is absent
    >>> valid = jnp.array([[1, 1, 1, 0]])
    >>> loss, m = plackett_luce_dpo_loss(logps, jnp.zeros((1, 4)), ranks, valid, beta=1.0)
    >>> print(round(float(loss), 4), float(m["rewards/accuracies"]), float(m["num_pairs"]))
    0.7209 1.0 3.0
    """
    chex.assert_rank([logps, ref_logps, ranks, valid], 2)
    chex.assert_equal_shape([logps, ref_logps, ranks, valid])
    _check_beta(beta)
    is_valid = jnp.asarray(valid) != 0  # [B, K]
    h = jnp.asarray(logps).astype(jnp.float32) - jnp.asarray(ref_logps).astype(jnp.float32)
    h = jnp.where(is_valid, h, 0.0)  # [B, K]; whatever sits in invalid slots is dropped
    s = jnp.asarray(beta, jnp.float32) * h  # [B, K] implicit rewards
    ranks = jnp.asarray(ranks)

    # Rank order, invalid slots last (argsort is stable: ties keep slot order).
    key = jnp.where(is_valid, ranks.astype(jnp.float32), jnp.inf)  # [B, K]
    order = jnp.argsort(key, axis=1)  # [B, K]
    s_sorted = jnp.take_along_axis(s, order, axis=1)  # [B, K]
    valid_sorted = jnp.take_along_axis(is_valid, order, axis=1)  # [B, K]
    # log sum_{j >= k} exp(s_(j)) over valid j only.  [B, K]
    suffix_lse = jax.lax.cumlogsumexp(jnp.where(valid_sorted, s_sorted, _LOG_ZERO), axis=1, reverse=True)
    log_lik = jnp.where(valid_sorted, s_sorted - suffix_lse, 0.0)  # [B, K], <= 0
    per_prompt = -jnp.sum(log_lik, axis=1)  # [B]
    n_valid = jnp.sum(valid_sorted, axis=1)  # [B]
    counted = (n_valid >= 2).astype(jnp.float32)  # [B]
    loss = ops.masked_mean(per_prompt, counted)

    # pairs[b, i, j]: slot i ranked strictly better than slot j, both valid.  [B, K, K]
    pairs = (is_valid[:, :, None] & is_valid[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])).astype(jnp.float32)
    diff = s[:, :, None] - s[:, None, :]  # [B, K, K]: s_i - s_j
    worst = jnp.take_along_axis(s_sorted, jnp.maximum(n_valid - 1, 0)[:, None], axis=1)[:, 0]  # [B]
    metrics = {
        "loss": loss,
        "rewards/accuracies": ops.masked_mean((diff > 0).astype(jnp.float32), pairs),
        "rewards/margins": ops.masked_mean(diff, pairs),
        "rewards/chosen": ops.masked_mean(s_sorted[:, 0], counted),
        "rewards/rejected": ops.masked_mean(worst, counted),
        "num_pairs": jnp.sum(pairs),
        "num_prompts": jnp.sum(counted),
    }
    return loss, metrics
