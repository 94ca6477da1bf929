"""One Flax Linen decoder for the GPT-2, Llama (Qwen2, Mistral, SmolLM) and GPT-NeoX families.

Parameters and the main activations carry logical axis names only ('batch', 'length',
'embed', 'mlp', 'heads', 'kv_heads', 'kv', 'vocab'); ``rlhf_jax.sharding`` maps them to
the ('data', 'fsdp', 'tensor') mesh. The parameter tree is a plain nested dict:

    embed/embedding [V, D]          pos_embed/embedding [P, D] (gpt2)
    layers_{i}/attn_norm, mlp_norm  {scale [D], bias [D] (layernorm)}
    layers_{i}/attn/{q,k,v}/kernel  [D, H(kv), Dh] (+ bias [H(kv), Dh])
    layers_{i}/attn/o/kernel        [H, Dh, D]     (+ bias [D])
    layers_{i}/mlp/{gate,up}/kernel [D, F]; mlp/down/kernel [F, D] (+ biases)
    final_norm                      {scale, bias}
    lm_head/kernel [D, V] (untied)  or  score/kernel [D, 1], score/bias [1] (scalar head)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.config import ModelConfig

Array = jax.Array
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(name: str) -> Any:
    return _DTYPES[name]


@flax.struct.dataclass
class KVCache:
    """Preallocated key/value cache; every row writes its slot ``index`` at the same time.

    Attributes:
      keys: one [B, H_kv, Dh, S] array per layer; values: one [B, H_kv, S, Dh] array per
        layer. Both are laid out as the right-hand operands of attention's two matmuls
        (q @ K and p @ V), so a decode step never transposes the cache.
      mask: [B, S] int32, 1 for slots holding a real token (pads and unwritten slots 0).
      index: int32 scalar, the next slot to write.
    """

    keys: tuple[Array, ...]
    values: tuple[Array, ...]
    mask: Array
    index: Array


def init_cache(config: ModelConfig, *, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
    """An empty cache for ``max_length`` slots (prompt + new tokens)."""
    dtype = dtype or to_dtype(config.dtype)
    k_shape = (batch_size, config.kv_heads, config.dim_per_head, max_length)
    v_shape = (batch_size, config.kv_heads, max_length, config.dim_per_head)
    return KVCache(
        keys=tuple(jnp.zeros(k_shape, dtype) for _ in range(config.num_layers)),
        values=tuple(jnp.zeros(v_shape, dtype) for _ in range(config.num_layers)),
        mask=jnp.zeros((batch_size, max_length), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


@flax.struct.dataclass
class ModelOutput:
    """logits [B, T, V] float32 (LM head) or None; values [B, T] float32 (scalar head) or None;
    hidden_states [B, T, D] after the final norm; cache: the updated KVCache or None."""

    logits: Array | None
    values: Array | None
    hidden_states: Array
    cache: KVCache | None


def _constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
    return nn.with_logical_constraint(x, axes)


def _param(init, axes):
    return nn.with_logical_partitioning(init, axes)


class Norm(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        pdt = to_dtype(cfg.param_dtype)
        x32 = x.astype(jnp.float32)
        scale = self.param("scale", _param(nn.initializers.ones, ("embed",)), (x.shape[-1],), pdt)
        if cfg.norm == "rmsnorm":  # Llama: x / rms(x) * w, computed in float32
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
            return (y.astype(x.dtype) * scale.astype(x.dtype)).astype(to_dtype(cfg.dtype))
        bias = self.param("bias", _param(nn.initializers.zeros, ("embed",)), (x.shape[-1],), pdt)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(to_dtype(cfg.dtype))


class Linear(nn.Module):
    """y = x W (+ b), contracting the last ``len(in_shape)`` axes of x; W [*in_shape, *features].

    (Flax's DenseGeneral reshapes a flat kernel inside its initialiser, which breaks
    logical-partitioning constraints of multi-axis kernels under a mesh context.)"""

    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    in_dims: int
    use_bias: bool
    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        in_shape = x.shape[x.ndim - self.in_dims :]
        kernel = self.param(
            "kernel",
            _param(nn.initializers.normal(0.02), self.axes),
            (*in_shape, *self.features),
            to_dtype(cfg.param_dtype),
        )
        dtype = to_dtype(cfg.dtype)
        lead = x.shape[: x.ndim - self.in_dims]
        # One 2-D product [N, K] @ [K, M]: its gradients are 2-D products too, which XLA's
        # CPU matmul runs at full speed; dot_general over [B, T, ...] gives gradients that
        # contract two axes at once and made the CPU SFT step 12% slower (README, Performance).
        x2 = x.astype(dtype).reshape(math.prod(lead), math.prod(in_shape))  # [N, K]
        w2 = kernel.astype(dtype).reshape(math.prod(in_shape), math.prod(self.features))  # [K, M]
        y = (x2 @ w2).reshape(*lead, *self.features)
        if self.use_bias:
            bias = self.param(
                "bias", _param(nn.initializers.zeros, self.axes[self.in_dims :]), self.features, to_dtype(cfg.param_dtype)
            )
            y = y + bias.astype(dtype)
        return y


def _dense(cfg: ModelConfig, features, axes, *, use_bias: bool, name: str, in_axes: int = 1) -> Linear:
    features = (features,) if isinstance(features, int) else tuple(features)
    return Linear(features=features, axes=axes, in_dims=in_axes, use_bias=use_bias, config=cfg, name=name)


def rotary(x: Array, positions: Array, *, rotary_dim: int, theta: float) -> Array:
    """Rotate the first ``rotary_dim`` features of each head (HF's rotate_half layout).

    Args:
      x: [B, T, H, Dh].
      positions: [B, T] int32 token positions.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))  # [R/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, R]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, key_mask, query_slots, cache_kv, cache_index, deterministic):
        """x [B, T, D]; positions [B, T]; key_mask [B, S]; query_slots [T] (cache slot of each
        query); cache_kv: (keys, values) [B, S, Hkv, Dh] or None (then S == T).

        The causal rule is by cache slot; a sliding window counts token positions, so
        that padding between a prompt and its continuation never shrinks the window."""
        cfg = self.config
        h, kv, dh = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        q = _dense(cfg, (h, dh), ("embed", "heads", "kv"), use_bias=cfg.qkv_bias, name="q")(x)  # [B, T, H, Dh]
        k = _dense(cfg, (kv, dh), ("embed", "kv_heads", "kv"), use_bias=cfg.qkv_bias, name="k")(x)  # [B, T, Hkv, Dh]
        v = _dense(cfg, (kv, dh), ("embed", "kv_heads", "kv"), use_bias=cfg.qkv_bias, name="v")(x)
        if cfg.uses_rope:
            q = rotary(q, positions, rotary_dim=cfg.rotary_dim, theta=cfg.rope_theta)
            k = rotary(k, positions, rotary_dim=cfg.rotary_dim, theta=cfg.rope_theta)
        k = k.transpose(0, 2, 3, 1)  # [B, Hkv, Dh, T]
        v = v.transpose(0, 2, 1, 3)  # [B, Hkv, T, Dh]
        new_kv = None
        if cache_kv is not None:
            ck, cv = cache_kv  # [B, Hkv, Dh, S], [B, Hkv, S, Dh]
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, 0, 0, cache_index))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, 0, cache_index, 0))
            new_kv = (k, v)
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        b, t = x.shape[:2]
        s = k.shape[3]
        g = h // kv
        # queries of the G heads sharing a KV head stacked along rows: [B, Hkv, G*T, Dh]
        qg = q.reshape(b, t, kv, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, dh)
        scale = 1.0 / jnp.sqrt(jnp.float32(dh))
        scores = jnp.matmul(qg, k).astype(jnp.float32) * scale  # [B, Hkv, G*T, S]
        key_slots = jnp.arange(s)
        allowed = key_slots[None, :] <= query_slots[:, None]  # [T, S] causal in cache slots
        allowed = allowed[None] & (key_mask[:, None, :] > 0)  # [B, T, S]
        if cfg.sliding_window is not None:
            key_positions = positions_from_mask(key_mask)  # [B, S]
            allowed &= positions[:, :, None] - key_positions[:, None, :] < cfg.sliding_window
        allowed = jnp.tile(allowed, (1, g, 1))[:, None]  # [B, 1, G*T, S], rows ordered (g, t)
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [B, Hkv, G*T, S]
        out = jnp.matmul(probs, v)  # [B, Hkv, G*T, Dh]
        out = out.reshape(b, kv, g, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)  # [B, T, H, Dh]
        out = _constrain(out, ("batch", "length", "heads", "kv"))
        out = _dense(cfg, x.shape[-1], ("heads", "kv", "embed"), use_bias=cfg.out_bias, name="o", in_axes=2)(out)
        return out, new_kv


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        act = {
            "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
            "gelu": functools.partial(jax.nn.gelu, approximate=False),
            "silu": jax.nn.silu,
        }[cfg.activation]
        up = _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), use_bias=cfg.mlp_bias, name="up")(x)  # [B, T, F]
        if cfg.gated_mlp:  # SwiGLU: act(x W_gate) * (x W_up)
            up = act(_dense(cfg, cfg.mlp_dim, ("embed", "mlp"), use_bias=cfg.mlp_bias, name="gate")(x)) * up
        else:
            up = act(up)
        up = _constrain(up, ("batch", "length", "mlp"))
        return _dense(cfg, x.shape[-1], ("mlp", "embed"), use_bias=cfg.mlp_bias, name="down")(up)  # [B, T, D]


