"""Frozen, validated configuration dataclasses (stdlib only).

Every config is a ``frozen``, ``kw_only`` dataclass: it is hashable (so a model holding
one can be a static argument of ``jax.jit``), validated once in ``__post_init__``, and
never mutated at run time. Derived values are properties.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

Family = Literal["gpt2", "llama", "neox", "gemma3"]
DType = Literal["float32", "bfloat16", "float16"]
# What a block keeps for its backward pass: "none" everything; "dots" only its matmul outputs
# (the elementwise ops and the attention softmax are recomputed); "full" only its input.
Remat = Literal["none", "dots", "full"]


def _remat_value(value) -> str:
    """``remat`` as one of :data:`Remat`; the former booleans (model.json, Python callers) map
    True -> "full", False -> "none"."""
    if isinstance(value, bool):
        return "full" if value else "none"
    _check(value in ("none", "dots", "full"), f"remat must be 'none', 'dots' or 'full', got {value!r}")
    return value


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


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
    """

    rank: int = 0
    alpha: float = 16.0  # the adapter's update is scaled by alpha / rank
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        targets = self.targets
        if isinstance(targets, str):  # "q,k,v,o" (a JSON string or one flag value)
            targets = tuple(t for t in targets.split(",") if t)
        object.__setattr__(self, "targets", tuple(t.strip() for t in targets))  # a JSON list: hashable again
        _check(self.rank >= 0, f"LoRAConfig.rank must be >= 0 (0 = off), got {self.rank}")
        _check(self.alpha > 0, f"LoRAConfig.alpha must be > 0, got {self.alpha}")
        _check(0 <= self.dropout < 1, f"LoRAConfig.dropout must be in [0, 1), got {self.dropout}")
        bad = sorted(set(self.targets) - set(LORA_TARGETS))
        _check(not bad, f"LoRAConfig.targets: unknown {bad}; choose from {', '.join(LORA_TARGETS)}")
        _check(bool(self.targets) or self.rank == 0, "LoRAConfig.targets: at least one target when rank > 0")

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
      * ``llama`` (Llama, Mistral, Qwen2, SmolLM): RoPE, RMSNorm, SwiGLU, grouped-query
        attention, optional QKV bias (Qwen2), tied or untied embeddings.
      * ``neox`` (GPT-NeoX, Pythia): partial rotary, LayerNorm, GELU, parallel or
        sequential residual, untied embeddings.
      * ``gemma3`` (Gemma 3 text): RMSNorm with a (1 + w) scale, norms before and after
        attention and MLP, q/k RMSNorm over head_dim, gated GELU(tanh), embeddings scaled
        by sqrt(hidden_size), tied embeddings, local/global layers with their own RoPE bases.

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
    rope_scaling_factor: float = 1.0  # linear RoPE scaling (positions / factor) of full-attention layers
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power; None = head_dim
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma)
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma)
    dropout: float = 0.0  # residual and embedding dropout; off by default
    dtype: DType = "float32"  # compute dtype of matmuls and activations
    param_dtype: DType = "float32"
    remat: Remat = "none"  # what each block keeps for the backward pass (see Remat)
    hf_model_type: str | None = None  # e.g. "qwen2": which HF config class to export to
    # Adapters on the dense projections (models.layers.Linear); set by a stage's driver from its
    # run config's ``lora``, never stored in model.json (a run's model is exported merged).
    lora: LoRAConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "remat", _remat_value(self.remat))
        if isinstance(self.lora, dict):  # from JSON
            object.__setattr__(self, "lora", LoRAConfig(**self.lora))
        if self.lora is not None and not self.lora.enabled:
            object.__setattr__(self, "lora", None)  # rank 0: the plain model, one spelling
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads"):
            _check(getattr(self, name) > 0, f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        _check(
            self.family in ("gpt2", "llama", "neox", "gemma3"), f"ModelConfig.family: unknown family {self.family!r}"
        )
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
        _check(
            self.rotary_dim % 2 == 0 or not self.uses_rope, f"ModelConfig: rotary dim {self.rotary_dim} must be even"
        )
        _check(0.0 <= self.dropout < 1.0, f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        _check(self.activation in ("gelu_tanh", "gelu", "silu"), f"ModelConfig.activation: unknown {self.activation!r}")
        if self.sliding_window is not None:
            _check(self.sliding_window > 0, "ModelConfig.sliding_window must be > 0 or None")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))  # a JSON list: hashable again
            _check(0 < len(self.layer_types) <= self.num_layers, "ModelConfig.layer_types: 1..num_layers entries")
            bad = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
            _check(not bad, f"ModelConfig.layer_types: unknown {bad} (use 'full_attention' / 'sliding_attention')")
            _check(
                self.sliding_window is not None or "sliding_attention" not in self.layer_types,
                "ModelConfig: 'sliding_attention' layers need sliding_window",
            )
        _check(
            self.rope_scaling_factor > 0, f"ModelConfig.rope_scaling_factor must be > 0, got {self.rope_scaling_factor}"
        )
        for name in ("rope_local_theta", "query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"ModelConfig.{name} must be > 0 or None, got {value}")

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
        """Per layer: (RoPE base, linear scaling factor that divides the inverse frequencies)."""
        local = self.rope_theta if self.rope_local_theta is None else self.rope_local_theta
        full = (self.rope_theta, self.rope_scaling_factor)
        return tuple((local, 1.0) if k == "sliding_attention" else full for k in self.layer_kinds)

    @property
    def qk_norm(self) -> bool:  # Gemma 3: RMSNorm of queries and keys over head_dim
        return self.family == "gemma3"

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
            _check(
                num_devices % known == 0,
                f"MeshConfig {tuple(sizes)}: {num_devices} devices are not divisible by {known}",
            )
            sizes[sizes.index(-1)] = num_devices // known
        _check(
            sizes[0] * sizes[1] * sizes[2] == num_devices,
            f"MeshConfig {tuple(sizes)} needs {sizes[0] * sizes[1] * sizes[2]} devices, {num_devices} available",
        )
        return tuple(sizes)  # type: ignore[return-value]


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with global-norm clipping and a warmup + cosine (or constant) schedule."""

    learning_rate: float = 1e-5
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_init_fraction: float = 0.0  # warmup starts at this fraction of the peak (PPO: 0.1)
    final_lr_fraction: float = 0.1  # cosine decays to this fraction of the peak (InstructGPT: 10%)
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        _check(self.learning_rate >= 0, f"OptimConfig.learning_rate must be >= 0, got {self.learning_rate}")
        _check(self.warmup_steps >= 0, "OptimConfig.warmup_steps must be >= 0")
        _check(0 <= self.final_lr_fraction <= 1, "OptimConfig.final_lr_fraction must be in [0, 1]")
        _check(0 <= self.warmup_init_fraction <= 1, "OptimConfig.warmup_init_fraction must be in [0, 1]")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, "OptimConfig.max_grad_norm must be > 0 or None")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What every stage shares: where, how often, on which mesh, with which seed."""

    seed: int = 0
    mesh: MeshConfig = MeshConfig()
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 200
    keep_last: int = 2  # latest N checkpoints kept
    keep_best: int = 1  # plus the best N by the validation metric
    on_error: Literal["raise", "skip"] = "raise"  # malformed data rows
    max_skip_fraction: float = 0.05  # abort if more rows than this are skipped
    split_fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)  # train/val/test by user id
    dedup_prefix_chars: int | None = None  # drop a row whose prompt starts like an earlier row's (this many chars)
    max_prompts_per_user: int | None = None  # keep at most this many rows per user id (InstructGPT: 200)
    dtype: DType = "float32"  # compute dtype (params stay float32)
    # "pack": SFT / pretraining rows are packed, whole, into fewer rows of a bucket length (segment ids
    # keep the examples apart), everything else as "bucket"; "bucket": each batch is cut to the next
    # bucket length above its longest row (16, 32, ... 512, then multiples of 256; the configured lengths
    # are caps); "max": every batch at the configured length
    pad_to: Literal["pack", "bucket", "max"] = "pack"
    # What each block keeps for the backward pass of a training step (README, "Memory"): "dots"
    # keeps matmul outputs and recomputes the elementwise ops; "full" keeps block inputs only
    remat: Remat = "dots"
    progress: bool = True
    # End this invocation once the step counter reaches this value (a checkpoint is saved there);
    # the schedule still spans the stage's total steps, so a later run resumes exactly. None: run to the end.
    stop_at_step: int | None = None
    # A step with a non-finite reward, logits, advantages, loss or gradients is skipped (the state
    # stays bitwise unchanged, the batch is consumed); this many skips in a row stop the run with
    # an error naming the step and the quantity.
    max_consecutive_skips: int = 10
    # A latest checkpoint that cannot be restored: False raises (naming the step); True falls back
    # to the newest one that restores and moves the damaged newer ones aside (logged).
    restore_fallback: bool = False
    # Write <run>/data_trace.jsonl: the example ids of every step's batch, per data iterator (a step
    # trained again after a restart appears again; its last line is the one that counts).
    trace_data: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "remat", _remat_value(self.remat))
        _check(self.stop_at_step is None or self.stop_at_step > 0, "RunConfig.stop_at_step must be > 0 or None")
        _check(self.max_consecutive_skips >= 1, "RunConfig.max_consecutive_skips must be >= 1")
        for name in ("log_every", "eval_every", "save_every", "eval_batches"):
            _check(getattr(self, name) > 0, f"RunConfig.{name} must be > 0")
        _check(self.keep_last >= 1 and self.keep_best >= 0, "RunConfig: keep_last >= 1 and keep_best >= 0")
        _check(abs(sum(self.split_fractions) - 1.0) < 1e-6, "RunConfig.split_fractions must sum to 1")
        _check(0 <= self.max_skip_fraction <= 1, "RunConfig.max_skip_fraction must be in [0, 1]")
        for name in ("dedup_prefix_chars", "max_prompts_per_user"):
            _check(getattr(self, name) is None or getattr(self, name) > 0, f"RunConfig.{name} must be > 0 or None")


@dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """Supervised fine-tuning (InstructGPT: 16 epochs, cosine to 10%, dropout 0.2) or pretraining."""

    data: str  # demonstrations (or text, with mode="pretrain"): file or hub name
    init: str  # an HF model directory, or a previous run directory
    out: str  # the run directory (checkpoints, metrics.jsonl, model.json, tokenizer/)
    max_steps: int | None = None  # None: epochs x steps per epoch
    run: RunConfig = RunConfig()
    mode: Literal["sft", "pretrain"] = "sft"  # pretrain: loss on every token of plain text
    epochs: float = 1.0
    batch_size: int = 32
    seq_len: int = 512
    pack: bool = True  # pretrain mode: pack texts into full rows
    prompt_loss: bool = False  # sft mode: also learn the prompt tokens
    dropout: float = 0.0  # residual dropout during SFT
    ptx_data: str | None = None  # pretraining text mixed into SFT batches
    ptx_fraction: float = 0.0  # fraction of each batch's rows from ptx_data (paper's PPO init: 0.1)
    select_by_reward: str | None = None  # an RM run dir: keep the checkpoint whose samples it scores best
    select_prompts: int = 64  # validation prompts sampled for that score
    optim: OptimConfig = OptimConfig(learning_rate=1e-5)
    lora: LoRAConfig = LoRAConfig()  # rank > 0: train adapters only, on the frozen --init

    def __post_init__(self) -> None:
        _check(self.batch_size > 0 and self.seq_len > 1, "SFTConfig: batch_size > 0 and seq_len > 1 required")
        _check(self.max_steps is None or self.max_steps > 0, "SFTConfig.max_steps must be > 0 or None")
        _check(self.epochs > 0, "SFTConfig.epochs must be > 0")
        _check(0 <= self.ptx_fraction < 1, "SFTConfig.ptx_fraction must be in [0, 1)")
        _check(
            (self.ptx_fraction > 0) == (self.ptx_data is not None),
            "SFTConfig: ptx_data and ptx_fraction > 0 go together",
        )
        _check(0 <= self.dropout < 1, "SFTConfig.dropout must be in [0, 1)")

    @property
    def ptx_rows(self) -> int:
        return int(round(self.batch_size * self.ptx_fraction))


