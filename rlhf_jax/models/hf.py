"""Hugging Face bridge: config.json + safetensors in, and out again.

This is the only module that reads or writes Hugging Face weights. Weights are matched
through an explicit name table per family (``_weight_table``), every key is accounted
for (missing, unexpected and mis-shaped tensors are errors naming the tensor), pickle
checkpoints are refused before a byte is read, and remote code is never executed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import ModelConfig
from rlhf_jax.models.hf_config import CheckpointError, config_from_hf, config_to_hf, read_config, read_json
from rlhf_jax.models.transformer import CausalLM


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Non-parameter buffers that some checkpoints carry.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")


# ----------------------------------------------------------------------------- weight table
@dataclass(frozen=True)
class _Entry:
    """Flax leaves <-> HF tensors, with the transforms both ways (numpy- and jax-compatible)."""

    flax_paths: tuple[tuple[str, ...], ...]
    hf_keys: tuple[str, ...]
    to_flax: Callable[..., tuple]
    to_hf: Callable[..., tuple]


def _one(flax_path: str, hf_key: str, to_flax=lambda a: a, to_hf=lambda a: a) -> _Entry:
    return _Entry((tuple(flax_path.split("/")),), (hf_key,), lambda a: (to_flax(a),), lambda a: (to_hf(a),))


def _linear(flax_path: str, hf_key: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> _Entry:
    """torch nn.Linear weight [out, in] <-> Flax DenseGeneral kernel [*in_shape, *out_shape]."""
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    return _one(
        flax_path, hf_key,
        lambda w: w.T.reshape(*in_shape, *out_shape),
        lambda k: k.reshape(n_in, n_out).T,
    )  # fmt: skip


def _bias(flax_path: str, hf_key: str, shape: tuple[int, ...]) -> _Entry:
    return _one(flax_path, hf_key, lambda b: b.reshape(shape), lambda b: b.reshape(-1))


def _norm(flax_prefix: str, hf_prefix: str, cfg: ModelConfig) -> list[_Entry]:
    entries = [_one(f"{flax_prefix}/scale", f"{hf_prefix}.weight")]
    if cfg.norm == "layernorm":
        entries.append(_one(f"{flax_prefix}/bias", f"{hf_prefix}.bias"))
    return entries


def _gpt2_c_attn(shape: tuple[int, ...]):
    """GPT-2's fused c_attn: weight [D, 3D] / bias [3D] <-> q, k, v of ``shape`` each."""
    n_cols = int(np.prod(shape[-2:]))

    def to_flax(w):
        cols = [w[..., i * n_cols : (i + 1) * n_cols] for i in range(3)]
        return tuple(c.reshape(shape) for c in cols)

    def to_hf(*parts):
        return (jnp.concatenate([p.reshape(*p.shape[:-2], n_cols) for p in parts], axis=-1),)

    return to_flax, to_hf


def _neox_qkv(h: int, dh: int, d: int | None):
    """NeoX's fused query_key_value, interleaved per head: weight [H*3*Dh, D] / bias [H*3*Dh]
    <-> q, k, v kernels [D, H, Dh] (or biases [H, Dh])."""

    def to_flax(w):
        w = w.reshape(h, 3, dh, *w.shape[1:])  # [H, 3, Dh, (D)]
        parts = [w[:, i] for i in range(3)]  # [H, Dh, (D)]
        return tuple(p.transpose(2, 0, 1) if d is not None else p for p in parts)

    def to_hf(*parts):
        parts = [p.transpose(1, 2, 0) if d is not None else p for p in parts]  # [H, Dh, (D)]
        stacked = jnp.stack(parts, axis=1)  # [H, 3, Dh, (D)]
        return (stacked.reshape(h * 3 * dh, *stacked.shape[3:]),)

    return to_flax, to_hf


