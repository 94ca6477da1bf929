"""Hugging Face config.json <-> ModelConfig, for the supported families.

Reading a config.json (or any JSON file of a checkpoint directory) gives a CheckpointError
naming the file when it is not a JSON object; that, the field type checks and the RoPE
and activation fields the families share are in :mod:`rlhf_jax.models.hf_config_fields`,
and this module holds what each family makes of its fields, in both directions.

transformers 4.x and 5.x spellings are both read (5.x moved the RoPE settings into
``rope_parameters``); anything that would change the computation and is not supported
(RoPE scaling other than the llama family's linear and Llama 3.1 types and Gemma 3's linear
one, Qwen2's / Qwen3's sliding window, GPT-2's attention-scaling variants) is an error naming
the field. Exporting a config that no transformers class expresses (GPT-2 with banded layers,
mixed windows outside Gemma 3) is refused.
"""

from __future__ import annotations

import warnings
from typing import Any

from rlhf_jax.config import ModelConfig
from rlhf_jax.models.hf_config_fields import (
    LAYER_TYPES,
    CheckpointError,
    check_field_types,
    read_activation,
    read_config,
    read_json,
    read_rope,
)

# CheckpointError, read_json and read_config live in hf_config_fields and stay importable from here.
__all__ = ["SUPPORTED_MODEL_TYPES", "CheckpointError", "config_from_hf", "config_to_hf", "read_config", "read_json"]

_LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_GEMMA_TYPES = ("gemma2", "gemma3_text")  # the "gemma3" family
SUPPORTED_MODEL_TYPES = ("gpt2", "gpt_neox", *_LLAMA_TYPES, *_GEMMA_TYPES)


def config_from_hf(hf: dict, *, dtype: str = "float32") -> ModelConfig:
    """A ModelConfig from a transformers config dict (the parsed config.json).

    Raises:
      CheckpointError: an unsupported model type or feature, or a missing, mistyped or
        inconsistent field (the message names it).
    """
    check_field_types(hf)
    hf = {k: v for k, v in hf.items() if v is not None}  # null means absent: the default, or missing
    try:
        return _config_from_hf(hf, dtype)
    except KeyError as e:
        raise CheckpointError(f"config.json: required field {e.args[0]!r} is missing") from None
    except ValueError as e:  # ModelConfig's own consistency checks
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"config.json: {e}") from None


def _config_from_hf(hf: dict, dtype: str) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"config.json: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    common = dict(vocab_size=hf["vocab_size"], dtype=dtype, param_dtype=dtype, hf_model_type=model_type)
    if model_type == "gpt2":
        if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
            raise CheckpointError("config.json: GPT-2 attention-scaling variants are not supported")
        return ModelConfig(
            family="gpt2",
            hidden_size=hf["n_embd"],
            num_layers=hf["n_layer"],
            num_heads=hf["n_head"],
            intermediate_size=hf.get("n_inner"),
            max_position_embeddings=hf["n_positions"],
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            activation=read_activation(hf, "activation_function"),
            qkv_bias=True,
            out_bias=True,
            mlp_bias=True,
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            **common,
        )
    if model_type in _GEMMA_TYPES:
        return _gemma_from_hf(hf, common)
    rope = read_rope(hf, scaled=model_type in _LLAMA_TYPES)
    theta, pct = rope.theta, rope.rotary_pct
    if model_type == "gpt_neox":
        bias = hf.get("attention_bias", True)
        return ModelConfig(
            family="neox",
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("layer_norm_eps", 1e-5),
            activation=read_activation(hf, "hidden_act"),
            rope_theta=theta,
            rotary_pct=pct,
            qkv_bias=bias,
            out_bias=bias,
            mlp_bias=True,
            parallel_residual=hf.get("use_parallel_residual", True),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            **common,
        )
    window = hf.get("sliding_window") if model_type == "mistral" else None
    if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window", False):
        raise CheckpointError(f"config.json: {model_type} use_sliding_window=true is not supported")
    attn_bias = model_type == "qwen2" or hf.get("attention_bias", False)
    # Llama's and Qwen3's attention_bias covers o_proj too; Qwen2's q/k/v biases do not
    out_bias = model_type in ("llama", "qwen3") and hf.get("attention_bias", False)
    return ModelConfig(
        family="llama",
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation=read_activation(hf, "hidden_act"),
        rope_theta=theta,
        rotary_pct=pct,
        qkv_bias=attn_bias,
        out_bias=out_bias,
        mlp_bias=model_type == "llama" and hf.get("mlp_bias", False),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        sliding_window=window,
        rope_scaling_factor=rope.linear_factor,
        rope_llama3=rope.llama3,
        query_key_norm=model_type == "qwen3" or None,
        **common,
    )