class Block(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, key_mask, query_slots, cache_kv, cache_index, deterministic):
        cfg = self.config
        drop = nn.Dropout(cfg.dropout, deterministic=deterministic)
        attn_out, new_kv = Attention(cfg, name="attn")(
            Norm(cfg, name="attn_norm")(x), positions, key_mask, query_slots, cache_kv, cache_index, deterministic
        )
        if cfg.parallel_residual:  # NeoX: x + attn(ln1(x)) + mlp(ln2(x))
            mlp_out = MLP(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x))
            x = x + drop(attn_out) + drop(mlp_out)
        else:
            x = x + drop(attn_out)
            x = x + drop(MLP(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x)))
        return _constrain(x, ("batch", "length", "act_embed")), new_kv


def _lookup(table: Array, ids: Array, table_axes: tuple[str | None, ...], dtype: str) -> Array:
    """Rows ``table[ids]`` ([..., D]) of a table gathered along its model dim first.

    The tables' model dim is fsdp-sharded at rest; a lookup straight from that layout gives
    rows split along D, which the SPMD partitioner cannot turn into the batch-sharded
    activations without an "involuntary full rematerialization" (seen on the (2, 2, 2) mesh).
    """
    return jnp.take(_constrain(table, table_axes), ids, axis=0).astype(to_dtype(dtype))


