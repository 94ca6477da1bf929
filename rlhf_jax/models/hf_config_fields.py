"""Reading a checkpoint's config.json: the shared machinery under :mod:`rlhf_jax.models.hf_config`.

The error every malformed checkpoint raises (:class:`CheckpointError`, naming the file),
reading a JSON object from a checkpoint directory, the type check of every config.json
field the families read (positive ints, positive finite numbers, booleans, objects), and
the two fields several families spell the same way: RoPE (transformers 4.x ``rope_theta``
/ ``rope_scaling`` and 5.x ``rope_parameters``) and the activation name. What each family
makes of its fields is in :mod:`rlhf_jax.models.hf_config`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "LAYER_TYPES",
    "CheckpointError",
    "check_field_types",
    "read_activation",
    "read_config",
    "read_json",
    "read_rope",
]


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be imported (the message says which file/tensor and why)."""


def read_json(file: Path) -> dict:
    """A JSON object from ``file``; CheckpointError naming the file if it is not one."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def read_config(path: Path) -> dict:
    """The parsed config.json of a Hugging Face model directory."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face model directory)")
    return read_json(cfg_file)


LAYER_TYPES = ("full_attention", "sliding_attention")
_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "silu": "silu",
    "swish": "silu",
}


class RoPE(NamedTuple):
    """What a config.json says of RoPE (see :func:`read_rope`)."""

    theta: float
    rotary_pct: float  # fraction of head_dim rotated
    linear_factor: float = 1.0  # rope_type "linear": positions / factor
    llama3: tuple[float, float, float, int] | None = None  # rope_type "llama3": ModelConfig.rope_llama3


def read_rope(hf: dict, *, scaled: bool = False) -> RoPE:
    """RoPE's settings from a transformers 4.x or 5.x config dict. ``scaled``: the family (the
    llama family) may also use rope_type "linear" (``factor``) and "llama3" (``factor``,
    ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``, all
    required); any other rope_type but "default" is an error naming it."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    supported = ("default", "linear", "llama3") if scaled else ("default",)
    if rope_type not in (None, *supported):
        raise CheckpointError(
            f"config.json: rope_type {rope_type!r} is not supported (only {', '.join(map(repr, supported))} RoPE)"
        )
    theta = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    pct = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 1.0)))
    fields = {**scaling, **params}  # 4.x: rope_scaling; 5.x: rope_parameters
    if rope_type == "linear":
        factor = fields.get("factor")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
            raise CheckpointError(f"config.json: rope_type 'linear' needs a numeric factor > 0, got {factor!r}")
        return RoPE(float(theta), float(pct), linear_factor=float(factor))
    if rope_type == "llama3":
        names = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [n for n in names if not isinstance(fields.get(n), (int, float)) or isinstance(fields.get(n), bool)]
        if missing:
            raise CheckpointError(f"config.json: rope_type 'llama3' needs numeric {', '.join(missing)}")
        factor, low, high, original = (fields[n] for n in names)
        if not (factor > 0 and 0 < low < high and original > 0):
            raise CheckpointError(
                f"config.json: rope_type 'llama3' needs factor > 0, 0 < low_freq_factor < high_freq_factor and "
                f"original_max_position_embeddings > 0, got {factor}, {low}, {high}, {original}"
            )
        return RoPE(float(theta), float(pct), llama3=(float(factor), float(low), float(high), int(original)))
    return RoPE(float(theta), float(pct))


def read_activation(hf: dict, key: str) -> str:
    act = hf.get(key)
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise CheckpointError(f"config.json: {key}={act!r} is not supported (supported: {sorted(_ACTIVATIONS)})")
    return _ACTIVATIONS[act]


# Fields read from config.json, by the type they must have when present (None = the default).
_INT_FIELDS = (
    "vocab_size",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "n_positions",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "max_position_embeddings",
    "sliding_window",
    "sliding_window_pattern",
)
_FLOAT_FIELDS = (
    "layer_norm_epsilon",
    "layer_norm_eps",
    "rms_norm_eps",
    "rope_theta",
    "rotary_emb_base",
    "rotary_pct",
    "partial_rotary_factor",
    "rope_local_base_freq",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
)
_BOOL_FIELDS = (
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "use_parallel_residual",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "use_sliding_window",
    "use_bidirectional_attention",
)


def check_field_types(hf: dict) -> None:
    """Positive ints, positive finite numbers, booleans and objects where config.json must have them."""
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise CheckpointError(f"config.json: {key} must be an object, got {type(hf[key]).__name__}")
    rope = hf.get("rope_parameters") or {}
    layer_types = hf.get("layer_types")
    if layer_types is not None and (
        not isinstance(layer_types, list) or not all(isinstance(t, str) and t in LAYER_TYPES for t in layer_types)
    ):
        raise CheckpointError(f"config.json: layer_types={layer_types!r} must be a list of {list(LAYER_TYPES)}")
    for key in _BOOL_FIELDS:
        if hf.get(key) is not None and not isinstance(hf[key], bool):
            raise CheckpointError(f"config.json: {key}={hf[key]!r} must be true or false")
    for key in _INT_FIELDS:
        v = hf.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise CheckpointError(f"config.json: {key}={v!r} must be a positive int")
    for key in _FLOAT_FIELDS:
        for v in (hf.get(key), rope.get(key)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf")):
                raise CheckpointError(f"config.json: {key}={v!r} must be a positive number")
