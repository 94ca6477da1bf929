"""Tests for rlhf_jax.train_loop beyond what the stage tests cover: running out of memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import sharding, train_loop
from rlhf_jax.config import MeshConfig
from tests import stage_fixtures as F


def test_out_of_memory_names_the_batch_shapes_and_the_flags(tmp_path):
    """XLA's RESOURCE_EXHAUSTED becomes an error naming the step, every batch array's shape and
    the stage's flags that lower memory (the real failure: 26.7 GB asked for a reward-model batch)."""
    mesh = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    replicated = sharding.replicated(mesh)
    state = {"w": jnp.ones((4,))}

    def step(st, batch):
        def fail(x):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 26764179776 bytes.")

        return {"w": st["w"] + jax.pure_callback(fail, st["w"], batch["input_ids"].sum())}, {}

    stage = train_loop.Stage(
        name="rm",
        state=jax.device_put(state, replicated),
        state_shardings={"w": replicated},
        train_step=step,
        next_batch=lambda: {"input_ids": np.ones((4, 4, 512), np.int32)},
        iterators={},
        total_steps=2,
        memory_flags="--batch-size, --max-response-len",
    )
    with pytest.raises(
        train_loop.StepOutOfMemory,
        match=r"rm: step 1 ran out of device memory on the batch "
        r"\{input_ids \[4, 4, 512\]\}.*--batch-size, --max-response-len",
    ):
        train_loop.run(stage, F.run_config(), mesh, tmp_path)
