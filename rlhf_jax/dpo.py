"""Direct preference optimisation on K-way rankings: the stage's objective and pure steps.

DPO (Rafailov et al. 2023, arXiv 2305.18290) trains the policy directly on comparisons,
with the implicit reward ``r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))`` against a
frozen reference (the SFT model the policy starts from). No reward model, no sampling.
A prompt's K ranked responses enter the loss in one of two ways (``DPOHyperparams.k_way``):

* ``"pl"``: the Plackett-Luce likelihood of the whole ranking (DPO appendix A.3,
  ``losses.plackett_luce_dpo_loss``); for K = 2 it is DPO's sigmoid loss.
* ``"pairs"``: ``losses.dpo_loss`` on each of the prompt's C(K,2) ordered pairs (ties
  excluded), averaged per prompt and then over prompts: InstructGPT's batching, all pairs
  of a prompt in one batch element, K forward passes instead of C(K,2). IPO, hinge and
  label smoothing are defined here.

Batches (from ``data.tokenize_rankings``): ``input_ids`` / ``attention_mask`` [B, K, L]
(prompt + response + EOS, right padded), ``ranks`` [B, K] (0 = best), ``valid`` [B, K],
``prompt_len`` [B] (the response starts at that position in every slot), and
``ref_logps`` [B, K] (the reference's :func:`sequence_logps`, computed once before
training: see ``rlhf_jax.drivers.run_dpo``). Without ``ref_logps`` the steps take the
reference params and compute them on the fly. Dropout is off: a response's log-prob must
be the same number under the policy's training pass as under the reference pass.
The driver (data, reference pass, mesh, loop, checkpoints) is ``rlhf_jax.drivers.run_dpo``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import losses, ops
from rlhf_jax.config import DPOHyperparams
from rlhf_jax.models import CausalLM
from rlhf_jax.optim import TrainState, gradient_step, logits_finite


def response_mask(attention_mask: jax.Array, prompt_len: jax.Array) -> jax.Array:
    """1 where token t of a slot is a response token (prompt_len <= t, a real token) -> [B, K, L].

    The response's EOS is included; the prompt and the padding are not. Token t is
    predicted from position t - 1, so target ``t`` of ``sequence_logps`` uses this mask at t.
    """
    positions = jnp.arange(attention_mask.shape[-1])  # [L]
    after_prompt = positions[None, None, :] >= prompt_len[:, None, None]  # [B, 1, L]
    return (after_prompt & (attention_mask > 0)).astype(jnp.int32)  # [B, K, L]


def _logps_and_finite(model: CausalLM, params: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
    b, k, length = batch["input_ids"].shape
    ids = batch["input_ids"].reshape(b * k, length)  # [B*K, L]
    mask = batch["attention_mask"].reshape(b * k, length)
    logits = model.apply({"params": params}, ids, attention_mask=mask, head_slice=(0, length - 1)).logits
    token_logps = ops.gather_logprobs(logits, ids[:, 1:])  # [B*K, L-1]: position t predicts token t + 1
    targets = response_mask(batch["attention_mask"], batch["prompt_len"]).reshape(b * k, length)[:, 1:] > 0
    logps = jnp.sum(jnp.where(targets, token_logps, 0.0), axis=1).reshape(b, k)  # [B, K]
    return logps, logits_finite(logits)


def sequence_logps(model: CausalLM, params: Any, batch: dict) -> jax.Array:
    """``log pi(y | x)`` of every response slot: summed log-probs of its response tokens -> [B, K].

    One forward pass over the B*K sequences; the prompt tokens and the padding count 0 (an
    invalid slot, all padding, gives exactly 0). The response's EOS is part of it.
    """
    return _logps_and_finite(model, params, batch)[0]


def ranking_dpo_loss(
    logps: jax.Array,
    ref_logps: jax.Array,
    ranks: jax.Array,
    valid: jax.Array,
    hparams: DPOHyperparams = DPOHyperparams(),
) -> tuple[jax.Array, dict]:
    """The DPO loss of K ranked responses per prompt, Plackett-Luce or all pairs (``hparams.k_way``).

    Args:
      logps, ref_logps: [B, K] summed response log-probs under the policy and the reference.
      ranks: [B, K] int, 0 = best; ties carry no order.
      valid: [B, K], 1 = a real response.

    Returns:
      (loss, metrics): TRL's names ``loss``, ``rewards/chosen``, ``rewards/rejected``,
      ``rewards/accuracies``, ``rewards/margins``, plus ``num_pairs`` and ``num_prompts``.
      ``"pl"``: chosen / rejected are the best and worst response of each counted prompt.
      ``"pairs"``: the loss is the mean over prompts of each prompt's mean over its ordered
      pairs; accuracies, margins, chosen and rejected are means over all pairs.
    """
    is_valid = jnp.asarray(valid) != 0
    logps = jnp.where(is_valid, logps, 0.0)  # whatever sits in invalid slots never enters
    ref_logps = jnp.where(is_valid, ref_logps, 0.0)
    if hparams.k_way == "pl":
        return losses.plackett_luce_dpo_loss(logps, ref_logps, ranks, is_valid, beta=hparams.beta)
    i, j = np.triu_indices(logps.shape[1], 1)  # [P] static: every unordered slot pair
    ri, rj = ranks[:, i], ranks[:, j]  # [B, P]
    pair = is_valid[:, i] & is_valid[:, j] & (ri != rj)  # [B, P]: an ordered pair of real responses
    i_wins = ri < rj

    def pick(x):  # [B, K] -> (winner, loser) values, each [B*P]
        xi, xj = x[:, i], x[:, j]
        return jnp.where(i_wins, xi, xj).reshape(-1), jnp.where(i_wins, xj, xi).reshape(-1)

    (cw, cl), (rw, rl) = pick(logps), pick(ref_logps)

    def one_pair(c, r, rc, rr):  # scalars -> dpo_loss on a batch of one pair
        return losses.dpo_loss(
            c[None],
            r[None],
            rc[None],
            rr[None],
            beta=hparams.beta,
            loss_type=hparams.loss_type,
            label_smoothing=hparams.label_smoothing,
        )

    per_pair, m = jax.vmap(one_pair)(cw, cl, rw, rl)  # [B*P] and metrics [B*P]
    b, p = pair.shape
    per_pair = jnp.where(pair, per_pair.reshape(b, p), 0.0)  # [B, P]
    n_pairs = jnp.sum(pair, axis=1)  # [B]
    per_prompt = jnp.sum(per_pair, axis=1) / jnp.maximum(n_pairs, 1)  # [B]
    counted = n_pairs > 0
    loss = ops.masked_mean(per_prompt, counted)
    over_pairs = lambda name: ops.masked_mean(jnp.where(pair, m[name].reshape(b, p), 0.0), pair)  # noqa: E731
    metrics = {
        "loss": loss,
        **{
            name: over_pairs(name)
            for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
        },
        "num_pairs": jnp.sum(pair).astype(jnp.float32),
        "num_prompts": jnp.sum(counted).astype(jnp.float32),
    }
    return loss, metrics


def metric_weights(hparams: DPOHyperparams) -> dict[str, str]:
    """metric -> the count it is a mean over (``num_prompts`` / ``num_pairs``): for weighted evaluation."""
    ends = "num_prompts" if hparams.k_way == "pl" else "num_pairs"
    return {
        "loss": "num_prompts",
        "rewards/accuracies": "num_pairs",
        "rewards/margins": "num_pairs",
        "rewards/chosen": ends,
        "rewards/rejected": ends,
    }


def dpo_objective(
    model: CausalLM, params: Any, batch: dict, ref_logps: jax.Array, hparams: DPOHyperparams = DPOHyperparams()
) -> tuple[jax.Array, dict]:
    """:func:`ranking_dpo_loss` of the policy's :func:`sequence_logps` against ``ref_logps`` [B, K]
    (no gradient through them); metrics add the ``finite/logits`` flag."""
    logps, finite = _logps_and_finite(model, params, batch)
    loss, metrics = ranking_dpo_loss(logps, jax.lax.stop_gradient(ref_logps), batch["ranks"], batch["valid"], hparams)
    return loss, {**metrics, "finite/logits": finite}


def _reference(model: CausalLM, batch: dict, ref_params: Any) -> jax.Array:
    if "ref_logps" in batch:
        return batch["ref_logps"]
    if ref_params is None:
        raise ValueError("DPO step: the batch has no 'ref_logps'; pass the reference params")
    return sequence_logps(model, ref_params, batch)


def make_train_step(
    model: CausalLM, optimizer: optax.GradientTransformation, hparams: DPOHyperparams = DPOHyperparams()
) -> Callable:
    """``step(state, batch[, ref_params]) -> (state, metrics)``: the reference log-probs come from
    ``batch["ref_logps"]`` (cached), else from a forward pass of ``ref_params``.

    A step whose logits, loss or gradients are not finite is skipped (``optim.gradient_step``).
    """

    def train_step(state: TrainState, batch: dict, ref_params: Any = None):
        ref_logps = _reference(model, batch, ref_params)
        return gradient_step(state, lambda params: dpo_objective(model, params, batch, ref_logps, hparams), optimizer)

    return train_step


def make_eval_step(model: CausalLM, hparams: DPOHyperparams = DPOHyperparams()) -> Callable:
    """``eval_step(params, batch[, ref_params]) -> metrics`` (loss, rewards/*, num_pairs, num_prompts)."""

    def eval_step(params: Any, batch: dict, ref_params: Any = None):
        metrics = dpo_objective(model, params, batch, _reference(model, batch, ref_params), hparams)[1]
        return {k: v for k, v in metrics.items() if not k.startswith("finite/")}

    return eval_step


__all__ = [
    "dpo_objective",
    "make_eval_step",
    "make_train_step",
    "metric_weights",
    "ranking_dpo_loss",
    "response_mask",
    "sequence_logps",
]