def _weight_table(cfg: ModelConfig, head: str = "lm") -> list[_Entry]:
    """The explicit name table: every HF tensor of the family and where it lives in our tree."""
    d, h, kv, dh, f = cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head, cfg.mlp_dim
    t: list[_Entry] = []
    if cfg.family == "gpt2":  # Conv1D weights are already [in, out]
        t.append(_one("embed/embedding", "transformer.wte.weight"))
        t.append(_one("pos_embed/embedding", "transformer.wpe.weight"))
        for i in range(cfg.num_layers):
            p, L = f"layers_{i}", f"transformer.h.{i}"
            t += _norm(f"{p}/attn_norm", f"{L}.ln_1", cfg) + _norm(f"{p}/mlp_norm", f"{L}.ln_2", cfg)
            names = tuple(tuple(f"{p}/attn/{n}/kernel".split("/")) for n in "qkv")
            t.append(_Entry(names, (f"{L}.attn.c_attn.weight",), *_gpt2_c_attn((d, h, dh))))
            names = tuple(tuple(f"{p}/attn/{n}/bias".split("/")) for n in "qkv")
            t.append(_Entry(names, (f"{L}.attn.c_attn.bias",), *_gpt2_c_attn((h, dh))))
            t.append(_one(f"{p}/attn/o/kernel", f"{L}.attn.c_proj.weight", lambda w: w.reshape(h, dh, d), lambda k: k.reshape(h * dh, d)))
            t.append(_one(f"{p}/attn/o/bias", f"{L}.attn.c_proj.bias"))
            t.append(_one(f"{p}/mlp/up/kernel", f"{L}.mlp.c_fc.weight"))
            t.append(_one(f"{p}/mlp/up/bias", f"{L}.mlp.c_fc.bias"))
            t.append(_one(f"{p}/mlp/down/kernel", f"{L}.mlp.c_proj.weight"))
            t.append(_one(f"{p}/mlp/down/bias", f"{L}.mlp.c_proj.bias"))
        t += _norm("final_norm", "transformer.ln_f", cfg)
        head_key = "lm_head.weight"
    elif cfg.family == "neox":
        t.append(_one("embed/embedding", "gpt_neox.embed_in.weight"))
        for i in range(cfg.num_layers):
            p, L = f"layers_{i}", f"gpt_neox.layers.{i}"
            t += _norm(f"{p}/attn_norm", f"{L}.input_layernorm", cfg) + _norm(f"{p}/mlp_norm", f"{L}.post_attention_layernorm", cfg)
            names = tuple(tuple(f"{p}/attn/{n}/kernel".split("/")) for n in "qkv")
            t.append(_Entry(names, (f"{L}.attention.query_key_value.weight",), *_neox_qkv(h, dh, d)))
            if cfg.qkv_bias:
                names = tuple(tuple(f"{p}/attn/{n}/bias".split("/")) for n in "qkv")
                t.append(_Entry(names, (f"{L}.attention.query_key_value.bias",), *_neox_qkv(h, dh, None)))
            t.append(_linear(f"{p}/attn/o/kernel", f"{L}.attention.dense.weight", (h, dh), (d,)))
            if cfg.out_bias:
                t.append(_one(f"{p}/attn/o/bias", f"{L}.attention.dense.bias"))
            t.append(_linear(f"{p}/mlp/up/kernel", f"{L}.mlp.dense_h_to_4h.weight", (d,), (f,)))
            t.append(_one(f"{p}/mlp/up/bias", f"{L}.mlp.dense_h_to_4h.bias"))
            t.append(_linear(f"{p}/mlp/down/kernel", f"{L}.mlp.dense_4h_to_h.weight", (f,), (d,)))
            t.append(_one(f"{p}/mlp/down/bias", f"{L}.mlp.dense_4h_to_h.bias"))
        t += _norm("final_norm", "gpt_neox.final_layer_norm", cfg)
        head_key = "embed_out.weight"
    else:
        t.append(_one("embed/embedding", "model.embed_tokens.weight"))
        for i in range(cfg.num_layers):
            p, L = f"layers_{i}", f"model.layers.{i}"
            t += _norm(f"{p}/attn_norm", f"{L}.input_layernorm", cfg) + _norm(f"{p}/mlp_norm", f"{L}.post_attention_layernorm", cfg)
            for n, heads in (("q", h), ("k", kv), ("v", kv)):
                t.append(_linear(f"{p}/attn/{n}/kernel", f"{L}.self_attn.{n}_proj.weight", (d,), (heads, dh)))
                if cfg.qkv_bias:
                    t.append(_bias(f"{p}/attn/{n}/bias", f"{L}.self_attn.{n}_proj.bias", (heads, dh)))
            t.append(_linear(f"{p}/attn/o/kernel", f"{L}.self_attn.o_proj.weight", (h, dh), (d,)))
            if cfg.out_bias:
                t.append(_one(f"{p}/attn/o/bias", f"{L}.self_attn.o_proj.bias"))
            for n in ("gate", "up"):
                t.append(_linear(f"{p}/mlp/{n}/kernel", f"{L}.mlp.{n}_proj.weight", (d,), (f,)))
            t.append(_linear(f"{p}/mlp/down/kernel", f"{L}.mlp.down_proj.weight", (f,), (d,)))
            if cfg.mlp_bias:
                for n in ("gate", "up", "down"):
                    t.append(_one(f"{p}/mlp/{n}/bias", f"{L}.mlp.{n}_proj.bias"))
        t += _norm("final_norm", "model.norm", cfg)
        head_key = "lm_head.weight"
    if head == "lm" and not cfg.tie_word_embeddings:
        t.append(_linear("lm_head/kernel", head_key, (d,), (cfg.vocab_size,)))
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


