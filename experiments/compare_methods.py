"""PPO-ptx against GRPO, RLOO, DPO (pairs and Plackett-Luce) and best-of-n on the built-in task.

    python experiments/compare_methods.py --out runs/compare            # full demo settings
    python experiments/compare_methods.py --quick --out /tmp/compare    # test-sized (the demo's --quick)
    python experiments/compare_methods.py --from runs/demo --out runs/compare   # reuse a demo's SFT + RM

One SFT model and one reward model (the demo's stages 1-5, ``rlhf_jax.tasks.demo.prepare``,
or those of an existing demo directory given with ``--from``; the big SFT model is trained
only as the RM's initialisation, ``DemoConfig.rm_init``, the demo's default ``sft_big``; a
``--from`` directory keeps the initialisation its RM was trained from), then from that SFT model:

* ``PPO-ptx``: the demo's PPO-ptx run exactly (GAE, value network, 64 episodes per iteration,
  minibatch 16, 1 epoch, KL 0.1 in the reward (k1), the demo's gamma (``DemoConfig.ptx_coef``, 1)
  with 8 pretraining rows per minibatch, EMA policy).
* ``GRPO`` / ``RLOO`` (``--estimator grpo|rloo --group-size G``): the same iterations, the same
  64 episodes per iteration (64 / G prompts x G samples), the same minibatch of 16 episodes and
  so the same number of optimizer steps, the same ptx rows, learning rate, EMA and KL
  coefficient 0.1, the KL in the loss (k3) as the estimators' default; no value network.
* ``DPO pairs`` / ``DPO PL`` (``rlhf-jax dpo --k-way pairs|pl``) on the K = 4..9 rankings the RM
  was trained on, with the RM's data budget: its batch of 32 rankings and its number of
  steps; beta ``--dpo-beta``, constant learning rate ``--dpo-lr`` (PPO's) after 10 warmup steps.
* ``best-of-n`` (``rlhf-jax sample --best-of n``): n SFT samples per held-out prompt, the one the RM
  scores highest among those that ended with EOS (a prompt with none keeps the SFT sample).

Every policy is evaluated the way the demo evaluates (``rlhf_jax.tasks.demo``): one response
per held-out user's prompt sampled at temperature 1 (key 7, the demo's), judged by the
world's gold preference, which no model saw. Reported per method: the gold win rate over the
SFT model's responses (ties half) with a 95% bootstrap interval over prompts, the mean gold
score, KL(policy || SFT) as the mean over the held-out prompts of the summed per-token
log-ratio ``log pi(y|x) - log pi_SFT(y|x)`` of the policy's own samples (k1, unbiased; for
best-of-n the analytic bound ``log n - (n - 1) / n`` instead, Stiennon et al. 2020), the
held-out pretraining loss, and the wall time of training (best-of-n: of sampling n responses
for every held-out prompt and scoring them, its cost at inference). The final checkpoint of
every run is evaluated: nothing is selected by the gold score or on held-out users.
Results go to ``<out>/results.json`` and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_jax.tasks.evaluate import bootstrap_ci, response_logps, win_outcomes  # noqa: F401  (shared with the demo)
from rlhf_jax.tasks.judge import EVAL_KEY  # the demo's evaluation samples, so both judge the same draws

log = logging.getLogger("compare_methods")

METHODS = ("PPO-ptx", "GRPO", "RLOO", "DPO pairs", "DPO PL")
COLUMNS = (
    "method",
    "gold win rate over SFT [95% CI]",
    "mean gold",
    "KL from SFT (nats)",
    "held-out pretrain loss",
    "samples generated in training",
    "wall time (s)",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/compare_methods", help="runs, results.json and results.md go here")
    p.add_argument(
        "--from",
        dest="from_dir",
        default=None,
        help="an existing `rlhf-jax demo` output directory (same --seed / --quick): reuse its SFT and RM",
    )
    p.add_argument("--quick", action="store_true", help="the demo's --quick sizes (a test-sized run)")
    p.add_argument("--seed", type=int, default=0, help="the world's and every run's seed")
    p.add_argument("--group-size", type=int, default=4, help="G of GRPO / RLOO (divides PPO's 64 episodes)")
    p.add_argument("--best-of", type=int, nargs="+", default=[4, 16], help="n of the best-of-n rows")
    p.add_argument("--dpo-beta", type=float, default=0.1)
    p.add_argument("--dpo-lr", type=float, default=1e-4, help="DPO's constant learning rate (default: PPO's)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the prompts")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="trained methods to run")
    args = p.parse_args(argv)
    if args.group_size < 2 or 64 % args.group_size:
        p.error("--group-size must be >= 2 and divide 64 (PPO-ptx's episodes per iteration)")
    if any(n < 1 for n in args.best_of):
        p.error("--best-of values must be >= 1")
    return args


# ---------------------------------------------------------------------------- statistics / table


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) <= log n - (n - 1) / n (exact for distinct samples; Stiennon et al. 2020).

    >>> round(best_of_n_kl(4), 4), best_of_n_kl(1)
    (0.6363, 0.0)
    """
    return math.log(n) - (n - 1) / n


