"""``rlhf-jax demo --quick --rounds 2 --iterate-ppo``: the whole InstructGPT study, test-sized, through the
command line, with one iterated RLHF round (plain PPO iterated too); the report's statistics on fake numbers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from rlhf_jax import checkpoint
from rlhf_jax.config import PPOConfig
from rlhf_jax.drivers.ppo import build_networks
from rlhf_jax.pipeline import read_jsonl
from rlhf_jax.tasks import demo, demo_config, evaluate, report
from rlhf_jax.train_loop import read_metrics
from tests import stage_fixtures as F

STAGES = ("base", "base_big", "sft", "sft_big", "rm", "ppo_ptx", "ppo", "ppo_nokl")
STAGES += ("round_1/rm", "round_1/ppo_ptx", "round_1/ppo")
MODELS = ("SFT", "SFT big", "PPO", "PPO-ptx", "PPO-ptx, round 1", "PPO, round 1")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The quick demo, run once per test session (both xdist workers read the same run).

    It runs in its own process (``F.run_cli``, whose environment has only the fake devices in
    XLA_FLAGS), so at XLA's default optimisation level: the test session compiles at level 0
    (root conftest.py), which speeds up the compile-bound tests but slows the demo's sampling
    loops (the quick demo took 484 s in CI at the default level, 1,034 s at level 0)."""

    def build(path):
        args = ["demo", "--quick", "--rounds", "2", "--iterate-ppo", "--out", str(path / "run")]
        done = F.run_cli(args, num_devices=8, timeout=3600)
        assert done.returncode == 0, done.stderr[-4000:]
        return {}

    path, _ = F.build_once(tmp_path_factory, "demo_quick_rounds2_iterated", build)
    root = path / "run"
    return root, report.load_results(root / "results.json")


def test_every_artifact_is_written(demo_run):
    root, _ = demo_run
    for name in ("pretrain", "pretrain_heldout", "demonstrations", "prompts", "rankings"):
        assert (root / "data" / f"{name}.jsonl").stat().st_size > 0, name
    for stage in STAGES:
        assert checkpoint.read_model_info(root / stage)["params_path"], stage
        assert any((root / stage / "checkpoints").iterdir()), stage
        assert read_metrics(root / stage), f"{stage} wrote no metrics"
    for name in ("ppo_ptx", "ppo", "ppo_nokl", "round_1/ppo_ptx"):
        samples = [json.loads(line) for line in (root / name / "samples.jsonl").read_text().splitlines()]
        assert samples and {"prompt", "response", "rm_score"} <= samples[0].keys()
    report_md = (root / "report.md").read_text()
    for plot in ("ppo_curves.png", "win_rates.png", "overoptimisation.png", "alignment_tax.png"):
        assert (root / plot).stat().st_size > 1000 and plot in report_md
    for claim in ("RLHF beats SFT", "alignment tax", "over-optimisation", "## Rounds", "plain PPO iterated alongside"):
        assert claim in report_md


def test_results_are_complete_and_finite(demo_run):
    _, results = demo_run
    assert set(results["models"]) == set(MODELS)
    for name in MODELS:
        m = results["models"][name]
        assert np.isfinite(m["gold"]) and np.isfinite(m["heldout_loss"]) and m["params"] > 0
    assert results["models"]["SFT big"]["params"] >= 4 * results["models"]["SFT"]["params"]
    for v in results["win_rates"].values():
        assert 0.0 <= v <= 1.0
    for key in ("rm_accuracy", "labeler_agreement"):
        assert 0.0 <= results[key] <= 1.0
    assert results["quick"] is True and results["total_s"] > 0
    assert results["final_policy"] == "PPO-ptx, round 1"


def test_ppo_improves_the_gold_score_over_sft(demo_run):
    """The hidden gold preference (never seen by the reward model) prefers the RL policies'
    samples on held-out users' prompts to the SFT model's."""
    _, results = demo_run
    gold = {name: results["models"][name]["gold"] for name in MODELS}
    assert gold["PPO-ptx"] > gold["SFT"] and gold["PPO"] > gold["SFT"], gold


