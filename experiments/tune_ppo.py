"""Choose the demo's PPO-ptx settings on validation users, judged by the simulated labelers.

    python experiments/tune_ppo.py --from runs/demo --out runs/tune_ppo                  # the default grid
    python experiments/tune_ppo.py --from runs/demo --out runs/tune_ppo \\
        --variant base: --variant ema0.95:ema_decay=0.95 --variant beta0.05:kl_coef=0.05,lr=2e-4

InstructGPT chose its PPO hyperparameters by labelers' preferences on a validation set of
prompts, not by a held-out evaluation. This script does the same on the built-in task: from a
finished demo directory (``rlhf-jax demo --rounds 1`` is enough: stages 1-5, the SFT model and
round 0's reward model) it trains one round-0 PPO-ptx run per variant, each the demo's run
(``rlhf_jax.tasks.demo.ppo_config``) with some fields overridden, and scores the final EMA
policy on the **validation users'** prompts (never the held-out test users'):

* ``labeler win rate``: one temperature-1 response of the policy and one of the SFT model per
  prompt, ordered by every simulated labeler of the world (``World.rank``: the labelers'
  noisy utility, the same ones that rank the RM's training data); ties count half. Its 95%
  interval is a percentile bootstrap over prompts. The gold preference is not computed.
* ``RM score`` of the policy's responses (what PPO maximises), ``KL`` from SFT (k1 on the
  policy's own samples, nats per response) and the held-out pretraining loss.

A variant is ``NAME:FIELD=VALUE,...``: any ``PPOHyperparams`` field, or ``lr`` (PPO's constant
learning rate), ``steps`` (iterations), ``ptx`` (0: plain PPO, no pretraining data) and ``rms``
(N: PPO maximises the mean score of an ensemble of N round-0 reward models, Coste et al. 2023:
the demo's and N - 1 more trained as it was with run seeds ``seed + 1, ...``, which also draws
each one's own 90% of the training users). Each RM set's pair accuracy on the validation users'
comparisons of SFT samples (K = 4..9, ranked by the simulated labelers) is reported beside it.
Finished runs are reused. Results: ``<out>/results.json`` (with each variant's per-prompt outcomes,
``labeler_wins``, for paired comparisons) and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("tune_ppo")

DEFAULT_VARIANTS = (
    "base:",
    "ema0.95:ema_decay=0.95",
    "ema0.9:ema_decay=0.9",
    "ema0:ema_decay=0",
    "beta0.05:kl_coef=0.05",
    "beta0.02:kl_coef=0.02",
    "lr2e-4:lr=2e-4",
    "ppo:ptx=0",
)
VAL_KEY = 11  # the sampling key of the validation responses (the held-out evaluation uses 7)


def parse_variant(spec: str) -> tuple[str, dict]:
    """``"name:field=value,..."`` -> (name, {field: value}) with numbers parsed."""
    name, sep, rest = spec.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--variant {spec!r}: expected NAME:FIELD=VALUE,... (NAME: for the demo's)")
    from rlhf_jax.config import PPOHyperparams

    known = {f.name for f in dataclasses.fields(PPOHyperparams)} | {"lr", "steps", "ptx", "rms"}
    fields = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"--variant {spec!r}: {item!r} is not FIELD=VALUE")
        if key.strip() not in known:
            raise argparse.ArgumentTypeError(
                f"--variant {spec!r}: unknown field {key.strip()!r} (PPOHyperparams fields, lr, steps, ptx, rms)"
            )
        try:
            fields[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            fields[key.strip()] = value.strip()
    return name, fields


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--from", dest="from_dir", required=True, help="a finished demo directory (stages 1-5)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0, help="the demo's seed (must match --from)")
    p.add_argument("--variant", action="append", type=parse_variant, help="NAME:FIELD=VALUE,... (repeatable)")
    p.add_argument("--prompts", type=int, default=480, help="validation prompts to judge on")
    p.add_argument("--bootstrap", type=int, default=2000)
    return p.parse_args(argv)


def labeler_win_outcomes(world, prompts: list[str], a: list[str], b: list[str]) -> np.ndarray:
    """Per prompt, the fraction of the world's labelers who rank ``a`` above ``b`` (ties half)."""
    out = np.zeros(len(prompts))
    for i, (prompt, x, y) in enumerate(zip(prompts, a, b)):
        rng = np.random.default_rng([world.config.seed, 31, i])
        wins = [world.rank(prompt, [x, y], rng, labeler=lab) for lab in range(world.config.num_labelers)]
        out[i] = np.mean([1.0 if r[0] < r[1] else 0.5 if r[0] == r[1] else 0.0 for r in wins])
    return out


def ensemble_members(cfg, prep, out: Path, n: int) -> tuple[Path, ...]:
    """The demo's round-0 RM and ``n - 1`` more trained as it was with run seeds ``cfg.seed + k``."""
    from rlhf_jax.drivers import run_rm
    from rlhf_jax.tasks import demo

    members = [Path(prep.rm)]
    for k in range(1, n):
        rm_dir = out / "rms" / f"seed_{cfg.seed + k}"
        if not (rm_dir / "model.json").is_file():
            rc = demo.rm_config(cfg, prep.rankings, prep.rm_init, prep.files["demonstrations"], rm_dir, cfg.rm_steps)
            run_rm(dataclasses.replace(rc, run=dataclasses.replace(rc.run, seed=cfg.seed + k)))
        members.append(rm_dir)
    return tuple(members)