def render_table(rows: list[dict]) -> str:
    """The markdown results table; a row has ``method``, ``win`` (None for the reference),
    ``ci`` (lo, hi), ``gold``, ``kl``, ``kl_analytic``, ``heldout_loss``, ``samples``, ``wall_s``."""

    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        win = "—" if r.get("win") is None else f"{pct(r['win'])} [{pct(r['ci'][0])}, {pct(r['ci'][1])}]"
        kl = f"{r['kl']:.3f}" + (" (analytic bound)" if r.get("kl_analytic") else "")
        wall = "—" if r.get("wall_s") is None else f"{r['wall_s']:.0f}" + (" (inference)" if r.get("inference") else "")
        cells = [r["method"], win, f"{r['gold']:.3f}", kl, f"{r['heldout_loss']:.3f}", r["samples"], wall]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- sampling and KL


def sample_with_tokens(model, params, tok, prompts: list[str], *, max_new_tokens: int, batch_size: int = 64) -> dict:
    """One temperature-1 response per prompt, exactly as the demo's evaluation draws them (same
    key, batches and padding), with the tokens kept for the log-probs (``evaluate.sample_with_tokens``)."""
    import jax

    from rlhf_jax.tasks import evaluate

    return evaluate.sample_with_tokens(
        model,
        params,
        tok,
        prompts,
        key=jax.random.key(EVAL_KEY),
        max_prompt_len=32,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )


# ---------------------------------------------------------------------------- the experiment


