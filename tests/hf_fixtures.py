"""Tiny random Hugging Face (PyTorch) models, saved as safetensors, for parity tests.

Each builder makes a tiny float32 model of one architecture family with a fixed
``torch.manual_seed``, perturbs *every* parameter with small noise (so biases, norm
weights and norm biases are non-trivial and a missing bias or a wrong norm shows up in
the logits), saves it with ``save_pretrained`` (safetensors) and returns the directory
and the torch model in eval mode with eager attention (exact, no fused kernels).

Tests use :func:`build` (cached per session by name) and the small helpers below for
padded batches and reference logits. torch/transformers are only touched in tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import transformers

transformers.utils.logging.disable_progress_bar()

VOCAB = 128
HIDDEN = 64
LAYERS = 2
HEADS = 4


def _shaped(cls_name: str, **kwargs) -> tuple[str, dict]:
    """(config class name, kwargs) of a tiny model with the shared shape (``kwargs`` may override it)."""
    shape = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=64,
    )
    return cls_name, {**shape, **kwargs}


# name -> (config class name, kwargs). Every family the library claims to support.
SPECS: dict[str, tuple[str, dict]] = {
    "gpt2": (
        "GPT2Config",
        dict(
            vocab_size=VOCAB,
            n_positions=64,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            tie_word_embeddings=True,
            bos_token_id=VOCAB - 1,  # the defaults (50256) lie outside the tiny vocabulary
            eos_token_id=VOCAB - 1,
        ),
    ),
    "llama": _shaped(
        "LlamaConfig",
        num_key_value_heads=2,  # grouped-query attention
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    "llama_tied": _shaped(
        "LlamaConfig",
        num_key_value_heads=HEADS,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
    ),
    "qwen2": _shaped(
        "Qwen2Config",
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    "mistral": _shaped(
        "MistralConfig",
        num_key_value_heads=2,
        tie_word_embeddings=False,
        sliding_window=64,  # longer than any test sequence: does not matter
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "mistral_swa": _shaped(
        "MistralConfig",
        num_key_value_heads=2,
        tie_word_embeddings=False,
        sliding_window=5,  # shorter than the test sequences: the window matters
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "neox_parallel": _shaped(
        "GPTNeoXConfig",
        use_parallel_residual=True,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    ),
    "gemma3": _shaped(
        "Gemma3TextConfig",
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=4,  # shorter than the test sequences: the local layer's window matters
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
        },
        query_pre_attn_scalar=24,  # != head_dim: the query scaling is Gemma's own
        attn_logit_softcapping=5.0,  # stored but never applied by transformers' Gemma 3 (nor by us)
        final_logit_softcapping=3.0,  # small: the tanh matters
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    ),
    "neox_sequential": _shaped(
        "GPTNeoXConfig",
        use_parallel_residual=False,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    ),
    "qwen3": _shaped(
        "Qwen3Config",
        num_key_value_heads=2,
        head_dim=24,  # != hidden / heads, as in Qwen3-0.6B (1024 / 16 heads of 128)
        tie_word_embeddings=True,
        attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
    ),
    "llama3_rope": _shaped(
        "LlamaConfig",
        num_key_value_heads=2,
        tie_word_embeddings=True,
        # Llama 3.1's scaling on a tiny context: with head_dim 16 and theta 5e5 the wavelengths are
        # 6.3 (kept: < 32 / 4), 32.4 (interpolated: <= 32 / 0.5) and 273 and up (stretched 8x)
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 0.5,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "llama_linear_rope": _shaped(
        "LlamaConfig",
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},  # positions / 4
    ),
    "gemma2": _shaped(
        "Gemma2Config",
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=4,  # shorter than the test sequences: the local layer's window matters
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        query_pre_attn_scalar=24,  # != head_dim
        attn_logit_softcapping=0.05,  # tiny, as the random scores are: Gemma 2 caps them
        final_logit_softcapping=3.0,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    ),
    "mistral_swa_linear_rope": _shaped(
        "MistralConfig",
        num_key_value_heads=2,
        tie_word_embeddings=False,
        sliding_window=5,  # every layer sliding, and scaled: the factor applies to all of them
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    ),
}

FAMILIES = tuple(SPECS)
SEEDS = {name: 1000 + i for i, name in enumerate(FAMILIES)}


def make_config(name: str):
    cls_name, kwargs = SPECS[name]
    return getattr(transformers, cls_name)(**kwargs)


def perturb_(model: torch.nn.Module, scale: float = 0.02, vector_scale: float = 0.1) -> None:
    """Adds noise to every parameter in place; 1-D ones (biases, norms) get more."""
    with torch.no_grad():
        for p in model.parameters():  # unique parameters: tied ones are perturbed once
            s = vector_scale if p.ndim == 1 else scale
            p.add_(s * torch.randn_like(p))


def make_model(name: str, *, seed: int | None = None) -> torch.nn.Module:
    """A fresh tiny random torch model of family ``name`` (float32, eager attention, eval)."""
    torch.manual_seed(SEEDS[name] if seed is None else seed)
    config = make_config(name)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    perturb_(model)
    if config.tie_word_embeddings:  # the perturbation must not untie them
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model.eval()


def save(model: torch.nn.Module, out_dir: str | os.PathLike) -> str:
    out_dir = str(out_dir)
    model.save_pretrained(out_dir)  # safetensors by default
    assert os.path.exists(os.path.join(out_dir, "model.safetensors")), os.listdir(out_dir)
    return out_dir


def load_hf(path: str | os.PathLike) -> torch.nn.Module:
    """Loads a saved directory back with transformers (float32, eager attention, eval)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path), attn_implementation="eager", dtype=torch.float32
    ).eval()


