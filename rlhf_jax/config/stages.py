"""The supervised stages' configurations: SFT (or pretraining), the reward model, DPO."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhf_jax.config.model import LoRAConfig
from rlhf_jax.config.run import OptimConfig, RunConfig
from rlhf_jax.config.validate import check


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
        check(self.batch_size > 0 and self.seq_len > 1, "SFTConfig: batch_size > 0 and seq_len > 1 required")
        check(self.max_steps is None or self.max_steps > 0, "SFTConfig.max_steps must be > 0 or None")
        check(self.epochs > 0, "SFTConfig.epochs must be > 0")
        check(0 <= self.ptx_fraction < 1, "SFTConfig.ptx_fraction must be in [0, 1)")
        check(
            (self.ptx_fraction > 0) == (self.ptx_data is not None),
            "SFTConfig: ptx_data and ptx_fraction > 0 go together",
        )
        check(0 <= self.dropout < 1, "SFTConfig.dropout must be in [0, 1)")

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
        check(self.center_coef >= 0, "RewardHyperparams.center_coef must be >= 0")


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
        check(self.batch_size > 0, "RewardConfig.batch_size must be > 0")
        check(self.max_steps is None or self.max_steps > 0, "RewardConfig.max_steps must be > 0 or None")
        check(self.max_prompt_len > 0 and self.max_response_len > 0, "RewardConfig: lengths must be > 0")
        check(self.max_k is None or self.max_k >= 2, "RewardConfig.max_k must be >= 2 (a ranking needs a pair)")
        check(self.epochs > 0, "RewardConfig.epochs must be > 0")


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
        check(self.beta > 0, f"DPOHyperparams.beta must be > 0, got {self.beta}")
        check(self.loss_type in ("sigmoid", "ipo", "hinge"), f"DPOHyperparams.loss_type: unknown {self.loss_type!r}")
        check(self.k_way in ("pl", "pairs"), f"DPOHyperparams.k_way must be 'pl' or 'pairs', got {self.k_way!r}")
        check(0 <= self.label_smoothing <= 1, "DPOHyperparams.label_smoothing must be in [0, 1]")
        check(
            self.label_smoothing == 0 or self.loss_type == "sigmoid",
            "DPOHyperparams.label_smoothing is only defined for loss_type='sigmoid'",
        )
        check(
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
        check(self.batch_size > 0, "DPOConfig.batch_size must be > 0")
        check(self.max_steps is None or self.max_steps > 0, "DPOConfig.max_steps must be > 0 or None")
        check(self.max_prompt_len > 0 and self.max_response_len > 0, "DPOConfig: lengths must be > 0")
        check(self.max_k is None or self.max_k >= 2, "DPOConfig.max_k must be >= 2 (a ranking needs a pair)")
        check(self.epochs > 0, "DPOConfig.epochs must be > 0")
