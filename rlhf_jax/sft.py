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
import jax.numpy as jnp
import optax

from rlhf_jax import losses, ops
from rlhf_jax.models import CausalLM, lora
from rlhf_jax.models.lm_head import auto_chunk, token_stats
from rlhf_jax.models.transformer import unembedding
from rlhf_jax.optim import TrainState, gradient_step, logits_finite


def lm_objective(
    model: CausalLM, params: Any, batch: dict, *, dropout_key: jax.Array | None = None, chunk: int | None | str = "auto"
):
    """Masked next-token cross-entropy: ``mean_{t: loss_mask} -log p(x_t | x_<t)``.

    Args:
      model, params: the LM (an LM head; ``lm+scalar`` too).
      batch: ``input_ids``, ``attention_mask``, ``loss_mask`` [B, T]; packed rows
        (``data.pack_batch``) also carry ``segment_ids`` and ``position_ids`` [B, T].
      dropout_key: enables dropout when given.
      chunk: positions per LM-head chunk (``models.lm_head.token_stats``: the logits of a
        large vocabulary are never all in memory); ``"auto"`` chunks only when the [B, T, V]
        float32 logits would pass ``lm_head.CHUNK_BYTES``; None never chunks.

    Returns:
      (loss, metrics) with metrics loss, accuracy, num_tokens and the ``finite/logits``
      flag (see ``optim.skip_nonfinite``).
    """
    rngs = {"dropout": dropout_key} if dropout_key is not None else None
    ids = batch["input_ids"]
    b, t = ids.shape
    if chunk == "auto":
        chunk = auto_chunk(b, t - 1, model.config.vocab_size)
    out = model.apply(
        {"params": params},
        ids,
        attention_mask=batch["attention_mask"],
        segment_ids=batch.get("segment_ids"),
        position_ids=batch.get("position_ids"),
        deterministic=dropout_key is None,
        rngs=rngs,
        head_slice=(0, t - 1),
        compute_logits=chunk is None,
    )
    targets, mask = ids[:, 1:], batch["loss_mask"][:, 1:]  # position t predicts token t + 1
    if chunk is None:
        logits = out.logits  # [B, T-1, V]
        loss, metrics = losses.masked_lm_loss(logits, targets, mask)
        return loss, {**metrics, "finite/logits": logits_finite(logits)}
    hidden = out.hidden_states[:, : t - 1]  # [B, T-1, D]
    stats = token_stats(hidden, unembedding(params, model.config), targets, model.config, chunk=chunk)
    loss = ops.masked_mean(-stats["logprob"], mask)
    metrics = {
        "loss": loss,
        "accuracy": ops.masked_mean(stats["is_top"], mask),
        "num_tokens": jnp.sum(jnp.asarray(mask).astype(jnp.float32)),
        "finite/logits": jnp.all(jnp.isfinite(stats["logsumexp"])),
    }
    return loss, metrics


def make_train_step(model: CausalLM, optimizer: optax.GradientTransformation) -> Callable:
    """``step(state, batch, base=None) -> (state, metrics)``; dropout is on when the model config
    has it (residual or LoRA dropout).

    With LoRA (``model.config.lora``) ``state.params`` holds the trainable tree only and
    ``base`` the frozen weights (``models.lora``): gradients and optimizer state are the adapters'.
    A step whose logits, loss or gradients are not finite is skipped (``optim.gradient_step``).
    """
    lora_cfg = model.config.lora
    use_dropout = model.config.dropout > 0 or (lora_cfg is not None and lora_cfg.dropout > 0)

    def train_step(state: TrainState, batch: dict, base: Any = None):
        key = state.key() if use_dropout else None

        def loss_fn(params):
            return lm_objective(model, lora.with_base(base, params), batch, dropout_key=key)

        return gradient_step(state, loss_fn, optimizer)

    return train_step


def make_eval_step(model: CausalLM) -> Callable:
    """``eval_step(params, batch) -> metrics`` (no dropout)."""

    def eval_step(params: Any, batch: dict):
        metrics = lm_objective(model, params, batch)[1]
        return {k: v for k, v in metrics.items() if not k.startswith("finite/")}

    return eval_step


__all__ = ["lm_objective", "make_eval_step", "make_train_step"]
