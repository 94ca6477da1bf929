"""Iterated RLHF: ``run_pipeline`` collects new comparisons on the current policy each round,
trains a new RM on all comparisons so far and a new policy; a person can do the ranking."""

from __future__ import annotations

import dataclasses
import json

import pytest

from rlhf_jax.config import OptimConfig, PPOConfig, PPOHyperparams, RewardConfig, RunConfig, SFTConfig
from rlhf_jax.pipeline import PipelineConfig, run_pipeline
from rlhf_jax.tasks import tiny
from rlhf_jax.tasks.world import World, WorldConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    world = World(WorldConfig(seed=0))
    tok = world.build_tokenizer(root / "tokenizer")
    files = world.write_files(root / "data")
    base = tiny.make_model_dir(root / "base", vocab_size=len(tok), hidden_size=32, num_layers=1, tokenizer=tok)
    # round-0 comparisons: the world's labelers on its own synthetic responses
    import numpy as np

    rng = np.random.default_rng(0)
    prompts = [json.loads(line)["prompt"] for line in files["prompts"].read_text().splitlines()][:64]
    groups = [world.synthetic_responses(p, 4, rng) for p in prompts]
    recs = world.rankings(prompts, groups, [None] * len(prompts), seed=0)
    (root / "data" / "rankings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    run = RunConfig(progress=False, log_every=1, eval_every=1000, save_every=1000, split_fractions=(1.0, 0.0, 0.0))
    cfg = PipelineConfig(
        out=str(root / "pipe"),
        rounds=2,
        samples_per_prompt=4,
        comparison_prompts=16,
        sft=SFTConfig(
            data=str(files["demonstrations"]),
            init=str(base),
            out="",
            max_steps=4,
            batch_size=16,
            seq_len=32,
            run=run,
            optim=OptimConfig(learning_rate=1e-3),
        ),
        rm=RewardConfig(
            data=str(root / "data" / "rankings.jsonl"),
            init="",
            out="",
            max_steps=3,
            batch_size=8,
            max_prompt_len=16,
            max_response_len=16,
            run=run,
        ),
        ppo=PPOConfig(
            prompts=str(files["prompts"]),
            policy="",
            reward="",
            out="",
            max_steps=2,
            max_prompt_len=16,
            run=run,
            hparams=PPOHyperparams(batch_size=8, minibatch_size=4, max_new_tokens=8),
        ),
    )
    return root, cfg


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_two_rounds_with_simulated_labelers(setup):
    root, cfg = setup
    final = run_pipeline(cfg)
    pipe = root / "pipe"
    assert final == pipe / "round_1" / "ppo"
    new = _rows(pipe / "round_1" / "rankings.jsonl")
    assert new and all(len(r["responses"]) == 4 and len(r["ranks"]) == 4 for r in new)
    merged = _rows(pipe / "round_1" / "all_rankings.jsonl")
    assert len(merged) == len(_rows(root / "data" / "rankings.jsonl")) + len(new)  # ALL comparisons so far
    for stage in ("round_0/rm", "round_0/ppo", "round_1/rm", "round_1/ppo"):
        assert (pipe / stage / "checkpoints").is_dir(), stage
    # the new RM and policy start from the SFT model, as in the paper
    assert json.loads((pipe / "round_1" / "ppo" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


def test_a_person_ranks_the_next_round(setup, tmp_path):
    root, cfg = setup
    cfg = dataclasses.replace(cfg, out=str(tmp_path / "pipe"), labeler="file")
    assert run_pipeline(cfg) == tmp_path / "pipe" / "round_0" / "ppo"  # stops: nothing ranked yet
    to_rank = tmp_path / "pipe" / "round_1" / "to_rank.jsonl"
    rows = _rows(to_rank)
    assert rows and not (tmp_path / "pipe" / "round_1" / "rankings.jsonl").exists()
    ranked = [{**r, "ranks": list(range(len(r["responses"])))} for r in rows if len(set(r["responses"])) == 4]
    (tmp_path / "pipe" / "round_1" / "rankings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ranked))
    assert run_pipeline(cfg) == tmp_path / "pipe" / "round_1" / "ppo"
