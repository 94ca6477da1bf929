"""PPO's configuration: the algorithm's hyperparameters (what ``rlhf_jax.ppo`` takes) and the run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhf_jax.config.model import LoRAConfig
from rlhf_jax.config.run import OptimConfig, RunConfig
from rlhf_jax.config.validate import check


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
        check(self.minibatch_size > 0 and self.ppo_epochs > 0, "PPOHyperparams: minibatch_size, ppo_epochs must be > 0")
        check(
            self.batch_size % self.minibatch_size == 0,
            "PPOHyperparams: batch_size must be a multiple of minibatch_size",
        )
        check(self.max_new_tokens > 0, "PPOHyperparams.max_new_tokens must be > 0")
        check(self.temperature > 0, "PPOHyperparams.temperature must be > 0 (sampling; log-probs use the same value)")
        check(0 <= self.ema_decay < 1, "PPOHyperparams.ema_decay must be in [0, 1)")
        check(
            self.kl_coef >= 0 and self.kl_target > 0 and self.kl_horizon > 0, "PPOHyperparams: KL settings must be > 0"
        )
        check(self.ptx_coef >= 0, "PPOHyperparams.ptx_coef must be >= 0")
        check(self.ptx_rows is None or self.ptx_rows > 0, "PPOHyperparams.ptx_rows must be > 0 or None")
        estimators = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp")
        check(self.estimator in estimators, f"PPOHyperparams.estimator must be one of {estimators}: {self.estimator!r}")
        check(self.kl_in in ("auto", "reward", "loss"), f"PPOHyperparams.kl_in: unknown {self.kl_in!r}")
        check(self.kl_kind in ("auto", "k1", "k2", "k3"), f"PPOHyperparams.kl_kind: unknown {self.kl_kind!r}")
        aggregations = ("auto", "token_mean", "sequence_mean", "token_sum")
        check(self.aggregation in aggregations, f"PPOHyperparams.aggregation must be one of {aggregations}")
        check(self.group_size >= 1, f"PPOHyperparams.group_size must be >= 1, got {self.group_size}")
        check(
            self.group_size >= 2 or self.estimator not in ("grpo", "dr_grpo", "rloo"),
            f"PPOHyperparams: estimator {self.estimator!r} needs group_size >= 2 responses per prompt "
            f"(its baseline is the other responses to the same prompt), got group_size={self.group_size}",
        )
        check(
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

    The policy and the KL reference both start from ``policy`` (the reference from ``reference``
    when that is set: iterated RLHF, where ``policy`` is the previous round's PPO run and its
    latest checkpoint is taken); the value network from
    ``reward`` (InstructGPT). With ``ptx_data`` the objective adds ``hparams.ptx_coef`` x
    the pretraining LM loss (PPO-ptx); without it, plain PPO.

    Several rewards (Sparrow-style): ``reward`` may name several reward-model runs and
    ``rule_reward`` jit-able rule functions (``"module:function"``, see ``rlhf_jax.rewards``);
    the score is ``sum_i reward_weights[i] * component_i``, one weight per reward model then
    per rule (None: all 1). A single path (a ``str`` is taken as one) is plain InstructGPT.
    """

    prompts: str  # prompts file or hub name
    policy: str  # an SFT run dir or HF dir: the initial policy AND (reference None) the KL reference
    reward: tuple[str, ...]  # reward-model run dirs (the first initialises the value function)
    out: str
    reward_weights: tuple[float, ...] | None = None  # one per reward, then per rule_reward; None: all 1
    rule_reward: tuple[str, ...] = ()  # "module:function": (prompt_ids, response_ids, response_mask) -> [B]
    ptx_data: str | None = None  # pretraining text; None = plain PPO
    # the KL reference's run dir when it is not ``policy`` (iterated RLHF: the policy continues
    # from the previous round's latest PPO checkpoint, the reference stays the SFT model)
    reference: str | None = None
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
        check(self.max_steps > 0, "PPOConfig.max_steps must be > 0")
        check(self.max_prompt_len > 0 and self.ptx_seq_len > 1, "PPOConfig: max_prompt_len > 0, ptx_seq_len > 1")
        for name in ("reward", "rule_reward"):  # a str (or a JSON list) is one entry / a tuple again
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        check(len(self.reward) >= 1, "PPOConfig.reward: at least one reward-model run is needed")
        for spec in self.rule_reward:
            module, _, func = spec.partition(":")
            check(bool(module and func), f"PPOConfig.rule_reward: {spec!r} is not of the form 'module:function'")
        if self.reward_weights is not None:
            object.__setattr__(self, "reward_weights", tuple(float(w) for w in self.reward_weights))
            n = len(self.reward) + len(self.rule_reward)
            check(
                len(self.reward_weights) == n,
                f"PPOConfig.reward_weights: {len(self.reward_weights)} weights for {n} rewards "
                f"({len(self.reward)} reward models, then {len(self.rule_reward)} rule rewards)",
            )
        check(
            self.reference is None or not self.lora.enabled,
            "PPOConfig.reference: a separate KL reference is not supported with LoRA (the reference is the policy's base)",
        )
        check(
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
