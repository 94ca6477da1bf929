"""Poisoning from outside the library: a CausalLM that makes one of its outputs non-finite.

The stages' pure steps take models, never a fault channel; to test the non-finite guard a
test hands them a :class:`PoisonedLM` instead of a ``CausalLM`` (same parameters, same
outputs) whose logits, values or gradients turn NaN / Inf when a *trigger* token opens a
sequence. The test puts the trigger in the batch at the steps it wants poisoned; one
compiled step serves every case of a stage.

* ``"logits"``: the LM head's output (SFT logits, PPO log-probs) becomes the value.
* ``"values"``: the scalar head's output (a reward model's scores, a value network's values).
* ``"grads"``: outputs pass unchanged, but the cotangent flowing back into the logits (or
  the values) becomes the value, so the loss is finite and the gradients are not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.models import CausalLM


@jax.custom_vjp
def _poison_cotangent(x: jax.Array, poison: jax.Array) -> jax.Array:
    return x


def _fwd(x, poison):
    return x, poison


def _bwd(poison, g):
    return jnp.where(jnp.isnan(poison) | jnp.isinf(poison), poison.astype(g.dtype), g), None


_poison_cotangent.defvjp(_fwd, _bwd)


class PoisonedLM(CausalLM):
    """A ``CausalLM`` with ``triggers``: ``(token, quantity, value)`` triples.

    A row whose first token is ``token`` (in a call over more than one position: prefill,
    scoring or training, never a single decode step) poisons ``quantity`` ("logits",
    "values" or "grads") of the whole batch with ``float(value)`` ("nan", "inf", "-inf").
    """

    triggers: tuple[tuple[int, str, str], ...] = ()

    def __call__(self, input_ids, attention_mask=None, **kwargs):
        out = super().__call__(input_ids, attention_mask, **kwargs)
        if input_ids.shape[1] < 2:
            return out
        logits, values = out.logits, out.values
        for token, quantity, value in self.triggers:
            hit = jnp.any(input_ids[:, 0] == token)
            poison = jnp.where(hit, jnp.float32(float(value)), jnp.float32(0.0))  # 0: no poison
            # (added, not selected: every element becomes the value, and XLA cannot fold it away)
            if quantity == "logits" and logits is not None:
                logits = logits + poison
            elif quantity == "values" and values is not None:
                values = values + poison
            elif quantity == "grads":
                if logits is not None:
                    logits = _poison_cotangent(logits, poison)
                if values is not None:
                    values = _poison_cotangent(values, poison)
        return out.replace(logits=logits, values=values)


def trigger_free(ids, triggers: tuple[tuple[int, str, str], ...], *, replacement: int = 2):
    """``ids`` with every trigger token replaced (base batches must poison nothing)."""
    tokens = jnp.asarray([t for t, _, _ in triggers])
    return jnp.where(jnp.isin(jnp.asarray(ids), tokens), replacement, jnp.asarray(ids))
