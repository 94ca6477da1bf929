"""The train state pytree, the optimizer every stage uses (optax), and the non-finite guard.

Non-finite values: every stage's step reports, for each quantity it computes, whether it
is finite (``finite/<name>`` boolean scalars in its metrics; names from
:data:`NONFINITE_QUANTITIES`), and :func:`skip_nonfinite` returns the OLD state, bitwise,
when any is not: the step is skipped as a whole (params, optimizer state and its count,
the step counter, RNG, and for PPO the KL coefficient, EMA params and iteration all stay
as they were; the batch is consumed). ``train_loop.run`` counts consecutive skips and
stops the run after ``RunConfig.max_consecutive_skips``. When checks run in sequence (PPO's
rollout then its minibatches), :func:`blame_first_nonfinite` keeps only the first failure:
a NaN reward also makes the advantages, the loss and the gradients NaN, and the error
should name the reward. Tests poison quantities from outside the library (a model that
returns NaN, NaN parameters, a gradient-poisoning wrapper: ``tests/poison.py``).
"""

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


def decay_mask(params: Any) -> Any:
    """True for the leaves weight decay applies to: matrices (ndim >= 2), not biases, norms or scales.

    nanoGPT's ``configure_optimizers`` rule; embeddings are matrices and are decayed, as there.
    """
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (+ global-norm clipping) on the schedule above; weight decay on matrices only (:func:`decay_mask`)."""
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
            mask=decay_mask if config.weight_decay > 0 else None,  # (no mask state without decay)
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
    """One optimizer step on ``loss_fn(params) -> (loss, metrics)``, skipped when non-finite.

    ``loss_fn``'s metrics may hold ``finite/<name>`` flags of its intermediates (e.g.
    ``finite/logits``); the loss and the gradients are checked here. Returns the new state
    (the old one, bitwise, if anything was non-finite) and the metrics plus ``grad_norm``
    and the guard's ``nonfinite/*`` metrics.
    """
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    metrics = {**metrics, "finite/loss": all_finite(loss), "finite/grads": norm_finite(grad_norm)}
    new_state, metrics = skip_nonfinite(apply_gradients(state, grads, optimizer), state, metrics)
    return new_state, {**metrics, "grad_norm": grad_norm}


def apply_gradients(state: TrainState, grads: Any, optimizer: optax.GradientTransformation) -> TrainState:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state)


# ---------------------------------------------------------------------------- non-finite guard

# What the stages check, in pipeline order: an error names the first non-finite one (a NaN
# reward also makes the advantages, the loss and the gradients NaN).
NONFINITE_QUANTITIES = ("reward", "logits", "advantages", "loss", "grads")


def all_finite(tree: Any) -> jax.Array:
    """bool scalar: every element of every floating-point leaf of ``tree`` is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all()


def norm_finite(global_norm: jax.Array) -> jax.Array:
    """bool scalar: a gradient tree is finite, judged from its global norm ``sqrt(sum g^2)``.

    Any NaN or inf element makes the norm non-finite, and so does a finite tree whose sum of
    squares overflows float32 (elements beyond ~1e19): a step no optimizer should take
    either. The norm is computed for clipping and logging anyway, so the check is free; a
    per-leaf ``isfinite`` pass reads every gradient again.
    """
    return jnp.isfinite(global_norm)


def logits_finite(logits: jax.Array) -> jax.Array:
    """bool scalar: ``logsumexp(logits)`` is finite at every position of ``logits`` [..., V].

    A NaN or +inf anywhere, or a position whose logits are all -inf, makes it False; a -inf
    logit among finite ones (a banned token) does not. The log-normaliser is what the
    losses compute anyway (XLA shares the reduction), so this costs a check of [...]
    values instead of a pass over the whole [..., V] array.
    """
    return jnp.all(jnp.isfinite(jax.nn.logsumexp(jnp.asarray(logits).astype(jnp.float32), axis=-1)))


def blame_first_nonfinite(flags: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Reduce checks that ran in sequence to one flag per quantity, blaming only the first failure.

    Once a quantity is non-finite, everything computed from it is too (a NaN reward makes the
    advantages, the loss and the gradients NaN; a NaN update makes the next minibatch's
    logits NaN), so only the first group with a failed check says what went wrong.

    Args:
      flags: ``name -> bool [N]``: the checks of N groups in the order they ran (pipeline
        stages, minibatches); a group that does not compute a quantity passes True for it.

    Returns:
      ``name -> bool`` scalar: False only for the quantities that failed in the first group
      with any failure; all True when every group was finite.

    >>> f = {"finite/reward": jnp.array([False, True]), "finite/loss": jnp.array([True, False])}
    >>> {k: bool(v) for k, v in blame_first_nonfinite(f).items()}
    {'finite/reward': False, 'finite/loss': True}
    """
    group_ok = jnp.stack([jnp.asarray(v, bool) for v in flags.values()]).all(axis=0)  # [N]
    earlier_ok = jnp.concatenate([jnp.ones(1, bool), jnp.cumprod(group_ok.astype(jnp.int32))[:-1] > 0])  # [N]
    return {k: jnp.all(jnp.asarray(v, bool) | ~earlier_ok) for k, v in flags.items()}


def skip_nonfinite(new_state: Any, old_state: Any, metrics: dict) -> tuple[Any, dict]:
    """``new_state`` if every ``finite/<name>`` flag in ``metrics`` is True, else ``old_state``.

    The choice is an elementwise select, so a skipped step returns ``old_state`` bitwise
    (every leaf: params, optimizer moments and counts, step, RNG key data, ...). The flags
    are replaced in the returned metrics by ``nonfinite/<name>`` (1.0 when that quantity
    was non-finite) and ``nonfinite/skipped`` (1.0 when the step was skipped).

    Args:
      new_state: the state after the step (any pytree).
      old_state: the state before it (same structure).
      metrics: the step's metrics with boolean scalar ``finite/<name>`` entries.
    """
    finite, out = nonfinite_metrics(metrics)
    return select_state(finite, new_state, old_state), out


def select_state(take: jax.Array, new_state: Any, old_state: Any) -> Any:
    """``new_state`` where the bool scalar ``take`` is True, else ``old_state``, leaf by leaf (bitwise)."""
    return jax.tree.map(lambda new, old: jnp.where(take, new, old), new_state, old_state)


def nonfinite_metrics(metrics: dict) -> tuple[jax.Array, dict]:
    """(all ``finite/<name>`` flags True, ``metrics`` with the flags turned into
    ``nonfinite/<name>`` and ``nonfinite/skipped``, 1.0 where non-finite / skipped)."""
    flags = {k[len("finite/") :]: v for k, v in metrics.items() if k.startswith("finite/")}
    out = {k: v for k, v in metrics.items() if not k.startswith("finite/")}
    finite = jnp.stack([jnp.asarray(v, bool) for v in flags.values()]).all() if flags else jnp.asarray(True)
    for name, ok in flags.items():
        out[f"nonfinite/{name}"] = 1.0 - jnp.asarray(ok, jnp.float32)
    out["nonfinite/skipped"] = 1.0 - finite.astype(jnp.float32)
    return finite, out
