"""Parameters of a model from its config alone: the one dummy-input ``init`` of the package."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def init_params(model: nn.Module, key: jax.Array | None = None, *, boxed: bool = False) -> Any:
    """Random parameters of ``model`` (a ``CausalLM``): its ``init`` on a dummy [1, 2] batch.

    Args:
      model: the Linen module; shapes depend on its config only, not on the dummy input.
      key: PRNG key (default ``jax.random.key(0)``).
      boxed: keep Flax's ``LogicallyPartitioned`` boxes, which carry each parameter's logical
        axis names (what ``sharding.param_shardings`` reads, under ``jax.eval_shape``).

    Returns:
      The nested param dict (unboxed unless ``boxed``).
    """
    key = jax.random.key(0) if key is None else key
    params = model.init(key, jnp.zeros((1, 2), jnp.int32))["params"]
    return params if boxed else nn.unbox(params)
