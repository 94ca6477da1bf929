"""Hugging Face bridge: config.json + safetensors in, and out again.

This is the only module (with ``hf_weights``, its name table) that reads or writes Hugging
Face weights. Weights are matched through an explicit name table per family
(``hf_weights.weight_table``; block tensors stacked over layers), every key is accounted
for (missing, unexpected and mis-shaped tensors are errors naming the tensor), pickle
checkpoints are refused before a byte is read, and remote code is never executed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.hf_config import config_from_hf, config_to_hf
from rlhf_jax.models.hf_config_fields import CheckpointError, read_config, read_json
from rlhf_jax.models.hf_weights import abstract_params, hf_shapes, params_from_hf, params_to_hf, weight_table
from rlhf_jax.models.transformer import CausalLM

__all__ = [
    "abstract_params",
    "from_pretrained",
    "hf_shapes",
    "load_state_dict",
    "load_tokenizer",
    "params_from_hf",
    "params_to_hf",
    "resize_vocab",
    "save_pretrained",
    "weight_table",
]


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "gpt_neox": "GPTNeoXForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


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
    """Write config.json + model.safetensors that transformers' AutoModelForCausalLM loads.

    Raises:
      CheckpointError: before anything is written, for a config that no transformers class
        computes (e.g. GPT-2 with GPT-3 style banded layers); the message names the setting.
    """
    from safetensors.numpy import save_file

    if model.head != "lm":
        raise ValueError(
            "save_pretrained exports language models (head='lm'); scalar-head models live in run checkpoints"
        )
    special = {}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        special[name] = value if value is not None and value < model.config.vocab_size else None
    hf_cfg = config_to_hf(model.config, **special)  # refuses what transformers cannot express
    hf_cfg.architectures = [_ARCHITECTURES[hf_cfg.model_type]]
    state = params_to_hf(jax.device_get(params), model.config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
