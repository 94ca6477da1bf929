"""One Flax Linen decoder for the GPT-2, Llama (Qwen2, Mistral, SmolLM), GPT-NeoX and Gemma 3 families.

The layers are one ``nn.scan`` over a single ``Block``: every block parameter is stacked
with a leading layer axis (logical name 'layers', never sharded), so compile time does
not grow with depth. Parameters and the main activations carry logical axis names only
('batch', 'length', 'embed', 'mlp', 'heads', 'kv_heads', 'kv', 'vocab', 'layers');
``rlhf_jax.sharding`` maps them to the ('data', 'fsdp', 'tensor') mesh. The parameter
tree is a plain nested dict (L = num_layers):

    embed/embedding [V, D]             pos_embed/embedding [P, D] (gpt2)
    layers/attn_norm, layers/mlp_norm  {scale [L, D], bias [L, D] (layernorm)}
    layers/post_attn_norm, post_mlp_norm  {scale [L, D]} (gemma3)
    layers/attn/{q,k,v}/kernel         [L, D, H(kv), Dh] (+ bias [L, H(kv), Dh])
    layers/attn/{q,k}_norm/scale       [L, Dh] (gemma3)
    layers/attn/o/kernel               [L, H, Dh, D]     (+ bias [L, D])
    layers/mlp/{gate,up}/kernel [L, D, F]; layers/mlp/down/kernel [L, F, D] (+ biases)
    final_norm                         {scale [D], bias [D]}
    lm_head/kernel [D, V] (untied)  or  score/kernel [D, 1], score/bias [1] (scalar head)
"""

from __future__ import annotations

import re

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import ModelConfig
from rlhf_jax.models.attention import Attention, attention_masks, layer_specs
from rlhf_jax.models.layers import (
    MLP,
    Norm,
    constrain,
    param_init,
    positions_from_mask,
    positions_from_segments,
    softcap,
    to_dtype,
)
from rlhf_jax.models.matmul import mixed_matmul

Array = jax.Array
__all__ = [
    "CausalLM",
    "KVCache",
    "ModelOutput",
    "init_cache",
    "lm_logits",
    "positions_from_mask",
    "positions_from_segments",
    "stack_legacy_layers",
    "to_dtype",
    "unembedding",
]


@flax.struct.dataclass
class KVCache:
    """Preallocated key/value cache; every row writes its slot ``index`` at the same time.

    Attributes:
      keys: [L, B, H_kv, Dh, S]; values: [L, B, H_kv, S, Dh], stacked over the layers (the
        layer scan carries them). Both are laid out as the right-hand operands of
        attention's two matmuls (q @ K and p @ V), so a decode step never transposes the cache.
      mask: [B, S] int32, 1 for slots holding a real token (pads and unwritten slots 0).
      index: int32 scalar, the next slot to write.
    """

    keys: Array
    values: Array
    mask: Array
    index: Array


def init_cache(config: ModelConfig, *, batch_size: int, max_length: int, dtype=None) -> KVCache:
    """An empty cache for ``max_length`` slots (prompt + new tokens)."""
    dtype = dtype or to_dtype(config.dtype)
    layers, kv, dh = config.num_layers, config.kv_heads, config.dim_per_head
    return KVCache(
        keys=jnp.zeros((layers, batch_size, kv, dh, max_length), dtype),
        values=jnp.zeros((layers, batch_size, kv, max_length, dh), dtype),
        mask=jnp.zeros((batch_size, max_length), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


@flax.struct.dataclass
class ModelOutput:
    """logits [B, T, V] float32 (LM head; None for a scalar head or ``compute_logits=False``);
    values [B, T] float32 (scalar head) or None; hidden_states [B, T, D] after the final
    norm; cache: the updated KVCache or None."""

    logits: Array | None
    values: Array | None
    hidden_states: Array
    cache: KVCache | None


class Block(nn.Module):
    """One decoder layer, the body of the layer scan: ((x, cache), layer) -> ((x, cache), None).

    Pre-norm residual block; NeoX's parallel residual x + attn(ln1(x)) + mlp(ln2(x));
    Gemma 3's sandwich x + post_norm(attn(pre_norm(x))) around attention and MLP.
    """

    config: ModelConfig
    deterministic: bool = True  # False: dropout on (needs a 'dropout' rng)

    @nn.compact
    def __call__(self, carry, layer, positions, masks, cache_index):
        """carry: (x [B, T, D], cache (keys, values) stacked over layers, or None); layer:
        this layer's ``layer_specs`` scalars; positions [B, T]; masks: ``attention_masks``."""
        cfg = self.config
        x, cache = carry
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        attn_out, cache = Attention(cfg, name="attn")(
            Norm(cfg, name="attn_norm")(x), positions, masks, layer, cache, cache_index
        )
        if cfg.sandwich_norm:
            attn_out = Norm(cfg, name="post_attn_norm")(attn_out)
        if cfg.parallel_residual:  # NeoX: x + attn(ln1(x)) + mlp(ln2(x))
            mlp_out = MLP(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x))
            x = x + drop(attn_out) + drop(mlp_out)
        else:
            x = x + drop(attn_out)
            mlp_out = MLP(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x))
            if cfg.sandwich_norm:
                mlp_out = Norm(cfg, name="post_mlp_norm")(mlp_out)
            x = x + drop(mlp_out)
        return (constrain(x, ("batch", "length", "act_embed")), cache), None


