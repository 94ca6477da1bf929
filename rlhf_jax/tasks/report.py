"""``report.md`` for ``rlhf-jax demo``: the small-scale InstructGPT results, per round, over one
or several seeds (its plots: :mod:`rlhf_jax.tasks.report_plots`).

Intervals are 95% percentile bootstraps over held-out prompts, pooled across seeds (each seed's
own world and held-out users; prompts resampled with replacement from the pooled set, the
statistic the mean over it). They measure prompt sampling, not seed-to-seed training variance:
the per-seed values are listed next to them. A target counts as met only when the interval's
lower end clears it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rlhf_jax.tasks.evaluate import bootstrap_ci, tax_at_matched_kl
from rlhf_jax.train_loop import read_metrics

RESAMPLES = 2000
RUN_LABELS = {"ppo_ptx": "PPO-ptx", "ppo": "PPO", "ppo_nokl": "PPO, no KL penalty"}


def save_results(root: Path, results: dict) -> None:
    """``root/results.json``, its run directories (under ``root``) named relative to ``root``."""
    runs = {k: str(Path(v).relative_to(root)) for k, v in results["runs"].items()}
    (root / "results.json").write_text(json.dumps(results | {"runs": runs}, indent=2))


def load_results(path: str | Path) -> dict:
    """A seed's ``results.json`` with its run directories resolved against the file's own
    directory (so a moved or copied run still reports)."""
    path = Path(path)
    results = json.loads(path.read_text())

    def resolve(run: str) -> str:  # results.json files written before kept cwd-relative paths
        here = path.parent / run
        return str(here if here.exists() or not Path(run).exists() else Path(run))

    results["runs"] = {k: resolve(v) for k, v in results.get("runs", {}).items()}
    return results


def series(run_dir: str, key: str) -> tuple[list[int], list[float]]:
    if not (Path(run_dir) / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (a run directory of this report's results.json)")
    rows = [m for m in read_metrics(run_dir) if m.get(key) is not None]
    return [m["step"] for m in rows], [m[key] for m in rows]


def pooled(values: list, weights: list | None = None) -> tuple[float, float, float]:
    """(mean, lower, upper) of per-prompt values pooled across seeds (``weights``: per-prompt
    weights of a ratio, e.g. pair counts of a pair accuracy)."""
    v = np.concatenate([np.asarray(x, np.float64) for x in values])
    w = None if weights is None else np.concatenate([np.asarray(x, np.float64) for x in weights])
    mean = float(v.mean() if w is None else (v * w).sum() / max(w.sum(), 1e-12))
    return (mean, *bootstrap_ci(v, resamples=RESAMPLES, seed=0, weights=w))


def _pct(t: tuple[float, float, float]) -> str:
    return f"{100 * t[0]:.1f}% [{100 * t[1]:.1f}, {100 * t[2]:.1f}]"


def _peak_then_fall(run_dir: str) -> bool:
    v = [y for _, y in sorted(zip(*series(run_dir, "val/gold_score")))]
    return len(v) >= 3 and max(v) > v[-1] and int(np.argmax(v)) < len(v) - 1


def matched_tax(res: dict) -> dict | None:
    """PPO's and PPO-ptx's held-out loss relative to SFT at the largest KL both reach: along round
    0's runs, or, when both went through several rounds (``--iterate-ppo``), along the last
    round's. Over rounds the KL penalty holds both policies near the same KL while plain PPO's
    loss keeps rising, so the loss is no function of KL across rounds; the last round is where
    the training of both has ended. ``round``: the round compared."""
    tr = res.get("trajectories")
    if not tr:
        return None
    last = min(max(p.get("round", 0) for p in tr[k]) for k in ("PPO", "PPO-ptx"))
    a, b = ([p for p in tr[k] if p.get("round", 0) == last] for k in ("PPO", "PPO-ptx"))
    t = tax_at_matched_kl(a, b)
    if t is None:
        return None
    sft = tr["PPO"][0]["heldout_loss"]
    return {"kl": t["kl"], "round": last, "ppo": t["a"] / sft - 1, "ptx": t["b"] / sft - 1}


def _acc(entry: dict | None) -> tuple[list, list]:
    return (entry or {}).get("group_accuracy", []), (entry or {}).get("group_pairs", [])


def round_rows(results: list[dict]) -> list[dict]:
    """Per round, pooled over seeds: RM accuracies, labeler agreement, gold, KL, win rate, held-out loss."""
    rows = []
    for r in range(min(len(x["rounds"]) for x in results)):
        es = [x["rounds"][r] for x in results]
        row = {
            "round": r,
            "comparisons": np.mean([e["comparisons_total"] for e in es]),
            "rm_heldout": pooled(*zip(*[_acc(e["rm_heldout"]) for e in es])),
            "agreement": float(np.mean([x["labeler_agreement"] for x in results])),
            "gold": float(np.mean([e["gold"] for e in es])),
            "kl": float(np.mean([e["kl"] for e in es])),
            "win": pooled([e["win_vs_sft"] for e in es]),
            "heldout_loss": float(np.mean([e["heldout_loss"] for e in es])),
        }
        if all("ppo" in e for e in es):  # plain PPO at the end of the round
            row["ppo"] = {
                "kl": float(np.mean([e["ppo"]["kl"] for e in es])),
                "win": pooled([e["ppo"]["win_vs_sft"] for e in es]),
                "heldout_loss": float(np.mean([e["ppo"]["heldout_loss"] for e in es])),
            }
        if "rm_on_new_samples_before" in es[0]:
            row["before"] = pooled(*zip(*[_acc(e["rm_on_new_samples_before"]) for e in es]))
            row["after"] = pooled(*zip(*[_acc(e["rm_on_new_samples_after"]) for e in es]))
            row["agreement_new"] = float(np.mean([e["labeler_agreement_new_samples"] for e in es]))
        rows.append(row)
    return rows


def results_table(results: list[dict]) -> str:
    """The markdown table of the paper's claims against what the run(s) measured."""
    final = results[0]["final_policy"]
    win = pooled([x["win_outcomes"][f"{final} vs SFT"] for x in results])
    big = pooled([x["win_outcomes"][f"{final} vs SFT big"] for x in results])
    rounds = round_rows(results)
    agreement = rounds[0]["agreement"]
    rm_ok = all(r["rm_heldout"][1] >= agreement - 0.05 for r in rounds)
    rm_txt = "; ".join(f"r{r['round']} {_pct(r['rm_heldout'])}" for r in rounds)
    ptx_rel = [x["models"][final]["heldout_loss"] / x["models"]["SFT"]["heldout_loss"] - 1 for x in results]
    taxes = [matched_tax(x) for x in results]
    tax_ok = all(t is not None and t["ppo"] >= 0.01 for t in taxes) and all(abs(v) <= 0.02 for v in ptx_rel)
    tax_txt = ", ".join(
        "n/a" if t is None else f"KL {t['kl']:.2f}: PPO {100 * t['ppo']:+.2f}% / PPO-ptx {100 * t['ptx']:+.2f}%"
        for t in taxes
    )
    peaks = [_peak_then_fall(x["runs"]["ppo_nokl"]) for x in results]
    ratio = results[0]["models"]["SFT big"]["params"] / results[0]["models"]["SFT"]["params"]

    def ok(flag: bool) -> str:
        return "met" if flag else "**missed**"

    rows = [
        (
            "RLHF beats SFT",
            f"gold win rate of {final} over SFT, held-out users",
            _pct(win) + f" (round 0: {_pct(rounds[0]['win'])})",
            ">= 65%, interval's lower end >= 60%",
            ok(win[0] >= 0.65 and win[1] >= 0.60),
        ),
        (
            "RM learns labeler preferences",
            "RM pair accuracy on held-out users' comparisons of SFT samples, every round, vs two labelers' agreement",
            f"{rm_txt} vs {100 * agreement:.1f}%",
            "lower end within 5 points, every round",
            ok(rm_ok),
        ),
        (
            "ptx removes the alignment tax",
            f"held-out pretraining loss vs SFT: {final}; PPO and PPO-ptx at matched KL along "
            f"{'the last round' if iterated(results) else 'round 0'} (per seed)",
            f"PPO-ptx {', '.join(f'{100 * v:+.2f}%' for v in ptx_rel)}; {tax_txt}",
            "PPO-ptx within 2%; PPO >= 1% worse at matched KL",
            ok(tax_ok),
        ),
        (
            "small aligned beats big unaligned",
            f"win rate of {final} over the {ratio:.1f}x larger SFT",
            _pct(big),
            ">= 50% (lower end)",
            ok(big[1] >= 0.5),
        ),
        (
            "KL penalty limits over-optimisation",
            "gold score vs KL without penalty (plot), seeds whose curve peaks then falls",
            f"{sum(peaks)} of {len(peaks)}",
            "peaks then falls",
            ok(all(peaks)),
        ),
    ]
    lines = ["| claim in the paper | measurement here | result | target | |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
    return "\n".join(lines)


def iterated(results: list[dict]) -> bool:
    """Whether plain PPO went through the rounds too (``--iterate-ppo``)."""
    return all(len(x["rounds"]) > 1 and all("ppo" in e for e in x["rounds"]) for x in results)


def ppo_rounds_table(results: list[dict]) -> str:
    """PPO-ptx against plain PPO at the end of every round: KL, held-out loss, win rate."""
    sft = float(np.mean([x["models"]["SFT"]["heldout_loss"] for x in results]))
    lines = [
        f"| round | KL from SFT: PPO-ptx / PPO | held-out loss (SFT {sft:.3f}): PPO-ptx / PPO | "
        "win rate vs SFT: PPO-ptx / PPO |",
        "|---|---|---|---|",
    ]
    for r in round_rows(results):
        q = r["ppo"]
        lines.append(
            f"| {r['round']} | {r['kl']:.2f} / {q['kl']:.2f} | {r['heldout_loss']:.3f} ({100 * (r['heldout_loss'] / sft - 1):+.2f}%)"
            f" / {q['heldout_loss']:.3f} ({100 * (q['heldout_loss'] / sft - 1):+.2f}%) | {_pct(r['win'])} / {_pct(q['win'])} |"
        )
    return "\n".join(lines)


def rounds_table(results: list[dict]) -> str:
    lines = [
        "| round | comparisons (all so far) | RM acc., held-out SFT samples | RM acc. on the previous policy's "
        "samples: before -> after retraining (labeler agreement) | gold | KL from SFT | win rate vs SFT | "
        "held-out loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in round_rows(results):
        new = "—"
        if "before" in r:
            new = f"{_pct(r['before'])} -> {_pct(r['after'])} ({100 * r['agreement_new']:.1f}%)"
        lines.append(
            f"| {r['round']} | {r['comparisons']:,.0f} | {_pct(r['rm_heldout'])} | {new} | {r['gold']:.3f} | "
            f"{r['kl']:.2f} | {_pct(r['win'])} | {r['heldout_loss']:.3f} |"
        )
    return "\n".join(lines)


def write_report(root: Path, results: list[dict]) -> Path:
    """``root/report.md`` (and its plots) from one or several seeds' ``results.json`` dicts."""
    root.mkdir(parents=True, exist_ok=True)
    from rlhf_jax.tasks.report_plots import write_plots  # it reads this module's helpers: imported here

    plots = write_plots(root, results)
    first = results[0]
    t = first.get("eval_temperature", 0.0)
    decoding = "greedy" if t == 0 else f"sampled at temperature {t:g}"
    seeds = ", ".join(str(x["seed"]) for x in results)
    total = sum(x["total_s"] for x in results)
    lines = [
        "# rlhf_jax demo: InstructGPT at small scale",
        "",
        f"Seed(s) {seeds}, {'quick' if first['quick'] else 'full'} run, {len(first['rounds'])} RLHF round(s), "
        f"{total / 60:.1f} min wall time on this machine in all.",
        "",
    ]
    for x in results:
        line = (
            f"- seed {x['seed']}: {x['total_s'] / 60:.1f} min "
            f"({', '.join(f'{k} {v:.0f}s' for k, v in x['timings_s'].items())})"
        )
        if p := x.get("programs"):  # results.json files of before 2026-12-01 have no count
            line += (
                f"; {p['compiled']} programs compiled in {p['compile_s']:.0f} s, {p['shared']} taken from an "
                f"earlier stage instead (their compiles took {p['saved_s']:.0f} s)"
            )
        lines.append(line)
    lines += [
        "",
        "Intervals: 95% bootstrap over held-out prompts pooled across the seeds (prompt sampling, not "
        "seed-to-seed training variance); a target is met only when the lower end clears it.",
        "",
        results_table(results),
        "",
        "## Rounds (iterated RLHF: new comparisons on the last policy, an RM on all of them, PPO-ptx continued)",
        "",
        rounds_table(results),
        "",
        *(
            [
                "### PPO-ptx and plain PPO at the end of every round (plain PPO iterated alongside)",
                "",
                ppo_rounds_table(results),
                "",
            ]
            if iterated(results)
            else []
        ),
        f"## Models (mean over seeds; held-out users, {decoding})",
        "",
        "| model | params | gold score | KL from SFT | held-out pretraining loss | win rate vs SFT |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in first["models"].items():
        per = [x["models"][name] for x in results]
        kl = "—" if "kl" not in v else f"{np.mean([p['kl'] for p in per]):.2f}"
        win = "—" if "win_vs_sft" not in v else _pct(pooled([p["win_vs_sft"] for p in per]))
        lines.append(
            f"| {name} | {v['params']:,} | {np.mean([p['gold'] for p in per]):.3f} | {kl} | "
            f"{np.mean([p['heldout_loss'] for p in per]):.3f} | {win} |"
        )
    lines += [
        "",
        f"![PPO curves]({plots['curves']})",
        "",
        f"![win rates]({plots['wins']})",
        "",
        f"![over-optimisation]({plots['overopt']})",
        "",
        f"![alignment tax]({plots['tax']})",
        "",
        f"## Samples (seed {first['seed']}, held-out prompts, {decoding})",
        "",
    ]
    for name, v in first["models"].items():
        lines.append(f"**{name}**")
        lines += [f"- `{p}` -> `{r}`" for p, r in v["samples"]]
        lines.append("")
    path = root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