def run(args: argparse.Namespace) -> dict:
    from rlhf_jax import checkpoint, data
    from rlhf_jax.config import DPOConfig, DPOHyperparams, OptimConfig, RunConfig
    from rlhf_jax.drivers import run_dpo, run_ppo, run_sample
    from rlhf_jax.tasks import demo, evaluate

    t_all = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo.DemoConfig(out=str(args.from_dir or out / "demo"), seed=args.seed, quick=args.quick).scaled()
    if args.from_dir:
        prior = Path(args.from_dir) / "results.json"
        if prior.is_file():
            r = json.loads(prior.read_text())
            if (r.get("seed"), r.get("quick")) != (args.seed, args.quick):
                raise SystemExit(f"--from {args.from_dir}: seed/quick {r.get('seed')}/{r.get('quick')} != the flags")
        for stage in ("sft", "rm"):
            if not (Path(args.from_dir) / stage / "model.json").is_file():
                raise SystemExit(f"--from {args.from_dir}: no finished {stage} run there")
        # the RM's initialisation as trained there (demos before DemoConfig.rm_init: the SFT model)
        with checkpoint.Checkpointer(Path(args.from_dir) / "rm" / "checkpoints") as ck:
            rm_init = Path(ck.restore_meta()["config"]["init"]).name
        cfg = dataclasses.replace(cfg, rm_init="sft_big" if rm_init == "sft_big" else "sft")
    rankings_file = Path(cfg.out) / "data" / "rankings.jsonl"
    rankings_before = rankings_file.read_bytes() if args.from_dir and rankings_file.is_file() else None
    prep_timings: dict[str, float] = {}
    prep = demo.prepare(cfg, big=False, timings=prep_timings)  # finished runs are reused, not retrained
    if rankings_before is not None and prep.rankings.read_bytes() != rankings_before:
        # prepare() samples the rankings again; where that differs (another machine's rounding), put
        # back the ones the RM was trained on: DPO must see the same data
        log.warning("compare: %s re-sampled differently; the original rankings are restored", prep.rankings)
        prep.rankings.write_bytes(rankings_before)
    world, tok = prep.world, prep.tokenizer
    runs = out / "runs"
    wall: dict[str, float] = {}

    def timed(name: str, fn):
        t0 = time.perf_counter()
        result = fn()
        wall[name] = time.perf_counter() - t0
        log.info("compare: %s done in %.1f s", name, wall[name])
        return result

    def plain_run(**kw) -> RunConfig:  # the demo's cadence
        return RunConfig(**{"log_every": 10, "eval_every": 50, "save_every": 1000, "keep_last": 1, **kw})

    # ---- training, every method from prep.sft; the RL ones against prep.rm
    trained: dict[str, Path] = {}
    g = args.group_size
    for name in args.methods:
        if name == "PPO-ptx":
            fn = lambda: run_ppo(demo.ppo_config(cfg, prep, runs / "ppo_ptx", ptx=True))  # noqa: E731
        elif name in ("GRPO", "RLOO"):
            est = name.lower()
            fn = lambda est=est: run_ppo(  # noqa: E731
                demo.ppo_config(cfg, prep, runs / est, ptx=True, estimator=est, group_size=g)
            )
        else:
            k_way = "pairs" if name == "DPO pairs" else "pl"
            fn = lambda k_way=k_way: run_dpo(  # noqa: E731
                DPOConfig(
                    data=str(prep.rankings),
                    init=str(prep.sft),
                    out=str(runs / f"dpo_{k_way}"),
                    max_steps=cfg.rm_steps,
                    batch_size=32,
                    max_prompt_len=32,
                    max_response_len=cfg.max_new_tokens + 1,
                    hparams=DPOHyperparams(beta=args.dpo_beta, k_way=k_way),
                    optim=OptimConfig(learning_rate=args.dpo_lr, schedule="constant", warmup_steps=10),
                    run=plain_run(seed=cfg.seed, eval_every=cfg.rm_steps),
                )
            )
        trained[name] = timed(name, fn)

    # ---- evaluation on held-out users' prompts
    texts = [r["prompt"] for r in prep.test_prompts][: cfg.eval_prompts]
    users = [r["user_id"] for r in prep.test_prompts][: cfg.eval_prompts]
    heldout_records, _ = data.load_records(prep.files["pretrain_heldout"], "text")
    heldout = data.tokenize_text(heldout_records, tok, seq_len=64)

    def gold_of(responses: list[str]) -> np.ndarray:
        return np.array([world.gold_score(p, r) for p, r in zip(texts, responses)])

    sft_model, sft_params, _ = checkpoint.load_model(prep.sft, which="latest")
    sft_s = sample_with_tokens(sft_model, sft_params, tok, texts, max_new_tokens=cfg.max_new_tokens)
    sft_gold = gold_of(sft_s["texts"])
    sft_loss = evaluate.heldout_lm_loss(sft_model, sft_params, heldout)
    results: dict[str, Any] = {"models": {}}

    def record(name: str, responses: list[str], gold: np.ndarray, **extra) -> None:
        outcomes = win_outcomes(gold, sft_gold)
        results["models"][name] = {
            "win_rate": float(outcomes.mean()),
            "win_ci95": bootstrap_ci(outcomes, resamples=args.bootstrap, seed=args.seed),
            "gold": float(gold.mean()),
            "samples": list(zip(texts[:5], responses[:5])),
            **extra,
        }

    results["models"]["SFT"] = {
        "win_rate": None,
        "gold": float(sft_gold.mean()),
        "kl": 0.0,
        "heldout_loss": sft_loss,
        "samples_in_training": "—",
        "samples": list(zip(texts[:5], sft_s["texts"][:5])),
    }
    episodes = 64 * cfg.ppo_steps
    for name, run_dir in trained.items():
        m, p, _ = checkpoint.load_model(run_dir, which="latest")
        s = sample_with_tokens(m, p, tok, texts, max_new_tokens=cfg.max_new_tokens)
        kl_rows = response_logps(m, p, s["seq"], s["mask"], s["P"]) - response_logps(
            sft_model, sft_params, s["seq"], s["mask"], s["P"]
        )
        record(
            name,
            s["texts"],
            gold_of(s["texts"]),
            kl=float(kl_rows.mean()),
            kl_sem=float(kl_rows.std(ddof=1) / math.sqrt(len(kl_rows))),
            heldout_loss=evaluate.heldout_lm_loss(m, p, heldout),
            wall_s=wall[name],
            samples_in_training=f"{episodes:,}" if name in ("PPO-ptx", "GRPO", "RLOO") else "0",
            run_dir=str(run_dir),
        )

    # ---- best-of-n: the SFT model's samples, picked by the RM at inference
    prompts_file = out / "heldout_prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": t, "user_id": u}) + "\n" for t, u in zip(texts, users)))
    for n in args.best_of:
        path = timed(
            f"best-of-{n}",
            lambda n=n: run_sample(
                str(prep.sft),
                str(prep.rm),
                str(prompts_file),
                str(out / f"best_of_{n}.jsonl"),
                best_of=n,
                max_new_tokens=cfg.max_new_tokens,
                max_prompt_len=32,
                batch_size=max(1, 256 // n),
                seed=cfg.seed,
                progress=False,
            ),
        )
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        responses, fallback, j = [], 0, 0
        for i, (t, u) in enumerate(zip(texts, users)):  # rows keep prompt order; prompts without a candidate are absent
            if j < len(rows) and rows[j]["prompt"] == t and rows[j].get("user_id") == u:
                responses.append(f"{rows[j]['response']} {tok.eos_token}".strip())  # every candidate ended with EOS
                j += 1
            else:
                responses.append(sft_s["texts"][i])
                fallback += 1
        record(
            f"best-of-{n}",
            responses,
            gold_of(responses),
            kl=best_of_n_kl(n),
            kl_analytic=True,
            heldout_loss=sft_loss,
            wall_s=wall[f"best-of-{n}"],
            inference=True,
            samples_in_training="0",
            samples_at_inference=n * len(texts),
            fallback_to_sft=fallback,
        )

    rows = []
    for name, m in results["models"].items():
        rows.append(
            {
                "method": name if name != "SFT" else "SFT (reference)",
                "win": m["win_rate"],
                "ci": m.get("win_ci95"),
                "gold": m["gold"],
                "kl": m["kl"],
                "kl_analytic": m.get("kl_analytic", False),
                "heldout_loss": m["heldout_loss"],
                "samples": m["samples_in_training"]
                if not m.get("inference")
                else f"0 ({m['samples_at_inference']:,} at inference)",
                "wall_s": m.get("wall_s"),
                "inference": m.get("inference", False),
            }
        )
    table = render_table(rows)
    results |= {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "seed": args.seed,
        "quick": args.quick,
        "from": args.from_dir,
        "eval_prompts": len(texts),
        "group_size": g,
        "dpo": {"beta": args.dpo_beta, "lr": args.dpo_lr, "steps": cfg.rm_steps, "batch_rankings": 32},
        "ppo": {"iterations": cfg.ppo_steps, "episodes_per_iteration": 64, "minibatch": 16, "kl_coef": 0.1},
        "prepare_s": prep_timings,
        "wall_s": wall,
        "total_s": time.perf_counter() - t_all,
        "cpu_count": os.cpu_count(),
        "table": table,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    header = (
        f"{results['date']}, seed {args.seed}, {'quick' if args.quick else 'full'} demo settings, "
        f"{len(texts)} held-out prompts, total {results['total_s'] / 60:.1f} min"
    )
    (out / "results.md").write_text(f"{header}\n\n{table}\n")
    print(header)
    print(table)
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    run(args)


if __name__ == "__main__":
    main()
