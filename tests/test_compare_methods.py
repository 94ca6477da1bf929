"""experiments/compare_methods.py without running it: flags, statistics and the table on fake numbers."""

from __future__ import annotations

import doctest
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "compare_methods.py"
_spec = importlib.util.spec_from_file_location("compare_methods", _PATH)
cm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cm)


def test_doctests():
    assert doctest.testmod(cm).failed == 0


def test_flags():
    a = cm.parse_args([])
    assert (a.quick, a.seed, a.group_size, a.best_of, a.from_dir) == (False, 0, 4, [4, 16], None)
    assert a.methods == list(cm.METHODS)
    a = cm.parse_args(["--quick", "--from", "runs/demo", "--group-size", "8", "--best-of", "2", "--methods", "GRPO"])
    assert (a.quick, a.from_dir, a.group_size, a.best_of, a.methods) == (True, "runs/demo", 8, [2], ["GRPO"])
    for bad in (["--group-size", "3"], ["--group-size", "1"], ["--best-of", "0"], ["--methods", "PPO"]):
        with pytest.raises(SystemExit):
            cm.parse_args(bad)


def test_bootstrap_interval_brackets_the_mean():
    x = cm.win_outcomes(np.arange(200) % 3 - 1.0, np.zeros(200))  # wins, ties, losses equally often
    lo, hi = cm.bootstrap_ci(x, resamples=500, seed=0)
    assert lo < x.mean() < hi and hi - lo < 0.2
    assert cm.bootstrap_ci(np.ones(10), resamples=50, seed=0) == (1.0, 1.0)


def test_best_of_n_kl_bound():
    assert cm.best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    assert all(cm.best_of_n_kl(n) < cm.best_of_n_kl(n + 1) for n in range(1, 20))


def test_table():
    rows = [
        {"method": "SFT (reference)", "win": None, "gold": -0.3, "kl": 0.0, "heldout_loss": 1.97, "samples": "—"},
        {
            "method": "GRPO",
            "win": 0.5625,
            "ci": (0.51, 0.61),
            "gold": -0.2,
            "kl": 0.4321,
            "heldout_loss": 1.95,
            "samples": "3,840",
            "wall_s": 30.4,
        },
        {
            "method": "best-of-4",
            "win": 0.6,
            "ci": (0.55, 0.65),
            "gold": -0.1,
            "kl": cm.best_of_n_kl(4),
            "kl_analytic": True,
            "heldout_loss": 1.97,
            "samples": "0 (1,920 at inference)",
            "wall_s": 5.0,
            "inference": True,
        },
    ]
    lines = cm.render_table(rows).splitlines()
    assert len(lines) == 5 and lines[0].count("|") == len(cm.COLUMNS) + 1
    assert "| GRPO | 56.2% [51.0%, 61.0%] | -0.200 | 0.432 | 1.950 | 3,840 | 30 |" == lines[3]
    assert "0.636 (analytic bound)" in lines[4] and "5 (inference)" in lines[4]
    assert lines[2].startswith("| SFT (reference) | — |")