@dataclass(frozen=True, kw_only=True)
class RewardHyperparams:
    """What the pure reward-model step takes (``reward.make_train_step``): the loss's knobs.

    InstructGPT's loss has none; both are extensions, off by default.
    """

    margin: float = 0.0  # a constant margin inside the pairwise sigmoid
    center_coef: float = 0.0  # penalty on the mean squared reward (keeps scores near 0)

    def __post_init__(self) -> None:
        _check(self.center_coef >= 0, "RewardHyperparams.center_coef must be >= 0")


@dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """Reward model run on K-way rankings (InstructGPT: 1 epoch, lr 9e-6 cosine to 10%, batch 64 prompts)."""

    data: str  # rankings file or hub name
    init: str  # an SFT run directory or an HF model directory
    out: str  # the run directory
    max_steps: int | None = None  # None: epochs x steps per epoch
    run: RunConfig = RunConfig()
    demonstrations: str | None = None  # scored after training to set the bias (demos mean 0)
    epochs: float = 1.0
    batch_size: int = 64  # prompts (each with all its K responses), not pairs
    max_prompt_len: int = 256
    max_response_len: int = 256
    max_k: int | None = None  # None: the largest K in the data
    hparams: RewardHyperparams = RewardHyperparams()
    optim: OptimConfig = OptimConfig(learning_rate=9e-6)
    lora: LoRAConfig = LoRAConfig()  # rank > 0: adapters + the new score head train, the --init base is frozen

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, "RewardConfig.batch_size must be > 0")
        _check(self.max_steps is None or self.max_steps > 0, "RewardConfig.max_steps must be > 0 or None")
        _check(self.max_prompt_len > 0 and self.max_response_len > 0, "RewardConfig: lengths must be > 0")
        _check(self.max_k is None or self.max_k >= 2, "RewardConfig.max_k must be >= 2 (a ranking needs a pair)")
        _check(self.epochs > 0, "RewardConfig.epochs must be > 0")


