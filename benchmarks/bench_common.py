"""What the side-by-side benchmarks share: timing, the quiet-machine check, the peer runner, tables.

The peer side (PyTorch / transformers / TRL) is ``../shared/bench/trl_baseline.py``, run
in its own Python (torch 2.13 + TRL; see ../shared/bench/README.md); it prints one JSON
line. This machine is shared: every measurement on either side records
``foreign_cores_avg``, the CPU cores other processes used while it ran (> ~0.1 means the
figure is inflated by contention and should be discarded).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf_jax.mfu import stats

PEER_SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "bench" / "trl_baseline.py"
SIZES = ("small", "medium")  # the peer's two GPT-2 configs; rlhf_jax.bench.PRESETS has the same ones


def timed(fn: Callable[[], Any], *, warmup: int, repeats: int) -> dict:
    """median / min / max seconds of ``repeats`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return stats(times)


def cpu_snapshot() -> tuple[float, float] | None:
    """(machine busy CPU-seconds, this process's CPU-seconds incl. children) from /proc; None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = sum(v) - v[3] - v[4]  # minus idle and iowait
        with open("/proc/self/stat") as f:
            w = f.read().rsplit(")", 1)[1].split()
        hz = os.sysconf("SC_CLK_TCK")
        return busy / hz, sum(int(x) for x in w[11:15]) / hz  # utime, stime, cutime, cstime
    except (OSError, ValueError, IndexError):
        return None


def wait_quiet(max_wait_s: float, *, threshold: float = 0.15, sample_s: float = 1.0) -> float:
    """Wait up to ``max_wait_s`` until other processes use < ``threshold`` cores in two consecutive
    one-second samples (the peer script's rule); returns the seconds waited."""
    t_start, quiet = time.perf_counter(), 0
    while time.perf_counter() - t_start < max_wait_s:
        a = cpu_snapshot()
        if a is None:
            return 0.0
        time.sleep(sample_s)
        b = cpu_snapshot()
        foreign = ((b[0] - a[0]) - (b[1] - a[1])) / sample_s
        quiet = quiet + 1 if foreign < threshold else 0
        if quiet >= 2:
            break
    return round(time.perf_counter() - t_start, 1)


def measured(name: str, fn: Callable[[], dict], *, wait_quiet_s: float = 0.0) -> dict:
    """Run one benchmark ``fn() -> dict`` and add the machine's load while it ran.

    Adds ``foreign_cores_avg`` (cores used by other processes), ``own_cores_avg``,
    ``loadavg_1m_end`` and ``waited_for_quiet_s``; an exception becomes ``{"error": ...}``.
    """
    waited = wait_quiet(wait_quiet_s) if wait_quiet_s > 0 else 0.0
    print(f"[{time.strftime('%H:%M:%S')}] rlhf_jax {name} ... (waited {waited}s for a quiet machine)", flush=True)
    t0, c0 = time.perf_counter(), cpu_snapshot()
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - one failed benchmark must not lose the others
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"[:500]}
    c1, wall = cpu_snapshot(), time.perf_counter() - t0
    if c0 and c1 and wall > 0:
        result["foreign_cores_avg"] = round(((c1[0] - c0[0]) - (c1[1] - c0[1])) / wall, 3)
        result["own_cores_avg"] = round((c1[1] - c0[1]) / wall, 3)
        result["loadavg_1m_end"] = os.getloadavg()[0]
    result["waited_for_quiet_s"] = waited
    print(f"    done in {wall:.1f}s (foreign load {result.get('foreign_cores_avg', '?')} cores)", flush=True)
    return result


def run_peer(python: str, *, sizes: str, only: str, repeats: int, warmup: int, wait_quiet_s: float = 0.0) -> dict:
    """Run ``trl_baseline.py`` with ``python`` and return its JSON (``{"error": ...}`` on failure)."""
    if not PEER_SCRIPT.exists():
        return {"error": f"{PEER_SCRIPT} not found (the peer baseline lives in ../shared/bench)"}
    cmd = [
        python,
        str(PEER_SCRIPT),
        "--sizes",
        sizes,
        "--only",
        only,
        "--repeats",
        str(repeats),
        "--warmup",
        str(warmup),
        "--wait-quiet",
        str(wait_quiet_s),
    ]
    print(f"[{time.strftime('%H:%M:%S')}] peer: {' '.join(cmd)}", flush=True)
    env = {**os.environ, "PYTHONPATH": ""}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        tail: list[str] = []
        for line in proc.stderr:  # its progress lines, as they come; stdout is the one JSON line at the end
            if line.startswith("[") or line.lstrip().startswith("done in"):
                print(f"  peer| {line.rstrip()[:200]}", flush=True)
            tail = (tail + [line])[-40:]
        stdout = proc.stdout.read()
    lines = stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {''.join(tail)[-2000:]}", "cmd": cmd}
    result = json.loads(lines[-1])
    result["cmd"] = cmd
    return result


def fmt_stats(s: dict | None, unit: str = "s") -> str:
    """'0.241 s [0.238-0.250]' from a stats dict."""
    if not s:
        return "-"
    return f"{s['median']:.3f} {unit} [{s['min']:.3f}-{s['max']:.3f}]"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
