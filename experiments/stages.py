"""Shared runner of the presets: ``python experiments/<preset>.py [sft|rm|ppo|all]``."""

from __future__ import annotations

import sys

from rlhf_jax.config import PPOConfig, RewardConfig, SFTConfig


def run_stages(sft: SFTConfig, rm: RewardConfig, ppo: PPOConfig, usage: str, argv: list[str] | None = None) -> None:
    """Run one stage by name, or all three in order (each resumes if its run directory exists)."""
    from rlhf_jax.drivers import run_ppo, run_rm, run_sft

    argv = sys.argv[1:] if argv is None else argv
    stage = argv[0] if argv else "all"
    stages = {"sft": lambda: run_sft(sft), "rm": lambda: run_rm(rm), "ppo": lambda: run_ppo(ppo)}
    if stage not in (*stages, "all"):
        raise SystemExit(usage)
    for name in stages if stage == "all" else [stage]:
        print(name, stages[name]())