_CACHE: dict[str, tuple[str, torch.nn.Module]] = {}


def build(name: str, root: str | os.PathLike) -> tuple[str, torch.nn.Module]:
    """(directory, torch model) for family ``name``; built once per process and cached."""
    if name not in _CACHE or not os.path.exists(_CACHE[name][0]):
        model = make_model(name)
        out_dir = save(model, Path(root) / name)
        _CACHE[name] = (out_dir, model)
    return _CACHE[name]


# ----------------------------------------------------------------------------- batches


def padded_batch(
    lengths: list[int], total: int, *, side: str = "left", seed: int = 0, pad_id: int = 0, vocab: int = VOCAB
) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids [B, total] int32 and mask [B, total] int32 with the given real lengths."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), total), pad_id, np.int32)
    mask = np.zeros((len(lengths), total), np.int32)
    for b, n in enumerate(lengths):
        assert 0 < n <= total
        toks = rng.integers(0, vocab, size=n, dtype=np.int32)
        sl = slice(total - n, total) if side == "left" else slice(0, n)
        ids[b, sl] = toks
        mask[b, sl] = 1
    return ids, mask


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    return np.clip(np.cumsum(mask, axis=-1) - 1, 0, None).astype(np.int32)


@torch.no_grad()
def hf_forward(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray, position_ids: np.ndarray | None = None):
    """Reference (logits [B,T,V], final hidden states [B,T,D] after the final norm).

    Positions are passed explicitly: ``clip(cumsum(mask) - 1, 0)`` unless given.
    """
    mask = np.asarray(mask)
    pos = positions_from_mask(mask) if position_ids is None else np.asarray(position_ids)
    kwargs = dict(
        input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long),
        attention_mask=torch.as_tensor(mask, dtype=torch.long),
        position_ids=torch.as_tensor(pos, dtype=torch.long),
        use_cache=False,
    )
    logits = model(**kwargs).logits
    hidden = model.base_model(**kwargs).last_hidden_state
    return logits.float().numpy(), hidden.float().numpy()


def edit_config(path: str | os.PathLike, **updates) -> None:
    cfg_path = os.path.join(str(path), "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(updates)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)


def build_peaky(root: str | os.PathLike, scale: float = 12.0) -> tuple[str, torch.nn.Module]:
    """GPT-2 whose output distribution is far from uniform (for sampling-frequency tests).

    The final LayerNorm's weight and bias are multiplied by ``scale``; with tied
    embeddings this scales every logit, so a few tokens carry most of the mass.
    """
    key = f"gpt2_peaky_{scale}"
    if key not in _CACHE or not os.path.exists(_CACHE[key][0]):
        model = make_model("gpt2", seed=4242)
        with torch.no_grad():
            model.transformer.ln_f.weight.mul_(scale)
            model.transformer.ln_f.bias.mul_(scale)
        _CACHE[key] = (save(model, Path(root) / key), model)
    return _CACHE[key]


def build_strong(name: str, root: str | os.PathLike, scale: float = 0.2) -> tuple[str, torch.nn.Module]:
    """Family ``name`` with large random weights (matrices get ``scale`` more noise).

    The default tiny random GPT-2 is nearly an identity map under greedy decoding (it
    repeats one token forever); larger weights give varied greedy continuations, which
    the EOS tests need.
    """
    key = f"{name}_strong_{scale}"
    if key not in _CACHE or not os.path.exists(_CACHE[key][0]):
        model = make_model(name)
        torch.manual_seed(SEEDS[name] + 1)
        perturb_(model, scale=scale, vector_scale=0.1)
        _CACHE[key] = (save(model, Path(root) / key), model)
    return _CACHE[key]
