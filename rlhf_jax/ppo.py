"""PPO-ptx (InstructGPT) and its critic-free variants: the RL stage as pure functions, one
compiled call per iteration.

The objective (InstructGPT eq. 2)::

    objective(phi) = E_{(x,y) ~ pi_RL} [ r(x, y) - beta * log(pi_RL(y|x) / pi_SFT(y|x)) ]
                     + gamma * E_{x ~ D_pretrain} [ log pi_RL(x) ]

as a bandit: one prompt, one sampled response, the reward-model score at its EOS, a
per-token KL penalty ``-beta * (log pi - log pi_ref)`` at every response token, GAE with
discount 1. Each iteration is ``iteration(state, batch, ref_params, rm_params)``:

  * the rollout (``rlhf_jax.rollout``, re-exported here): sample, score once per model,
    KL-shaped rewards, advantages.
  * :func:`update`: ``ppo_epochs x minibatches`` as ``lax.scan``: clipped policy loss +
    ``ptx_coef`` x the LM loss on a pretraining minibatch (one gradient, one update),
    clipped value loss on the value network, EMA of the policy weights, and the
    adaptive KL coefficient (an array in the state, never a compile-time constant).

Old log-probs are computed by the very function the update uses (``response_forward``),
on minibatches of the update's shape, and the update recomputes
(rematerialises) that forward instead of fusing it with its backward pass, so the
probability ratio is exactly 1 on the first minibatch. Dropout is off in every RL pass.

Advantage estimators (``PPOHyperparams.estimator``): ``"gae"`` above (value network), or
critic-free: ``"grpo"`` / ``"dr_grpo"`` / ``"rloo"`` sample ``group_size`` responses per prompt
inside the same compiled iteration (each prompt repeated G times: episodes = prompts x G) and
use ``rl.group_advantages`` of the sequence rewards reshaped ``[N, G]``, broadcast over each
response's real tokens; ``"reinforce_pp"`` uses ``rl.reinforce_pp_advantages`` of the per-token
rewards. Critic-free runs have no value network: ``PPOState.value`` is None, no value loss,
no ``val/*`` metrics. With the KL in the loss (``kl_in="loss"``, the grpo family's default)
the reward is the plain score and the policy loss adds ``kl_coef`` x the KL estimate
(k3 by default) aggregated like the policy loss, logged as ``loss/kl``.

The score may combine several reward models and rule rewards (``rewards.RewardSum``), each
logged as ``objective/scores/<name>``.

LoRA (``policy.config.lora``): ``state.policy.params`` and the EMA hold the adapters only; the
frozen base is ``ref_params``, so the reference log-probs are the base model's, computed by the
plain model (``reference_model``). A LoRA value network trains adapters and its score head on
the first reward model's params. Gradients and optimizer state exist for the trainable trees only.

Non-finite values: an iteration whose rollout has non-finite RM scores (``reward``),
log-probs (``logits``), advantages or returns changes nothing: the state comes back bitwise,
iteration counter included. A minibatch whose losses or gradients are not all finite stops
the update there: its optimizer step and every later one of the iteration are skipped, the
earlier ones stand, and neither the KL coefficient nor the iteration counter moves. The choice is made inside the
minibatch scan, step by step, so that XLA updates the state in place: skipping the whole
iteration would keep a second copy of every parameter, moment and EMA alive (3.6 GB for
SmolLM2-135M's policy and value network).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses, ops, rl
from rlhf_jax.config import PPOHyperparams
from rlhf_jax.models import CausalLM
from rlhf_jax.optim import (
    TrainState,
    all_finite,
    apply_gradients,
    blame_first_nonfinite,
    init_train_state,
    nonfinite_metrics,
    norm_finite,
    select_state,
)
from rlhf_jax.rollout import (  # the rollout half; re-exported, so `from rlhf_jax.ppo import make_rollout` works
    ResponseOutputs,
    Rollout,
    as_reward,
    check_networks,
    make_rollout,
    network_params,
    reference_model,
    response_forward,
)
from rlhf_jax.sft import lm_objective

__all__ = [
    "PPOState",
    "ResponseOutputs",
    "Rollout",
    "aggregate",
    "as_reward",
    "check_networks",
    "init_ppo_state",
    "make_iteration",
    "make_rollout",
    "make_update",
    "network_params",
    "ppo_objective",
    "reference_model",
    "response_forward",
]


@flax.struct.dataclass
class PPOState:
    """Everything that changes during PPO.

    Attributes:
      policy: TrainState of the policy (its step counts optimizer steps).
      value: TrainState of the value network (None with a shared value head or a critic-free estimator).
      ema_params: EMA of the policy params (used for evaluation and export).
      kl_coef: float32 scalar, beta (adapted when the controller is on).
      iteration: int32 scalar, PPO iterations completed.
      rng: uint32 [2] key data for rollouts.
    """

    policy: TrainState
    value: TrainState | None
    ema_params: Any
    kl_coef: jax.Array
    iteration: jax.Array
    rng: jax.Array


def aggregate(per_token: jax.Array, mask: jax.Array, aggregation: str) -> jax.Array:
    """Reduce ``[B, R]`` over real tokens as ``losses.ppo_policy_loss(aggregation=...)`` does."""
    if aggregation == "token_mean":
        return ops.masked_mean(per_token, mask)
    if aggregation == "sequence_mean":
        has_tokens = (jnp.sum(mask != 0, axis=1) > 0).astype(jnp.float32)  # [B]
        return ops.masked_mean(ops.masked_mean(per_token, mask, axis=1), has_tokens)
    return ops.masked_sum(per_token, mask) / (per_token.shape[0] * per_token.shape[1])  # token_sum


def ppo_objective(
    cfg: PPOHyperparams,
    policy: CausalLM,
    value: CausalLM | None,
    policy_params,
    value_params,
    mb: dict,
    ptx: dict | None,
    prompt_len: int,
    *,
    kl_coef: float | jax.Array = 0.0,
):
    """policy loss [+ kl_coef * KL] + vf_coef * value loss + ptx_coef * ptx loss.

    The value term only with a critic (in ``policy_total`` with a shared head); the KL term
    only with ``cfg.kl_in_loss`` (``mb`` then holds ``ref_logprobs``): the ``cfg.kl_estimator``
    estimate of KL(pi || pi_ref) on the sampled tokens, aggregated like the policy loss.
    Returns (policy_total, (value_total, metrics)) so the two networks can take separate
    gradients; metrics hold the ``finite/logits`` and ``finite/loss`` flags.
    """
    # Rematerialised: inside value_and_grad, XLA would otherwise fuse the forward differently
    # (residuals kept for the backward pass) and round it differently from the rollout's
    # forward-only pass; recomputed, the forward is the same program, so the first
    # minibatch's ratio is exactly 1 (Llama-style models differ by ~1e-7 without it).
    forward = lambda pp: response_forward(
        policy,
        pp,
        mb["sequences"],
        mb["sequence_mask"],
        prompt_len,  # noqa: E731
        cfg.temperature,
    )
    if cfg.exact_ratio:
        forward = jax.checkpoint(forward)
    logprobs, entropy, shared_values = forward(policy_params)
    mask = mb["response_mask"]
    pg_loss, pg_metrics = losses.ppo_policy_loss(
        logprobs, mb["old_logprobs"], mb["advantages"], mask, clip_eps=cfg.clip_eps, aggregation=cfg.policy_aggregation
    )
    ratio = jnp.exp(logprobs - mb["old_logprobs"])
    metrics = {
        "loss/policy": pg_loss,
        "ppo/clipfrac": pg_metrics["clipfrac"],
        "ppo/approx_kl": pg_metrics["approx_kl"],
        "ppo/ratio_mean": ops.masked_mean(ratio, mask),
        "ppo/ratio_max_dev": jnp.max(jnp.abs(ratio - 1.0) * mask),
        "objective/entropy": ops.masked_mean(entropy, mask),
    }
    policy_total = pg_loss
    if cfg.kl_in_loss:  # DeepSeekMath: + beta * KL(pi || pi_ref), k3 on the sampled tokens
        kl_tokens = losses.kl_penalty(logprobs, mb["ref_logprobs"], kind=cfg.kl_estimator)
        kl_loss = aggregate(jnp.where(mask != 0, kl_tokens, 0.0), mask, cfg.policy_aggregation)
        metrics["loss/kl"] = kl_loss
        policy_total = policy_total + kl_coef * kl_loss
    value_total = jnp.zeros((), jnp.float32)
    if cfg.uses_critic:
        if value is None:
            new_values = shared_values
        else:
            new_values = response_forward(value, value_params, mb["sequences"], mb["sequence_mask"], prompt_len).values
        vf_loss, vf_metrics = losses.value_loss(new_values, mb["values"], mb["returns"], mask, clip_eps=cfg.vf_clip_eps)
        metrics["loss/value"] = vf_loss
        metrics["val/clipfrac"] = vf_metrics.get("vf_clipfrac", 0.0)
        value_total = cfg.vf_coef * vf_loss
    logits_ok = all_finite(logprobs)
    if ptx is not None and cfg.ptx_coef > 0:
        ptx_loss, ptx_metrics = lm_objective(policy, policy_params, ptx)
        metrics["loss/ptx"] = ptx_loss
        logits_ok &= ptx_metrics["finite/logits"]
        policy_total = policy_total + cfg.ptx_coef * ptx_loss
    if cfg.uses_critic and value is None:
        policy_total = policy_total + value_total
    metrics["finite/logits"] = logits_ok
    metrics["finite/loss"] = all_finite((policy_total, value_total))
    return policy_total, (value_total, metrics)


def make_update(
    cfg: PPOHyperparams,
    policy: CausalLM,
    value: CausalLM | None,
    policy_opt: optax.GradientTransformation,
    value_opt: optax.GradientTransformation | None,
) -> Callable:
    """``update(state, rollout, ptx_batch | None, policy_base, value_base) -> (state, metrics)``:
    epochs x minibatches scans. The bases (LoRA's frozen weights; None for full fine-tuning)
    are joined with the trainable trees the gradients are taken with respect to.

    ``proceed`` (bool scalar, default True): False skips every optimizer step (a non-finite
    rollout). Otherwise the first minibatch with a non-finite loss or gradient and every later
    one are skipped (``optim.select_state`` inside the scan, so the state is updated in place).

    Metrics are means over the minibatches, except the ``finite/*`` flags: those of the first
    minibatch with a non-finite quantity, all True when every minibatch was finite.
    """
    n_mb, mb_size = cfg.num_minibatches, cfg.minibatch_size

    def guarded_step(carry, xs, policy_base, value_base):
        state, proceed = carry
        new_state, metrics = minibatch_step(state, xs, policy_base, value_base)
        take = proceed & jnp.stack([jnp.asarray(v, bool) for k, v in metrics.items() if k.startswith("finite/")]).all()
        return (select_state(take, new_state, state), take), metrics

    def minibatch_step(state: PPOState, xs, policy_base, value_base):
        mb, ptx = xs
        p = mb["sequences"].shape[1] - cfg.max_new_tokens
        full_policy = lambda pp: network_params(policy, pp, policy_base)  # noqa: E731

        if value is None:
            grad_fn = jax.value_and_grad(
                lambda pp: ppo_objective(cfg, policy, None, full_policy(pp), None, mb, ptx, p, kl_coef=state.kl_coef),
                has_aux=True,
            )
            (_, (_, metrics)), p_grads = grad_fn(state.policy.params)
            new_value = None
        else:

            def joint(pp, vp):
                vp = network_params(value, vp, value_base)
                pol, (val, metrics) = ppo_objective(
                    cfg, policy, value, full_policy(pp), vp, mb, ptx, p, kl_coef=state.kl_coef
                )
                return pol + val, metrics  # disjoint params: d/dpp sees pol, d/dvp sees val

            (_, metrics), (p_grads, v_grads) = jax.value_and_grad(joint, argnums=(0, 1), has_aux=True)(
                state.policy.params, state.value.params
            )
            new_value = apply_gradients(state.value, v_grads, value_opt)
            metrics["val/grad_norm"] = optax.tree.norm(v_grads)
        metrics["ppo/grad_norm"] = optax.tree.norm(p_grads)
        metrics["finite/grads"] = norm_finite(metrics["ppo/grad_norm"]) & norm_finite(metrics.get("val/grad_norm", 0.0))
        new_policy = apply_gradients(state.policy, p_grads, policy_opt)
        ema = jax.tree.map(
            lambda e, w: cfg.ema_decay * e + (1.0 - cfg.ema_decay) * w, state.ema_params, new_policy.params
        )
        return state.replace(policy=new_policy, value=new_value, ema_params=ema), metrics

    def update(state: PPOState, ro: Rollout, ptx_batch: dict | None, policy_base=None, value_base=None, proceed=True):
        fields = ["sequences", "sequence_mask", "response_mask", "old_logprobs", "advantages"]
        fields += ["values", "returns"] if cfg.uses_critic else []
        fields += ["ref_logprobs"] if cfg.kl_in_loss else []
        data = {k: getattr(ro, k) for k in fields}
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.iteration + (1 << 30))

        def epoch(carry, epoch_idx):
            perm = jax.random.permutation(jax.random.fold_in(key, epoch_idx), cfg.batch_size)
            shuffled = jax.tree.map(lambda x: x[perm].reshape(n_mb, mb_size, *x.shape[1:]), data)
            ptx = None
            if ptx_batch is not None:  # [E * n_mb * rows, T] -> this epoch's [n_mb, rows, T]
                ptx = jax.tree.map(lambda x: x.reshape(cfg.ppo_epochs, n_mb, -1, *x.shape[1:])[epoch_idx], ptx_batch)
            step = functools.partial(guarded_step, policy_base=policy_base, value_base=value_base)
            return jax.lax.scan(step, carry, (shuffled, ptx))

        (state, _), metrics = jax.lax.scan(epoch, (state, jnp.asarray(proceed)), jnp.arange(cfg.ppo_epochs))
        flags = {k: v.reshape(-1) for k, v in metrics.items() if k.startswith("finite/")}  # [E * n_mb] each
        out = {k: jnp.mean(v) for k, v in metrics.items() if not k.startswith("finite/")}
        return state, out | blame_first_nonfinite(flags)

    return update


def make_iteration(
    cfg: PPOHyperparams,
    policy: CausalLM,
    value: CausalLM | None,
    rm: CausalLM,
    policy_opt: optax.GradientTransformation,
    value_opt: optax.GradientTransformation | None,
    *,
    eos_token_id: int,
    pad_token_id: int,
) -> Callable:
    """``iteration(state, batch, ref_params, rm_params) -> (state, metrics)``: rollout + update + KL control.

    ``batch``: ``prompt_ids``/``prompt_mask`` [N, P] (N = batch_size / group_size); with ptx also ``ptx_input_ids``,
    ``ptx_attention_mask``, ``ptx_loss_mask`` [E * n_minibatches * rows, T]. An iteration with
    a non-finite score, log-prob or advantage returns ``state`` bitwise; a non-finite loss or
    gradient skips that minibatch's step and the later ones (see the module docstring); the
    metrics name the first quantity that was not finite.
    """
    rollout_fn = make_rollout(cfg, policy, value, rm, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    reward, bare = as_reward(rm)
    update_fn = make_update(cfg, policy, value, policy_opt, value_opt)

    def iteration(state: PPOState, batch: dict, ref_params: Any, rm_params: Any):
        ro = rollout_fn(state, batch["prompt_ids"], batch["prompt_mask"], ref_params, rm_params)
        ptx = None
        if "ptx_input_ids" in batch:
            ptx = {k[len("ptx_") :]: v for k, v in batch.items() if k.startswith("ptx_")}
        first_rm = rm_params if bare else rm_params[0]  # a LoRA value network's base
        # The rollout's checks come first; the update's are blamed only when the rollout was finite.
        rollout = {
            "reward": all_finite((ro.scores, ro.score_components)),
            "logits": all_finite((ro.old_logprobs, ro.ref_logprobs)),
            "advantages": all_finite((ro.advantages, ro.returns)),
        }
        rollout_ok = jnp.stack(list(rollout.values())).all()
        new_state, metrics = update_fn(state, ro, ptx, ref_params, first_rm, proceed=rollout_ok)

        mask = ro.response_mask
        seq_kl = jnp.sum(ro.kl * mask, axis=1)  # [B] KL(pi || pi_ref) of each episode (k-estimator sums)
        mean_kl = jnp.mean(seq_kl)
        kl_coef = state.kl_coef
        if cfg.adaptive_kl:
            kl_coef = rl.update_kl_coef(kl_coef, mean_kl, cfg.batch_size, target=cfg.kl_target, horizon=cfg.kl_horizon)
        metrics.update(
            {
                "objective/kl": mean_kl,
                "objective/scores": jnp.mean(ro.scores),
                "objective/rlhf_reward": jnp.mean(ro.scores - state.kl_coef * seq_kl),
                "objective/non_score_reward": jnp.mean(jnp.sum(ro.rewards * mask, axis=1) - ro.scores),
                "episode/response_length": jnp.mean(jnp.sum(mask, axis=1)),
                "episode/eos_rate": jnp.mean(ro.has_eos.astype(jnp.float32)),
                "kl_coef": state.kl_coef,
            }
        )
        if len(reward.names) > 1:  # each reward's unweighted mean score
            metrics.update({f"objective/scores/{n}": jnp.mean(v) for n, v in ro.score_components.items()})
        if cfg.uses_critic:
            returns_var = ops.masked_var(ro.returns, mask)
            metrics["val/explained_variance"] = 1.0 - ops.masked_var(ro.returns - ro.values, mask) / (
                returns_var + 1e-8
            )
            metrics["val/mean"] = ops.masked_mean(ro.values, mask)
        update = {k[len("finite/") :]: metrics.pop(k) for k in list(metrics) if k.startswith("finite/")}
        names = list(dict.fromkeys([*rollout, *update]))
        true = jnp.asarray(True)
        in_order = {f"finite/{n}": jnp.stack([rollout.get(n, true), update.get(n, true)]) for n in names}  # [2] each
        finite, metrics = nonfinite_metrics(metrics | blame_first_nonfinite(in_order))
        # The update skipped its own non-finite steps in place; the counters follow the iteration's
        # verdict (a non-finite rollout leaves new_state == state bitwise).
        new_state = new_state.replace(
            kl_coef=jnp.where(finite, kl_coef, state.kl_coef),
            iteration=jnp.where(finite, state.iteration + 1, state.iteration),
        )
        return new_state, metrics

    return iteration


def init_ppo_state(
    policy_params: Any, value_params: Any | None, policy_opt, value_opt, *, kl_coef: float, seed: int
) -> PPOState:
    """The state before the first iteration; the reference policy and the RM are not part of it."""
    return PPOState(
        policy=init_train_state(policy_params, policy_opt, seed),
        value=None if value_params is None else init_train_state(value_params, value_opt, seed + 1),
        ema_params=jax.tree.map(lambda x: jnp.array(x, copy=True), policy_params),  # own buffers (donation)
        kl_coef=jnp.asarray(kl_coef, jnp.float32),
        iteration=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed + 2)),
    )
