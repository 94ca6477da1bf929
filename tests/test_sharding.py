"""The same forward and gradient step on 1 device and on 8 fake CPU devices in several meshes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import sharding
from rlhf_jax.config import MeshConfig, ModelConfig
from rlhf_jax.models import CausalLM

CONFIGS = {
    "llama_gqa": ModelConfig(
        family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64
    ),
    "gpt2": ModelConfig(
        family="gpt2",
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        max_position_embeddings=32,
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
    ),
}


def _setup(cfg):
    model = CausalLM(cfg)
    init = lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]  # noqa: E731
    params = nn.unbox(init())
    ids = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size)
    mask = jnp.ones((8, 16), jnp.int32).at[0, :5].set(0).at[3, 12:].set(0)  # left and right padding

    def loss(p, ids, mask):
        logits = model.apply({"params": p}, ids, attention_mask=mask).logits  # [B, T, V]
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1)[..., 0]
        m = mask[:, 1:]
        return -jnp.sum(logp * m) / jnp.sum(m)

    def step(p, ids, mask):
        value, grads = jax.value_and_grad(loss)(p, ids, mask)
        return value, jax.tree.map(lambda a, g: a - 0.1 * g, p, grads)

    return init, params, ids, mask, step


@pytest.mark.parametrize(
    "name,shape",
    [("llama_gqa", (8, 1, 1)), ("llama_gqa", (1, 8, 1)), ("llama_gqa", (2, 2, 2)), ("gpt2", (2, 2, 2))],
)
def test_mesh_step_matches_single_device(name, shape):
    assert len(jax.devices()) == 8, "conftest.py should fake 8 CPU devices"
    init, params, ids, mask, step = _setup(CONFIGS[name])
    single = jax.jit(step)
    loss1, params1 = single(jax.device_put(params, jax.devices()[0]), ids, mask)

    mesh = sharding.make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]))
    shardings = sharding.param_shardings(init, mesh)
    batch = sharding.batch_sharding(mesh)
    with sharding.use_mesh(mesh):
        sharded = jax.jit(
            step, in_shardings=(shardings, batch, batch), out_shardings=(sharding.replicated(mesh), shardings)
        )
        loss2, params2 = sharded(jax.device_put(params, shardings), ids, mask)
    np.testing.assert_allclose(float(loss2), float(loss1), atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)
    # the parameters really are distributed (not silently replicated)
    kernel = params2["layers"]["mlp"]["up"]["kernel"]  # [layers, embed, mlp]: the scanned layer axis unsharded
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert len(kernel.sharding.device_set) == 8


def test_mesh_config_shapes():
    assert MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (2, 2, 2)
    assert MeshConfig().shape(1) == (1, 1, 1)
    with pytest.raises(ValueError, match="devices"):
        MeshConfig(data=3, fsdp=1, tensor=1).shape(8)
    with pytest.raises(ValueError, match="at most one axis"):
        MeshConfig(data=-1, fsdp=-1)


def test_shard_batch_places_rows_across_data_axes():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    batch = sharding.shard_batch({"ids": np.arange(32).reshape(8, 4)}, mesh)
    assert batch["ids"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(batch["ids"]), np.arange(32).reshape(8, 4))


def test_initialize_distributed_only_tolerates_a_missing_cluster(monkeypatch):
    """No coordinator configured (ValueError) is single-host; a cluster that cannot be joined
    (RuntimeError), or any failure with explicit arguments, propagates."""

    def raising(exc):
        def initialize(**kwargs):
            raise exc

        return initialize

    monkeypatch.setattr(jax.distributed, "initialize", raising(ValueError("coordinator_address should be defined.")))
    assert sharding.initialize_distributed() is None
    with pytest.raises(ValueError):
        sharding.initialize_distributed(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=0)
    monkeypatch.setattr(jax.distributed, "initialize", raising(RuntimeError("coordinator unreachable")))
    with pytest.raises(RuntimeError, match="unreachable"):
        sharding.initialize_distributed()
