"""Decoder LMs (GPT-2, Llama/Qwen2/Mistral, GPT-NeoX/Pythia) and the Hugging Face bridge."""

from rlhf_jax.models.hf import from_pretrained, load_tokenizer, resize_vocab, save_pretrained
from rlhf_jax.models.hf_config import CheckpointError, config_from_hf, config_to_hf
from rlhf_jax.models.transformer import CausalLM, KVCache, ModelOutput, init_cache, positions_from_mask

__all__ = [
    "CausalLM",
    "CheckpointError",
    "KVCache",
    "ModelOutput",
    "config_from_hf",
    "config_to_hf",
    "from_pretrained",
    "init_cache",
    "load_tokenizer",
    "positions_from_mask",
    "resize_vocab",
    "save_pretrained",
]
