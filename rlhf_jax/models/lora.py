"""LoRA parameter trees: the frozen base and the trainable part, split, joined and merged.

With ``ModelConfig.lora`` set, every targeted projection has ``lora_a`` [L, *in, r] and
``lora_b`` [L, r, *out] beside its ``kernel`` (``models.layers.Linear``). Training keeps two
trees (params of one ``CausalLM`` are their union):

  * the **base**: every pretrained weight, frozen; passed to the compiled step as a frozen
    argument (never donated, never in a checkpoint). In PPO the policy's base is also the KL
    reference, and the value network's base is the reward model's weights: one copy each.
  * the **trainable** tree: the adapters, plus the ``score`` head when the model has one
    (a reward model's or value network's new head trains in full, as PEFT's
    ``modules_to_save``). Only it has optimizer state, EMA and checkpoints.

Export merges ``W + (alpha / r) A B`` into full weights (:func:`merge_adapters`), or writes
the adapters alone in PEFT's format (:func:`peft_state_dict`, :func:`peft_config`).

QLoRA (``LoRAConfig.base_bits``): the base's adapted kernels are held quantized
(``models.quant.quantize_base``, done by the driver); the split, join and reference model
below work on such a tree unchanged, and a merge goes into the dequantized base.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import LoRAConfig, ModelConfig
from rlhf_jax.models import quant
from rlhf_jax.models.params import init_params

ADAPTER_LEAVES = ("lora_a", "lora_b")
TRAINABLE_HEADS = ("score",)  # top-level subtrees that train in full next to the adapters


def _is_trainable(path: tuple[str, ...]) -> bool:
    return path[-1] in ADAPTER_LEAVES or path[0] in TRAINABLE_HEADS


def _select(tree: dict, keep, path: tuple[str, ...] = ()) -> dict:
    out = {}
    for key, value in tree.items():
        here = (*path, key)
        if isinstance(value, dict):
            sub = _select(value, keep, here)
            if sub:
                out[key] = sub
        elif keep(here):
            out[key] = value
    return out


def split(params: dict) -> tuple[dict, dict]:
    """(base, trainable) of a full LoRA params tree; leaves are shared, nothing is copied.

    Works on boxed trees too (``nn.LogicallyPartitioned`` leaves), for deriving shardings.
    """
    return _select(params, lambda p: not _is_trainable(p)), _select(params, _is_trainable)


def join(base: dict, trainable: dict) -> dict:
    """The full params tree: ``base`` with ``trainable``'s leaves added (and winning, e.g. ``score``)."""
    out = dict(base)
    for key, value in trainable.items():
        out[key] = join(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def with_base(base: dict | None, params: dict) -> dict:
    """What a step applies its model to: ``params`` alone (full fine-tuning, ``base`` None),
    or the frozen ``base`` joined with the trainable ``params`` (LoRA)."""
    return params if base is None else join(base, params)


def without_lora(model):
    """The same ``CausalLM`` without adapters (applies to a base tree: the LoRA run's reference)."""
    return model.clone(config=model.config.replace(lora=None))


def trainable_init(model, base: dict, seed: int = 0) -> dict:
    """The trainable tree of a fresh LoRA ``model`` on ``base``: new adapters (B = 0), and
    ``base``'s score head (copied: the trainable tree owns its buffers) when it has one.

    Only the adapters are initialised (the rest of the random init is dead code under jit).
    """
    adapters = jax.jit(lambda: _select(init_params(model, jax.random.key(seed)), lambda p: p[-1] in ADAPTER_LEAVES))()
    heads = {k: jax.tree.map(jnp.copy, base[k]) for k in TRAINABLE_HEADS if k in base}
    return join(adapters, heads)


def merge_adapters(params: dict, lora: LoRAConfig) -> dict:
    """Full weights: every ``kernel`` with adapters becomes ``kernel + scale * A B`` (float32
    product, then the kernel's dtype); the adapter leaves are dropped. Host or device arrays.

    QLoRA (``lora.base_bits``): ``params`` holds the float base the run started from; its
    adapted kernels are quantized and dequantized again first (deterministic: the weights the
    run trained on), so the adapters are merged into the dequantized base.
    """
    return _merge(quant.roundtrip_base(params, lora), lora)


def _merge(params: dict, lora: LoRAConfig) -> dict:
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out[key] = _merge(value, lora)
        elif key not in ADAPTER_LEAVES:
            out[key] = value
    if "lora_a" in params:
        a, b, kernel = params["lora_a"], params["lora_b"], params["kernel"]
        r = lora.rank
        lead = a.ndim + b.ndim - 2 - kernel.ndim  # stacked layer axes (1: the layer scan's)
        a2 = jnp.asarray(a, jnp.float32).reshape(*a.shape[:lead], -1, r)  # [L, K, r]
        b2 = jnp.asarray(b, jnp.float32).reshape(*b.shape[:lead], r, -1)  # [L, r, M]
        delta = (a2 @ b2).reshape(kernel.shape) * lora.scale  # [L, *in, *out]
        out["kernel"] = (jnp.asarray(kernel, jnp.float32) + delta).astype(kernel.dtype)
    return out


# ---------------------------------------------------------------------------- PEFT format

# logical target -> the HF module under model.layers.{i} (Llama / Qwen2 / Mistral / Gemma 3 layout)
PEFT_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_FLAX_PATH = {"q": ("attn", "q"), "k": ("attn", "k"), "v": ("attn", "v"), "o": ("attn", "o")}
_FLAX_PATH |= {"gate": ("mlp", "gate"), "up": ("mlp", "up"), "down": ("mlp", "down")}


def check_peft_exportable(cfg: ModelConfig) -> None:
    """PEFT's adapters name HF modules; only families with separate projections map one to one."""
    if cfg.family not in ("llama", "gemma3"):
        raise ValueError(
            f"--export-adapters: PEFT adapters for the {cfg.family!r} family are not supported (its HF "
            "checkpoints fuse q, k and v into one module); export the merged model instead"
        )


def peft_state_dict(trainable: dict, cfg: ModelConfig, lora: LoRAConfig) -> dict[str, np.ndarray]:
    """PEFT's ``adapter_model.safetensors`` tensors of a LoRA trainable tree.

    Keys ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` [r, in] and
    ``...lora_B.weight`` [out, r] (torch's Linear layout; in / out flatten multi-axis
    kernels as the HF weight table does). A score head, if any, is not part of PEFT's adapter.
    """
    check_peft_exportable(cfg)
    layers = trainable["layers"]
    out = {}
    for target in lora.targets:
        group, name = _FLAX_PATH[target]
        a, b = np.asarray(layers[group][name]["lora_a"]), np.asarray(layers[group][name]["lora_b"])
        for i in range(cfg.num_layers):
            prefix = f"base_model.model.model.layers.{i}.{PEFT_MODULES[target]}"
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, lora.rank).T)  # [r, in]
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(lora.rank, -1).T)  # [out, r]
    return out


def save_peft_adapters(
    trainable: dict, cfg: ModelConfig, lora: LoRAConfig, out: str | Path, *, base_model: str
) -> Path:
    """Write ``out/adapter_config.json`` + ``out/adapter_model.safetensors`` (PEFT's LoRA format:
    ``peft.PeftModel.from_pretrained(hf_model, out)`` loads them onto the base model)."""
    from safetensors.numpy import save_file

    check_peft_exportable(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.astype(np.float32) for k, v in peft_state_dict(trainable, cfg, lora).items()}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(peft_config(lora, base_model), indent=2))
    return out


def peft_config(lora: LoRAConfig, base_model: str) -> dict:
    """PEFT's ``adapter_config.json`` for these adapters (plain LoRA, no bias, no rslora)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(PEFT_MODULES[t].split(".")[-1] for t in lora.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
