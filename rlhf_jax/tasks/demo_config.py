"""``DemoConfig``: what ``rlhf-jax demo`` runs (every field a flag), and ``--full``'s headline run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from rlhf_jax.tasks.world_lang import FAMILIES

# ``rlhf-jax demo --full``: three seeds and six rounds, fixed by the time budget before any result
# of them (2026-12-02 on 2 cores: 10.6-11.3 min a seed with plain PPO iterated, 32.9 min in all)
FULL_SEEDS = "0,1,2"
FULL_ROUNDS = 6


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """The built-in InstructGPT study at small scale (``--quick``: the same pipeline, test-sized).

    Attributes:
      out: the directory of every run, the data and ``report.md``.
      seed: the world's and every run's seed.
      quick: shrink every stage to test size (see :meth:`scaled`).
      hidden_size, num_layers: the aligned model; the "big" SFT model has 2x width and
        2x depth (>= 4x the parameters).
      num_users, prompts_per_user: the world's simulated users (80/10/10 split by user id:
        train / validation / held-out evaluation users).
      families: the instruction families asked (``--quick``: the three a few hundred steps learn).
      demo_filler_rate: how often a labeler's demonstration wraps a correct answer in
        filler, a style the rankings dislike (``WorldConfig.demo_filler_rate``).
      pretrain_steps, sft_steps, rm_steps, ppo_steps: optimizer steps (PPO: iterations).
      big_step_fraction: the big model's pretraining and SFT steps, as a fraction of the
        small one's (1.0: the same data; ``--quick`` shortens it, the slowest stage).
      rm_learning_rate: the reward model's peak learning rate.
      rm_init: the model every reward model (round 0's and each round's retrained one) is
        initialised from: ``"sft_big"``, the big SFT model, as InstructGPT used one 6B RM for
        its 1.3B, 6B and 175B policies (larger than the small policy, not the policy's own SFT
        model); ``"sft"``: the policy's own SFT model. PPO's value network is initialised from
        the RM, so it has the RM's size. ``sft_big`` makes :func:`prepare` train the big models
        even with ``big=False``.
      ptx_coef: gamma of PPO-ptx (1; InstructGPT: 27.8, whose pretraining gradient is ~4x PPO's
        here), chosen on validation users by the labelers' preference (``experiments/tune_ppo.py``).
      ppo_learning_rate, ppo_ema_decay: PPO's constant learning rate and the decay of the
        EMA policy that is evaluated and exported (0.992 as in the paper; ``--quick``'s 12
        iterations need a shorter average).
      ranking_prompts: prompts of training users whose K = 4..9 SFT samples labelers rank.
      eval_prompts: held-out users' prompts for the win rates and RM accuracy.
      eval_temperature: sampling temperature of the evaluation responses (1.0: the policy's
        own distribution, as in rollouts and the labelers' comparisons; 0: greedy).
      max_new_tokens: response length limit everywhere.
      rounds: RLHF rounds (InstructGPT step 4, :mod:`rlhf_jax.tasks.demo_rounds`): 1 is SFT ->
        RM -> PPO-ptx; each further round ranks the last policy's samples, retrains the RM
        on all comparisons so far and continues PPO-ptx from the last policy. None: 3, or
        6 (``FULL_ROUNDS``) with ``full``.
      iterate_ppo: plain PPO continues through the rounds too (from its own last policy,
        against each round's RM, the KL reference still SFT), so that its held-out loss and KL
        are measured at the end of every round and the alignment tax at matched KL spans all
        of them (off: plain PPO runs in round 0 only).
      seeds: ``"0,1,2"``: the whole demo once per seed, one after another, under
        ``out/seed_<s>``, and one report with 95% bootstrap intervals (empty: ``seed`` alone).
      full: the README's headline run, shorthand for ``--seeds 0,1,2`` (unless ``seeds`` is
        given), 6 rounds (``FULL_ROUNDS``, unless ``rounds`` is given) and ``--iterate-ppo``. It is
        consumed on construction (reset to False), so the configuration a run records is what
        ran and the explicit flags reuse a ``--full`` run's finished seeds.
    """

    out: str = "runs/demo"
    seed: int = 0
    quick: bool = False
    hidden_size: int = 64
    num_layers: int = 2
    num_users: int = 120
    prompts_per_user: int = 40
    families: tuple[str, ...] = FAMILIES
    demo_filler_rate: float = 0.3
    pretrain_steps: int = 400
    sft_steps: int = 600
    big_step_fraction: float = 1.0
    rm_steps: int = 120
    rm_learning_rate: float = 1e-3
    rm_init: Literal["sft", "sft_big"] = "sft_big"
    ppo_steps: int = 60
    ptx_coef: float = 1.0
    ppo_learning_rate: float = 1e-4
    ppo_ema_decay: float = 0.992
    ranking_prompts: int = 2000
    eval_prompts: int = 480
    eval_temperature: float = 1.0
    max_new_tokens: int = 16
    rounds: int | None = None
    iterate_ppo: bool = False
    seeds: str = ""
    full: bool = False

    def __post_init__(self) -> None:
        full = self.full
        if full:
            object.__setattr__(self, "seeds", self.seeds or FULL_SEEDS)
            object.__setattr__(self, "iterate_ppo", True)
            object.__setattr__(self, "full", False)
        if self.rounds is None:
            object.__setattr__(self, "rounds", FULL_ROUNDS if full else 3)
        if self.rounds < 1:
            raise ValueError("DemoConfig.rounds must be >= 1")
        if self.rm_init not in ("sft", "sft_big"):
            raise ValueError(f"DemoConfig.rm_init must be 'sft' or 'sft_big', got {self.rm_init!r}")
        self.seed_list  # noqa: B018  (validates --seeds)

    @property
    def seed_list(self) -> tuple[int, ...]:
        """``--seeds 0,1,2`` as integers; empty: ``(seed,)``."""
        try:
            seeds = tuple(int(x) for x in self.seeds.replace(" ", "").split(",") if x)
        except ValueError:
            raise ValueError(f"DemoConfig.seeds: {self.seeds!r} is not a comma-separated list of integers") from None
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"DemoConfig.seeds: {self.seeds!r} repeats a seed")
        return seeds or (self.seed,)

    def scaled(self) -> DemoConfig:
        if not self.quick:
            return self
        return dataclasses.replace(
            self,
            num_users=40,
            prompts_per_user=40,
            families=("repeat", "count", "sort"),
            demo_filler_rate=0.5,
            pretrain_steps=150,
            sft_steps=250,
            big_step_fraction=0.2,
            rm_steps=30,
            ppo_steps=12,
            ppo_learning_rate=3e-4,
            ppo_ema_decay=0.9,
            ranking_prompts=600,
            eval_prompts=160,
        )
