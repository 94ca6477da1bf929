"""The model's configuration: architecture switches, attention pattern, remat, LoRA adapters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from rlhf_jax.config.validate import check

Family = Literal["gpt2", "llama", "neox", "gemma3"]
DType = Literal["float32", "bfloat16", "float16"]
# What a block keeps for its backward pass: "none" everything; "dots" only its matmul outputs
# (the elementwise ops and the attention softmax are recomputed); "full" only its input.
Remat = Literal["none", "dots", "full"]
# How a layer computes softmax(q k^T) v without a KV cache: "einsum" our XLA matmuls (any platform,
# every feature, scores recomputed in the backward pass); "jax" ``jax.nn.dot_product_attention``
# with its XLA implementation; "cudnn" the same call with cuDNN's fused (flash) kernel: GPU only,
# bfloat16 / float16, no attention logit soft-capping; "auto" "cudnn" where that holds, else "einsum".
AttentionImpl = Literal["auto", "einsum", "jax", "cudnn"]


def remat_value(value) -> str:
    """``remat`` as one of :data:`Remat`; the former booleans (model.json, Python callers) map
    True -> "full", False -> "none"."""
    if isinstance(value, bool):
        return "full" if value else "none"
    check(value in ("none", "dots", "full"), f"remat must be 'none', 'dots' or 'full', got {value!r}")
    return value


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the dense projections, by logical name


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021) on a frozen base: ``W x + (alpha / rank) * B A x``.

    ``rank = 0`` is off (full fine-tuning, the default). ``targets`` names the projections
    that get an adapter: attention ``q``, ``k``, ``v``, ``o`` and MLP ``gate``, ``up``,
    ``down`` (every family's layers carry these names). The default adapts all seven, as
    QLoRA found adapting every linear layer matches full fine-tuning best; ``("q", "v")`` is
    the original paper's choice. ``dropout`` applies to an adapter's input where the stage
    trains with dropout (SFT); RL passes and reward-model steps run without dropout.

    ``base_bits`` (QLoRA, Dettmers et al. 2023): the frozen base kernels of the ``targets``
    are held quantized, None = float (plain LoRA), 8 = int8 with an absmax scale per output
    channel, 4 = NF4 in blocks of 64 (``models.quant``); embeddings, norms and the LM head
    stay float, and the adapters train in float32 as before.
    """

    rank: int = 0
    alpha: float = 16.0  # the adapter's update is scaled by alpha / rank
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS
    base_bits: int | None = None  # QLoRA: None (float base), 8 or 4

    def __post_init__(self) -> None:
        targets = self.targets
        if isinstance(targets, str):  # "q,k,v,o" (a JSON string or one flag value)
            targets = tuple(t for t in targets.split(",") if t)
        object.__setattr__(self, "targets", tuple(t.strip() for t in targets))  # a JSON list: hashable again
        check(self.rank >= 0, f"LoRAConfig.rank must be >= 0 (0 = off), got {self.rank}")
        check(self.alpha > 0, f"LoRAConfig.alpha must be > 0, got {self.alpha}")
        check(0 <= self.dropout < 1, f"LoRAConfig.dropout must be in [0, 1), got {self.dropout}")
        bad = sorted(set(self.targets) - set(LORA_TARGETS))
        check(not bad, f"LoRAConfig.targets: unknown {bad}; choose from {', '.join(LORA_TARGETS)}")
        check(bool(self.targets) or self.rank == 0, "LoRAConfig.targets: at least one target when rank > 0")
        check(
            self.base_bits in (None, 8, 4),
            f"LoRAConfig.base_bits must be None, 8 (int8) or 4 (NF4), got {self.base_bits}",
        )
        check(
            self.base_bits is None or self.rank > 0,
            f"LoRAConfig.base_bits={self.base_bits} quantizes the frozen base under LoRA adapters: set rank > 0 too",
        )

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        """alpha / rank: the factor on ``B A x``."""
        return self.alpha / self.rank


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A decoder-only transformer; one class covers four families by its switches.

    ``family`` picks the defaults and the Hugging Face weight layout:
      * ``gpt2``: learned positions, LayerNorm, GELU(tanh), biases, tied embeddings.
      * ``llama`` (Llama, Mistral, Qwen2, Qwen3, SmolLM): RoPE (optionally linear or Llama 3.1
        scaling), RMSNorm, SwiGLU, grouped-query attention, optional QKV bias (Qwen2), q/k
        RMSNorm over head_dim (``query_key_norm``: Qwen3), tied or untied embeddings.
      * ``neox`` (GPT-NeoX, Pythia): partial rotary, LayerNorm, GELU, parallel or
        sequential residual, untied embeddings.
      * ``gemma3`` (Gemma 3 text): RMSNorm with a (1 + w) scale, norms before and after
        attention and MLP, q/k RMSNorm over head_dim, gated GELU(tanh), embeddings scaled
        by sqrt(hidden_size), tied embeddings, local/global layers with their own RoPE bases.
        Gemma 2 is the same layer without the q/k norm (``query_key_norm=False``), with one
        RoPE and attention scores capped by ``attn_logit_softcap``.

    The attention pattern is per layer: ``layer_types`` names each layer "full_attention"
    (dense causal) or "sliding_attention" (keys at most ``sliding_window`` positions back:
    Mistral's window, Gemma 3's local layers, GPT-3's locally banded layers). A shorter
    tuple is a pattern repeated over the layers: GPT-3 style alternating layers are
    ``layer_types=("full_attention", "sliding_attention"), sliding_window=256``. With
    ``layer_types=None`` every layer is sliding when ``sliding_window`` is set (Mistral).
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
    sliding_window: int | None = None  # keys at most this many positions back, on sliding layers
    layer_types: tuple[str, ...] | None = None  # per layer (or a repeated pattern), see the class docstring
    rope_local_theta: float | None = None  # RoPE base of sliding layers (Gemma 3: 10k); None = rope_theta
    rope_scaling_factor: float = 1.0  # linear RoPE scaling (positions / factor), see layer_rope
    # Llama 3.1's RoPE scaling: (factor, low_freq_factor, high_freq_factor, original max positions)
    rope_llama3: tuple[float, float, float, int] | None = None
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power; None = head_dim
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma)
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma)
    dropout: float = 0.0  # residual and embedding dropout; off by default
    dtype: DType = "float32"  # compute dtype of matmuls and activations
    param_dtype: DType = "float32"
    remat: Remat = "none"  # what each block keeps for the backward pass (see Remat)
    attention: AttentionImpl = "auto"  # the attention kernel of passes without a KV cache (see AttentionImpl)
    # RMSNorm of queries and keys over head_dim, before RoPE; None: the family's default
    # (Gemma 3: on, the rest: off). Qwen3 turns it on in the llama family, Gemma 2 off in Gemma's.
    query_key_norm: bool | None = None
    hf_model_type: str | None = None  # e.g. "qwen2": which HF config class to export to
    # Adapters on the dense projections (models.layers.Linear); set by a stage's driver from its
    # run config's ``lora``, never stored in model.json (a run's model is exported merged).
    lora: LoRAConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "remat", remat_value(self.remat))
        if isinstance(self.lora, dict):  # from JSON
            object.__setattr__(self, "lora", LoRAConfig(**self.lora))
        if self.lora is not None and not self.lora.enabled:
            object.__setattr__(self, "lora", None)  # rank 0: the plain model, one spelling
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads"):
            check(getattr(self, name) > 0, f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        check(self.family in ("gpt2", "llama", "neox", "gemma3"), f"ModelConfig.family: unknown family {self.family!r}")
        check(
            self.num_heads % self.kv_heads == 0,
            f"ModelConfig: num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.kv_heads})",
        )
        if self.head_dim is None:
            check(
                self.hidden_size % self.num_heads == 0,
                f"ModelConfig: hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})",
            )
        check(0.0 < self.rotary_pct <= 1.0, f"ModelConfig.rotary_pct must be in (0, 1], got {self.rotary_pct}")
        check(self.rotary_dim % 2 == 0 or not self.uses_rope, f"ModelConfig: rotary dim {self.rotary_dim} must be even")
        check(0.0 <= self.dropout < 1.0, f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        check(self.activation in ("gelu_tanh", "gelu", "silu"), f"ModelConfig.activation: unknown {self.activation!r}")
        if self.sliding_window is not None:
            check(self.sliding_window > 0, "ModelConfig.sliding_window must be > 0 or None")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))  # a JSON list: hashable again
            check(0 < len(self.layer_types) <= self.num_layers, "ModelConfig.layer_types: 1..num_layers entries")
            bad = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
            check(not bad, f"ModelConfig.layer_types: unknown {bad} (use 'full_attention' / 'sliding_attention')")
            check(
                self.sliding_window is not None or "sliding_attention" not in self.layer_types,
                "ModelConfig: 'sliding_attention' layers need sliding_window",
            )
        check(
            self.rope_scaling_factor > 0, f"ModelConfig.rope_scaling_factor must be > 0, got {self.rope_scaling_factor}"
        )
        if self.rope_llama3 is not None:
            object.__setattr__(self, "rope_llama3", tuple(self.rope_llama3))  # a JSON list: hashable again
            check(len(self.rope_llama3) == 4, "ModelConfig.rope_llama3: (factor, low, high, original_max_position)")
            factor, low, high, original = self.rope_llama3
            check(
                factor > 0 and 0 < low < high and original > 0,
                f"ModelConfig.rope_llama3: need factor > 0, 0 < low_freq_factor < high_freq_factor and "
                f"original_max_position_embeddings > 0, got {self.rope_llama3}",
            )
        check(
            self.attention in ("auto", "einsum", "jax", "cudnn"),
            f"ModelConfig.attention must be 'auto', 'einsum', 'jax' or 'cudnn', got {self.attention!r}",
        )
        check(
            self.attention not in ("jax", "cudnn") or self.attn_logit_softcap is None,
            f"ModelConfig.attention={self.attention!r} has no attention logit soft-capping "
            f"(attn_logit_softcap={self.attn_logit_softcap}): use 'einsum' or 'auto'",
        )
        for name in ("rope_local_theta", "query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, name)
            check(value is None or value > 0, f"ModelConfig.{name} must be > 0 or None, got {value}")

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
        return self.family in ("llama", "neox", "gemma3")

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """The attention kind of every layer ("full_attention" / "sliding_attention")."""
        if self.layer_types is None:
            return ("sliding_attention" if self.sliding_window else "full_attention",) * self.num_layers
        return tuple(self.layer_types[i % len(self.layer_types)] for i in range(self.num_layers))

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Per layer: the sliding window in positions, 0 = dense causal attention."""
        return tuple(self.sliding_window if k == "sliding_attention" else 0 for k in self.layer_kinds)

    @property
    def layer_rope(self) -> tuple[tuple[float, float], ...]:
        """Per layer: (RoPE base, linear scaling factor that divides the inverse frequencies).

        Sliding layers have a RoPE of their own, unscaled, only with ``rope_local_theta`` (Gemma
        3's local layers); otherwise every layer has the same (Mistral's window with a linear
        scaling scales it everywhere, as transformers does)."""
        full = (self.rope_theta, self.rope_scaling_factor)
        local = full if self.rope_local_theta is None else (self.rope_local_theta, 1.0)
        return tuple(local if k == "sliding_attention" else full for k in self.layer_kinds)

    @property
    def qk_norm(self) -> bool:  # RMSNorm of queries and keys over head_dim (see query_key_norm)
        return self.family == "gemma3" if self.query_key_norm is None else self.query_key_norm

    @property
    def sandwich_norm(self) -> bool:  # Gemma 3: norms after attention and MLP too
        return self.family == "gemma3"

    @property
    def rotary_dim(self) -> int:
        return int(self.dim_per_head * self.rotary_pct)

    @property
    def gated_mlp(self) -> bool:
        return self.family in ("llama", "gemma3")

    @property
    def norm(self) -> Literal["layernorm", "rmsnorm"]:
        return "rmsnorm" if self.family in ("llama", "gemma3") else "layernorm"

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self, *, with_embeddings: bool = True) -> int:
        """Parameter count (analytic; matches the initialised tree)."""
        d, f, v = self.hidden_size, self.mlp_dim, self.vocab_size
        hd, h, kv = self.dim_per_head, self.num_heads, self.kv_heads
        norm = 2 * d if self.norm == "layernorm" else d
        attn = d * hd * (h + 2 * kv) + h * hd * d
        attn += (h + 2 * kv) * hd * self.qkv_bias + d * self.out_bias + 2 * hd * self.qk_norm
        mlp = (3 if self.gated_mlp else 2) * d * f + (f + d) * self.mlp_bias
        total = self.num_layers * (attn + mlp + (4 if self.sandwich_norm else 2) * norm) + norm
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
