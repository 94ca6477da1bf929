"""The train state pytree and the optimizer every stage uses (optax)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax.config import OptimConfig


@flax.struct.dataclass
class TrainState:
    """Immutable state of one trained network.

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: the model's nested param dict.
      opt_state: optax state (includes the schedule's own count).
      rng: uint32 [2] raw PRNG key data (raw so that checkpoints hold plain arrays).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    def key(self, *names: int) -> jax.Array:
        """A typed key for this step, folded with ``names`` (e.g. a minibatch index)."""
        key = jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)
        for n in names:
            key = jax.random.fold_in(key, n)
        return key


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from ``warmup_init_fraction * lr``, then cosine to ``final_lr_fraction * lr``
    over the remaining steps (InstructGPT SFT/RM), or constant (InstructGPT PPO)."""
    lr = config.learning_rate
    warm = config.warmup_steps
    start = lr * config.warmup_init_fraction
    if config.schedule == "constant":
        main = optax.constant_schedule(lr)
    else:
        main = optax.cosine_decay_schedule(lr, max(total_steps - warm, 1), alpha=config.final_lr_fraction)
    if warm == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(start, lr, warm), main], [warm])


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (+ global-norm clipping) on the schedule above."""
    parts = []
    if config.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    parts.append(
        optax.adamw(
            learning_rate=learning_rate_schedule(config, total_steps),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
    )
    return optax.chain(*parts)


def init_train_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def gradient_step(state: TrainState, loss_fn, optimizer: optax.GradientTransformation) -> tuple[TrainState, dict]:
    """One optimizer step on ``loss_fn(params) -> (loss, metrics)``; adds ``grad_norm`` to the metrics."""
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return apply_gradients(state, grads, optimizer), {**metrics, "grad_norm": optax.tree.norm(grads)}


def apply_gradients(state: TrainState, grads: Any, optimizer: optax.GradientTransformation) -> TrainState:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state)