def _canonical_key(key: str, family: str) -> str:
    """Checkpoints of base models (GPT2Model, LlamaModel) omit the LM-head model's prefix."""
    prefix = {"gpt2": "transformer.", "neox": "gpt_neox.", "llama": "model."}[family]
    if key.startswith(prefix) or key in ("lm_head.weight", "embed_out.weight"):
        return key
    return prefix + key


def params_from_hf(state: dict[str, np.ndarray], cfg: ModelConfig, *, head: str = "lm") -> dict:
    """Our nested params from a transformers state dict (numpy arrays), strictly checked."""
    state = {_canonical_key(k, cfg.family): v for k, v in state.items() if not k.endswith(_BUFFER_SUFFIXES)}
    if cfg.tie_word_embeddings:  # tied heads may or may not be stored
        state.pop("lm_head.weight", None)
    table = _weight_table(cfg, head)
    expected = abstract_params(cfg, head)
    expected_hf = hf_shapes(cfg, head)
    missing = [k for e in table for k in e.hf_keys if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s), first: {missing[:5]}")
    unexpected = sorted(set(state) - {k for e in table for k in e.hf_keys})
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} unexpected tensor(s): {unexpected[:5]}")
    params: dict = {}
    dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    for e in table:
        arrays = [state[k] for k in e.hf_keys]
        for k, a in zip(e.hf_keys, arrays):
            if tuple(a.shape) != expected_hf[k]:
                raise CheckpointError(f"tensor {k!r} has shape {tuple(a.shape)}, the config needs {expected_hf[k]}")
        for path, value in zip(e.flax_paths, e.to_flax(*arrays)):
            want = _get(expected, path).shape
            if tuple(value.shape) != tuple(want):  # a table bug, not a user error, but say which
                raise CheckpointError(f"tensor for {'/'.join(path)} has shape {value.shape}, expected {want}")
            _set(params, path, np.asarray(value).astype(dtype))
    produced, wanted = set(_flat_paths(params)), set(_flat_paths(expected))
    if head == "scalar":  # the score head is new: initialised by the caller
        wanted = {p for p in wanted if p[0] != "score"}
    if produced != wanted:
        raise CheckpointError(f"weight table does not cover parameters {sorted(wanted - produced)[:5]}")
    return params


def params_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """A transformers state dict (numpy, float32 unless the params are bf16) from our params."""
    state = {}
    for e in _weight_table(cfg):
        leaves = [np.asarray(_get(params, p)) for p in e.flax_paths]
        for k, v in zip(e.hf_keys, e.to_hf(*leaves)):
            state[k] = np.ascontiguousarray(v)
    return state


def abstract_params(cfg: ModelConfig, head: str = "lm") -> dict:
    """Shapes/dtypes of the param tree, without allocating it."""
    model = CausalLM(cfg, head=head)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return nn.unbox(variables)["params"]


def hf_shapes(cfg: ModelConfig, head: str = "lm") -> dict[str, tuple[int, ...]]:
    """Expected shape of every HF tensor, derived by running the table's export on shapes only."""
    abstract = abstract_params(cfg, head)
    out = {}
    for e in _weight_table(cfg, head):
        leaves = [_get(abstract, p) for p in e.flax_paths]
        shapes = jax.eval_shape(lambda *xs, _e=e: _e.to_hf(*xs), *leaves)
        out.update({k: tuple(s.shape) for k, s in zip(e.hf_keys, shapes)})
    return out


