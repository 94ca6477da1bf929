"""The explicit HF <-> Flax weight name table, and state dicts through it, both ways.

Every HF tensor of a family has one ``_Entry``: which Flax leaves it becomes and the
transforms both ways (numpy- and jax-compatible). Block parameters are stacked over the
layers ([L, ...], the layer scan's layout): a per-layer entry fills (or reads) slice
``layer`` of its stacked leaves. Every key is accounted for: missing, unexpected and
mis-shaped tensors are errors naming the tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import ModelConfig
from rlhf_jax.models.hf_config_fields import CheckpointError
from rlhf_jax.models.transformer import CausalLM

# Non-parameter buffers that some checkpoints carry.
BUFFER_SUFFIXES = (
    ".attn.bias",
    ".attn.masked_bias",
    ".attention.bias",
    ".attention.masked_bias",
    ".rotary_emb.inv_freq",
)
_PREFIX = {"gpt2": "transformer.", "neox": "gpt_neox.", "llama": "model.", "gemma3": "model."}


@dataclass(frozen=True)
class _Entry:
    """Flax leaves <-> HF tensors, with the transforms both ways; ``layer``: the slice of
    the stacked leaves ([L, ...]) this per-layer entry covers (None: an unstacked leaf)."""

    flax_paths: tuple[tuple[str, ...], ...]
    hf_keys: tuple[str, ...]
    to_flax: Callable[..., tuple]
    to_hf: Callable[..., tuple]
    layer: int | None = None


def _one(flax_path: str, hf_key: str, to_flax=lambda a: a, to_hf=lambda a: a) -> _Entry:
    return _Entry((tuple(flax_path.split("/")),), (hf_key,), lambda a: (to_flax(a),), lambda a: (to_hf(a),))


def _linear(flax_path: str, hf_key: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> _Entry:
    """torch nn.Linear weight [out, in] <-> Flax kernel [*in_shape, *out_shape]."""
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    return _one(
        flax_path,
        hf_key,
        lambda w: w.T.reshape(*in_shape, *out_shape),  # [*in_shape, *out_shape]
        lambda k: k.reshape(n_in, n_out).T,  # [out, in]
    )


def _bias(flax_path: str, hf_key: str, shape: tuple[int, ...]) -> _Entry:
    return _one(flax_path, hf_key, lambda b: b.reshape(shape), lambda b: b.reshape(-1))


def _norm(flax_prefix: str, hf_prefix: str, cfg: ModelConfig) -> list[_Entry]:
    entries = [_one(f"{flax_prefix}/scale", f"{hf_prefix}.weight")]
    if cfg.norm == "layernorm":
        entries.append(_one(f"{flax_prefix}/bias", f"{hf_prefix}.bias"))
    return entries


def _fused(flax_prefix: str, leaf: str, hf_key: str, fns) -> _Entry:
    names = tuple(tuple(f"{flax_prefix}/{n}/{leaf}".split("/")) for n in "qkv")
    return _Entry(names, (hf_key,), *fns)


def _gpt2_c_attn(shape: tuple[int, ...]):
    """GPT-2's fused c_attn: weight [D, 3D] / bias [3D] <-> q, k, v of ``shape`` each."""
    n_cols = int(np.prod(shape[-2:]))

    def to_flax(w):
        cols = [w[..., i * n_cols : (i + 1) * n_cols] for i in range(3)]  # 3 x [(D,) H*Dh]
        return tuple(c.reshape(shape) for c in cols)  # 3 x [(D,) H, Dh]

    def to_hf(*parts):
        return (jnp.concatenate([p.reshape(*p.shape[:-2], n_cols) for p in parts], axis=-1),)  # [(D,) 3*H*Dh]

    return to_flax, to_hf


