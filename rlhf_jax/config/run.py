"""What every stage's run shares: the device mesh, the optimizer, the run's cadence and shapes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhf_jax.config.model import AttentionImpl, DType, Remat, remat_value
from rlhf_jax.config.validate import check


@dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh ('data', 'fsdp', 'tensor'); one axis may be -1 (= all remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        check(all(s == -1 or s >= 1 for s in sizes), f"MeshConfig: axis sizes must be >= 1 or -1, got {sizes}")
        check(sizes.count(-1) <= 1, f"MeshConfig: at most one axis may be -1, got {sizes}")

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """The concrete (data, fsdp, tensor) shape for ``num_devices`` devices."""
        sizes = [self.data, self.fsdp, self.tensor]
        known = 1
        for s in sizes:
            known *= s if s != -1 else 1
        if -1 in sizes:
            check(
                num_devices % known == 0,
                f"MeshConfig {tuple(sizes)}: {num_devices} devices are not divisible by {known}",
            )
            sizes[sizes.index(-1)] = num_devices // known
        check(
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
        check(self.learning_rate >= 0, f"OptimConfig.learning_rate must be >= 0, got {self.learning_rate}")
        check(self.warmup_steps >= 0, "OptimConfig.warmup_steps must be >= 0")
        check(0 <= self.final_lr_fraction <= 1, "OptimConfig.final_lr_fraction must be in [0, 1]")
        check(0 <= self.warmup_init_fraction <= 1, "OptimConfig.warmup_init_fraction must be in [0, 1]")
        check(self.max_grad_norm is None or self.max_grad_norm > 0, "OptimConfig.max_grad_norm must be > 0 or None")


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
    # keep the examples apart) and a reward model batch drops its empty response slots (K < max K),
    # everything else as "bucket"; "bucket": each batch is cut to the next
    # bucket length above its longest row (16, 32, ... 512, then multiples of 256; the configured lengths
    # are caps); "max": every batch at the configured length
    pad_to: Literal["pack", "bucket", "max"] = "pack"
    # What each block keeps for the backward pass of a training step (README, "Memory"): "dots"
    # keeps matmul outputs and recomputes the elementwise ops; "full" keeps block inputs only
    remat: Remat = "dots"
    # The attention kernel of training and scoring passes (ModelConfig.attention): "auto" is cuDNN's
    # fused kernel on a GPU in bfloat16 / float16, our einsum attention elsewhere
    attention: AttentionImpl = "auto"
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
        object.__setattr__(self, "remat", remat_value(self.remat))
        check(self.stop_at_step is None or self.stop_at_step > 0, "RunConfig.stop_at_step must be > 0 or None")
        check(self.max_consecutive_skips >= 1, "RunConfig.max_consecutive_skips must be >= 1")
        for name in ("log_every", "eval_every", "save_every", "eval_batches"):
            check(getattr(self, name) > 0, f"RunConfig.{name} must be > 0")
        check(self.keep_last >= 1 and self.keep_best >= 0, "RunConfig: keep_last >= 1 and keep_best >= 0")
        check(abs(sum(self.split_fractions) - 1.0) < 1e-6, "RunConfig.split_fractions must sum to 1")
        check(0 <= self.max_skip_fraction <= 1, "RunConfig.max_skip_fraction must be in [0, 1]")
        for name in ("dedup_prefix_chars", "max_prompts_per_user"):
            check(getattr(self, name) is None or getattr(self, name) > 0, f"RunConfig.{name} must be > 0 or None")
