"""experiments/tune_ppo.py without training: variant specs and the labelers' win rate."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax.tasks.world import World, WorldConfig
from rlhf_jax.tasks.world_lang import answer_words

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "tune_ppo.py"
_spec = importlib.util.spec_from_file_location("tune_ppo", _PATH)
tp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tp)


def test_variant_specs():
    assert tp.parse_variant("base:") == ("base", {})
    assert tp.parse_variant("g1:ptx_coef=1,lr=2e-4,estimator=rloo") == (
        "g1",
        {"ptx_coef": 1, "lr": 2e-4, "estimator": "rloo"},
    )
    for bad in ("nocolon", ":ptx_coef=1", "x:ptx_coef", "x:ptx_cof=1"):
        with pytest.raises(argparse.ArgumentTypeError):
            tp.parse_variant(bad)
    a = tp.parse_args(["--from", "runs/demo", "--out", "o", "--variant", "a:kl_coef=0.05", "--variant", "b:"])
    assert a.variant == [("a", {"kl_coef": 0.05}), ("b", {})]
    assert [tp.parse_variant(v)[0] for v in tp.DEFAULT_VARIANTS][0] == "base"


def test_labelers_prefer_correct_answers():
    world = World(WorldConfig(seed=0, num_users=12, prompts_per_user=10))
    prompts = [p["prompt"] for p in world.prompts()][:60]
    right = [" ".join(answer_words(p)) + " <eos>" for p in prompts]
    wrong = ["zzz qqq" for _ in prompts]  # not the answer, never ended
    wins = tp.labeler_win_outcomes(world, prompts, right, wrong)
    assert wins.shape == (60,) and wins.mean() > 0.9
    np.testing.assert_array_equal(tp.labeler_win_outcomes(world, prompts, right, wrong), wins)  # seeded per prompt
    assert tp.labeler_win_outcomes(world, prompts, wrong, right).mean() < 0.1
    np.testing.assert_array_equal(tp.labeler_win_outcomes(world, prompts, right, right), 0.5)  # identical: a tie
