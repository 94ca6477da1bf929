"""Grouped-query causal self-attention with a stacked KV cache and per-layer windows.

One module serves every layer of the scanned stack, so whatever differs between layers
arrives as traced per-layer scalars (``LayerSpec``): the sliding window (0 = dense) and
the RoPE base and linear scaling factor. Nothing branches on the layer index in Python.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.config import ModelConfig
from rlhf_jax.models.layers import Norm, constrain, dense, positions_from_mask, rotary, softcap
from rlhf_jax.models.matmul import mixed_matmul

Array = jax.Array


def layer_specs(cfg: ModelConfig) -> dict[str, Array]:
    """The per-layer scalars the layer scan slices, each [L]: ``index`` int32, ``window``
    int32 (0 = dense causal), ``rope_theta`` and ``rope_factor`` float32."""
    rope = cfg.layer_rope
    return {
        "index": jnp.arange(cfg.num_layers, dtype=jnp.int32),
        "window": jnp.asarray(cfg.layer_windows, jnp.int32),
        "rope_theta": jnp.asarray([theta for theta, _ in rope], jnp.float32),
        "rope_factor": jnp.asarray([factor for _, factor in rope], jnp.float32),
    }


def attention_masks(
    cfg: ModelConfig,
    positions: Array,
    key_mask: Array,
    query_slots: Array,
    *,
    key_positions: Array | None = None,
    segment_ids: Array | None = None,
) -> dict[str, Array]:
    """What every layer's mask is made of, computed once outside the layer scan.

    Args:
      positions: [B, T] positions of the queries.
      key_mask: [B, S] 1 for slots holding a real token (S = T without a cache).
      query_slots: [T] the cache slot of each query.
      key_positions: [B, S] positions of the keys; None = ``positions_from_mask(key_mask)``.
      segment_ids: [B, T] (no cache, S == T): which packed example each token belongs to;
        a query then sees only keys of its own segment (MaxText-style packing).

    Returns:
      ``causal`` [B, T, S] bool: the key is real, not after the query (by cache slot) and,
      with ``segment_ids``, in the query's segment; ``distance`` [B, T, S] int32: query
      position - key position, where a layer has a window (absent otherwise). A window
      counts token positions, not slots, so padding between a prompt and its continuation
      never shrinks it.
    """
    s = key_mask.shape[1]
    causal = jnp.arange(s)[None, :] <= query_slots[:, None]  # [T, S]
    allowed = causal[None] & (key_mask[:, None, :] > 0)  # [B, T, S]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    out = {"causal": allowed}
    if any(cfg.layer_windows):
        if key_positions is None:
            key_positions = positions_from_mask(key_mask)  # [B, S]
        out["distance"] = positions[:, :, None] - key_positions[:, None, :]  # [B, T, S]
    return out


class Attention(nn.Module):
    """Causal self-attention of one layer: [B, T, D] -> [B, T, D] (+ the updated cache).

    The KV cache is stacked over layers and laid out as the right-hand operands of the
    two matmuls (q @ K and p @ V), so a decode step never transposes it: keys
    [L, B, Hkv, Dh, S], values [L, B, Hkv, S, Dh].
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, masks, layer, cache=None, cache_index=None):
        """Args:
          x: [B, T, D] (normed) inputs.
          positions: [B, T] int32 positions of the queries (RoPE).
          masks: ``attention_masks(...)``: causal [B, T, S] bool (+ distance [B, T, S]).
          layer: this layer's ``layer_specs`` scalars (index, window, rope_theta, rope_factor).
          cache: (keys [L, B, Hkv, Dh, S], values [L, B, Hkv, S, Dh]) or None (then S == T).
          cache_index: int32 scalar: the slot of the first of the T new tokens.

        Returns:
          (out [B, T, D], cache with this layer's slots cache_index .. + T written, or None).
        """
        cfg = self.config
        h, kv, dh = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        q = dense(cfg, (h, dh), ("embed", "heads", "kv"), use_bias=cfg.qkv_bias, name="q")(x)  # [B, T, H, Dh]
        k = dense(cfg, (kv, dh), ("embed", "kv_heads", "kv"), use_bias=cfg.qkv_bias, name="k")(x)  # [B, T, Hkv, Dh]
        v = dense(cfg, (kv, dh), ("embed", "kv_heads", "kv"), use_bias=cfg.qkv_bias, name="v")(x)  # [B, T, Hkv, Dh]
        if cfg.qk_norm:  # Gemma 3, Qwen3: RMSNorm over head_dim, before RoPE
            q = Norm(cfg, axis_name="kv", name="q_norm")(q)
            k = Norm(cfg, axis_name="kv", name="k_norm")(k)
        if cfg.uses_rope:
            rope = dict(
                rotary_dim=cfg.rotary_dim,
                theta=layer["rope_theta"],
                factor=layer["rope_factor"],
                llama3=cfg.rope_llama3,
            )
            q, k = rotary(q, positions, **rope), rotary(k, positions, **rope)
        allowed = masks["causal"]  # [B, T, S]
        if "distance" in masks:  # some layer has a window; this one's may be 0 (dense)
            window = layer["window"]
            allowed = allowed & ((window <= 0) | (masks["distance"] < window))
        scale = (cfg.query_pre_attn_scalar or dh) ** -0.5
        out = None
        if cache is None:  # [B, T, H, Dh] through jax.nn.dot_product_attention, where chosen and supported
            out = _library_attention(cfg, q, k, v, allowed, scale)
        if out is None:
            out, cache = _einsum_attention(cfg, q, k, v, allowed, scale, cache, cache_index, layer["index"])
        out = constrain(out, ("batch", "length", "heads", "kv"))
        out = dense(cfg, x.shape[-1], ("heads", "kv", "embed"), use_bias=cfg.out_bias, name="o", in_dims=2)(out)
        return out, cache  # [B, T, D]


