"""The figures of ``report.md`` (:func:`rlhf_jax.tasks.report.write_report`), drawn with matplotlib."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rlhf_jax.tasks.report import RUN_LABELS, iterated, pooled, series
from rlhf_jax.train_loop import read_metrics


def _save(fig, root: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(root / name, dpi=110)
    plt.close(fig)
    return name


def write_plots(root: Path, results: list[dict]) -> dict[str, str]:
    """The report's figures under ``root``: PPO curves, win rates, over-optimisation, alignment
    tax; returns their file names by role (``curves``, ``wins``, ``overopt``, ``tax``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = results[0]
    out = {}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, ax, title in (
        ("objective/scores", axes[0], "reward-model score (training samples)"),
        ("val/gold_score", axes[1], "gold score (validation prompts, greedy)"),
        ("objective/kl", axes[2], "KL(policy || SFT) per episode"),
    ):
        for run, label in RUN_LABELS.items():
            x, y = series(first["runs"][run], key)
            if x:
                ax.plot(x, y, marker="o" if key.startswith("val") else None, ms=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"PPO iteration (seed {first['seed']}, round 0)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    out["curves"] = _save(fig, root, "ppo_curves.png")

    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = list(first["win_outcomes"])
    stats = [pooled([x["win_outcomes"][k] for x in results]) for k in labels]
    ys = [100 * s[0] for s in stats]
    err = [[100 * (s[0] - s[1]) for s in stats], [100 * (s[2] - s[0]) for s in stats]]
    bars = ax.bar(range(len(labels)), ys, yerr=err, capsize=4, color="tab:green")
    ax.set_xticks(range(len(labels)), [k.replace(" vs ", "\nvs ") for k in labels], fontsize=7)
    ax.axhline(50, color="gray", ls="--", lw=1)
    ax.bar_label(bars, fmt="%.0f%%", fontsize=8)
    ax.set_ylabel("gold-judged win rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"held-out users' prompts, {len(results)} seed(s), 95% bootstrap", fontsize=10)
    out["wins"] = _save(fig, root, "win_rates.png")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for run, label in RUN_LABELS.items():
        rows = read_metrics(first["runs"][run])
        kl_by_step = {m["step"]: m["objective/kl"] for m in rows if m.get("objective/kl") is not None}
        pts = sorted(
            (kl_by_step[m["step"]], m["val/gold_score"])
            for m in rows
            if m.get("val/gold_score") is not None and m["step"] in kl_by_step
        )
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=label)
    rounds = [(e["kl"], e["gold"]) for e in first["rounds"]]
    ax.plot(*zip(*rounds), marker="s", ls=":", color="k", label="PPO-ptx by round (held-out, sampled)")
    ax.set_xlabel("KL(policy || SFT) per episode (nats)")
    ax.set_ylabel("gold score")
    ax.set_title(f"reward over-optimisation (seed {first['seed']})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    out["overopt"] = _save(fig, root, "overoptimisation.png")

    several_rounds = iterated(results)
    fig, axes = plt.subplots(1, 2 if several_rounds else 1, figsize=(11 if several_rounds else 6, 3.6), squeeze=False)
    ax = axes[0, 0]
    for name, color in (("PPO", "tab:orange"), ("PPO-ptx", "tab:green")):
        for i, x in enumerate(results):
            pts = x["trajectories"][name]  # in training order: round by round, checkpoint by checkpoint
            ax.plot(
                [p["kl"] for p in pts],
                [p["heldout_loss"] for p in pts],
                marker="o",
                ms=3,
                color=color,
                alpha=0.8,
                label=name if i == 0 else None,
            )
            ends = [
                p
                for j, p in enumerate(pts)
                if j > 0 and (j == len(pts) - 1 or pts[j + 1].get("round") != p.get("round"))
            ]
            if len(ends) > 1:  # the end of each round
                ax.scatter(
                    [p["kl"] for p in ends],
                    [p["heldout_loss"] for p in ends],
                    s=30,
                    color=color,
                    marker="s",
                    edgecolor="k",
                    zorder=3,
                    label=f"{name}, end of a round" if i == 0 else None,
                )
    ax.set_xlabel("KL(policy || SFT) per response, held-out prompts (nats)")
    ax.set_ylabel("held-out pretraining loss")
    ax.set_title(
        f"alignment tax along the PPO runs ({'every round, ' if several_rounds else ''}every seed)", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if several_rounds:  # the same losses at the end of each round, relative to each seed's SFT model
        ax = axes[0, 1]
        for name, color in (("PPO", "tab:orange"), ("PPO-ptx", "tab:green")):
            rel = np.asarray(
                [
                    [
                        (e["ppo"] if name == "PPO" else e)["heldout_loss"] / x["models"]["SFT"]["heldout_loss"] - 1
                        for e in x["rounds"]
                    ]
                    for x in results
                ]
            )  # [seeds, rounds]
            for i, seed_rel in enumerate(rel):
                ax.plot(100 * seed_rel, color=color, alpha=0.35, lw=1, label=f"{name}, each seed" if i == 0 else None)
            ax.plot(100 * rel.mean(0), color=color, marker="o", lw=2, label=f"{name}, mean")
        ax.axhline(0, color="gray", ls="--", lw=1)
        ax.set_xlabel("RLHF round")
        ax.set_ylabel("held-out loss vs SFT (%)")
        ax.set_title("held-out pretraining loss at the end of each round", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    out["tax"] = _save(fig, root, "alignment_tax.png")
    return out