def test_rounds_are_reported_one_entry_each(demo_run):
    _, results = demo_run
    rounds = results["rounds"]
    assert [e["round"] for e in rounds] == [0, 1]
    assert "rm_on_new_samples_before" not in rounds[0]
    for e in rounds:
        assert 0 <= e["win_rate"] <= 1 and np.isfinite([e["gold"], e["kl"], e["heldout_loss"]]).all()
        assert 0 <= e["rm_heldout"]["accuracy"] <= 1 and len(e["win_vs_sft"]) == len(e["gold_scores"])
    before, after = rounds[1]["rm_on_new_samples_before"], rounds[1]["rm_on_new_samples_after"]
    assert before["group_pairs"] == after["group_pairs"]  # the same comparisons, judged by both RMs
    assert rounds[1]["win_rate"] == results["win_rates"]["PPO-ptx, round 1 vs SFT"]
    # plain PPO at the end of every round: round 0's is the demo's own PPO run
    assert rounds[0]["ppo"]["win_vs_sft"] == results["models"]["PPO"]["win_vs_sft"]
    assert rounds[1]["ppo"]["win_vs_sft"] == results["win_outcomes"]["PPO, round 1 vs SFT"]
    for e in rounds:
        q = e["ppo"]
        assert np.isfinite([q["gold"], q["kl"], q["heldout_loss"]]).all() and q["win_rate"] == np.mean(q["win_vs_sft"])
    assert Path(rounds[1]["ppo"]["run"]).name == "ppo" and Path(rounds[1]["ppo"]["run"]).parent.name == "round_1"


def test_trajectories_span_every_round_when_plain_ppo_is_iterated(demo_run):
    """The alignment tax is measured along both rounds of both variants: SFT first, then each kept
    checkpoint of round 0's run and of round 1's."""
    root, results = demo_run
    for name, run in (("PPO-ptx", "ppo_ptx"), ("PPO", "ppo")):
        pts = results["trajectories"][name]
        assert pts[0] == {"round": 0, "step": 0, "kl": 0.0, "heldout_loss": pts[0]["heldout_loss"]}
        for r, run_dir in enumerate((root / run, root / "round_1" / run)):
            steps = [p["step"] for p in pts[1:] if p["round"] == r]
            assert steps == [s for s, _ in evaluate.checkpoint_params(run_dir)], (name, r)
        assert all(p["kl"] > 0 for p in pts[1:])
    # each trajectory ends at its round 1 policy as judged (its latest EMA params)
    ends = {"PPO": results["rounds"][1]["ppo"]["heldout_loss"], "PPO-ptx": results["rounds"][1]["heldout_loss"]}
    for name, loss in ends.items():
        assert np.isclose(results["trajectories"][name][-1]["heldout_loss"], loss), name


def test_round_1_rm_trains_on_all_comparisons_so_far(demo_run):
    root, results = demo_run
    first, new = read_jsonl(root / "data" / "rankings.jsonl"), read_jsonl(root / "round_1" / "rankings.jsonl")
    union = read_jsonl(root / "round_1" / "all_rankings.jsonl")
    assert new and union == first + new
    assert results["rounds"][1]["comparisons_total"] == len(first) + len(new)
    # its steps scale with the data (as often over each comparison as round 0's RM)
    assert results["rounds"][1]["rm_steps"] == max(1, round(results["rounds"][0]["rm_steps"] * len(union) / len(first)))
    meta = checkpoint.Checkpointer(root / "round_1" / "rm" / "checkpoints").restore_meta()
    assert meta["config"]["data"] == str(root / "round_1" / "all_rankings.jsonl")
    # every round's RM starts from DemoConfig.rm_init, as round 0's does
    init = str(root / results["config"]["rm_init"])
    assert meta["config"]["init"] == init
    assert checkpoint.Checkpointer(root / "rm" / "checkpoints").restore_meta()["config"]["init"] == init