def _gemma3_rope(hf: dict) -> dict:
    """Gemma 3's two RoPEs: (full-attention theta and linear factor, sliding-layer theta), from
    transformers 5's per-layer-type ``rope_parameters`` or 4.x's rope_theta / rope_local_base_freq /
    rope_scaling (which applies to the full-attention layers)."""
    params = hf.get("rope_parameters") or {}
    if params and not all(isinstance(params.get(k, {}), dict) for k in LAYER_TYPES):
        raise CheckpointError("config.json: gemma3_text rope_parameters must map layer types to objects")
    full = dict(params.get("full_attention") or {})
    local = dict(params.get("sliding_attention") or {})
    full.update(hf.get("rope_scaling") or {})
    full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
    out = {}
    for kind, p in (("full_attention", full), ("sliding_attention", local)):
        rope_type = p.get("rope_type", p.get("type", "default"))
        allowed = ("default", "linear") if kind == "full_attention" else ("default",)
        if rope_type not in allowed:
            raise CheckpointError(f"config.json: {kind} rope_type {rope_type!r} is not supported (only {allowed})")
        factor = p.get("factor", 1.0) if rope_type == "linear" else 1.0
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < float("inf"):
            raise CheckpointError(f"config.json: {kind} RoPE factor={factor!r} must be a positive number")
        if p.get("partial_rotary_factor", 1.0) != 1.0:
            raise CheckpointError(f"config.json: {kind} partial_rotary_factor is not supported for gemma3_text")
        out[kind] = (float(p["rope_theta"]), float(factor))
    return out


def _gemma_from_hf(hf: dict, common: dict) -> ModelConfig:
    """Gemma 3 text or Gemma 2: the same layer (RMSNorm with (1 + w), norms before and after
    attention and MLP, sqrt(D)-scaled embeddings, local and global layers). Gemma 2 has one
    RoPE for all layers, no query/key norm, caps the attention scores
    (``attn_logit_softcapping``) and alternates local and global layers."""
    model_type = hf["model_type"]
    if hf.get("use_bidirectional_attention", False):
        raise CheckpointError(f"config.json: {model_type} use_bidirectional_attention=true is not supported")
    layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    if layer_types is None:  # transformers' rule for configs with only sliding_window_pattern
        pattern = hf.get("sliding_window_pattern", 2 if model_type == "gemma2" else 6)
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    if len(layer_types) != layers:
        raise CheckpointError(f"config.json: layer_types has {len(layer_types)} entries, num_hidden_layers={layers}")
    if model_type == "gemma2":
        one = read_rope(hf)  # the default RoPE only, on every layer
        if one.rotary_pct != 1.0:
            raise CheckpointError("config.json: partial_rotary_factor is not supported for gemma2")
        rope = {"full_attention": (one.theta, 1.0), "sliding_attention": (None, 1.0)}  # None: rope_theta
        attn_softcap = hf.get("attn_logit_softcapping")
    else:
        rope = _gemma3_rope(hf)
        attn_softcap = None
        if hf.get("attn_logit_softcapping") is not None:  # transformers' Gemma3Attention never passes it on
            warnings.warn(
                f"config.json: gemma3_text attn_logit_softcapping={hf['attn_logit_softcapping']} is ignored, as "
                "transformers' Gemma 3 ignores it (only Gemma 2 caps attention scores)",
                stacklevel=3,
            )
    bias = hf.get("attention_bias", False)
    return ModelConfig(
        family="gemma3",
        hidden_size=hf["hidden_size"],
        num_layers=layers,
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim", 256),
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 131_072),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation=read_activation(
            {"hidden_activation": hf.get("hidden_activation", hf.get("hidden_act"))}, "hidden_activation"
        ),
        rope_theta=rope["full_attention"][0],
        rope_scaling_factor=rope["full_attention"][1],
        rope_local_theta=rope["sliding_attention"][0],
        qkv_bias=bias,
        out_bias=bias,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        sliding_window=hf.get("sliding_window", 4096),
        layer_types=tuple(layer_types),
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
        attn_logit_softcap=attn_softcap,
        final_logit_softcap=hf.get("final_logit_softcapping"),
        query_key_norm=False if model_type == "gemma2" else None,
        **common,
    )