@dataclass(frozen=True, kw_only=True)
class PPOHyperparams:
    """The PPO-ptx algorithm: everything the pure functions in ``rlhf_jax.ppo`` take.

    Paper values (InstructGPT): beta (``kl_coef``) 0.02, gamma (``ptx_coef``) 27.8, batch 512,
    minibatch 64, 1 PPO epoch, clip 0.2, GAE discount 1 (lambda 0.95 in Ziegler et al.),
    temperature 1, EMA of policy weights with decay 0.992.

    ``estimator`` picks the advantage estimator (``rlhf_jax.rl``):
      * ``"gae"`` (InstructGPT): a value network, GAE on KL-shaped per-token rewards.
      * ``"grpo"`` / ``"dr_grpo"`` / ``"rloo"``: critic-free, a group baseline over the
        ``group_size`` (G >= 2) responses sampled for each prompt; the sequence advantage is
        broadcast over the response tokens.
      * ``"reinforce_pp"``: critic-free, REINFORCE++'s batch-whitened reward-to-go of the
        KL-shaped per-token rewards (any G).
    Critic-free estimators build no value network (no value loss, no value params in the state).
    ``batch_size`` and ``minibatch_size`` count episodes: an iteration samples G responses for
    each of ``batch_size / group_size`` prompts. The ``"auto"`` settings resolve per estimator:
    ``kl_in`` (where the KL to the reference goes: ``"reward"``, per-token shaping as InstructGPT,
    or ``"loss"``, ``kl_coef`` x the aggregated KL added to the policy loss as DeepSeekMath) is
    "loss" for the group estimators (grpo, dr_grpo, rloo) and "reward" for gae and reinforce_pp;
    ``kl_kind`` is k3 with the KL in the loss and k1 in the reward; ``aggregation`` (``losses.ppo_policy_loss``) is "sequence_mean" for
    grpo, "token_sum" for dr_grpo and "token_mean" otherwise.
    """

    estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"] = "gae"
    group_size: int = 1  # G: responses sampled per prompt (the group of the group estimators)
    kl_in: Literal["auto", "reward", "loss"] = "auto"
    aggregation: Literal["auto", "token_mean", "sequence_mean", "token_sum"] = "auto"
    batch_size: int = 64  # episodes per iteration (paper: 512) = prompts x group_size
    minibatch_size: int = 16  # paper: 64
    ppo_epochs: int = 1  # paper: 1 (Ziegler: 4)
    max_new_tokens: int = 64  # sampling: response tokens at most
    temperature: float = 1.0  # sampling; the log-probs for the ratio and the KL use the same value
    top_k: int = 0
    top_p: float = 1.0
    clip_eps: float = 0.2
    vf_clip_eps: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    kl_coef: float = 0.02  # beta (the initial value when adaptive)
    kl_kind: Literal["auto", "k1", "k2", "k3"] = "auto"  # auto: k1 in the reward, k3 in the loss
    adaptive_kl: bool = False  # Ziegler's controller
    kl_target: float = 6.0
    kl_horizon: int = 10000
    ptx_coef: float = 27.8  # gamma of PPO-ptx; applies when the run has pretraining data (0: plain PPO with it)
    ptx_rows: int | None = None  # pretraining rows per minibatch (None: = minibatch_size)
    no_eos_penalty: float | None = -1.0  # score of a response that never emits EOS (None: keep the RM score)
    whiten_rewards: bool = False  # whiten the per-token rewards (no mean shift) before GAE
    ema_decay: float = 0.992
    exact_ratio: bool = True  # recompute the policy forward in the update so the first ratio is exactly 1
    # (False: ~1e-7 rounding differences on RoPE models, one policy forward per minibatch cheaper)

    def __post_init__(self) -> None:
        _check(
            self.minibatch_size > 0 and self.ppo_epochs > 0, "PPOHyperparams: minibatch_size, ppo_epochs must be > 0"
        )
        _check(
            self.batch_size % self.minibatch_size == 0,
            "PPOHyperparams: batch_size must be a multiple of minibatch_size",
        )
        _check(self.max_new_tokens > 0, "PPOHyperparams.max_new_tokens must be > 0")
        _check(self.temperature > 0, "PPOHyperparams.temperature must be > 0 (sampling; log-probs use the same value)")
        _check(0 <= self.ema_decay < 1, "PPOHyperparams.ema_decay must be in [0, 1)")
        _check(
            self.kl_coef >= 0 and self.kl_target > 0 and self.kl_horizon > 0, "PPOHyperparams: KL settings must be > 0"
        )
        _check(self.ptx_coef >= 0, "PPOHyperparams.ptx_coef must be >= 0")
        _check(self.ptx_rows is None or self.ptx_rows > 0, "PPOHyperparams.ptx_rows must be > 0 or None")
        estimators = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp")
        _check(
            self.estimator in estimators, f"PPOHyperparams.estimator must be one of {estimators}: {self.estimator!r}"
        )
        _check(self.kl_in in ("auto", "reward", "loss"), f"PPOHyperparams.kl_in: unknown {self.kl_in!r}")
        _check(self.kl_kind in ("auto", "k1", "k2", "k3"), f"PPOHyperparams.kl_kind: unknown {self.kl_kind!r}")
        aggregations = ("auto", "token_mean", "sequence_mean", "token_sum")
        _check(self.aggregation in aggregations, f"PPOHyperparams.aggregation must be one of {aggregations}")
        _check(self.group_size >= 1, f"PPOHyperparams.group_size must be >= 1, got {self.group_size}")
        _check(
            self.group_size >= 2 or self.estimator not in ("grpo", "dr_grpo", "rloo"),
            f"PPOHyperparams: estimator {self.estimator!r} needs group_size >= 2 responses per prompt "
            f"(its baseline is the other responses to the same prompt), got group_size={self.group_size}",
        )
        _check(
            self.batch_size % self.group_size == 0,
            f"PPOHyperparams: batch_size counts episodes (prompts x group_size): batch_size={self.batch_size} "
            f"must be a multiple of group_size={self.group_size}",
        )

    @property
    def uses_critic(self) -> bool:
        """A value network (GAE); the other estimators are critic-free."""
        return self.estimator == "gae"

    @property
    def num_prompts(self) -> int:
        """Prompts per iteration: each is sampled ``group_size`` times."""
        return self.batch_size // self.group_size

    @property
    def kl_in_loss(self) -> bool:
        """The KL to the reference is a loss term (True) rather than per-token reward shaping."""
        if self.kl_in == "auto":
            return self.estimator in ("grpo", "dr_grpo", "rloo")
        return self.kl_in == "loss"

    @property
    def kl_estimator(self) -> str:
        """The per-token KL estimator (``losses.kl_penalty`` kind) after resolving "auto"."""
        if self.kl_kind == "auto":
            return "k3" if self.kl_in_loss else "k1"
        return self.kl_kind

    @property
    def policy_aggregation(self) -> str:
        """``losses.ppo_policy_loss``'s aggregation after resolving "auto"."""
        if self.aggregation == "auto":
            return {"grpo": "sequence_mean", "dr_grpo": "token_sum"}.get(self.estimator, "token_mean")
        return self.aggregation

    @property
    def num_minibatches(self) -> int:
        return self.batch_size // self.minibatch_size

    @property
    def rows_per_ptx_minibatch(self) -> int:
        return self.ptx_rows or self.minibatch_size

    @property
    def updates_per_iteration(self) -> int:
        """Optimizer steps in one PPO iteration: epochs x minibatches."""
        return self.ppo_epochs * self.num_minibatches


@dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """A PPO / PPO-ptx run: data, models, cadence, optimizer, and the algorithm's ``hparams``.

    The policy and the KL reference both start from ``policy``; the value network from
    ``reward`` (InstructGPT). With ``ptx_data`` the objective adds ``hparams.ptx_coef`` x
    the pretraining LM loss (PPO-ptx); without it, plain PPO.

    Several rewards (Sparrow-style): ``reward`` may name several reward-model runs and
    ``rule_reward`` jit-able rule functions (``"module:function"``, see ``rlhf_jax.rewards``);
    the score is ``sum_i reward_weights[i] * component_i``, one weight per reward model then
    per rule (None: all 1). A single path (a ``str`` is taken as one) is plain InstructGPT.
    """

    prompts: str  # prompts file or hub name
    policy: str  # an SFT run dir or HF dir: the initial policy AND the KL reference
    reward: tuple[str, ...]  # reward-model run dirs (the first initialises the value function)
    out: str
    reward_weights: tuple[float, ...] | None = None  # one per reward, then per rule_reward; None: all 1
    rule_reward: tuple[str, ...] = ()  # "module:function": (prompt_ids, response_ids, response_mask) -> [B]
    ptx_data: str | None = None  # pretraining text; None = plain PPO
    max_steps: int = 100  # PPO iterations
    run: RunConfig = RunConfig(eval_every=10, save_every=10, log_every=1)
    max_prompt_len: int = 64
    ptx_seq_len: int = 128
    value_head: Literal["separate", "shared"] = "separate"  # shared: value head on the policy backbone
    eval_prompts: int = 32  # validation prompts sampled (greedy, EMA policy) at each evaluation
    # Ziegler et al.'s reward normalisation: before training, scale and shift the RM so that the
    # initial policy's samples on the first training prompts score mean 0, std 1 (InstructGPT sets
    # only the bias, on demonstrations: `rlhf-jax rm --demonstrations`)
    normalize_reward: bool = False
    hparams: PPOHyperparams = PPOHyperparams()
    optim: OptimConfig = OptimConfig(learning_rate=1e-5, schedule="constant", warmup_steps=10, warmup_init_fraction=0.1)
    # rank > 0: the policy trains adapters on its frozen base, which is also the KL reference (one
    # copy); the value network trains adapters (+ its score head) on the first reward model's weights
    lora: LoRAConfig = LoRAConfig()

    def __post_init__(self) -> None:
        _check(self.max_steps > 0, "PPOConfig.max_steps must be > 0")
        _check(self.max_prompt_len > 0 and self.ptx_seq_len > 1, "PPOConfig: max_prompt_len > 0, ptx_seq_len > 1")
        for name in ("reward", "rule_reward"):  # a str (or a JSON list) is one entry / a tuple again
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        _check(len(self.reward) >= 1, "PPOConfig.reward: at least one reward-model run is needed")
        for spec in self.rule_reward:
            module, _, func = spec.partition(":")
            _check(bool(module and func), f"PPOConfig.rule_reward: {spec!r} is not of the form 'module:function'")
        if self.reward_weights is not None:
            object.__setattr__(self, "reward_weights", tuple(float(w) for w in self.reward_weights))
            n = len(self.reward) + len(self.rule_reward)
            _check(
                len(self.reward_weights) == n,
                f"PPOConfig.reward_weights: {len(self.reward_weights)} weights for {n} rewards "
                f"({len(self.reward)} reward models, then {len(self.rule_reward)} rule rewards)",
            )
        _check(
            self.hparams.uses_critic or self.value_head == "separate",
            f"PPOConfig: value_head='shared' needs a critic, but estimator {self.hparams.estimator!r} is critic-free",
        )

    @property
    def weights(self) -> tuple[float, ...]:
        """One weight per reward model, then per rule reward."""
        return self.reward_weights or (1.0,) * (len(self.reward) + len(self.rule_reward))

    @property
    def uses_ptx(self) -> bool:
        """PPO-ptx: pretraining data is given and its coefficient is not 0."""
        return self.ptx_data is not None and self.hparams.ptx_coef > 0