def test_round_1_continues_the_policy_against_the_sft_reference(demo_run):
    """Round 1's PPO starts from round 0's latest EMA policy; its KL reference is still SFT, bitwise."""
    root, _ = demo_run
    meta = checkpoint.Checkpointer(root / "round_1" / "ppo_ptx" / "checkpoints").restore_meta()
    assert meta["config"]["policy"] == str(root / "ppo_ptx") and meta["config"]["reference"] == str(root / "sft")
    plain = checkpoint.Checkpointer(root / "round_1" / "ppo" / "checkpoints").restore_meta()["config"]
    assert plain["policy"] == str(root / "ppo") and plain["reference"] == str(root / "sft")
    assert plain["reward"] == meta["config"]["reward"] == [str(root / "round_1" / "rm")] and plain["ptx_data"] is None
    pcfg = PPOConfig(
        prompts=str(root / "data" / "prompts.jsonl"),
        policy=str(root / "ppo_ptx"),
        reference=str(root / "sft"),
        reward=str(root / "round_1" / "rm"),
        out=str(root / "unused"),
    )
    nets = build_networks(pcfg)
    _, sft_params, _ = checkpoint.load_model(root / "sft")
    _, prev_params, _ = checkpoint.load_model(root / "ppo_ptx", which="latest")

    def same(a, b) -> bool:
        return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    assert same(nets["ref_params"], sft_params) and same(nets["policy_params"], prev_params)
    assert not same(sft_params, prev_params)
    # the value network is a copy of the RM, which has the size of DemoConfig.rm_init's model (sft_big)
    init_model, _, _ = checkpoint.load_model(root / "sft_big")
    shape = lambda c: (c.hidden_size, c.num_layers)  # noqa: E731
    assert shape(nets["value"].config) == shape(nets["rm"].config) == shape(init_model.config)
    assert same(nets["value_params"], nets["rm_params"])
    assert shape(nets["policy"].config) != shape(init_model.config)


def test_report_pools_seeds(demo_run, tmp_path):
    _, results = demo_run
    other = json.loads(json.dumps(results)) | {"seed": 1}
    text = report.write_report(tmp_path, [results, other]).read_text()
    assert "Seed(s) 0, 1" in text and "## Rounds" in text and "plain PPO iterated alongside" in text
    # results of a run without --iterate-ppo (or written before it existed): no plain-PPO table
    legacy = json.loads(json.dumps(results))
    for e in legacy["rounds"][1:]:
        del e["ppo"]
    legacy["trajectories"] = {
        k: [{"kl": p["kl"], "heldout_loss": p["heldout_loss"]} for p in v if p["round"] == 0]
        for k, v in legacy["trajectories"].items()
    }
    text = report.write_report(tmp_path / "legacy", [legacy]).read_text()
    assert "## Rounds" in text and "plain PPO iterated alongside" not in text
    win = report.pooled([results["win_outcomes"]["PPO-ptx vs SFT"]] * 2)
    assert win[1] <= win[0] <= win[2] and np.isclose(win[0], results["win_rates"]["PPO-ptx vs SFT"])


def test_results_name_their_runs_relative_to_their_directory(demo_run, tmp_path):
    """A report regenerated from another directory reads the same runs; a missing run is an error."""
    root, results = demo_run
    stored = json.loads((root / "results.json").read_text())["runs"]
    assert stored == {"ppo_ptx": "ppo_ptx", "ppo": "ppo", "ppo_nokl": "ppo_nokl"}
    assert all(Path(v) == root / k for k, v in results["runs"].items())
    moved = results | {"runs": {k: str(tmp_path / "elsewhere" / k) for k in stored}}
    with pytest.raises(FileNotFoundError, match="elsewhere/ppo"):
        report.write_report(tmp_path / "report", [moved])


def test_seeds_flag():
    assert demo.DemoConfig(seeds="0,1,2").seed_list == (0, 1, 2)
    assert demo.DemoConfig(seed=4).seed_list == (4,)
    for bad in ("0,x", "1,1"):
        with pytest.raises(ValueError):
            demo.DemoConfig(seeds=bad)
    with pytest.raises(ValueError):
        demo.DemoConfig(rounds=0)
    assert demo.DemoConfig().rm_init == "sft_big"
    assert (demo.DemoConfig().rounds, demo.DemoConfig().iterate_ppo) == (3, False)
    full = demo.DemoConfig(full=True)  # the headline run's shorthand, consumed on construction
    assert (full.seed_list, full.rounds, full.iterate_ppo, full.full) == (
        (0, 1, 2),
        demo_config.FULL_ROUNDS,
        True,
        False,
    )
    assert dataclasses.asdict(full) == dataclasses.asdict(demo.DemoConfig(seeds="0,1,2", rounds=6, iterate_ppo=True))
    mine = demo.DemoConfig(full=True, seeds="4", rounds=2)  # explicit flags win
    assert (mine.seed_list, mine.rounds, mine.iterate_ppo) == ((4,), 2, True)
    with pytest.raises(ValueError):
        demo.DemoConfig(rm_init="base")


