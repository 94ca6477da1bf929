"""``rlhf-jax demo --quick``: the whole InstructGPT study, test-sized, through the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlhf_jax import checkpoint
from rlhf_jax.cli import main
from rlhf_jax.train_loop import read_metrics

STAGES = ("base", "base_big", "sft", "sft_big", "rm", "ppo_ptx", "ppo", "ppo_nokl")
MODELS = ("SFT", "SFT big", "PPO", "PPO-ptx")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "run"
    main(["demo", "--quick", "--out", str(root)])
    return root, json.loads((root / "results.json").read_text())


def test_every_artifact_is_written(demo):
    root, _ = demo
    for name in ("pretrain", "pretrain_heldout", "demonstrations", "prompts", "rankings"):
        assert (root / "data" / f"{name}.jsonl").stat().st_size > 0, name
    for stage in STAGES:
        assert checkpoint.read_model_info(root / stage)["params_path"], stage
        assert any((root / stage / "checkpoints").iterdir()), stage
        assert read_metrics(root / stage), f"{stage} wrote no metrics"
    for name in ("ppo_ptx", "ppo", "ppo_nokl"):
        samples = [json.loads(line) for line in (root / name / "samples.jsonl").read_text().splitlines()]
        assert samples and {"prompt", "response", "rm_score"} <= samples[0].keys()
    report = (root / "report.md").read_text()
    for plot in ("ppo_curves.png", "win_rates.png", "overoptimisation.png"):
        assert (root / plot).stat().st_size > 1000 and plot in report
    for claim in ("RLHF beats SFT", "alignment tax", "over-optimisation"):
        assert claim in report


def test_results_are_complete_and_finite(demo):
    _, results = demo
    assert set(results["models"]) == set(MODELS)
    for name in MODELS:
        m = results["models"][name]
        assert np.isfinite(m["gold"]) and np.isfinite(m["heldout_loss"]) and m["params"] > 0
    # the "big" SFT model is at least 4x the aligned one
    assert results["models"]["SFT big"]["params"] >= 4 * results["models"]["SFT"]["params"]
    for v in results["win_rates"].values():
        assert 0.0 <= v <= 1.0
    for key in ("rm_accuracy", "labeler_agreement"):
        assert 0.0 <= results[key] <= 1.0
    assert results["quick"] is True and results["total_s"] > 0


def test_ppo_improves_the_gold_score_over_sft(demo):
    """The hidden gold preference (never seen by the reward model) prefers the RL policies'
    samples on held-out users' prompts to the SFT model's."""
    _, results = demo
    gold = {name: results["models"][name]["gold"] for name in MODELS}
    assert gold["PPO-ptx"] > gold["SFT"] and gold["PPO"] > gold["SFT"], gold
