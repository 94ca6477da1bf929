"""The attention kernels (``ModelConfig.attention``): our einsum attention and
``jax.nn.dot_product_attention`` give the same logits and gradients.

cuDNN's fused kernel is the "jax" path with another implementation behind the same call, so
checking the "jax" path on CPU checks what the cuDNN path feeds it: the layout of grouped-query
heads, the mask (padding, causality, per-layer windows, packed segments) and the scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import ModelConfig
from rlhf_jax.models import CausalLM, init_cache
from rlhf_jax.models.attention import attention_kernel
from rlhf_jax.models.params import init_params

COMMON = dict(vocab_size=40, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=48)
CONFIGS = {
    # grouped-query heads, a dense layer then a sliding one (windows count positions)
    "llama-gqa-window": ModelConfig(
        family="llama",
        activation="silu",
        num_kv_heads=2,
        layer_types=("full_attention", "sliding_attention"),
        sliding_window=3,
        **COMMON,
    ),
    # query pre-attention scalar, q/k norms, local and global RoPE bases
    "gemma3": ModelConfig(
        family="gemma3",
        activation="gelu_tanh",
        num_kv_heads=1,
        head_dim=16,
        query_pre_attn_scalar=24.0,
        layer_types=("sliding_attention", "full_attention"),
        sliding_window=4,
        rope_local_theta=10_000.0,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        **COMMON,
    ),
    "gpt2": ModelConfig(family="gpt2", max_position_embeddings=64, **COMMON),
}


def _batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, COMMON["vocab_size"], (3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, 9:] = 0  # right padding
    segments = np.array([[1] * 5 + [2] * 7, [1] * 12, [1] * 3 + [2] * 4 + [3] * 4 + [0]], np.int32)
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(segments)


@pytest.mark.parametrize(
    ("name", "packed"), [("llama-gqa-window", False), ("llama-gqa-window", True), ("gemma3", True), ("gpt2", False)]
)
def test_library_attention_matches_einsum(name, packed):
    cfg = CONFIGS[name]
    ids, mask, segments = _batch()
    einsum_model = CausalLM(cfg.replace(attention="einsum"))
    library_model = CausalLM(cfg.replace(attention="jax"))
    params = init_params(einsum_model, jax.random.key(1))
    kw = {"segment_ids": segments, "attention_mask": (segments > 0).astype(jnp.int32)} if packed else {}
    kw.setdefault("attention_mask", mask)
    real = np.asarray(kw["attention_mask"], bool)

    def loss(model, p):
        logits = model.apply({"params": p}, ids, **kw).logits  # [B, T, V]
        return jnp.sum(jnp.where(real[..., None], jnp.tanh(logits), 0.0)), logits

    (l_ref, logits_ref), g_ref = jax.jit(jax.value_and_grad(lambda p: loss(einsum_model, p), has_aux=True))(params)
    (l_lib, logits_lib), g_lib = jax.jit(jax.value_and_grad(lambda p: loss(library_model, p), has_aux=True))(params)
    np.testing.assert_allclose(np.asarray(logits_lib)[real], np.asarray(logits_ref)[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(l_lib), float(l_ref), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_lib), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_library_attention_is_used_and_decoding_keeps_the_cache_path():
    """The "jax" kernel really runs jax.nn.dot_product_attention (a poisoned one changes the
    logits), and a KV-cache pass always takes the einsum path (same logits as "einsum")."""
    cfg = CONFIGS["llama-gqa-window"]
    ids, mask, _ = _batch(1)
    params = init_params(CausalLM(cfg), jax.random.key(2))
    plain = CausalLM(cfg.replace(attention="einsum")).apply({"params": params}, ids, attention_mask=mask).logits
    original = jax.nn.dot_product_attention
    try:
        jax.nn.dot_product_attention = lambda q, k, v, **kw: jnp.zeros_like(q)
        poisoned = CausalLM(cfg.replace(attention="jax")).apply({"params": params}, ids, attention_mask=mask).logits
        # with a cache the prompt and each decoded token go through the einsum path, untouched
        library = CausalLM(cfg.replace(attention="jax"))
        cache = init_cache(cfg, batch_size=ids.shape[0], max_length=ids.shape[1] + 1)
        prefill = library.apply({"params": params}, ids, attention_mask=mask, cache=cache)
        step = library.apply({"params": params}, ids[:, :1], cache=prefill.cache)
    finally:
        jax.nn.dot_product_attention = original
    assert not np.allclose(np.asarray(poisoned), np.asarray(plain), atol=1e-3)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(prefill.logits)[real], np.asarray(plain)[real], rtol=1e-5, atol=1e-5)
    full = jnp.concatenate([ids, ids[:, :1]], axis=1)
    full_mask = jnp.concatenate([mask, jnp.ones_like(mask[:, :1])], axis=1)
    expected = CausalLM(cfg.replace(attention="einsum")).apply({"params": params}, full, attention_mask=full_mask)
    np.testing.assert_allclose(np.asarray(step.logits[:, 0]), np.asarray(expected.logits[:, -1]), rtol=1e-4, atol=1e-5)


def test_kernel_choice_and_validation():
    cfg = CONFIGS["gpt2"]
    expect = "cudnn" if jax.default_backend() == "gpu" else "einsum"
    assert attention_kernel(cfg, jnp.bfloat16) == expect
    assert attention_kernel(cfg, jnp.float32) == "einsum"  # cuDNN's flash kernel is half precision only
    assert attention_kernel(cfg.replace(attention="jax"), jnp.float32) == "jax"
    assert attention_kernel(cfg.replace(attn_logit_softcap=50.0), jnp.bfloat16) == "einsum"
    with pytest.raises(ValueError, match="soft-capping"):
        cfg.replace(attention="cudnn", attn_logit_softcap=50.0)
    with pytest.raises(ValueError, match="attention must be"):
        cfg.replace(attention="flash")
