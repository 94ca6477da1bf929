"""PPO's rollout: sample episodes with the policy, score them once, shape rewards, estimate advantages.

``make_rollout(...)(state, prompt_ids, prompt_mask, ref_params, rm_params) -> Rollout`` samples
with the policy (temperature T), then makes ONE scoring pass per model over prompt + response
(minibatch by minibatch, in the update's minibatch shape): old log-probs (policy, same T),
reference log-probs, values, and the RM score at the last real token (a fixed penalty without
EOS); then KL-shaped rewards and the advantages of ``PPOHyperparams.estimator`` (GAE with
whitening, a group baseline, or REINFORCE++). :func:`response_forward` is the one forward pass
both the rollout and the update (``rlhf_jax.ppo``) use, so their log-probs round identically.

LoRA: the policy is its frozen base (``ref_params``, also the KL reference, applied by
:func:`reference_model`) joined with the adapters; a LoRA value network's base is the first
reward model's params (:func:`network_params`). Each base is in memory once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax import ops, rl
from rlhf_jax.config import PPOHyperparams
from rlhf_jax.models import CausalLM, lora
from rlhf_jax.models.lm_head import auto_chunk, token_stats
from rlhf_jax.models.transformer import unembedding
from rlhf_jax.rewards import RewardSum
from rlhf_jax.sampling import generate

if TYPE_CHECKING:
    from rlhf_jax.ppo import PPOState


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
