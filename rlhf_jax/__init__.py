"""rlhf_jax: the InstructGPT RLHF pipeline (SFT, K-way reward model, PPO-ptx) in JAX/Flax."""

__version__ = "0.1.0"
