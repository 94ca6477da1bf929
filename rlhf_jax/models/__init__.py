"""Decoder LMs (GPT-2 / GPT-3-style banded, Llama/Qwen2/Mistral, GPT-NeoX/Pythia, Gemma 3) and the Hugging Face bridge."""

from rlhf_jax.models.hf import from_pretrained, load_tokenizer, resize_vocab, save_pretrained
from rlhf_jax.models.hf_config import CheckpointError, config_from_hf, config_to_hf
from rlhf_jax.models.transformer import (
    CausalLM,
    KVCache,
    ModelOutput,
    init_cache,
    lm_logits,
    positions_from_mask,
    positions_from_segments,
    stack_legacy_layers,
    unembedding,
)

__all__ = [
    "CausalLM",
    "CheckpointError",
    "KVCache",
    "ModelOutput",
    "config_from_hf",
    "config_to_hf",
    "from_pretrained",
    "init_cache",
    "lm_logits",
    "load_tokenizer",
    "positions_from_mask",
    "positions_from_segments",
    "resize_vocab",
    "save_pretrained",
    "stack_legacy_layers",
    "unembedding",
]
