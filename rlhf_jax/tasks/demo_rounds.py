"""The demo after its stages 1-5 (``demo.prepare``): PPO-ptx, PPO and no-KL PPO, the evaluation,
iterated RLHF rounds (``rlhf-jax demo --rounds N``, InstructGPT step 4), the alignment tax along
the PPO runs, and several seeds (``--seeds 0,1,2``) into one report.

Round 0 is the demo's own reward model and PPO-ptx run. Round r >= 1:
  1. samples K = 4..9 responses (temperature 1) of round r-1's PPO-ptx policy on training
     users' prompts (the next ``ranking_prompts`` of them, wrapping around) and has the
     simulated labelers rank them;
  2. trains a new reward model from ``prep.rm_init`` (the big SFT model by default,
     ``DemoConfig.rm_init``, as round 0's) on the union of all comparisons so far
     (``pipeline.union_of_comparisons``), its steps scaled with the number of ranked groups
     so that it passes over them as often as round 0's RM passed over its own;
  3. continues PPO-ptx from round r-1's policy (its latest EMA params) against the new RM,
     the KL reference still the SFT model (``PPOConfig.reference``);
  4. with ``DemoConfig.iterate_ppo``, continues plain PPO the same way from its own round r-1
     policy against the same new RM (the comparisons stay PPO-ptx's samples), so that the
     alignment tax is measured at the end of every round and along all of them.

Each round is judged on the held-out users' prompts: gold score, win rate over SFT (per
prompt, for the bootstrap), KL from SFT (k1 on the policy's own temperature-1 samples),
held-out pretraining loss; and its reward model's pair accuracy on held-out comparisons of
SFT samples and of the previous policy's samples (the ones it was retrained for; the
previous RM's accuracy on them is the "before"), by :class:`rlhf_jax.tasks.judge.Judge`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from rlhf_jax import checkpoint, shared_jit
from rlhf_jax.drivers import run_ppo, run_rm
from rlhf_jax.pipeline import read_jsonl, union_of_comparisons, write_jsonl
from rlhf_jax.tasks import evaluate, report
from rlhf_jax.tasks.demo import ppo_config, prepare, rm_config, timed
from rlhf_jax.tasks.demo_config import DemoConfig
from rlhf_jax.tasks.judge import Judge, gold_fn, trajectory
from rlhf_jax.train_loop import read_metrics


def _round_entry(
    judge: Judge,
    r: int,
    rm_dir: Path,
    ppo_dir: Path,
    prev: tuple[Path, Path] | None,
    plain_dir: Path | None = None,
    **extra,
) -> dict:
    """One row of the per-round table (see the module docstring); ``plain_dir``: the round's plain
    PPO run, judged the same way under ``"ppo"``."""
    ev = judge.model(ppo_dir)
    ev.pop("responses")
    rm_val = [m for m in read_metrics(rm_dir) if "val/accuracy" in m]
    kl_train = [m["objective/kl"] for m in read_metrics(ppo_dir) if m.get("objective/kl") is not None]
    entry = {
        "round": r,
        "rm": str(rm_dir),
        "ppo_ptx": str(ppo_dir),
        "rm_val_accuracy": rm_val[-1]["val/accuracy"] if rm_val else None,
        "train_kl": kl_train[-1] if kl_train else None,
        **{k: ev[k] for k in ("gold", "kl", "heldout_loss", "win_vs_sft", "gold_scores")},
        "win_rate": float(np.mean(ev["win_vs_sft"])),
        **extra,
    }
    if plain_dir is not None:
        ev = judge.model(plain_dir)
        entry["ppo"] = {"run": str(plain_dir), "win_rate": float(np.mean(ev["win_vs_sft"]))}
        entry["ppo"] |= {k: ev[k] for k in ("gold", "kl", "heldout_loss", "win_vs_sft")}
    if prev is not None:  # the RM's accuracy on the samples it was retrained for, before and after
        recs = judge.policy_comparisons(prev[1])
        entry["rm_on_new_samples_before"] = judge.rm_accuracy(prev[0], recs)
        entry["rm_on_new_samples_after"] = judge.rm_accuracy(rm_dir, recs)
        entry["labeler_agreement_new_samples"] = judge.agreement(recs)
    return entry


def _continue_ppo(cfg, prep, out: Path, policy: Path, rm: Path, r: int, *, ptx: bool) -> Path:
    """Round ``r``'s PPO(-ptx) run: ``policy`` trained on against ``rm``, the KL reference still SFT."""
    c = ppo_config(cfg, prep, out, ptx=ptx)
    run = dataclasses.replace(c.run, seed=cfg.seed + r)
    c = dataclasses.replace(c, policy=str(policy), reference=str(prep.sft), reward=str(rm), run=run)
    return run_ppo(c, gold_fn=gold_fn(prep.world))


