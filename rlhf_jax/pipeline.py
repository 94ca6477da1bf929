"""``rlhf-jax pipeline --rounds N``: SFT -> RM -> PPO, then iterated RLHF (InstructGPT step 4).

Round 0 trains the SFT model, a reward model on the given rankings and a policy against
it. Each later round r samples ``samples_per_prompt`` responses from the previous round's
policy on comparison prompts, writes them to ``round_<r>/to_rank.jsonl`` and gets them
ranked — by the built-in task's simulated labelers (``labeler="world"``) or by a person,
who writes ``round_<r>/rankings.jsonl`` (same rows plus ``"ranks"``) and runs the same
command again — then trains a new RM on ALL comparisons so far and a new policy from the
SFT model against it. Every stage is an ordinary run directory, so an interrupted
pipeline resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax

from rlhf_jax import checkpoint, data
from rlhf_jax.config import PPOConfig, RewardConfig, SFTConfig
from rlhf_jax.drivers import run_ppo, run_rm, run_sft
from rlhf_jax.tasks.evaluate import sample_responses, strip_eos
from rlhf_jax.tasks.world import World, WorldConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """The three stages' configs (their ``out``/``init``/``policy``/``reward`` are set per round)."""

    out: str
    sft: SFTConfig
    rm: RewardConfig
    ppo: PPOConfig
    rounds: int = 1  # 1 = SFT -> RM -> PPO; each extra round collects new comparisons
    labeler: Literal["world", "file"] = "world"  # world: the built-in task's simulated labelers
    world_seed: int = 0
    samples_per_prompt: int = 4  # K of the new comparisons
    comparison_prompts: int = 256  # prompts sampled per round

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError("PipelineConfig.rounds must be >= 1")
        if not 2 <= self.samples_per_prompt <= 9:
            raise ValueError("PipelineConfig.samples_per_prompt must be in 2..9 (InstructGPT: K = 4..9)")


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def union_of_comparisons(paths: list[Path], out: Path) -> Path:
    """All ranking records of ``paths`` in one file: what each round's new reward model trains on."""
    return write_jsonl(out, [row for p in paths for row in read_jsonl(p)])


def collect_comparisons(cfg: PipelineConfig, round_dir: Path, policy_dir: Path) -> Path | None:
    """Sample K responses per prompt from ``policy_dir`` and get them ranked.

    Returns the rankings file, or None when a person still has to rank ``to_rank.jsonl``.
    """
    ranked = round_dir / "rankings.jsonl"
    if ranked.exists():
        return ranked
    to_rank = round_dir / "to_rank.jsonl"
    if not to_rank.exists():
        records, _ = data.load_records(cfg.ppo.prompts, "prompts")
        prompts = [r for r in records if "prompt" in r][: cfg.comparison_prompts]
        model, params, tok = checkpoint.load_model(policy_dir)
        texts = [r["prompt"] for r in prompts]
        groups: list[list[tuple[str, bool]]] = [[] for _ in texts]
        for k in range(cfg.samples_per_prompt):
            outs = sample_responses(
                model,
                params,
                tok,
                texts,
                key=jax.random.key(1000 + k),
                max_prompt_len=cfg.ppo.max_prompt_len,
                max_new_tokens=cfg.ppo.hparams.max_new_tokens,
                temperature=cfg.ppo.hparams.temperature,
            )
            for g, o in zip(groups, outs):
                g.append(strip_eos(o, tok.eos_token))
        rows = [
            {"prompt": t, "responses": [r for r, _ in g], "ended": [e for _, e in g], "user_id": p.get("user_id")}
            for t, g, p in zip(texts, groups, prompts)
        ]
        write_jsonl(to_rank, rows)
    if cfg.labeler == "file":
        log.warning('pipeline: rank %s and write %s (add "ranks", 0 = best), then run again', to_rank, ranked)
        return None
    world = World(WorldConfig(seed=cfg.world_seed))
    rows = read_jsonl(to_rank)
    usable = [r for r in rows if len(set(r["responses"])) >= 2 and all(r["responses"])]
    recs = world.rankings(
        [r["prompt"] for r in usable],
        [r["responses"] for r in usable],
        [r.get("user_id") for r in usable],
        seed=len(rows),
        ended=[r["ended"] for r in usable],
    )
    return write_jsonl(ranked, recs)


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Run (or resume) every round; returns the last round's policy run directory."""
    root = Path(cfg.out)
    sft_dir = run_sft(dataclasses.replace(cfg.sft, out=str(root / "sft")))
    comparisons = [Path(cfg.rm.data)]
    policy_dir = None
    for r in range(cfg.rounds):
        round_dir = root / f"round_{r}"
        if r > 0:
            new = collect_comparisons(cfg, round_dir, policy_dir)
            if new is None:
                return policy_dir
            comparisons.append(new)
        merged = union_of_comparisons(comparisons, round_dir / "all_rankings.jsonl")
        rm_dir = run_rm(dataclasses.replace(cfg.rm, data=str(merged), init=str(sft_dir), out=str(round_dir / "rm")))
        policy_dir = run_ppo(
            dataclasses.replace(cfg.ppo, policy=str(sft_dir), reward=str(rm_dir), out=str(round_dir / "ppo"))
        )
        log.info("pipeline: round %d done: %s", r, policy_dir)
    return policy_dir