def run(args: argparse.Namespace) -> dict:
    import jax

    from rlhf_jax import checkpoint, data
    from rlhf_jax.drivers import run_ppo
    from rlhf_jax.reward import score_sequences
    from rlhf_jax.tasks import demo, evaluate

    cfg = demo.DemoConfig(out=args.from_dir, seed=args.seed)
    for stage in ("sft", "rm"):
        if not (Path(args.from_dir) / stage / "model.json").is_file():
            raise SystemExit(f"--from {args.from_dir}: no finished {stage} run there")
    prep = demo.prepare(cfg)  # finished runs are reused
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok, world = prep.tokenizer, prep.world
    texts = [r["prompt"] for r in prep.val_prompts][: args.prompts]
    heldout_records, _ = data.load_records(prep.files["pretrain_heldout"], "text")
    heldout = data.tokenize_text(heldout_records, tok, seq_len=64)
    rm = checkpoint.load_model(prep.rm, head="scalar")[0]  # every ensemble member has its architecture
    score = jax.jit(lambda params, ids, mask: score_sequences(rm, params, ids, mask))  # compiled once
    rm_params: dict[Path, object] = {}

    def rm_set(dirs: tuple[Path, ...]) -> tuple:
        for d in dirs:
            if d not in rm_params:
                rm_params[d] = checkpoint.load_model(d, head="scalar")[1]
        return tuple(rm_params[d] for d in dirs)

    def sample(model, params):
        return evaluate.sample_with_tokens(
            model,
            params,
            tok,
            texts,
            key=jax.random.key(VAL_KEY),
            max_prompt_len=32,
            max_new_tokens=cfg.max_new_tokens,
        )

    sft = checkpoint.load_model(prep.sft)[:2]
    sft_s = sample(*sft)
    # the validation users' comparisons of SFT samples, for each RM set's pair accuracy
    ks = np.random.default_rng([args.seed, 17]).integers(4, 10, len(texts))
    val_rankings = evaluate.ranked_samples(
        world,
        *sft,
        tok,
        prep.val_prompts[: len(texts)],
        ks,
        sample_seed=300,
        label_seed=args.seed + 1,
        max_new_tokens=cfg.max_new_tokens,
    )
    lengths = {"max_prompt_len": 32, "max_response_len": cfg.max_new_tokens + 1}
    results = {"from": str(args.from_dir), "seed": args.seed, "prompts": len(texts), "variants": {}}
    for name, fields in args.variant or [parse_variant(v) for v in DEFAULT_VARIANTS]:
        fields = dict(fields)
        c = dataclasses.replace(
            cfg,
            ppo_learning_rate=float(fields.pop("lr", cfg.ppo_learning_rate)),
            ppo_steps=int(fields.pop("steps", cfg.ppo_steps)),
        )
        ptx = bool(fields.pop("ptx", 1))
        n_rms = int(fields.pop("rms", 1))
        members = ensemble_members(c, prep, out, n_rms)
        ppo_cfg = demo.ppo_config(c, prep, out / "runs" / name, ptx=ptx, **fields)
        if n_rms > 1:  # the mean of the members' scores; the value network from the first
            ppo_cfg = dataclasses.replace(
                ppo_cfg, reward=tuple(map(str, members)), reward_weights=(1.0 / n_rms,) * n_rms
            )
        t0 = time.perf_counter()
        run_dir = run_ppo(ppo_cfg)
        wall = time.perf_counter() - t0
        m, p, _ = checkpoint.load_model(run_dir, which="latest")
        s = sample(m, p)
        wins = labeler_win_outcomes(world, texts, s["texts"], sft_s["texts"])
        lp = evaluate.response_logps(m, p, s["seq"], s["mask"], s["P"])
        kl = float(np.mean(lp - evaluate.response_logps(*sft, s["seq"], s["mask"], s["P"])))
        ps = rm_set(members)
        rm_scores = np.mean([np.asarray(score(p_, s["seq"], s["mask"])) for p_ in ps], axis=0)
        rm_acc = evaluate.rm_group_accuracy(rm, ps, val_rankings, tok, **lengths)["accuracy"]
        results["variants"][name] = {
            "fields": {"lr": c.ppo_learning_rate, "steps": c.ppo_steps, "ptx": ptx, "rms": n_rms, **fields},
            "rm_val_accuracy": rm_acc,
            "labeler_win_rate": float(wins.mean()),
            "labeler_win_ci95": evaluate.bootstrap_ci(wins, resamples=args.bootstrap, seed=args.seed),
            "rm_score": float(rm_scores.mean()),
            "kl": kl,
            "heldout_loss": evaluate.heldout_lm_loss(m, p, heldout),
            "wall_s": wall,
            "labeler_wins": wins.tolist(),  # per prompt: paired comparisons between variants
        }
        log.info("tune: %s %s", name, {k: v for k, v in results["variants"][name].items() if k != "labeler_wins"})
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        f"Validation users' prompts: {len(texts)} (seed {args.seed}, from {args.from_dir}); win rate over SFT by the"
        " simulated labelers, ties half, 95% bootstrap interval over prompts.",
        "",
        "| variant | overrides | labeler win rate over SFT | RM pair acc. (val.) | RM score | KL from SFT |"
        " held-out loss | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in results["variants"].items():
        lo, hi = v["labeler_win_ci95"]
        lines.append(
            f"| {name} | {v['fields']} | {100 * v['labeler_win_rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] |"
            f" {100 * v['rm_val_accuracy']:.1f}% |"
            f" {v['rm_score']:.3f} | {v['kl']:.2f} | {v['heldout_loss']:.4f} | {v['wall_s']:.0f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    run(parse_args(argv))


if __name__ == "__main__":
    main()
