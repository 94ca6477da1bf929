"""PPO-ptx (InstructGPT) and its critic-free variants: the RL stage as pure functions, one
compiled call per iteration.

The objective (InstructGPT eq. 2)::

    objective(phi) = E_{(x,y) ~ pi_RL} [ r(x, y) - beta * log(pi_RL(y|x) / pi_SFT(y|x)) ]
                     + gamma * E_{x ~ D_pretrain} [ log pi_RL(x) ]

as a bandit: one prompt, one sampled response, the reward-model score at its EOS, a
per-token KL penalty ``-beta * (log pi - log pi_ref)`` at every response token, GAE with
discount 1. Each iteration is ``iteration(state, batch, ref_params, rm_params)``:

  * :func:`rollout`: sample with the policy (temperature T), then ONE scoring pass per
    model over prompt + response (minibatch by minibatch, in the update's minibatch shape):
    old log-probs (policy, same T), reference log-probs, values, and the RM score at the
    last real token (a fixed penalty without EOS); KL-shaped rewards, GAE, whitened advantages.
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
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses, ops, rl
from rlhf_jax.config import PPOHyperparams
from rlhf_jax.models import CausalLM, lora
from rlhf_jax.models.lm_head import auto_chunk, token_stats
from rlhf_jax.models.transformer import unembedding
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
from rlhf_jax.rewards import RewardSum
from rlhf_jax.sampling import generate
from rlhf_jax.sft import lm_objective


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


@flax.struct.dataclass
class Rollout:
    """One batch of episodes; every array is [B, ...] with R = max_new_tokens.

    sequences/sequence_mask [B, P+R]: prompt then response (with G > 1, rows n*G .. n*G+G-1
    answer prompt n); response_mask [B, R]; old_logprobs, ref_logprobs, rewards, advantages,
    kl: [B, R]; values, returns: [B, R] with a critic, None without; scores [B] (the weighted
    sum of the reward components, after the no-EOS penalty); score_components: name -> [B]
    unweighted component scores; has_eos [B].
    """

    sequences: jax.Array
    sequence_mask: jax.Array
    response_mask: jax.Array
    old_logprobs: jax.Array
    ref_logprobs: jax.Array
    values: jax.Array | None
    rewards: jax.Array
    advantages: jax.Array
    returns: jax.Array | None
    kl: jax.Array
    scores: jax.Array
    has_eos: jax.Array
    score_components: dict[str, jax.Array]


class ResponseOutputs(NamedTuple):
    """What one forward pass over prompt + response gives for the R response tokens.

    logprobs, entropy: [B, R] ``log pi(y_t | x, y_<t)`` and the entropy of ``pi(. | x, y_<t)``
    at the sampling temperature (None for a scalar-head model); values: [B, R], the value of
    the state before token t (None without a scalar head).
    """

    logprobs: jax.Array | None
    entropy: jax.Array | None
    values: jax.Array | None


def response_forward(
    model: CausalLM, params: Any, sequences: jax.Array, mask: jax.Array, prompt_len: int, temperature: float = 1.0
) -> ResponseOutputs:
    """One forward pass over prompt + response; position ``P - 1 + t`` predicts response token t.

    A large vocabulary's LM head runs in chunks (``models.lm_head``): the [B, R, V] logits
    of the rollout's scoring passes and of the update are never all in memory.
    """
    b, t = sequences.shape
    chunk = auto_chunk(b, t - prompt_len, model.config.vocab_size) if model.head != "scalar" else None
    out = model.apply(
        {"params": params},
        sequences,
        attention_mask=mask,
        head_slice=(prompt_len - 1, t - 1),
        compute_logits=chunk is None,
    )
    if model.head == "scalar":
        return ResponseOutputs(None, None, out.values)
    targets = sequences[:, prompt_len:]  # [B, R]
    if chunk is None:
        logits = out.logits / temperature  # [B, R, V]
        return ResponseOutputs(ops.gather_logprobs(logits, targets), ops.entropy_from_logits(logits), out.values)
    hidden = out.hidden_states[:, prompt_len - 1 : t - 1]  # [B, R, D]
    stats = token_stats(
        hidden, unembedding(params, model.config), targets, model.config, temperature=temperature, chunk=chunk
    )
    return ResponseOutputs(stats["logprob"], stats["entropy"], out.values)


def network_params(model: CausalLM, trainable: Any, base: Any) -> Any:
    """The params ``model`` is applied with: its ``trainable`` tree (full fine-tuning), or with
    LoRA (``model.config.lora``) the frozen ``base`` joined with the adapters (``models.lora``)."""
    return lora.with_base(None if model.config.lora is None else base, trainable)


def reference_model(policy: CausalLM) -> CausalLM:
    """The KL reference: the policy's LM head without adapters (applied to ``ref_params``)."""
    return lora.without_lora(policy.clone(head="lm"))