def _neox_qkv(h: int, dh: int, d: int | None):
    """NeoX's fused query_key_value, interleaved per head: weight [H*3*Dh, D] / bias [H*3*Dh]
    <-> q, k, v kernels [D, H, Dh] (or biases [H, Dh])."""

    def to_flax(w):
        w = w.reshape(h, 3, dh, *w.shape[1:])  # [H, 3, Dh, (D)]
        parts = [w[:, i] for i in range(3)]  # [H, Dh, (D)]
        return tuple(p.transpose(2, 0, 1) if d is not None else p for p in parts)  # [D, H, Dh] or [H, Dh]

    def to_hf(*parts):
        parts = [p.transpose(1, 2, 0) if d is not None else p for p in parts]  # [H, Dh, (D)]
        stacked = jnp.stack(parts, axis=1)  # [H, 3, Dh, (D)]
        return (stacked.reshape(h * 3 * dh, *stacked.shape[3:]),)  # [H*3*Dh, (D)]

    return to_flax, to_hf


def _layer_entries(cfg: ModelConfig, i: int) -> list[_Entry]:
    """The HF tensors of layer ``i`` (into slice i of the stacked ``layers/...`` leaves)."""
    d, h, kv, dh, f = cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head, cfg.mlp_dim
    p, t = "layers", []
    if cfg.family == "gpt2":  # Conv1D weights are already [in, out]
        L = f"transformer.h.{i}"
        t += _norm(f"{p}/attn_norm", f"{L}.ln_1", cfg) + _norm(f"{p}/mlp_norm", f"{L}.ln_2", cfg)
        t.append(_fused(f"{p}/attn", "kernel", f"{L}.attn.c_attn.weight", _gpt2_c_attn((d, h, dh))))
        t.append(_fused(f"{p}/attn", "bias", f"{L}.attn.c_attn.bias", _gpt2_c_attn((h, dh))))
        t.append(
            _one(
                f"{p}/attn/o/kernel",
                f"{L}.attn.c_proj.weight",
                lambda w: w.reshape(h, dh, d),
                lambda k: k.reshape(h * dh, d),
            )
        )
        t.append(_one(f"{p}/attn/o/bias", f"{L}.attn.c_proj.bias"))
        t.append(_one(f"{p}/mlp/up/kernel", f"{L}.mlp.c_fc.weight"))
        t.append(_one(f"{p}/mlp/up/bias", f"{L}.mlp.c_fc.bias"))
        t.append(_one(f"{p}/mlp/down/kernel", f"{L}.mlp.c_proj.weight"))
        t.append(_one(f"{p}/mlp/down/bias", f"{L}.mlp.c_proj.bias"))
    elif cfg.family == "neox":
        L = f"gpt_neox.layers.{i}"
        t += _norm(f"{p}/attn_norm", f"{L}.input_layernorm", cfg) + _norm(
            f"{p}/mlp_norm", f"{L}.post_attention_layernorm", cfg
        )
        t.append(_fused(f"{p}/attn", "kernel", f"{L}.attention.query_key_value.weight", _neox_qkv(h, dh, d)))
        if cfg.qkv_bias:
            t.append(_fused(f"{p}/attn", "bias", f"{L}.attention.query_key_value.bias", _neox_qkv(h, dh, None)))
        t.append(_linear(f"{p}/attn/o/kernel", f"{L}.attention.dense.weight", (h, dh), (d,)))
        if cfg.out_bias:
            t.append(_one(f"{p}/attn/o/bias", f"{L}.attention.dense.bias"))
        t.append(_linear(f"{p}/mlp/up/kernel", f"{L}.mlp.dense_h_to_4h.weight", (d,), (f,)))
        t.append(_one(f"{p}/mlp/up/bias", f"{L}.mlp.dense_h_to_4h.bias"))
        t.append(_linear(f"{p}/mlp/down/kernel", f"{L}.mlp.dense_4h_to_h.weight", (f,), (d,)))
        t.append(_one(f"{p}/mlp/down/bias", f"{L}.mlp.dense_4h_to_h.bias"))
    else:  # llama, gemma3
        L = f"model.layers.{i}"
        t += _norm(f"{p}/attn_norm", f"{L}.input_layernorm", cfg)
        if cfg.sandwich_norm:  # Gemma 3: post_attention_layernorm is after attention, not before the MLP
            t += _norm(f"{p}/post_attn_norm", f"{L}.post_attention_layernorm", cfg)
            t += _norm(f"{p}/mlp_norm", f"{L}.pre_feedforward_layernorm", cfg)
            t += _norm(f"{p}/post_mlp_norm", f"{L}.post_feedforward_layernorm", cfg)
        else:
            t += _norm(f"{p}/mlp_norm", f"{L}.post_attention_layernorm", cfg)
        for n, heads in (("q", h), ("k", kv), ("v", kv)):
            t.append(_linear(f"{p}/attn/{n}/kernel", f"{L}.self_attn.{n}_proj.weight", (d,), (heads, dh)))
            if cfg.qkv_bias:
                t.append(_bias(f"{p}/attn/{n}/bias", f"{L}.self_attn.{n}_proj.bias", (heads, dh)))
        if cfg.qk_norm:
            t += _norm(f"{p}/attn/q_norm", f"{L}.self_attn.q_norm", cfg) + _norm(
                f"{p}/attn/k_norm", f"{L}.self_attn.k_norm", cfg
            )
        t.append(_linear(f"{p}/attn/o/kernel", f"{L}.self_attn.o_proj.weight", (h, dh), (d,)))
        if cfg.out_bias:
            t.append(_one(f"{p}/attn/o/bias", f"{L}.self_attn.o_proj.bias"))
        for n in ("gate", "up"):
            t.append(_linear(f"{p}/mlp/{n}/kernel", f"{L}.mlp.{n}_proj.weight", (d,), (f,)))
        t.append(_linear(f"{p}/mlp/down/kernel", f"{L}.mlp.down_proj.weight", (f,), (d,)))
        if cfg.mlp_bias:
            for n in ("gate", "up", "down"):
                t.append(_one(f"{p}/mlp/{n}/bias", f"{L}.mlp.{n}_proj.bias"))
    return [dataclasses.replace(e, layer=i) for e in t]