@dataclass(frozen=True, kw_only=True)
class DPOHyperparams:
    """What the pure DPO step takes (``dpo.make_train_step``), Rafailov et al. 2023.

    ``k_way`` says how a prompt's K ranked responses enter the loss: ``"pl"`` the
    Plackett-Luce likelihood of the whole ranking (DPO appendix A.3; for K = 2 it is DPO's
    sigmoid loss), ``"pairs"`` the mean over its C(K,2) ordered pairs (ties excluded), then
    over prompts (InstructGPT's RM batching). IPO, hinge and label smoothing are defined on
    pairs: they need ``k_way="pairs"`` (for pairs data, K = 2, the two modes coincide).
    """

    beta: float = 0.1  # inverse temperature of the implicit reward beta * log(pi / pi_ref) (IPO: tau)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = 0.0  # conservative DPO: assumed label-flip probability (sigmoid only)
    k_way: Literal["pl", "pairs"] = "pl"

    def __post_init__(self) -> None:
        _check(self.beta > 0, f"DPOHyperparams.beta must be > 0, got {self.beta}")
        _check(self.loss_type in ("sigmoid", "ipo", "hinge"), f"DPOHyperparams.loss_type: unknown {self.loss_type!r}")
        _check(self.k_way in ("pl", "pairs"), f"DPOHyperparams.k_way must be 'pl' or 'pairs', got {self.k_way!r}")
        _check(0 <= self.label_smoothing <= 1, "DPOHyperparams.label_smoothing must be in [0, 1]")
        _check(
            self.label_smoothing == 0 or self.loss_type == "sigmoid",
            "DPOHyperparams.label_smoothing is only defined for loss_type='sigmoid'",
        )
        _check(
            self.k_way == "pairs" or (self.loss_type == "sigmoid" and self.label_smoothing == 0),
            f"DPOHyperparams: loss_type={self.loss_type!r} / label_smoothing={self.label_smoothing} are defined "
            "on pairs: use k_way='pairs' (for K = 2 data it is the same as 'pl')",
        )


