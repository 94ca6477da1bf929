"""The configuration of the built-in world (:class:`WorldConfig`): every knob that decides it.

Users and their prompts, the labelers' demonstration errors and filler, the pretraining
corpus sizes, the gold preference's style terms and the labelers' Thurstone noise, all
validated at construction. :class:`rlhf_jax.tasks.world.World` builds the world from it;
the same config gives the same files, byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_jax.tasks import world_labels as wl
from rlhf_jax.tasks.world_lang import FAMILIES

__all__ = ["WorldConfig"]


@dataclass(frozen=True, kw_only=True)
class WorldConfig:
    """Everything that decides the world; the same config gives the same files, byte for byte.

    Attributes:
      seed: the root of every random stream.
      num_users: simulated users (ids ``u000``...); prompts are split by these.
      prompts_per_user: distinct prompts each user asks.
      families: the instruction families in use (a subset of ``world_lang.FAMILIES``).
      main_style_prob: how often a user phrases a prompt in their own style (else another).
      family_concentration: Dirichlet concentration of each user's family preference
        (small: users specialise; large: every user asks every family equally).
      list_len: inclusive (min, max) words in a prompt's list (replace caps at 4).
      demo_error_rate: fraction of demonstrations with one labeler error (a dropped,
        duplicated, swapped, wrong or cut-off word, or filler before / after the answer).
      demo_filler_rate: fraction of the otherwise error-free demonstrations that the labeler
        wraps in filler ("sure , here it is : ..." / "... hope this helps"): a verbose house
        style that SFT imitates and the gold preference (and so the rankings) dislikes.
      pretrain_docs, heldout_docs: documents written to pretrain.jsonl / pretrain_heldout.jsonl.
      filler_penalty, filler_cap, bad_end_penalty, no_eos_penalty: the gold preference's
        style terms (see ``world_labels``).
      labeler_sigma: std of the Thurstone noise on gold scores. 0.52 is calibrated so that
        two labelers agree on 73% of pairs of SFT-like samples (``World.synthetic_responses``
        pools, K = 4..9: measured 0.729, range 0.721-0.738, over world seeds 0-4 with 2000
        pools each); one labeler agrees with the gold order on about 82% of pairs, the
        ceiling of a reward model's accuracy against the gold preference.
      labeler_spread: log-normal spread of each labeler's personal weight on style.
      num_labelers: labelers who share the ranking work.
    """

    seed: int = 0
    num_users: int = 40
    prompts_per_user: int = 30
    families: tuple[str, ...] = FAMILIES
    main_style_prob: float = 0.85
    family_concentration: float = 1.0
    list_len: tuple[int, int] = (3, 5)
    demo_error_rate: float = 0.2
    demo_filler_rate: float = 0.0
    pretrain_docs: int = 20000
    heldout_docs: int = 1000
    filler_penalty: float = 0.1
    filler_cap: int = 5
    bad_end_penalty: float = 0.3
    no_eos_penalty: float = 0.5
    labeler_sigma: float = 0.52
    labeler_spread: float = 0.25
    num_labelers: int = 8

    def __post_init__(self) -> None:
        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"WorldConfig: {msg}")

        check(self.num_users > 0 and self.prompts_per_user > 0, "num_users and prompts_per_user must be > 0")
        check(bool(self.families) and set(self.families) <= set(FAMILIES), f"families must be a subset of {FAMILIES}")
        check(0.0 <= self.main_style_prob <= 1.0, "main_style_prob must be in [0, 1]")
        check(self.family_concentration > 0, "family_concentration must be > 0")
        check(2 <= self.list_len[0] <= self.list_len[1] <= 5, "list_len must satisfy 2 <= min <= max <= 5")
        check(0.0 <= self.demo_error_rate <= 1.0, "demo_error_rate must be in [0, 1]")
        check(0.0 <= self.demo_filler_rate <= 1.0, "demo_filler_rate must be in [0, 1]")
        check(self.pretrain_docs > 0 and self.heldout_docs > 0, "pretrain_docs and heldout_docs must be > 0")
        check(self.labeler_sigma >= 0 and self.labeler_spread >= 0, "labeler_sigma and labeler_spread must be >= 0")
        check(self.num_labelers >= 2, "num_labelers must be >= 2")

    @property
    def gold_weights(self) -> wl.GoldWeights:
        """The style terms of the gold preference."""
        return wl.GoldWeights(self.filler_penalty, self.filler_cap, self.bad_end_penalty, self.no_eos_penalty)
