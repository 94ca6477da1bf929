"""Supervised fine-tuning (and plain LM pretraining): the stage's objective and pure steps.

InstructGPT trains its SFT models with cross-entropy on the response tokens, 16 epochs,
cosine decay to 10% of the peak learning rate, residual dropout 0.2, and selects the final
checkpoint by reward-model score on validation prompts rather than by validation loss.
The policy PPO starts from is an SFT model trained with 10% pretraining data mixed in
(``ptx_fraction=0.1``).

Batches: ``input_ids`` [B, T], ``attention_mask`` [B, T], ``loss_mask`` [B, T] where
``loss_mask[b, t] = 1`` marks ``input_ids[b, t]`` as a target (predicted from t - 1).
:func:`lm_objective` is also the ptx term of PPO-ptx and the held-out loss of the demo.
The driver (data, mesh, loop, checkpoints) is ``rlhf_jax.drivers.run_sft``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from rlhf_jax import losses
from rlhf_jax.models import CausalLM
from rlhf_jax.optim import TrainState, gradient_step, logits_finite


def lm_objective(model: CausalLM, params: Any, batch: dict, *, dropout_key: jax.Array | None = None):
    """Masked next-token cross-entropy: ``mean_{t: loss_mask} -log p(x_t | x_<t)``.

    Returns (loss, metrics) with metrics loss, accuracy, num_tokens and the
    ``finite/logits`` flag (see ``optim.skip_nonfinite``).
    """
    rngs = {"dropout": dropout_key} if dropout_key is not None else None
    t = batch["input_ids"].shape[1]
    out = model.apply(
        {"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"],
        deterministic=dropout_key is None, rngs=rngs, head_slice=(0, t - 1),
    )  # fmt: skip
    logits = out.logits  # [B, T-1, V]: position t predicts token t + 1
    loss, metrics = losses.masked_lm_loss(logits, batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:])
    return loss, {**metrics, "finite/logits": logits_finite(logits)}


def make_train_step(model: CausalLM, optimizer: optax.GradientTransformation) -> Callable:
    """``step(state, batch) -> (state, metrics)``; dropout is on when the model config has it.

    A step whose logits, loss or gradients are not finite is skipped (``optim.gradient_step``).
    """
    use_dropout = model.config.dropout > 0

    def train_step(state: TrainState, batch: dict):
        key = state.key() if use_dropout else None

        return gradient_step(state, lambda params: lm_objective(model, params, batch, dropout_key=key), optimizer)

    return train_step


def make_eval_step(model: CausalLM) -> Callable:
    """``eval_step(params, batch) -> metrics`` (no dropout)."""

    def eval_step(params: Any, batch: dict):
        metrics = lm_objective(model, params, batch)[1]
        return {k: v for k, v in metrics.items() if not k.startswith("finite/")}

    return eval_step


__all__ = ["lm_objective", "make_eval_step", "make_train_step"]
