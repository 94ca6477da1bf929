"""Frozen, validated configuration dataclasses (stdlib only).

Every config is a ``frozen``, ``kw_only`` dataclass: it is hashable (so a model holding
one can be a static argument of ``jax.jit``), validated once in ``__post_init__``, and
never mutated at run time. Derived values are properties.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

Family = Literal["gpt2", "llama", "neox"]
DType = Literal["float32", "bfloat16", "float16"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A decoder-only transformer; one class covers three families by its switches.

    ``family`` picks the defaults and the Hugging Face weight layout:
      * ``gpt2``: learned positions, LayerNorm, GELU(tanh), biases, tied embeddings.
      * ``llama`` (Llama, Mistral, Qwen2, SmolLM): RoPE, RMSNorm, SwiGLU, grouped-query
        attention, optional QKV bias (Qwen2), tied or untied embeddings.
      * ``neox`` (GPT-NeoX, Pythia): partial rotary, LayerNorm, GELU, parallel or
        sequential residual, untied embeddings.
    """

    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None  # None: = num_heads (multi-head attention)
    head_dim: int | None = None  # None: hidden_size // num_heads
    intermediate_size: int | None = None  # None: 4 * hidden_size
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    activation: Literal["gelu_tanh", "gelu", "silu"] = "gelu_tanh"
    rope_theta: float = 10000.0
    rotary_pct: float = 1.0  # fraction of head_dim that is rotated (NeoX: 0.25)
    qkv_bias: bool = False
    out_bias: bool = False  # bias of the attention output projection
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    parallel_residual: bool = False  # NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    sliding_window: int | None = None  # Mistral: keys at most this many slots back
    dropout: float = 0.0  # residual and embedding dropout; off by default
    dtype: DType = "float32"  # compute dtype of matmuls and activations
    param_dtype: DType = "float32"
    remat: bool = False  # rematerialise each block in the backward pass
    hf_model_type: str | None = None  # e.g. "qwen2": which HF config class to export to

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads"):
            _check(getattr(self, name) > 0, f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        _check(self.family in ("gpt2", "llama", "neox"), f"ModelConfig.family: unknown family {self.family!r}")
        _check(
            self.num_heads % self.kv_heads == 0,
            f"ModelConfig: num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.kv_heads})",
        )
        if self.head_dim is None:
            _check(
                self.hidden_size % self.num_heads == 0,
                f"ModelConfig: hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})",
            )
        _check(0.0 < self.rotary_pct <= 1.0, f"ModelConfig.rotary_pct must be in (0, 1], got {self.rotary_pct}")
        _check(self.rotary_dim % 2 == 0 or not self.uses_rope, f"ModelConfig: rotary dim {self.rotary_dim} must be even")
        _check(0.0 <= self.dropout < 1.0, f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        _check(self.activation in ("gelu_tanh", "gelu", "silu"), f"ModelConfig.activation: unknown {self.activation!r}")
        if self.sliding_window is not None:
            _check(self.sliding_window > 0, "ModelConfig.sliding_window must be > 0 or None")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def uses_rope(self) -> bool:
        return self.family in ("llama", "neox")

    @property
    def rotary_dim(self) -> int:
        return int(self.dim_per_head * self.rotary_pct)

    @property
    def gated_mlp(self) -> bool:
        return self.family == "llama"

    @property
    def norm(self) -> Literal["layernorm", "rmsnorm"]:
        return "rmsnorm" if self.family == "llama" else "layernorm"

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self, *, with_embeddings: bool = True) -> int:
        """Parameter count (analytic; matches the initialised tree)."""
        d, f, v = self.hidden_size, self.mlp_dim, self.vocab_size
        hd, h, kv = self.dim_per_head, self.num_heads, self.kv_heads
        norm = 2 * d if self.norm == "layernorm" else d
        attn = d * hd * (h + 2 * kv) + h * hd * d
        attn += (h + 2 * kv) * hd * self.qkv_bias + d * self.out_bias
        mlp = (3 if self.gated_mlp else 2) * d * f + (f + d) * self.mlp_bias
        total = self.num_layers * (attn + mlp + 2 * norm) + norm
        if with_embeddings:
            total += v * d + (0 if self.tie_word_embeddings else v * d)
            if self.family == "gpt2":
                total += self.max_position_embeddings * d
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B."""
        n = self.num_params(with_embeddings=False) + self.vocab_size * self.hidden_size
        attn = 2 * self.num_layers * seq_len * self.num_heads * self.dim_per_head  # QK^T and AV, fwd
        return 3 * (2 * n + attn)


@dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh ('data', 'fsdp', 'tensor'); one axis may be -1 (= all remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        _check(all(s == -1 or s >= 1 for s in sizes), f"MeshConfig: axis sizes must be >= 1 or -1, got {sizes}")
        _check(sizes.count(-1) <= 1, f"MeshConfig: at most one axis may be -1, got {sizes}")

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """The concrete (data, fsdp, tensor) shape for ``num_devices`` devices."""
        sizes = [self.data, self.fsdp, self.tensor]
        known = 1
        for s in sizes:
            known *= s if s != -1 else 1
        if -1 in sizes:
            _check(num_devices % known == 0, f"MeshConfig {tuple(sizes)}: {num_devices} devices are not divisible by {known}")
            sizes[sizes.index(-1)] = num_devices // known
        _check(
            sizes[0] * sizes[1] * sizes[2] == num_devices,
            f"MeshConfig {tuple(sizes)} needs {sizes[0] * sizes[1] * sizes[2]} devices, {num_devices} available",
        )
        return tuple(sizes)  # type: ignore[return-value]