def as_reward(rm: Any) -> tuple[RewardSum, bool]:
    """``(reward, bare)``: a ``RewardSum`` for ``rm``; ``bare`` when ``rm`` was one reward model
    (its params are then one tree, not a tuple)."""
    if isinstance(rm, RewardSum):
        return rm, False
    return RewardSum(models=(rm,)), True


def check_networks(cfg: PPOHyperparams, policy: CausalLM, value: CausalLM | None) -> None:
    """A critic (a value network, or a policy with a shared value head) exactly when the estimator needs one."""
    head = getattr(policy, "head", "lm")
    if cfg.uses_critic:
        if value is None and head != "lm+scalar":
            raise ValueError("estimator 'gae' needs a value network, or a policy with a shared value head (lm+scalar)")
    elif value is not None or head != "lm":
        raise ValueError(
            f"estimator {cfg.estimator!r} is critic-free: pass value=None and a policy with an LM head "
            f"only (got value={type(value).__name__ if value is not None else None}, head={head!r})"
        )


def make_rollout(
    cfg: PPOHyperparams,
    policy: CausalLM,
    value: CausalLM | None,
    rm: CausalLM | RewardSum,
    *,
    eos_token_id: int,
    pad_token_id: int,
) -> Callable:
    """``rollout(state, prompt_ids [N,P], prompt_mask [N,P], ref_params, rm_params) -> Rollout``.

    N = ``cfg.num_prompts``: each prompt is sampled ``cfg.group_size`` times, B = N x G episodes.
    ``rm``: one scalar-head reward model (``rm_params`` its params) or a ``rewards.RewardSum``
    (``rm_params`` a tuple, one tree per reward model). With LoRA the policy is ``ref_params``
    joined with ``state.policy.params`` (the adapters), and a LoRA value network's base is the
    first reward model's params: each base is in memory once.
    """
    check_networks(cfg, policy, value)
    reward, bare = as_reward(rm)
    group = cfg.group_size

    def rollout(state: PPOState, prompt_ids, prompt_mask, ref_params, rm_params) -> Rollout:
        if prompt_ids.shape[0] * group != cfg.batch_size:
            raise ValueError(
                f"rollout: {prompt_ids.shape[0]} prompts x group_size {group} != batch_size "
                f"{cfg.batch_size} episodes; pass batch_size / group_size = {cfg.num_prompts} prompts"
            )
        if group > 1:  # [N, P] -> [N*G, P]: rows n*G .. n*G+G-1 are prompt n
            prompt_ids, prompt_mask = jnp.repeat(prompt_ids, group, axis=0), jnp.repeat(prompt_mask, group, axis=0)
        rm_tuple = (rm_params,) if bare else tuple(rm_params)
        policy_params = network_params(policy, state.policy.params, ref_params)
        p = prompt_ids.shape[1]
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.iteration)
        gen = generate(
            policy,
            policy_params,
            prompt_ids,
            prompt_mask,
            key,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            with_logprobs=False,
        )
        seq = jnp.concatenate([prompt_ids, gen.tokens], axis=1)  # [B, P+R]
        seq_mask = jnp.concatenate([prompt_mask.astype(jnp.int32), gen.mask], axis=1)
        resp_mask = gen.mask.astype(jnp.float32)  # [B, R]

        def score_minibatch(xs):  # [mb, P+R] -> old/ref log-probs, values [mb, R]; reward components [mb]
            s, m = xs
            pol = response_forward(policy, policy_params, s, m, p, cfg.temperature)
            ref = response_forward(reference_model(policy), ref_params, s, m, p, cfg.temperature)
            out = {
                "old_logprobs": pol.logprobs,
                "ref_logprobs": ref.logprobs,
                "components": reward.components(rm_tuple, s, m, p),
            }
            if cfg.uses_critic:
                if value is None:
                    out["values"] = pol.values
                else:
                    value_params = network_params(value, state.value.params, rm_tuple[0])
                    out["values"] = response_forward(value, value_params, s, m, p).values
            return out

        # Scored minibatch by minibatch, with the update's minibatch shape: XLA's rounding can
        # depend on the batch dimension, and the ratio must be exactly 1 on the first minibatch.
        # Strided rows (minibatch i = rows i, i + n, ...) keep every minibatch spread over the
        # batch-sharded devices.
        n_mb, mb_size = cfg.num_minibatches, cfg.minibatch_size

        def split(x):  # [B, ...] -> [n_mb, mb, ...]
            return x.reshape(mb_size, n_mb, *x.shape[1:]).swapaxes(0, 1)

        def merge(x):  # [n_mb, mb, ...] -> [B, ...]
            return x.swapaxes(0, 1).reshape(n_mb * mb_size, *x.shape[2:])

        outs = jax.tree.map(merge, jax.lax.map(score_minibatch, (split(seq), split(seq_mask))))
        old_logprobs, ref_logprobs, values = outs["old_logprobs"], outs["ref_logprobs"], outs.get("values")
        scores = reward.total(outs["components"])  # [B]

        has_eos = jnp.any((gen.tokens == eos_token_id) & (gen.mask > 0), axis=1)  # [B]
        if cfg.no_eos_penalty is not None:
            scores = jnp.where(has_eos, scores, cfg.no_eos_penalty)
        # KL in the reward: -beta * KL_t at every token (InstructGPT); in the loss: the plain score
        kl_coef = 0.0 if cfg.kl_in_loss else state.kl_coef
        rewards, kl = rl.kl_shaped_rewards(
            scores, old_logprobs, ref_logprobs, resp_mask, kl_coef=kl_coef, kind=cfg.kl_estimator
        )
        if cfg.whiten_rewards and cfg.estimator in ("gae", "reinforce_pp"):  # per-token rewards only
            rewards = ops.masked_whiten(rewards, resp_mask, shift_mean=False)
        returns = None
        if cfg.estimator == "gae":
            advantages, returns = rl.gae(rewards, values * resp_mask, resp_mask, gamma=cfg.gamma, lam=cfg.lam)
            advantages = ops.masked_whiten(advantages, resp_mask, shift_mean=True)
        elif cfg.estimator == "reinforce_pp":
            advantages = rl.reinforce_pp_advantages(rewards, resp_mask)
        else:  # a group baseline on each response's total reward, broadcast over its real tokens
            seq_rewards = jnp.sum(rewards * resp_mask, axis=1)  # [B] = score (- beta * sum_t KL_t in the reward)
            seq_adv = rl.group_advantages(seq_rewards.reshape(-1, group), estimator=cfg.estimator)  # [N, G]
            advantages = seq_adv.reshape(-1)[:, None] * resp_mask  # [B, R]
        return Rollout(
            sequences=seq,
            sequence_mask=seq_mask,
            response_mask=resp_mask,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            values=values,
            rewards=rewards,
            advantages=advantages,
            returns=returns,
            kl=kl,
            scores=scores,
            has_eos=has_eos,
            score_components=outs["components"],
        )

    return rollout


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
