"""The scanned layer stack: stacked params and their logical axes, parameter counts,
remat, the stacked KV cache, hidden states without logits + the unembedding, and the
conversion of params written before the layers were scanned (``layers_0`` ...)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import sharding
from rlhf_jax.config import MeshConfig, ModelConfig
from rlhf_jax.models import CausalLM, init_cache, lm_logits, stack_legacy_layers, unembedding
from rlhf_jax.models.hf import abstract_params, hf_shapes

L = 3
CONFIGS = {
    "gpt2": ModelConfig(
        family="gpt2",
        vocab_size=64,
        hidden_size=32,
        num_layers=L,
        num_heads=4,
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
        max_position_embeddings=32,
    ),
    "llama": ModelConfig(
        family="llama",
        vocab_size=64,
        hidden_size=32,
        num_layers=L,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=48,
        activation="silu",
    ),
    "neox": ModelConfig(
        family="neox",
        vocab_size=64,
        hidden_size=32,
        num_layers=L,
        num_heads=4,
        rotary_pct=0.25,
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        parallel_residual=True,
    ),
    "gemma3": ModelConfig(
        family="gemma3",
        vocab_size=64,
        hidden_size=32,
        num_layers=L,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=48,
        tie_word_embeddings=True,
        sliding_window=4,
        layer_types=("sliding_attention", "sliding_attention", "full_attention"),
        rope_local_theta=10000.0,
        rope_theta=1e6,
        query_pre_attn_scalar=16.0,
        final_logit_softcap=30.0,
        attn_logit_softcap=50.0,
    ),
}


def _init(cfg: ModelConfig, head: str = "lm", boxed: bool = False):
    variables = CausalLM(cfg, head=head).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    return variables["params"] if boxed else nn.unbox(variables)["params"]


def _batch(seed: int = 0, b: int = 2, t: int = 7):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(0, 64, (b, t)), jnp.int32)
    mask = jnp.asarray(np.arange(t)[None] >= np.array([[0], [3]]), jnp.int32)  # row 1 left-padded
    return ids, mask


@pytest.mark.parametrize("name", list(CONFIGS))
def test_params_are_stacked_with_a_layers_axis(name):
    cfg = CONFIGS[name]
    boxed = _init(cfg, boxed=True)
    assert not any(k.startswith("layers_") for k in boxed)
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        boxed["layers"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )[0]:
        assert leaf.value.shape[0] == L, (path, leaf.value.shape)
        assert leaf.names[0] == "layers", (path, leaf.names)
    # num_params matches the tree (with and without a scalar head)
    params = nn.unbox(boxed)
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
    scalar = _init(cfg, head="scalar")
    assert sum(x.size for x in jax.tree.leaves(scalar)) == cfg.num_params() + cfg.hidden_size + 1 - (
        0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    )
    # abstract_params / hf_shapes derive from the stacked tree (one HF tensor per layer)
    assert jax.tree.map(lambda x: x.shape, abstract_params(cfg)) == jax.tree.map(jnp.shape, params)
    shapes = hf_shapes(cfg)
    assert sum(int(np.prod(s)) for s in shapes.values()) == cfg.num_params()


def test_layers_axis_is_never_sharded():
    cfg = CONFIGS["llama"]
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    shardings = sharding.param_shardings(lambda: _init(cfg, boxed=True), mesh)
    spec = shardings["layers"]["mlp"]["up"]["kernel"].spec
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor"), spec


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_remat_and_dropout_paths(name):
    cfg = CONFIGS[name]
    params = _init(cfg)
    ids, mask = _batch()

    def loss(model, p):
        return model.apply({"params": p}, ids, attention_mask=mask).logits.sum()

    plain = jax.value_and_grad(lambda p: loss(CausalLM(cfg), p))(params)
    for policy in ("dots", "full", True):  # True: the former boolean spelling of "full"
        remat = jax.value_and_grad(lambda p, policy=policy: loss(CausalLM(cfg.replace(remat=policy)), p))(params)
        np.testing.assert_allclose(remat[0], plain[0], rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(remat[1])):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    # dropout: different layers draw different masks, and it changes the output
    drop = CausalLM(cfg.replace(dropout=0.5, remat=True))
    out = drop.apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.key(1)}).logits
    ref = CausalLM(cfg).apply({"params": params}, ids).logits
    assert np.all(np.isfinite(out)) and np.abs(np.asarray(out) - np.asarray(ref)).max() > 1e-3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_stacked_cache_decodes_like_the_full_forward(name):
    cfg = CONFIGS[name]
    model, params = CausalLM(cfg), _init(cfg)
    ids, mask = _batch(seed=1, t=8)
    full = model.apply({"params": params}, ids, attention_mask=mask).logits
    cache = init_cache(cfg, batch_size=2, max_length=8)
    assert cache.keys.shape == (L, 2, cfg.kv_heads, cfg.dim_per_head, 8)
    assert cache.values.shape == (L, 2, cfg.kv_heads, 8, cfg.dim_per_head)
    out = model.apply({"params": params}, ids[:, :5], attention_mask=mask[:, :5], cache=cache)
    logits = [out.logits]
    for i in range(5, 8):
        out = model.apply({"params": params}, ids[:, i : i + 1], attention_mask=mask[:, i : i + 1], cache=out.cache)
        logits.append(out.logits)
    got = np.concatenate([np.asarray(x) for x in logits], axis=1)
    real = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(got[real], np.asarray(full)[real], atol=2e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma3"])
@pytest.mark.parametrize("head", ["lm", "lm+scalar"])
def test_hidden_only_and_unembedding(name, head):
    """compute_logits=False returns the final hidden states (and values) without the LM head;
    lm_logits(hidden, unembedding(params)) gives the model's logits exactly."""
    cfg = CONFIGS[name].replace(tie_word_embeddings=name != "llama")
    model, params = CausalLM(cfg, head=head), _init(cfg, head=head)
    ids, mask = _batch(seed=2)
    full = model.apply({"params": params}, ids, attention_mask=mask, head_slice=(0, 6))
    hid = model.apply({"params": params}, ids, attention_mask=mask, head_slice=(0, 6), compute_logits=False)
    assert hid.logits is None
    np.testing.assert_array_equal(hid.hidden_states, full.hidden_states)
    if head == "lm+scalar":
        np.testing.assert_array_equal(hid.values, full.values)
    w = unembedding(params, cfg)
    assert w.shape == (cfg.hidden_size, cfg.vocab_size)
    np.testing.assert_allclose(lm_logits(hid.hidden_states[:, :6], w, cfg), full.logits, rtol=1e-6, atol=1e-6)
    # the unembedding is differentiable back to the embedding (tied) or lm_head (untied)
    g = jax.grad(lambda p: lm_logits(hid.hidden_states, unembedding(p, cfg), cfg).sum())(params)
    leaf = g["embed"]["embedding"] if cfg.tie_word_embeddings else g["lm_head"]["kernel"]
    assert np.abs(np.asarray(leaf)).sum() > 0


def test_stack_legacy_layers_converts_old_checkpoints():
    cfg = CONFIGS["llama"]
    params = jax.tree.map(np.asarray, _init(cfg, head="lm+scalar"))
    legacy = {k: v for k, v in params.items() if k != "layers"}
    for i in range(L):
        legacy[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    # and an optimizer-state-like tree that mirrors the params, nested
    opt_like = [{"mu": legacy, "nu": legacy}, {"count": np.int32(3)}]
    converted = stack_legacy_layers(legacy)
    assert jax.tree.structure(converted) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(converted), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    opt = stack_legacy_layers(opt_like)
    assert jax.tree.structure(opt[0]["mu"]) == jax.tree.structure(params) and opt[1]["count"] == 3
    assert stack_legacy_layers(params) is not None and jax.tree.structure(stack_legacy_layers(params)) == (
        jax.tree.structure(params)
    )
    ids, mask = _batch()
    out = CausalLM(cfg, head="lm+scalar").apply({"params": converted}, ids, attention_mask=mask)
    assert np.all(np.isfinite(out.logits))
    with pytest.raises(ValueError, match="layers_0"):
        stack_legacy_layers({k: v for k, v in legacy.items() if k != "layers_1"})
