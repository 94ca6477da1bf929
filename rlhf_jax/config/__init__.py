"""Frozen, validated configuration dataclasses (stdlib only).

Every config is a ``frozen``, ``kw_only`` dataclass: it is hashable (so a model holding
one can be a static argument of ``jax.jit``), validated once in ``__post_init__``, and
never mutated at run time. Derived values are properties.

Split by concept: :mod:`~rlhf_jax.config.model` (the network), :mod:`~rlhf_jax.config.run` (mesh,
optimizer, what every run shares), :mod:`~rlhf_jax.config.stages` (SFT, reward model, DPO) and
:mod:`~rlhf_jax.config.ppo`; everything is importable from ``rlhf_jax.config``.
"""

from rlhf_jax.config.model import LORA_TARGETS, AttentionImpl, DType, Family, LoRAConfig, ModelConfig, Remat
from rlhf_jax.config.ppo import PPOConfig, PPOHyperparams
from rlhf_jax.config.run import MeshConfig, OptimConfig, RunConfig
from rlhf_jax.config.stages import DPOConfig, DPOHyperparams, RewardConfig, RewardHyperparams, SFTConfig

__all__ = [
    "LORA_TARGETS",
    "AttentionImpl",
    "DPOConfig",
    "DPOHyperparams",
    "DType",
    "Family",
    "LoRAConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "PPOConfig",
    "PPOHyperparams",
    "Remat",
    "RewardConfig",
    "RewardHyperparams",
    "RunConfig",
    "SFTConfig",
]