@dataclass(frozen=True, kw_only=True)
class DPOConfig:
    """A DPO run on rankings (pairs are K = 2), against the frozen ``init`` as the reference.

    DPO paper: beta 0.1, lr 1e-6 with 150 warmup steps then constant, batch 64. The
    reference log-probs are computed once before training and served with the batches.
    """

    data: str  # rankings file or hub name ({"prompt","responses","ranks"} or {"prompt","chosen","rejected"})
    init: str  # an SFT run directory or HF model directory: the initial policy AND the reference
    out: str  # the run directory
    max_steps: int | None = None  # None: epochs x steps per epoch
    run: RunConfig = RunConfig()
    epochs: float = 1.0
    batch_size: int = 64  # prompts (each with all its K responses)
    max_prompt_len: int = 256
    max_response_len: int = 256
    max_k: int | None = None  # None: the largest K in the data
    hparams: DPOHyperparams = DPOHyperparams()
    optim: OptimConfig = OptimConfig(learning_rate=1e-6, schedule="constant", warmup_steps=150)

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, "DPOConfig.batch_size must be > 0")
        _check(self.max_steps is None or self.max_steps > 0, "DPOConfig.max_steps must be > 0 or None")
        _check(self.max_prompt_len > 0 and self.max_response_len > 0, "DPOConfig: lengths must be > 0")
        _check(self.max_k is None or self.max_k >= 2, "DPOConfig.max_k must be >= 2 (a ranking needs a pair)")
        _check(self.epochs > 0, "DPOConfig.epochs must be > 0")