def _lookup(table: Array, ids: Array, table_axes: tuple[str | None, ...], dtype: str) -> Array:
    """Rows ``table[ids]`` ([..., D]) of a table gathered along its model dim first.

    The tables' model dim is fsdp-sharded at rest; a lookup straight from that layout gives
    rows split along D, which the SPMD partitioner cannot turn into the batch-sharded
    activations without an "involuntary full rematerialization" (seen on the (2, 2, 2) mesh).
    """
    return jnp.take(constrain(table, table_axes), ids, axis=0).astype(to_dtype(dtype))


class _Kernel(nn.Module):
    """A bare weight (the untied LM head's [D, V]), applied by the caller."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    config: ModelConfig

    @nn.compact
    def __call__(self) -> Array:
        init = param_init(nn.initializers.normal(0.02), self.axes)
        return self.param("kernel", init, self.shape, to_dtype(self.config.param_dtype))


def unembedding(params: dict, config: ModelConfig) -> Array:
    """The LM head's matrix [D, V] of a params tree: the tied embedding transposed, or lm_head/kernel.

    With :func:`lm_logits` it gives the model's logits from ``hidden_states`` chunk by chunk
    (``CausalLM(..., compute_logits=False)``), without materialising [B, T, V].
    """
    if config.tie_word_embeddings:
        return params["embed"]["embedding"].T  # [D, V]
    return params["lm_head"]["kernel"]  # [D, V]


def lm_logits(hidden: Array, unembed: Array, config: ModelConfig) -> Array:
    """Logits [..., V] float32 of final hidden states [..., D] and ``unembedding`` [D, V],
    exactly as the model's LM head computes them (compute-dtype operands accumulated in float32,
    ``models.matmul``; then final soft-capping)."""
    dtype = to_dtype(config.dtype)
    lead = hidden.shape[:-1]
    h2 = hidden.astype(dtype).reshape(-1, hidden.shape[-1])  # [N, D]
    logits = mixed_matmul(h2, unembed, dtype).reshape(*lead, unembed.shape[-1])  # [..., V] float32
    return softcap(logits, config.final_logit_softcap)


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
        segment_ids: Array | None = None,
        cache: KVCache | None = None,
        deterministic: bool = True,
        head_slice: tuple[int, int] | None = None,
        head_index: Array | None = None,
        compute_logits: bool = True,
    ) -> ModelOutput:
        """Args:
        input_ids: [B, T] int token ids.
        attention_mask: [B, T], 1 for real tokens (left or right padding); None = all real.
        position_ids: [B, T]; derived from the mask (and the cache's mask), or from
          ``segment_ids`` (restarting per segment), when None.
        segment_ids: [B, T] int (no cache): several examples packed in one row, numbered
          1, 2, ... (0 at padding); attention stays within a segment (``data.pack_batch``).
        cache: a KVCache; the T new tokens are written at slots cache.index .. +T.
        deterministic: False enables dropout (needs a 'dropout' rng).
        head_slice: static (start, stop): apply the head to positions start:stop only
          (logits [B, stop - start, V]); the LM head is most of a short sequence's cost.
        head_index: [B] int: apply the head at one position per row (logits [B, 1, V]).
        compute_logits: False skips the LM head (logits None): for a loss that consumes
          ``hidden_states`` [B, T, D] and :func:`unembedding` in chunks. A scalar head still runs.
        """
        cfg = self.config
        if self.head not in ("lm", "scalar", "lm+scalar"):
            raise ValueError(f"CausalLM.head must be 'lm', 'scalar' or 'lm+scalar', got {self.head!r}")
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        attention_mask = attention_mask.astype(jnp.int32)
        if cache is None:
            key_mask, query_slots, cache_index = attention_mask, jnp.arange(t), jnp.zeros((), jnp.int32)
            if position_ids is None:
                position_ids = (
                    positions_from_mask(attention_mask) if segment_ids is None else positions_from_segments(segment_ids)
                )
            key_positions = position_ids
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed rows) cannot be used with a KV cache")
            cache_index = cache.index
            key_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, cache_index))  # [B, S]
            query_slots = cache_index + jnp.arange(t)
            if position_ids is None:
                position_ids = jax.lax.dynamic_slice_in_dim(positions_from_mask(key_mask), cache_index, t, axis=1)
            key_positions = None  # positions_from_mask(key_mask), where a window needs them

        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=to_dtype(cfg.dtype),
            param_dtype=to_dtype(cfg.param_dtype),
            embedding_init=param_init(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="embed",
        )
        x = _lookup(embed.embedding, input_ids, ("vocab", None), cfg.dtype)  # [B, T, D]
        if cfg.family == "gemma3":  # scaled by sqrt(D) rounded to the compute dtype, as HF does
            x = x * jnp.asarray(cfg.hidden_size**0.5, x.dtype)
        if cfg.family == "gpt2":
            pos_embed = nn.Embed(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                dtype=to_dtype(cfg.dtype),
                param_dtype=to_dtype(cfg.param_dtype),
                embedding_init=param_init(nn.initializers.normal(0.01), (None, "embed")),
                name="pos_embed",
            )
            x = x + _lookup(pos_embed.embedding, position_ids, (None, None), cfg.dtype)
        x = nn.Dropout(cfg.dropout, deterministic=deterministic)(x)
        x = constrain(x, ("batch", "length", "act_embed"))

        block = Block
        if cfg.remat != "none":  # "dots": keep the matmul outputs; "full": keep the block's input only
            policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if cfg.remat == "dots" else None
            block = nn.remat(Block, prevent_cse=False, policy=policy)
        stack = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        masks = attention_masks(
            cfg, position_ids, key_mask, query_slots, key_positions=key_positions, segment_ids=segment_ids
        )
        kv = None if cache is None else (cache.keys, cache.values)
        (x, kv), _ = stack(cfg, deterministic=deterministic, name="layers")(
            (x, kv), layer_specs(cfg), position_ids, masks, cache_index
        )
        hidden = Norm(cfg, name="final_norm")(x)  # [B, T, D]
        head_in = hidden
        if head_slice is not None:
            head_in = hidden[:, head_slice[0] : head_slice[1]]  # [B, T', D]
        if head_index is not None:
            head_in = jnp.take_along_axis(head_in, head_index[:, None, None], axis=1)  # [B, 1, D]

        logits = values = None
        if self.head in ("lm", "lm+scalar"):
            if cfg.tie_word_embeddings:
                unembed = embed.embedding.T  # [D, V]
            else:
                unembed = _Kernel((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg, name="lm_head")()
            if compute_logits:
                logits = constrain(lm_logits(head_in, unembed, cfg), ("batch", "length", "vocab"))  # [B, T, V]
        if self.head in ("scalar", "lm+scalar"):
            score = nn.Dense(
                1,
                dtype=jnp.float32,
                param_dtype=to_dtype(cfg.param_dtype),
                kernel_init=param_init(nn.initializers.normal(1.0 / (cfg.hidden_size + 1) ** 0.5), ("embed", None)),
                bias_init=param_init(nn.initializers.zeros, (None,)),
                name="score",
            )
            values = score(head_in.astype(jnp.float32))[..., 0]  # [B, T]

        new_cache = None
        if cache is not None:
            new_cache = KVCache(kv[0], kv[1], key_mask, cache_index + t)
        return ModelOutput(logits=logits, values=values, hidden_states=hidden, cache=new_cache)


_LEGACY_LAYER = re.compile(r"layers_(\d+)$")


def stack_legacy_layers(tree):
    """A tree written before the layers were scanned (``layers_0`` ... ``layers_{L-1}``, one
    subtree per layer) as today's layout (one ``layers`` subtree, leaves stacked [L, ...]).

    Every dict in ``tree`` is converted, so a params tree and an optimizer state restored
    raw (Adam's mu and nu mirror the params) both work. A tree without legacy keys is
    returned as it is. Stacked leaves are numpy arrays.

    Raises:
      ValueError: the legacy layers are not numbered 0..L-1, or differ in structure.
    """
    if isinstance(tree, (list, tuple)):
        return type(tree)(stack_legacy_layers(v) for v in tree)
    if not isinstance(tree, dict):
        return tree
    tree = {k: stack_legacy_layers(v) for k, v in tree.items()}
    found = {int(m.group(1)): k for k in tree if (m := _LEGACY_LAYER.match(str(k)))}
    if not found:
        return tree
    if sorted(found) != list(range(len(found))) or "layers" in tree:
        raise ValueError(f"legacy params: layer subtrees {sorted(found.values())} are not layers_0..layers_{{L-1}}")
    per_layer = [tree[found[i]] for i in range(len(found))]
    structure = jax.tree.structure(per_layer[0])
    if any(jax.tree.structure(p) != structure for p in per_layer):
        raise ValueError("legacy params: the layers_{i} subtrees differ in structure")
    out = {k: v for k, v in tree.items() if k not in found.values()}
    out["layers"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *per_layer)
    return out