def _check_exportable(cfg: ModelConfig) -> None:
    """Refuse settings the family's transformers class cannot express (they would change the model)."""
    if cfg.family == "gemma3":
        family = "gemma2" if cfg.hf_model_type == "gemma2" else "gemma3"
    else:
        family = cfg.hf_model_type or cfg.family
    problems = []
    if cfg.family != "gemma3":
        kinds = set(cfg.layer_kinds)
        if "sliding_attention" in kinds and (family != "mistral" or kinds != {"sliding_attention"}):
            problems.append(
                f"sliding-window / banded layers {cfg.layer_kinds} (transformers' {family} has no such attention; "
                "only Mistral's all-layer window and Gemma 3's layer_types export)"
            )
        for name in ("rope_local_theta", "query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            if getattr(cfg, name) is not None:
                problems.append(f"{name}={getattr(cfg, name)}")
        if cfg.rope_scaling_factor != 1.0 and family not in _LLAMA_TYPES:
            problems.append(f"rope_scaling_factor={cfg.rope_scaling_factor}")
        if cfg.rope_scaling_factor != 1.0 and cfg.rope_llama3 is not None:
            problems.append("both linear and Llama 3.1 RoPE scaling (transformers has one rope_type)")
    else:
        if cfg.qkv_bias != cfg.out_bias or cfg.mlp_bias or cfg.parallel_residual or cfg.rotary_pct != 1.0:
            problems.append("qkv_bias != out_bias, mlp_bias, parallel_residual or partial rotary")
        if cfg.query_pre_attn_scalar is not None and cfg.query_pre_attn_scalar != int(cfg.query_pre_attn_scalar):
            problems.append(f"query_pre_attn_scalar={cfg.query_pre_attn_scalar} (transformers needs an int)")
        if family == "gemma2":
            if cfg.rope_local_theta is not None or cfg.rope_scaling_factor != 1.0:
                problems.append("a second RoPE or RoPE scaling (transformers' Gemma 2 has one default RoPE)")
        elif cfg.attn_logit_softcap is not None:  # transformers' Gemma 3 would silently drop it
            problems.append(f"attn_logit_softcap={cfg.attn_logit_softcap} (transformers' Gemma 3 ignores it)")
    if cfg.qk_norm != (family in ("qwen3", "gemma3")):  # only these transformers classes norm q and k
        problems.append(
            f"query/key norm {'on' if cfg.qk_norm else 'off'} (transformers' {family} has it the other way)"
        )
    if cfg.rope_llama3 is not None and family not in _LLAMA_TYPES:
        problems.append(f"rope_llama3={cfg.rope_llama3} (Llama 3.1's RoPE scaling: llama-family models only)")
    if problems:
        raise CheckpointError(f"export: no transformers {family} model computes this config: {'; '.join(problems)}")


def config_to_hf(cfg: ModelConfig, **extra: Any):
    """A transformers PretrainedConfig for ``cfg`` (the class is chosen by family / hf_model_type)."""
    import transformers

    _check_exportable(cfg)
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "silu": "silu"}[cfg.activation]
    if cfg.family == "gemma3":
        gemma = dict(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.mlp_dim,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.kv_heads,
            head_dim=cfg.dim_per_head,
            max_position_embeddings=cfg.max_position_embeddings,
            rms_norm_eps=cfg.norm_eps,
            hidden_activation={"gelu_tanh": "gelu_pytorch_tanh"}.get(cfg.activation, act),
            tie_word_embeddings=cfg.tie_word_embeddings,
            attention_bias=cfg.qkv_bias,
            query_pre_attn_scalar=int(cfg.query_pre_attn_scalar or cfg.dim_per_head),
            sliding_window=cfg.sliding_window or 4096,
            layer_types=list(cfg.layer_kinds),
            final_logit_softcapping=cfg.final_logit_softcap,
            **extra,
        )
        if cfg.hf_model_type == "gemma2":  # one RoPE; attention scores capped
            return transformers.Gemma2Config(
                rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                attn_logit_softcapping=cfg.attn_logit_softcap,
                **gemma,
            )
        rope = {
            "full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta},
        }
        if cfg.rope_scaling_factor != 1.0:
            rope["full_attention"].update(rope_type="linear", factor=cfg.rope_scaling_factor)
        return transformers.Gemma3TextConfig(rope_parameters=rope, **gemma)
    if cfg.family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=cfg.vocab_size,
            n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_inner=cfg.mlp_dim,
            n_positions=cfg.max_position_embeddings,
            layer_norm_epsilon=cfg.norm_eps,
            activation_function=act,
            tie_word_embeddings=cfg.tie_word_embeddings,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **extra,
        )
    if cfg.family == "neox":
        return transformers.GPTNeoXConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.mlp_dim,
            max_position_embeddings=cfg.max_position_embeddings,
            layer_norm_eps=cfg.norm_eps,
            hidden_act=act,
            rotary_pct=cfg.rotary_pct,
            rotary_emb_base=cfg.rope_theta,
            use_parallel_residual=cfg.parallel_residual,
            attention_bias=cfg.qkv_bias,
            tie_word_embeddings=cfg.tie_word_embeddings,
            **extra,
        )
    model_type = cfg.hf_model_type or "llama"
    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.dim_per_head,
        intermediate_size=cfg.mlp_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_eps,
        hidden_act=act,
        tie_word_embeddings=cfg.tie_word_embeddings,
        **extra,
    )
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling_factor != 1.0:
        rope.update(rope_type="linear", factor=cfg.rope_scaling_factor)
    if cfg.rope_llama3 is not None:
        names = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        rope.update(rope_type="llama3", **dict(zip(names, cfg.rope_llama3)))
    kwargs["rope_parameters"] = rope
    if model_type == "qwen2":
        return transformers.Qwen2Config(**kwargs)
    if model_type == "qwen3":
        if cfg.qkv_bias != cfg.out_bias:
            raise CheckpointError("export: Qwen3's attention_bias is one flag for q/k/v and o (qkv_bias == out_bias)")
        return transformers.Qwen3Config(attention_bias=cfg.qkv_bias, **kwargs)
    if model_type == "mistral":
        return transformers.MistralConfig(sliding_window=cfg.sliding_window, **kwargs)
    if cfg.sliding_window is not None:
        raise CheckpointError("export: a llama-family config with sliding_window needs hf_model_type='mistral'")
    return transformers.LlamaConfig(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, **kwargs)
