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
previous RM's accuracy on them is the "before"). The gold preference is only ever read here
and by PPO's validation curve, never by a reward model or a labeler.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax import checkpoint, data, shared_jit
from rlhf_jax.drivers import run_ppo, run_rm
from rlhf_jax.pipeline import read_jsonl, union_of_comparisons, write_jsonl
from rlhf_jax.tasks import evaluate, report
from rlhf_jax.tasks.demo import DemoConfig, ppo_config, prepare, rm_config, timed
from rlhf_jax.train_loop import read_metrics

EVAL_KEY = 7  # the key of every evaluation sample on held-out prompts (the demo's and compare_methods')


@dataclass
class Judge:
    """The held-out users' evaluation set and what every model is judged against."""

    cfg: Any  # DemoConfig, scaled
    prep: Any  # demo.Prepared
    texts: list[str]  # held-out users' prompts
    heldout: Any  # tokenised held-out pretraining text
    sft: tuple  # (model, params) of the SFT model: the KL reference
    sft_gold: np.ndarray | None = None  # per prompt, once the SFT model has been judged
    judged: dict = dataclasses.field(default_factory=dict)  # run dir -> model(run dir), computed once
    comparisons: dict = dataclasses.field(default_factory=dict)  # policy dir -> held-out ranking records

    @classmethod
    def build(cls, cfg, prep) -> Judge:
        records, _ = data.load_records(prep.files["pretrain_heldout"], "text")
        heldout = data.tokenize_text(records, prep.tokenizer, seq_len=64)
        model, params, _ = checkpoint.load_model(prep.sft)
        return cls(cfg, prep, [r["prompt"] for r in prep.test_prompts][: cfg.eval_prompts], heldout, (model, params))

    def sample(self, model, params, temperature: float) -> dict:
        return evaluate.sample_with_tokens(
            model,
            params,
            self.prep.tokenizer,
            self.texts,
            key=jax.random.key(EVAL_KEY),
            max_prompt_len=32,
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=temperature,
        )

    def kl(self, model, params, s: dict | None = None) -> float:
        """Mean k1 estimate of KL(policy || SFT) per response, on the policy's temperature-1 samples."""
        s = s or self.sample(model, params, 1.0)
        lp = evaluate.response_logps(model, params, s["seq"], s["mask"], s["P"])
        return float(np.mean(lp - evaluate.response_logps(*self.sft, s["seq"], s["mask"], s["P"])))

    def model(self, run_dir: Path, *, kl: bool = True) -> dict:
        """Gold score (per prompt and mean), held-out loss, KL from SFT (``kl``), win outcomes
        over SFT (once SFT is judged), a few samples; ``responses`` is removed by the caller."""
        if str(run_dir) in self.judged:
            return dict(self.judged[str(run_dir)])
        m, p, _ = checkpoint.load_model(run_dir, which="latest")
        t = self.cfg.eval_temperature
        s = self.sample(m, p, t)
        gold = np.asarray([self.prep.world.gold_score(x, o) for x, o in zip(self.texts, s["texts"])])
        out = {
            "gold": float(gold.mean()),
            "heldout_loss": evaluate.heldout_lm_loss(m, p, self.heldout),
            "params": m.config.num_params(),
            "samples": list(zip(self.texts[:5], s["texts"][:5])),
            "gold_scores": gold.tolist(),
            "responses": s["texts"],
        }
        if kl:
            out["kl"] = self.kl(m, p, s if t == 1.0 else None)
        if self.sft_gold is not None:
            out["win_vs_sft"] = evaluate.win_outcomes(gold, self.sft_gold).tolist()
            self.judged[str(run_dir)] = out
        return dict(out)

    def policy_comparisons(self, policy_dir: Path) -> list[dict]:
        """Held-out users' ranking records of ``policy_dir``'s samples (K = 4..9), cached."""
        key = str(policy_dir)
        if key not in self.comparisons:
            m, p, _ = checkpoint.load_model(policy_dir, which="latest")
            rng = np.random.default_rng([self.cfg.seed, 17, len(self.comparisons)])
            recs = [{"prompt": t, "user_id": None} for t in self.texts]
            self.comparisons[key] = evaluate.ranked_samples(
                self.prep.world,
                m,
                p,
                self.prep.tokenizer,
                recs,
                rng.integers(4, 10, len(recs)),
                sample_seed=900 + 10 * len(self.comparisons),
                label_seed=self.cfg.seed + 5 + len(self.comparisons),
                max_new_tokens=self.cfg.max_new_tokens,
            )
        return self.comparisons[key]

    def rm_accuracy(self, rm_dir: Path, records: list[dict]) -> dict:
        rm, params, _ = checkpoint.load_model(rm_dir)
        lengths = {"max_prompt_len": 32, "max_response_len": self.cfg.max_new_tokens + 1}
        return evaluate.rm_group_accuracy(rm, params, records, self.prep.tokenizer, **lengths)

    def agreement(self, records: list[dict]) -> float:
        """Two independent labelers' pair agreement on the same groups (the RM's ceiling)."""
        return self.prep.world.labeler_agreement(
            [r["prompt"] for r in records], [r["responses"] for r in records], seed=self.cfg.seed + 3
        )


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
        pcfg = ppo_config(cfg, prep, rdir / "ppo_ptx", ptx=True)
        pcfg = dataclasses.replace(
            pcfg,
            policy=str(policy_dir),
            reference=str(prep.sft),
            reward=str(new_rm),
            run=dataclasses.replace(pcfg.run, seed=cfg.seed + r),
        )
        new_policy = run_ppo(pcfg, gold_fn=gold_fn(prep.world))
        timings[f"round_{r}"] = time.perf_counter() - t0
        if cfg.iterate_ppo:  # the same round for plain PPO: its own last policy, the same RM and seed
            t0 = time.perf_counter()
            qcfg = ppo_config(cfg, prep, rdir / "ppo", ptx=False)
            qcfg = dataclasses.replace(
                qcfg, policy=str(ppo_dir), reference=str(prep.sft), reward=str(new_rm), run=pcfg.run
            )
            ppo_dir = run_ppo(qcfg, gold_fn=gold_fn(prep.world))
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


def trajectory(judge: Judge, run_dirs: list[Path]) -> list[dict]:
    """Held-out pretraining loss and KL from SFT of every kept checkpoint of one PPO run, or of
    the runs of consecutive rounds continuing it (their EMA policies, ``"round"`` the run's
    index), SFT itself first (round 0, step 0): the alignment tax along the runs."""
    sft_model, sft_params = judge.sft
    sft_loss = evaluate.heldout_lm_loss(sft_model, sft_params, judge.heldout)
    points = [{"round": 0, "step": 0, "kl": 0.0, "heldout_loss": sft_loss}]
    for r, run_dir in enumerate(run_dirs):
        model, _, _ = checkpoint.load_model(run_dir, which="latest")
        for step, params in evaluate.checkpoint_params(run_dir):
            points.append(
                {
                    "round": r,
                    "step": step,
                    "kl": judge.kl(model, params),
                    "heldout_loss": evaluate.heldout_lm_loss(model, params, judge.heldout),
                }
            )
    return points


def gold_fn(world):
    """PPO's validation gold score (``run_ppo(gold_fn=...)``): the hidden preference per sample."""
    return lambda prompts, responses: [world.gold_score(p, r) for p, r in zip(prompts, responses)]


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