def test_weighted_bootstrap_and_matched_kl():
    acc, pairs = np.array([1.0, 0.0]), np.array([3.0, 1.0])
    lo, hi = evaluate.bootstrap_ci(acc, resamples=400, seed=0, weights=pairs)
    assert lo == 0.0 and hi == 1.0  # resamples of one group only reach both ends
    a = [{"kl": 0.0, "heldout_loss": 2.0}, {"kl": 1.0, "heldout_loss": 2.2}]
    b = [{"kl": 0.0, "heldout_loss": 2.0}, {"kl": 0.5, "heldout_loss": 1.9}, {"kl": 2.0, "heldout_loss": 1.8}]
    t = evaluate.tax_at_matched_kl(a, b)
    assert t["kl"] == 1.0 and np.isclose(t["a"], 2.2) and np.isclose(t["b"], 1.9 - 0.1 / 3)
    assert evaluate.tax_at_matched_kl(a, [{"kl": 0.0, "heldout_loss": 2.0}]) is None
    # iterated runs are compared along their last round: KL stays put while plain PPO's loss rises
    sft = {"round": 0, "step": 0, "kl": 0.0, "heldout_loss": 2.0}
    ppo = [sft, {"round": 0, "step": 10, "kl": 1.5, "heldout_loss": 2.01}]
    ppo += [
        {"round": 1, "step": 10, "kl": 0.7, "heldout_loss": 2.08},
        {"round": 1, "step": 20, "kl": 0.9, "heldout_loss": 2.1},
    ]
    ptx = [sft, {"round": 0, "step": 10, "kl": 1.2, "heldout_loss": 1.99}]
    ptx += [
        {"round": 1, "step": 10, "kl": 0.6, "heldout_loss": 1.98},
        {"round": 1, "step": 20, "kl": 0.8, "heldout_loss": 1.96},
    ]
    t = report.matched_tax({"trajectories": {"PPO": ppo, "PPO-ptx": ptx}})
    assert t["round"] == 1 and np.isclose(t["kl"], 0.8)
    assert np.isclose(t["ppo"], 2.09 / 2.0 - 1) and np.isclose(t["ptx"], 1.96 / 2.0 - 1)
    # round 0 alone (the default demo): the largest KL both reach there
    t = report.matched_tax({"trajectories": {"PPO": ppo[:2], "PPO-ptx": ptx[:2]}})
    assert t["round"] == 0 and np.isclose(t["kl"], 1.2) and np.isclose(t["ppo"], (2.0 + 0.01 * 1.2 / 1.5) / 2.0 - 1)


def test_ppo_config_takes_the_demo_gamma(tmp_path):
    """PPO-ptx's gamma is DemoConfig.ptx_coef (1, chosen on validation users); plain PPO has no ptx data."""
    from types import SimpleNamespace

    prep = SimpleNamespace(files={"prompts": tmp_path / "p.jsonl", "pretrain": tmp_path / "t.jsonl"}, sft="s", rm="r")
    cfg = demo.DemoConfig()
    ptx = demo.ppo_config(cfg, prep, tmp_path / "a", ptx=True)
    assert ptx.hparams.ptx_coef == cfg.ptx_coef == 1.0 and ptx.ptx_data == str(tmp_path / "t.jsonl")
    assert demo.ppo_config(cfg, prep, tmp_path / "b", ptx=False).ptx_data is None
    paper = demo.ppo_config(demo.DemoConfig(ptx_coef=27.8), prep, tmp_path / "c", ptx=True)
    assert paper.hparams.ptx_coef == 27.8 and paper.hparams.kl_coef == ptx.hparams.kl_coef == 0.1
