"""The reward model: the SFT network with a scalar head, trained on K-way rankings.

InstructGPT eq. 1: for each prompt, all C(K,2) ordered pairs of its K ranked responses
form ONE batch element, so a prompt costs K forward passes (not C(K,2)) and no response
is seen K-1 times per epoch. The score r(x, y) is read at the last real token of the
response (its EOS), never at a pad. After training a bias is set so that the labelers'
demonstrations score mean 0 (the loss is shift-invariant; only the scale the KL
coefficient is measured against changes); it is stored in the run's model.json and
added to the score head whenever the run is loaded. The driver is ``rlhf_jax.drivers.run_rm``.

Batches: ``input_ids`` / ``attention_mask`` [B, K, L] (prompt + response + EOS, right
padded), ``ranks`` [B, K] (0 = best), ``valid`` [B, K], ``end_index`` [B, K]; the trainer
packs them (``data.pack_ranking_slots``): the valid slots' sequences, several to a row,
[R, L] with ``segment_ids`` / ``position_ids``; ``end_index`` [S] (flat positions in
[R * L]) and ``slot`` [S]; ``ranks`` and ``valid`` unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import losses, ops, rl
from rlhf_jax.config import RewardHyperparams
from rlhf_jax.models import CausalLM, lora
from rlhf_jax.optim import TrainState, all_finite, gradient_step
from rlhf_jax.sampling import GenerationOutput, generate


def score_sequences(model: CausalLM, params: Any, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """r(x, y) of each sequence [B, T]: the scalar head at the last real token -> [B]."""
    values = model.apply({"params": params}, input_ids, attention_mask=attention_mask).values  # [B, T]
    last = ops.last_token_index(attention_mask)  # [B]
    return jnp.take_along_axis(values, last[:, None], axis=1)[:, 0]


def ranking_rewards(model: CausalLM, params: Any, batch: dict) -> jax.Array:
    """Scores of every response slot: one forward pass per response -> [B, K].

    A batch packed by ``data.pack_ranking_slots`` (it has ``slot``) holds only the real
    responses, several to a row [R, L] told apart by ``segment_ids``; the score of each is
    read at its ``end_index`` (a flat position in [R * L]) and scattered back to its slot,
    and the empty slots score 0 (the ranking loss never reads them).
    """
    if "slot" in batch:
        b, k = batch["ranks"].shape
        values = model.apply(
            {"params": params},
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            segment_ids=batch["segment_ids"],
            position_ids=batch["position_ids"],
        ).values  # [R, L]
        scores = values.reshape(-1)[batch["end_index"]]  # [S]
        return jnp.zeros((b * k,), scores.dtype).at[batch["slot"]].set(scores, mode="drop").reshape(b, k)
    b, k, length = batch["input_ids"].shape
    flat_ids = batch["input_ids"].reshape(b * k, length)  # [B*K, L]
    flat_mask = batch["attention_mask"].reshape(b * k, length)
    values = model.apply({"params": params}, flat_ids, attention_mask=flat_mask).values  # [B*K, L]
    end = batch["end_index"].reshape(b * k)
    return jnp.take_along_axis(values, end[:, None], axis=1).reshape(b, k)  # [B, K]


def reward_objective(model: CausalLM, params: Any, batch: dict, hparams: RewardHyperparams = RewardHyperparams()):
    """K-way ranking loss of the batch's scores; metrics add the ``finite/reward`` flag."""
    rewards = ranking_rewards(model, params, batch)  # [B, K]
    loss, metrics = losses.k_way_ranking_loss(
        rewards, batch["ranks"], batch["valid"], margin=hparams.margin, center_coef=hparams.center_coef
    )
    return loss, {**metrics, "finite/reward": all_finite(rewards)}


def make_train_step(
    model: CausalLM, optimizer: optax.GradientTransformation, hparams: RewardHyperparams = RewardHyperparams()
) -> Callable:
    """``step(state, batch, base=None) -> (state, metrics)``; skipped when the scores, loss or
    gradients are not finite. With LoRA, ``state.params`` is the trainable tree (adapters and the
    score head) and ``base`` the frozen weights (``models.lora.with_base``)."""

    def train_step(state: TrainState, batch: dict, base: Any = None):
        return gradient_step(
            state, lambda params: reward_objective(model, lora.with_base(base, params), batch, hparams), optimizer
        )

    return train_step


def make_eval_step(model: CausalLM) -> Callable:
    """``eval_step(params, batch) -> metrics`` (ranking loss, pair accuracy, num_pairs, ...) without the flags."""

    def eval_step(params: Any, batch: dict):
        metrics = reward_objective(model, params, batch)[1]
        return {k: v for k, v in metrics.items() if not k.startswith("finite/")}

    return eval_step


def demonstration_bias(model: CausalLM, params: Any, dataset: Any, *, batch_size: int = 32) -> float:
    """The bias that makes the demonstrations (prompt + response + EOS) score mean 0 (host loop)."""
    score = jax.jit(lambda p, ids, m: score_sequences(model, p, ids, m))
    ids, mask = dataset.arrays["input_ids"], dataset.arrays["attention_mask"]
    scores = [
        np.asarray(score(params, ids[i : i + batch_size], mask[i : i + batch_size]))
        for i in range(0, len(ids), batch_size)
    ]
    return float(rl.reward_bias(jnp.asarray(np.concatenate(scores))))


def sample_and_score(
    policy: CausalLM,
    policy_params: Any,
    rm: CausalLM,
    rm_params: Any,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int,
    pad_token_id: int,
) -> tuple[GenerationOutput, jax.Array]:
    """Sample a response per prompt and score prompt + response with the RM.

    Args:
      prompt_ids, prompt_mask: [B, P] (left- or right-padded).
      temperature: 0 = greedy.

    Returns:
      (the generation, with tokens and mask [B, R]; RM scores [B] read at each sequence's
      last real token, the EOS when one was emitted).
    """
    gen = generate(
        policy,
        policy_params,
        prompt_ids,
        prompt_mask,
        key,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        with_logprobs=False,
    )
    sequences = jnp.concatenate([prompt_ids, gen.tokens], axis=1)  # [B, P+R]
    mask = jnp.concatenate([prompt_mask.astype(jnp.int32), gen.mask], axis=1)
    return gen, score_sequences(rm, rm_params, sequences, mask)
