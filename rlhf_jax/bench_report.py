"""Tables and plots of ``rlhf-jax bench`` results (the dict :func:`rlhf_jax.bench.run_bench` returns)."""

from __future__ import annotations

import json
from pathlib import Path


def format_row(row: dict) -> str:
    parts = [f"{row['preset']:>10} mesh {tuple(row['mesh'])}"]
    for stage in ("sft", "rm", "ppo"):
        if stage in row:
            r = row[stage]
            t = r["iter_s" if stage == "ppo" else "step_s"]["median"]
            parts.append(f"{stage} {t * 1e3:8.1f} ms {r['tokens_per_s']:9.0f} tok/s MFU {100 * r['mfu']:5.1f}%")
    return " | ".join(parts)


def markdown_table(result: dict) -> str:
    """One row per (preset, mesh, stage)."""
    lines = [
        (
            f"Device: {result['num_devices']} x {result['device']} ({result['platform']}), compute {result['dtype']}"
            f", remat {result['remat']}; peak {result['peak_flops'] / 1e12:.3g} TFLOP/s "
            f"({result['peak_source']})."
        ),
        "",
        "| model | params | mesh (data, fsdp, tensor) | step | time (median) | first call | tokens/s | extra | MFU | peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        mem = f"{row['peak_memory_bytes'] / 2**20:.0f} MiB"
        for stage in ("sft", "rm", "ppo"):
            if stage not in row:
                continue
            r = row[stage]
            if stage == "sft":
                what, t = f"SFT {r['batch']} x {r['seq']}", r["step_s"]
                extra = ""
            elif stage == "rm":
                what, t = f"RM {r['prompts']} x K={r['k']} x {r['seq']}", r["step_s"]
                extra = f"{r['comparisons_per_s']:.1f} comparisons/s"
            else:
                what, t = f"PPO{'-ptx' if r['ptx'] else ''} {r['episodes']} x ({r['prompt']} + {r['new']})", r["iter_s"]
                extra = f"{r['episodes_per_s']:.2f} episodes/s"
                if "rollout_s" in r:
                    extra += f" (rollout {r['rollout_s']['median']:.3f} s, update {r['update_s']['median']:.3f} s)"
            lines.append(
                f"| {row['preset']} | {row['params'] / 1e6:.1f}M | {tuple(row['mesh'])} | {what} | {t['median'] * 1e3:.1f} ms "
                f"| {r['first_call_s']:.1f} s | {r['tokens_per_s']:,.0f} | {extra} | {100 * r['mfu']:.1f}% | {mem} |"
            )
    lines.append("")
    lines.append(f"Peak memory: {result['rows'][0]['memory_source'] if result['rows'] else '-'}.")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Tokens/s (bars) and MFU (labels) per (preset, mesh), one panel per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in ("sft", "rm", "ppo") if any(s in row for row in result["rows"])]
    fig, axes = plt.subplots(1, max(len(stages), 1), figsize=(5 * max(len(stages), 1), 4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rows = [row for row in result["rows"] if stage in row]
        labels = [f"{row['preset']}\n{tuple(row['mesh'])}" for row in rows]
        values = [row[stage]["tokens_per_s"] for row in rows]
        bars = ax.bar(range(len(rows)), values, color="tab:blue")
        for bar, row in zip(bars, rows):
            ax.annotate(
                f"{100 * row[stage]['mfu']:.0f}%",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"{stage.upper()}: tokens/s (label: MFU)")
    fig.suptitle(f"{result['num_devices']} x {result['device']}, {result['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown_table(result))
    plot(result, out / "results.png")
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'results.png'}")