def _einsum_attention(cfg: ModelConfig, q, k, v, allowed, scale, cache, cache_index, layer_index):
    """Our own attention: q [B, T, H, Dh], k / v [B, T, Hkv, Dh] (+ the stacked cache, written at
    ``cache_index`` for layer ``layer_index``) -> (out [B, T, H, Dh], cache)."""
    h, kv, dh = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    k = k.transpose(0, 2, 3, 1)  # [B, Hkv, Dh, T]
    v = v.transpose(0, 2, 1, 3)  # [B, Hkv, T, Dh]
    if cache is not None:
        ck, cv = cache  # [L, B, Hkv, Dh, S], [L, B, Hkv, S, Dh]
        i = layer_index
        ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), (i, 0, 0, 0, cache_index))
        cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), (i, 0, 0, cache_index, 0))
        cache = (ck, cv)
        k = jax.lax.dynamic_index_in_dim(ck, i, axis=0, keepdims=False).astype(q.dtype)  # [B, Hkv, Dh, S]
        v = jax.lax.dynamic_index_in_dim(cv, i, axis=0, keepdims=False).astype(q.dtype)  # [B, Hkv, S, Dh]
    b, t = q.shape[:2]
    g = h // kv
    # queries of the G heads sharing a KV head stacked along rows: [B, Hkv, G*T, Dh]
    qg = q.reshape(b, t, kv, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, dh)
    out = _attend(qg, k, v, allowed, scale, cfg.attn_logit_softcap)  # [B, Hkv, G*T, Dh]
    return out.reshape(b, kv, g, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh), cache


def attention_kernel(cfg: ModelConfig, dtype) -> str:
    """``cfg.attention`` resolved for compute dtype ``dtype``: "auto" is "cudnn" on a GPU in
    bfloat16 / float16 without attention logit soft-capping, else "einsum"."""
    if cfg.attention != "auto":
        return cfg.attention
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if jax.default_backend() == "gpu" and half and cfg.attn_logit_softcap is None:
        return "cudnn"
    return "einsum"


def _library_attention(cfg: ModelConfig, q: Array, k: Array, v: Array, allowed: Array, scale: float) -> Array | None:
    """``jax.nn.dot_product_attention`` of q [B, T, H, Dh], k / v [B, S, Hkv, Dh] (grouped-query
    heads are its native layout) under the mask ``allowed`` [B, T, S]: [B, T, H, Dh], or None
    when the resolved kernel is "einsum", or when "auto" chose cuDNN and cuDNN's trace-time
    checks refuse these shapes (head dim, sequence lengths, GPU generation): the caller then
    uses its own einsum attention. An explicit "cudnn" raises instead."""
    kernel = attention_kernel(cfg, q.dtype)
    if kernel == "einsum":
        return None
    attend = functools.partial(
        jax.nn.dot_product_attention,
        mask=allowed[:, None],  # [B, 1, T, S], broadcast over heads
        scale=scale,
        implementation="cudnn" if kernel == "cudnn" else "xla",
    )
    if cfg.attention == "auto":
        try:
            return attend(q, k, v)
        except (NotImplementedError, ValueError, RuntimeError):
            return None
    return attend(q, k, v)


@functools.partial(jax.checkpoint, static_argnums=(4, 5))
def _attend(qg: Array, k: Array, v: Array, allowed: Array, scale: float, cap: float | None) -> Array:
    """softmax(q k^T * scale, masked) v of stacked query groups: [B, Hkv, G*T, Dh].

    Args: qg [B, Hkv, G*T, Dh] (rows ordered (g, t)); k [B, Hkv, Dh, S]; v [B, Hkv, S, Dh];
    allowed [B, T, S] bool.

    Under ``jax.checkpoint``: the backward pass keeps q, k, v and recomputes the scores and
    probabilities instead of holding [B, H, T, S] float32 per layer (at T = 512 the probs
    of 30 layers alone would take 2.3 GB for 8 rows). The recomputed part is 2 of the
    layer's ~14 matmul FLOPs per token at T = 512 and fewer at shorter T.

    Both matmuls take q's / v's dtype (the compute dtype) and accumulate in float32
    (``models.matmul``); the scores, the softmax and the probabilities' gradient stay float32.
    """
    g = qg.shape[2] // allowed.shape[1]
    scores = mixed_matmul(qg, k, qg.dtype) * scale  # [B, Hkv, G*T, S] float32
    scores = softcap(scores, cap)
    mask = jnp.tile(allowed, (1, g, 1))[:, None]  # [B, 1, G*T, S], rows ordered (g, t)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)  # [B, Hkv, G*T, S] float32
    return mixed_matmul(probs, v, v.dtype).astype(v.dtype)  # [B, Hkv, G*T, Dh]
