"""Kill -9 loop: the long version of tests/test_kill.py (issue 8, item 1).

Command:   python experiments/kill_loop.py --kills 200 [--stages sft ppo] [--out /tmp/kill_loop] [--seed 0]
Hardware:  CPU (the children use one device), 2+ cores.
Time:      about 8-15 s per kill on a 2-core machine (each kill restarts a Python process).
Expected:  every kill leaves only complete checkpoints (each restores and is finite, no
           temporary directory is listed), every restart resumes from the latest one, and
           each finished run is bitwise equal to an uninterrupted run; prints the counts
           (kills, kills during a save, kills during a deletion, resumes, corrupt restores = 0)
           as JSON and exits 1 on any violation.

The kills are split evenly over the stages and made in rounds of ``--per-run`` kills per
training run (a run of ``steps`` steps has room for about steps / 2 kills), each round
compared with its own uninterrupted reference run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import kill_harness as K  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--stages", nargs="+", default=["sft", "ppo"], choices=["sft", "ppo"])
    ap.add_argument("--per-run", type=int, default=10, help="kills per training run")
    ap.add_argument("--out", type=Path, default=Path("/tmp/kill_loop"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.out.exists():
        shutil.rmtree(args.out)
    world = args.out / "world"
    K.make_world(world)
    env = K.child_env(args.out / "jax_cache")
    total = K.KillStats()
    rounds = 0
    per_stage = -(-args.kills // len(args.stages))
    for stage in args.stages:
        left = per_stage
        while left > 0:
            kills = min(args.per_run, left)
            steps = 3 * kills + 4  # room for 1-3 steps of progress per leg
            root = args.out / f"{stage}_{rounds}"
            root.mkdir(parents=True)
            ref = K.start_child(
                stage, world, root / "reference", slow=0.0, env=env, log=root / "reference.log", steps=steps
            )
            stats = K.kill_cycle(
                stage,
                world,
                root / "killed",
                kills=kills,
                seed=args.seed + rounds,
                env=env,
                steps=steps,
                sigterm_at=1 if stage == "ppo" else None,
            )
            if ref.wait(timeout=600) != 0:
                raise SystemExit(f"reference run failed: see {root / 'reference.log'}")
            K.assert_same_run(root / "killed", root / "reference")
            total.add(stats)
            left -= kills
            rounds += 1
            print(json.dumps({"stage": stage, "round": rounds, **dataclasses.asdict(stats)}), flush=True)
    summary = {k: v for k, v in dataclasses.asdict(total).items() if k != "kinds"}
    summary["runs_bitwise_equal_to_uninterrupted"] = rounds
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