def positions_from_mask(mask: Array) -> Array:
    """Position ids from an attention mask [B, T]: cumsum(mask) - 1, clipped at 0.

    Gives the same positions to a sequence whatever its left or right padding."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


class CausalLM(nn.Module):
    """Decoder-only transformer with an LM head (``head="lm"``), a scalar head
    (``head="scalar"``) or both on one backbone (``head="lm+scalar"``: a policy with a
    shared value head).

    The scalar head (reward model, value function) replaces the unembedding with a
    Dense(D -> 1) read at every position; the reward is read at the EOS position by the caller.
    """

    config: ModelConfig
    head: str = "lm"

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        *,
        position_ids: Array | None = None,
        cache: KVCache | None = None,
        deterministic: bool = True,
        head_slice: tuple[int, int] | None = None,
        head_index: Array | None = None,
    ) -> ModelOutput:
        """Args:
          input_ids: [B, T] int token ids.
          attention_mask: [B, T], 1 for real tokens (left or right padding); None = all real.
          position_ids: [B, T]; derived from the mask (and the cache's mask) when None.
          cache: a KVCache; the T new tokens are written at slots cache.index .. +T.
          deterministic: False enables dropout (needs a 'dropout' rng).
          head_slice: static (start, stop): apply the head to positions start:stop only
            (logits [B, stop - start, V]); the LM head is most of a short sequence's cost.
          head_index: [B] int: apply the head at one position per row (logits [B, 1, V]).
        """
        cfg = self.config
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        attention_mask = attention_mask.astype(jnp.int32)
        if cache is None:
            key_mask, query_slots, cache_index = attention_mask, jnp.arange(t), None
            if position_ids is None:
                position_ids = positions_from_mask(attention_mask)
        else:
            cache_index = cache.index
            key_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, cache_index))  # [B, S]
            query_slots = cache_index + jnp.arange(t)
            if position_ids is None:
                position_ids = jax.lax.dynamic_slice_in_dim(positions_from_mask(key_mask), cache_index, t, axis=1)

        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=to_dtype(cfg.dtype),
            param_dtype=to_dtype(cfg.param_dtype),
            embedding_init=_param(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="embed",
        )
        x = _lookup(embed.embedding, input_ids, ("vocab", None), cfg.dtype)  # [B, T, D]
        if cfg.family == "gpt2":
            pos_embed = nn.Embed(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                dtype=to_dtype(cfg.dtype),
                param_dtype=to_dtype(cfg.param_dtype),
                embedding_init=_param(nn.initializers.normal(0.01), (None, "embed")),
                name="pos_embed",
            )
            x = x + _lookup(pos_embed.embedding, position_ids, (None, None), cfg.dtype)
        x = nn.Dropout(cfg.dropout, deterministic=deterministic)(x)
        x = _constrain(x, ("batch", "length", "act_embed"))

        block_cls = nn.remat(Block, static_argnums=(7,)) if cfg.remat else Block
        new_keys, new_values = [], []
        for i in range(cfg.num_layers):
            layer_kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, kv = block_cls(cfg, name=f"layers_{i}")(
                x, position_ids, key_mask, query_slots, layer_kv, cache_index, deterministic
            )
            if kv is not None:
                new_keys.append(kv[0])
                new_values.append(kv[1])
        hidden = Norm(cfg, name="final_norm")(x)  # [B, T, D]
        head_in = hidden
        if head_slice is not None:
            head_in = hidden[:, head_slice[0] : head_slice[1]]  # [B, T', D]
        if head_index is not None:
            head_in = jnp.take_along_axis(head_in, head_index[:, None, None], axis=1)  # [B, 1, D]

        logits = values = None
        if self.head not in ("lm", "scalar", "lm+scalar"):
            raise ValueError(f"CausalLM.head must be 'lm', 'scalar' or 'lm+scalar', got {self.head!r}")
        if self.head in ("lm", "lm+scalar"):
            if cfg.tie_word_embeddings:
                logits = embed.attend(head_in)
            else:
                logits = _dense(cfg, cfg.vocab_size, ("embed", "vocab"), use_bias=False, name="lm_head")(head_in)
            logits = _constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))  # [B, T, V]
        if self.head in ("scalar", "lm+scalar"):
            score = nn.Dense(
                1,
                dtype=jnp.float32,
                param_dtype=to_dtype(cfg.param_dtype),
                kernel_init=_param(nn.initializers.normal(1.0 / (cfg.hidden_size + 1) ** 0.5), ("embed", None)),
                bias_init=_param(nn.initializers.zeros, (None,)),
                name="score",
            )
            values = score(head_in.astype(jnp.float32))[..., 0]  # [B, T]

        new_cache = None
        if cache is not None:
            new_cache = KVCache(tuple(new_keys), tuple(new_values), key_mask, cache_index + t)
        return ModelOutput(logits=logits, values=values, hidden_states=hidden, cache=new_cache)
