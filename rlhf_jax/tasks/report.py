"""``report.md`` and its plots for ``rlhf-jax demo``: the small-scale InstructGPT results table."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rlhf_jax.train_loop import read_metrics


def _series(run_dir: str, key: str) -> tuple[list[int], list[float]]:
    rows = [m for m in read_metrics(run_dir) if m.get(key) is not None]
    return [m["step"] for m in rows], [m[key] for m in rows]


def _plots(root: Path, results: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    names = {"ppo_ptx": "PPO-ptx", "ppo": "PPO", "ppo_nokl": "PPO, no KL penalty"}
    out = {}

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, ax, title in (
        ("objective/scores", axes[0], "reward-model score (training samples)"),
        ("val/gold_score", axes[1], "gold score (held-out prompts, greedy)"),
        ("objective/kl", axes[2], "KL(policy || SFT) per episode"),
    ):
        for run, label in names.items():
            x, y = _series(runs[run], key)
            if x:
                ax.plot(x, y, marker="o" if key.startswith("val") else None, ms=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "ppo_curves.png", dpi=110)
    plt.close(fig)
    out["curves"] = "ppo_curves.png"

    fig, ax = plt.subplots(figsize=(6, 3.4))
    labels = list(results["win_rates"])
    values = [100 * results["win_rates"][k] for k in labels]
    bars = ax.bar(labels, values, color=["tab:green", "tab:orange", "tab:blue"][: len(labels)])
    ax.axhline(50, color="gray", ls="--", lw=1)
    ax.bar_label(bars, fmt="%.0f%%")
    ax.set_ylabel("gold-judged win rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title("held-out users' prompts", fontsize=10)
    fig.tight_layout()
    fig.savefig(root / "win_rates.png", dpi=110)
    plt.close(fig)
    out["wins"] = "win_rates.png"

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for run, label in names.items():
        rows = [m for m in read_metrics(runs[run])]
        kl_by_step = {m["step"]: m["objective/kl"] for m in rows if m.get("objective/kl") is not None}
        pts = [
            (kl_by_step[m["step"]], m["val/gold_score"])
            for m in rows
            if m.get("val/gold_score") is not None and m["step"] in kl_by_step
        ]
        if pts:
            pts.sort()
            ax.plot(*zip(*pts), marker="o", ms=3, label=label)
    ax.set_xlabel("KL(policy || SFT) per episode (nats)")
    ax.set_ylabel("gold score")
    ax.set_title("reward over-optimisation", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "overoptimisation.png", dpi=110)
    plt.close(fig)
    out["overopt"] = "overoptimisation.png"
    return out


def results_table(results: dict) -> str:
    """The markdown table of the paper's claims against what this run measured."""
    m, w = results["models"], results["win_rates"]
    sft, ppo, ptx = m["SFT"]["heldout_loss"], m["PPO"]["heldout_loss"], m["PPO-ptx"]["heldout_loss"]
    gap = 100 * abs(results["rm_accuracy"] - results["labeler_agreement"])
    nokl = [v for _, v in sorted(zip(*_series(results["runs"]["ppo_nokl"], "val/gold_score")))]
    peak_then_fall = len(nokl) >= 3 and max(nokl) > nokl[-1] and int(np.argmax(nokl)) < len(nokl) - 1

    def ok(flag: bool) -> str:
        return "met" if flag else "**missed**"

    rows = [
        (
            "RLHF beats SFT",
            "gold win rate of PPO-ptx over SFT, held-out users",
            f"{100 * w['PPO-ptx vs SFT']:.0f}%",
            ">= 65%",
            ok(w["PPO-ptx vs SFT"] >= 0.65),
        ),
        (
            "RM learns labeler preferences",
            "RM pair accuracy on held-out users vs labeler agreement",
            f"{100 * results['rm_accuracy']:.1f}% vs {100 * results['labeler_agreement']:.1f}%",
            "within 5 points",
            ok(gap <= 5),
        ),
        (
            "ptx removes the alignment tax",
            "held-out pretraining loss: SFT / PPO / PPO-ptx",
            f"{sft:.3f} / {ppo:.3f} / {ptx:.3f}",
            "PPO-ptx within 2% of SFT; PPO >= 1% worse than SFT",
            ok(abs(ptx - sft) / sft <= 0.02 and (ppo - sft) / sft >= 0.01 and ppo > ptx),
        ),
        (
            "small aligned beats big unaligned",
            f"win rate of PPO-ptx over the {m['SFT big']['params'] / m['SFT']['params']:.1f}x larger SFT",
            f"{100 * w['PPO-ptx vs SFT big']:.0f}%",
            ">= 50%",
            ok(w["PPO-ptx vs SFT big"] >= 0.5),
        ),
        (
            "KL penalty limits over-optimisation",
            "gold score vs KL without penalty (plot)",
            "peaks then falls" if peak_then_fall else "no peak-then-fall seen",
            "peaks then falls",
            ok(peak_then_fall),
        ),
    ]
    lines = ["| claim in the paper | measurement here | result | target | |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
    return "\n".join(lines)


def write_report(root: Path, results: dict) -> Path:
    plots = _plots(root, results)
    m = results["models"]
    t = results.get("eval_temperature", 0.0)
    decoding = "greedy" if t == 0 else f"sampled at temperature {t:g}"
    lines = [
        "# rlhf_jax demo: InstructGPT at small scale",
        "",
        f"Seed {results['seed']}, {'quick' if results['quick'] else 'full'} run, "
        f"{results['total_s'] / 60:.1f} min wall time on this machine ({', '.join(f'{k} {v:.0f}s' for k, v in results['timings_s'].items())}).",
        "",
        results_table(results),
        "",
        f"| model | params | mean gold score (held-out, {decoding}) | held-out pretraining loss |",
        "|---|---|---|---|",
    ]
    lines += [f"| {k} | {v['params']:,} | {v['gold']:.3f} | {v['heldout_loss']:.3f} |" for k, v in m.items()]
    lines += [
        "",
        f"![PPO curves]({plots['curves']})",
        "",
        f"![win rates]({plots['wins']})",
        "",
        f"![over-optimisation]({plots['overopt']})",
        "",
        f"## Samples (held-out prompts, {decoding})",
        "",
    ]
    for name, v in m.items():
        lines.append(f"**{name}**")
        lines += [f"- `{p}` -> `{r}`" for p, r in v["samples"]]
        lines.append("")
    path = root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