# ----------------------------------------------------------------------------- files
def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        names = sorted(set(map(str, weight_map.values())))
        foreign = [n for n in names if Path(n).name != n or not n.endswith(".safetensors")]
        if foreign:  # a pickle shard, or a path out of the directory: never opened
            raise CheckpointError(
                f"{index}: shard(s) {foreign[:5]} are not *.safetensors files inside {path}; refused "
                "(pickle files can execute code when loaded)"
            )
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard file(s) {missing} are missing")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path}: only pickle checkpoint(s) {pickles} found; pickle files can execute code when loaded and are "
            "refused. Convert them to safetensors (e.g. save_pretrained(..., safe_serialization=True) in a trusted "
            "environment)."
        )
    raise CheckpointError(f"{path}: no *.safetensors weights found")


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a (possibly sharded) safetensors checkpoint as numpy arrays."""
    from safetensors.numpy import load_file

    state: dict[str, np.ndarray] = {}
    for f in _safetensors_files(Path(path)):
        try:
            tensors = load_file(f)
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: a damaged or foreign file
            raise CheckpointError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        for k, v in tensors.items():
            if k in state:
                raise CheckpointError(f"{f}: tensor {k!r} appears in two shards")
            state[k] = v
    return state


def from_pretrained(path: str | os.PathLike, dtype: Any = jnp.float32, *, head: str = "lm") -> tuple[CausalLM, dict]:
    """Load a local Hugging Face directory (config.json + safetensors) as (module, params).

    Args:
      path: a directory with config.json and model.safetensors (or shards + index).
      dtype: parameter and compute dtype (jnp.float32 or jnp.bfloat16).
      head: "lm" for the language model; "scalar" for a reward/value model whose score
        head is freshly initialised (the unembedding is dropped).

    Returns:
      (model, params): ``model.apply({"params": params}, ids, attention_mask=mask)``.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (hub downloads are not done here: pass a local directory)")
    dtype_name = jnp.dtype(dtype).name
    cfg = config_from_hf(read_config(path), dtype=dtype_name)
    params = params_from_hf(load_state_dict(path), cfg, head=head)
    model = CausalLM(cfg, head=head)
    if head == "scalar":
        fresh = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
        params["score"] = jax.tree.map(np.asarray, fresh["score"])
    return model, jax.tree.map(jnp.asarray, params)


def save_pretrained(model: CausalLM, params: dict, out_dir: str | os.PathLike, *, tokenizer=None) -> Path:
    """Write config.json + model.safetensors that transformers' AutoModelForCausalLM loads."""
    from safetensors.numpy import save_file

    if model.head != "lm":
        raise ValueError("save_pretrained exports language models (head='lm'); scalar-head models live in run checkpoints")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = jax.device_get(params)
    state = params_to_hf(params, model.config)
    special = {}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        special[name] = value if value is not None and value < model.config.vocab_size else None
    hf_cfg = config_to_hf(model.config, **special)
    hf_cfg.architectures = [{"gpt2": "GPT2LMHeadModel", "neox": "GPTNeoXForCausalLM"}.get(
        model.config.family, {"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}.get(
            model.config.hf_model_type or "llama", "LlamaForCausalLM"))]  # fmt: skip
    hf_cfg.save_pretrained(out)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def load_tokenizer(path: str | os.PathLike, *, pad_token: str = "<|pad|>"):
    """transformers' AutoTokenizer for a local directory, with a pad token distinct from EOS.

    A tokenizer without a pad token, or whose pad is its EOS (GPT-2 style), gets a new
    ``pad_token`` added, and a warning says so: PAD must never hide the real EOS. If that
    grows the vocabulary past the model's embedding, ``resize_vocab`` makes room.
    A tokenizer that needs custom code (an ``auto_map`` naming a tokenizer class) is
    refused before transformers reads the directory: no downloaded code is ever run.
    """
    import warnings

    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (tokenizers are loaded from local directories only)")
    for name in ("tokenizer_config.json", "config.json"):
        auto_map = read_json(path / name).get("auto_map") if (path / name).is_file() else None
        if auto_map and (not isinstance(auto_map, dict) or "AutoTokenizer" in auto_map):
            raise CheckpointError(f"{path / name}: the tokenizer needs custom code (auto_map); custom code is refused")
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.eos_token_id is None:
        raise CheckpointError(f"{path}: the tokenizer has no EOS token; responses could never end")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        old = tok.pad_token
        tok.add_special_tokens({"pad_token": pad_token})
        warnings.warn(
            f"{path}: tokenizer pad token {old!r} was missing or equal to EOS; added {pad_token!r} as id "
            f"{tok.pad_token_id} (vocabulary now {len(tok)})",
            stacklevel=2,
        )
    return tok


def resize_vocab(model: CausalLM, params: dict, vocab_size: int) -> tuple[CausalLM, dict]:
    """Grow the embedding (and untied LM head) to ``vocab_size`` rows; new rows are the mean row."""
    cfg = model.config
    if vocab_size < cfg.vocab_size:
        raise ValueError(f"resize_vocab only grows the vocabulary ({cfg.vocab_size} -> {vocab_size} requested)")
    extra = vocab_size - cfg.vocab_size
    params = dict(params)
    emb = params["embed"]["embedding"]  # [V, D]
    params["embed"] = {"embedding": jnp.concatenate([emb, jnp.repeat(emb.mean(0, keepdims=True), extra, 0)])}
    if "lm_head" in params:
        k = params["lm_head"]["kernel"]  # [D, V]
        params["lm_head"] = {"kernel": jnp.concatenate([k, jnp.repeat(k.mean(1, keepdims=True), extra, 1)], axis=1)}
    return CausalLM(cfg.replace(vocab_size=vocab_size), head=model.head), params