def run_rounds(
    cfg, prep, judge: Judge, ppo_ptx_dir: Path, ppo_dir: Path, rm_held: list[dict], timings: dict
) -> list[dict]:
    """Round 0's entry from the demo's RM, PPO-ptx and plain PPO runs, then rounds 1..cfg.rounds-1
    (plain PPO continued too with ``cfg.iterate_ppo``); returns the entries.

    ``rm_held``: the held-out comparisons of SFT samples on which every round's RM is scored.
    """
    root = Path(cfg.out)
    n0 = len(read_jsonl(prep.rankings))
    entries = [
        _round_entry(
            judge,
            0,
            prep.rm,
            ppo_ptx_dir,
            None,
            ppo_dir,
            comparisons=n0,
            comparisons_total=n0,
            rm_steps=cfg.rm_steps,
            rm_heldout=judge.rm_accuracy(prep.rm, rm_held),
        )
    ]
    pool = prep.train_prompts + prep.val_prompts
    comparisons, rm_dir, policy_dir = [prep.rankings], prep.rm, ppo_ptx_dir
    for r in range(1, cfg.rounds):
        t0 = time.perf_counter()
        rdir = root / f"round_{r}"
        rdir.mkdir(parents=True, exist_ok=True)
        start = (r * cfg.ranking_prompts) % len(pool)
        src = (pool[start:] + pool[:start])[: cfg.ranking_prompts]
        new_path = rdir / "rankings.jsonl"
        if not new_path.exists():
            m, p, _ = checkpoint.load_model(policy_dir, which="latest")
            ks = np.random.default_rng([cfg.seed, r]).integers(4, 10, len(src))
            recs = evaluate.ranked_samples(
                prep.world,
                m,
                p,
                prep.tokenizer,
                src,
                ks,
                sample_seed=100 + 1000 * r,
                label_seed=cfg.seed + 1000 * r,
                max_new_tokens=cfg.max_new_tokens,
            )
            write_jsonl(new_path, recs)
        comparisons.append(new_path)
        union = union_of_comparisons(comparisons, rdir / "all_rankings.jsonl")
        n_union = len(read_jsonl(union))
        steps = max(1, round(cfg.rm_steps * n_union / n0))
        new_rm = run_rm(rm_config(cfg, union, prep.rm_init, prep.files["demonstrations"], rdir / "rm", steps))
        new_policy = _continue_ppo(cfg, prep, rdir / "ppo_ptx", policy_dir, new_rm, r, ptx=True)
        timings[f"round_{r}"] = time.perf_counter() - t0
        if cfg.iterate_ppo:  # the same round for plain PPO: its own last policy, the same RM and seed
            t0 = time.perf_counter()
            ppo_dir = _continue_ppo(cfg, prep, rdir / "ppo", ppo_dir, new_rm, r, ptx=False)
            timings[f"round_{r}_ppo"] = time.perf_counter() - t0
        entries.append(
            _round_entry(
                judge,
                r,
                new_rm,
                new_policy,
                (rm_dir, policy_dir),
                ppo_dir if cfg.iterate_ppo else None,
                comparisons=len(read_jsonl(new_path)),
                comparisons_total=n_union,
                rm_steps=steps,
                rm_heldout=judge.rm_accuracy(new_rm, rm_held),
            )
        )
        rm_dir, policy_dir = new_rm, new_policy
    return entries


def run_demo(cfg: DemoConfig) -> Path:
    """Run every stage for each seed (skipping finished runs when re-run); returns the report path.

    One seed writes its runs under ``out``; several (``--seeds 0,1,2``) under ``out/seed_<s>``,
    one after another, and the report at ``out`` covers them all.
    """
    seeds = cfg.seed_list
    if len(seeds) == 1:
        results = [run_seed(dataclasses.replace(cfg, seed=seeds[0], seeds=""))]
    else:
        root = Path(cfg.out)
        results = [run_seed(dataclasses.replace(cfg, seed=s, seeds="", out=str(root / f"seed_{s}"))) for s in seeds]
    return report.write_report(Path(cfg.out), results)


def _finished(cfg: DemoConfig) -> dict | None:
    """The seed's ``results.json`` when a run with this very configuration wrote it (a re-run of
    several seeds reuses the finished ones), else None."""
    path = Path(cfg.out) / "results.json"
    if not path.is_file():
        return None
    results = report.load_results(path)
    return results if results.get("config") == _config_json(cfg) else None