def weight_table(cfg: ModelConfig, head: str = "lm") -> list[_Entry]:
    """The explicit name table: every HF tensor of the family and where it lives in our tree."""
    prefix = _PREFIX[cfg.family]
    embed = {"gpt2": "wte", "neox": "embed_in"}.get(cfg.family, "embed_tokens")
    t = [_one("embed/embedding", f"{prefix}{embed}.weight")]
    if cfg.family == "gpt2":
        t.append(_one("pos_embed/embedding", "transformer.wpe.weight"))
    for i in range(cfg.num_layers):
        t += _layer_entries(cfg, i)
    final = {"gpt2": "ln_f", "neox": "final_layer_norm"}.get(cfg.family, "norm")
    t += _norm("final_norm", f"{prefix}{final}", cfg)
    if head == "lm" and not cfg.tie_word_embeddings:
        head_key = "embed_out.weight" if cfg.family == "neox" else "lm_head.weight"
        t.append(_linear("lm_head/kernel", head_key, (cfg.hidden_size,), (cfg.vocab_size,)))
    return t


# ----------------------------------------------------------------------------- state dicts
def _get(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _flat_paths(tree: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for k, v in tree.items():
        out += _flat_paths(v, prefix + (k,)) if isinstance(v, dict) else [prefix + (k,)]
    return out


def _leaf(tree: dict, path: tuple[str, ...], layer: int | None):
    """A leaf of ``tree``, or slice ``layer`` of a stacked one (arrays or ShapeDtypeStructs)."""
    x = _get(tree, path)
    if layer is None:
        return x
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    return x[layer]


def _canonical_key(key: str, family: str) -> str:
    """Checkpoints of base models (GPT2Model, LlamaModel) omit the LM-head model's prefix."""
    prefix = _PREFIX[family]
    if key.startswith(prefix) or key in ("lm_head.weight", "embed_out.weight"):
        return key
    return prefix + key


def params_from_hf(state: dict[str, np.ndarray], cfg: ModelConfig, *, head: str = "lm") -> dict:
    """Our nested params (block leaves stacked [L, ...]) from a transformers state dict
    (numpy arrays), strictly checked: every tensor named by the table, with its shape."""
    state = {_canonical_key(k, cfg.family): v for k, v in state.items() if not k.endswith(BUFFER_SUFFIXES)}
    if cfg.tie_word_embeddings:  # tied heads may or may not be stored
        state.pop("lm_head.weight", None)
    table = weight_table(cfg, head)
    expected = abstract_params(cfg, head)
    expected_hf = hf_shapes(cfg, head)
    missing = [k for e in table for k in e.hf_keys if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s), first: {missing[:5]}")
    unexpected = sorted(set(state) - {k for e in table for k in e.hf_keys})
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} unexpected tensor(s): {unexpected[:5]}")
    params: dict = {}
    stacks: dict[tuple[str, ...], list] = {}  # stacked leaf -> its L layer slices
    dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    for e in table:
        arrays = [state[k] for k in e.hf_keys]
        for k, a in zip(e.hf_keys, arrays):
            if tuple(a.shape) != expected_hf[k]:
                raise CheckpointError(f"tensor {k!r} has shape {tuple(a.shape)}, the config needs {expected_hf[k]}")
        for path, value in zip(e.flax_paths, e.to_flax(*arrays)):
            want = _leaf(expected, path, e.layer).shape
            if tuple(value.shape) != tuple(want):  # a table bug, not a user error, but say which
                raise CheckpointError(
                    f"tensor {e.hf_keys} for {'/'.join(path)} has shape {value.shape}, expected {want}"
                )
            value = np.asarray(value).astype(dtype)
            if e.layer is None:
                _set(params, path, value)
            else:
                stacks.setdefault(path, [None] * cfg.num_layers)[e.layer] = value
    for path, parts in stacks.items():
        holes = [i for i, p in enumerate(parts) if p is None]
        if holes:
            raise CheckpointError(f"weight table does not fill layers {holes[:5]} of {'/'.join(path)}")
        _set(params, path, np.stack(parts))  # [L, ...]
    produced, wanted = set(_flat_paths(params)), set(_flat_paths(expected))
    if head == "scalar":  # the score head is new: initialised by the caller
        wanted = {p for p in wanted if p[0] != "score"}
    if produced != wanted:
        raise CheckpointError(f"weight table does not cover parameters {sorted(wanted - produced)[:5]}")
    return params


def params_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """A transformers state dict (numpy, float32 unless the params are bf16) from our params;
    stacked block leaves are split into one tensor per layer."""
    params = jax.tree.map(np.asarray, params)
    state = {}
    for e in weight_table(cfg):
        leaves = [_leaf(params, p, e.layer) for p in e.flax_paths]
        for k, v in zip(e.hf_keys, e.to_hf(*leaves)):
            state[k] = np.ascontiguousarray(v)
    return state


def abstract_params(cfg: ModelConfig, head: str = "lm") -> dict:
    """Shapes/dtypes of the param tree (block leaves [L, ...]), without allocating it."""
    model = CausalLM(cfg, head=head)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return nn.unbox(variables)["params"]


def hf_shapes(cfg: ModelConfig, head: str = "lm") -> dict[str, tuple[int, ...]]:
    """Expected shape of every HF tensor, derived by running the table's export on shapes only."""
    abstract = abstract_params(cfg, head)
    out = {}
    for e in weight_table(cfg, head):
        leaves = [_leaf(abstract, p, e.layer) for p in e.flax_paths]
        shapes = jax.eval_shape(lambda *xs, _e=e: _e.to_hf(*xs), *leaves)
        out.update({k: tuple(s.shape) for k, s in zip(e.hf_keys, shapes)})
    return out