def _config_json(cfg: DemoConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def run_seed(cfg: DemoConfig) -> dict:
    """Every stage of one seed under ``cfg.out``: its ``results.json``, returned as a dict."""
    cfg = cfg.scaled()
    if (done := _finished(cfg)) is not None:
        return done
    root = Path(cfg.out)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    compiles_before = dict(shared_jit.STATS)

    def stage(name: str, fn):
        return timed(timings, name, fn)

    prep = prepare(cfg, timings=timings)
    world, rng = prep.world, prep.rng

    def ppo(name: str, *, ptx: bool, kl_coef: float = 0.1) -> Path:
        return run_ppo(
            ppo_config(cfg, prep, root / name, ptx=ptx, kl_coef=kl_coef),
            gold_fn=gold_fn(world),
        )

    ppo_ptx_dir = stage("ppo_ptx", lambda: ppo("ppo_ptx", ptx=True))
    ppo_dir = stage("ppo", lambda: ppo("ppo", ptx=False))
    nokl_dir = stage("ppo_nokl", lambda: ppo("ppo_nokl", ptx=False, kl_coef=0.0))

    judge = Judge.build(cfg, prep)
    results: dict = {"models": {}}

    def evaluation():  # held-out users: gold, win rates, held-out loss, RM accuracy vs labeler agreement
        r = results["models"]
        for name, run_dir in (("SFT", prep.sft), ("SFT big", prep.sft_big), ("PPO", ppo_dir), ("PPO-ptx", ppo_ptx_dir)):
            r[name] = judge.model(run_dir, kl=name != "SFT big")
            if name == "SFT":
                judge.sft_gold = np.asarray(r[name]["gold_scores"])
        big_gold = np.asarray(r["SFT big"]["gold_scores"])
        results["win_outcomes"] = {
            "PPO-ptx vs SFT": r["PPO-ptx"]["win_vs_sft"],
            "PPO vs SFT": r["PPO"]["win_vs_sft"],
            "PPO-ptx vs SFT big": evaluate.win_outcomes(np.asarray(r["PPO-ptx"]["gold_scores"]), big_gold).tolist(),
        }
        # RM accuracy on held-out users' comparisons of SFT samples, against two labelers' agreement
        sft_model, sft_params = judge.sft
        held = [{"prompt": t, "user_id": None} for t in judge.texts]
        recs = evaluate.ranked_samples(
            world,
            sft_model,
            sft_params,
            prep.tokenizer,
            held,
            rng.integers(4, 10, len(held)),
            sample_seed=500,
            label_seed=cfg.seed + 2,
            max_new_tokens=cfg.max_new_tokens,
        )
        results["rm_heldout_records"] = recs
        results["rm_accuracy"] = judge.rm_accuracy(prep.rm, recs)["accuracy"]
        results["labeler_agreement"] = judge.agreement(recs)
        results["labeler_gold_accuracy"] = world.labeler_accuracy(
            [x["prompt"] for x in recs], [x["responses"] for x in recs], seed=cfg.seed + 3
        )

    stage("evaluation", evaluation)
    held_recs = results.pop("rm_heldout_records")
    results["rounds"] = run_rounds(cfg, prep, judge, ppo_ptx_dir, ppo_dir, held_recs, timings)
    final = results["rounds"][-1]
    if cfg.rounds > 1:  # the final round's policy against SFT and the big SFT model
        name = f"PPO-ptx, round {cfg.rounds - 1}"
        r = results["models"]
        r[name] = judge.model(Path(final["ppo_ptx"]))
        big_gold = np.asarray(r["SFT big"]["gold_scores"])
        results["win_outcomes"][f"{name} vs SFT"] = r[name]["win_vs_sft"]
        results["win_outcomes"][f"{name} vs SFT big"] = evaluate.win_outcomes(
            np.asarray(r[name]["gold_scores"]), big_gold
        ).tolist()
        if cfg.iterate_ppo:  # plain PPO after the same rounds (judged in run_rounds: cached)
            name = f"PPO, round {cfg.rounds - 1}"
            r[name] = judge.model(Path(final["ppo"]["run"]))
            results["win_outcomes"][f"{name} vs SFT"] = r[name]["win_vs_sft"]
    results["final_policy"] = "PPO-ptx" if cfg.rounds == 1 else f"PPO-ptx, round {cfg.rounds - 1}"
    # the alignment tax along round 0's runs, or along every round's when plain PPO was iterated too
    kept = results["rounds"] if cfg.iterate_ppo else results["rounds"][:1]
    runs = {"PPO-ptx": [Path(e["ppo_ptx"]) for e in kept], "PPO": [Path(e["ppo"]["run"]) for e in kept]}
    results["trajectories"] = stage("trajectories", lambda: {name: trajectory(judge, d) for name, d in runs.items()})
    results["win_rates"] = {k: float(np.mean(v)) for k, v in results["win_outcomes"].items()}
    for v in results["models"].values():
        del v["responses"]
    rm_val = [m for m in read_metrics(prep.rm) if "val/accuracy" in m]
    results |= {
        "config": _config_json(cfg),
        "seed": cfg.seed,
        "quick": cfg.quick,
        "rounds_requested": cfg.rounds,
        "eval_temperature": cfg.eval_temperature,
        "rm_val_accuracy": rm_val[-1]["val/accuracy"] if rm_val else None,
        "timings_s": timings,
        "total_s": time.perf_counter() - t_start,
        # the stages' programs: compiled, and shared with an earlier stage (or seed) of the process
        "programs": {k: v - compiles_before[k] for k, v in shared_jit.STATS.items()},
        "runs": {"ppo_ptx": str(ppo_ptx_dir), "ppo": str(ppo_dir), "ppo_nokl": str(nokl_dir)},
    }
    report.save_results(root, results)
    return results
