"""PPO / PPO-ptx iteration speed: rlhf_jax against plain PyTorch and TRL, same work, one run.

The work is the peer script's (../shared/bench/trl_baseline.py, `bench_ppo_torch`): GPT-2
(4 layers, d_model 256, 4 heads, vocab 8192), 16 prompts of 64 tokens, 64 new tokens at
temperature 0.7, policy + separate value network + frozen reference + reward model,
per-token KL, GAE, 1 epoch of 2 minibatches of 8 (2 optimizer steps), fp32; PPO-ptx adds
8 x 128 pretraining tokens per minibatch with coefficient 27.8.

    python benchmarks/ppo.py                                  # rlhf_jax only
    python benchmarks/ppo.py --peer-python /tmp/peer-ppo/bin/python   # + torch and TRL PPO

(``--peer-python`` is a Python with torch==2.13.0 and trl==1.12.0, the last TRL with a PPO
trainer; see ../shared/bench/README.md.) Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from bench_common import run_peer

SIZES = ("small", "medium")


def bench_rlhf_jax(size: str, *, ptx: bool, warmup: int, repeats: int, exact_ratio: bool = True) -> dict:
    """One PPO(-ptx) iteration of rlhf_jax on one device, with rollout and update timed apart
    (``rlhf_jax.bench.measure_ppo`` with the peer's settings, ``rlhf_jax.bench.ppo_config``)."""
    import jax

    from rlhf_jax import bench, sharding
    from rlhf_jax.config import MeshConfig

    cfg = bench.ppo_config(batch=16, minibatch=8, prompt_len=64, new_tokens=64, ptx=ptx)
    cfg = dataclasses.replace(cfg, exact_ratio=exact_ratio)
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    r = bench.measure_ppo(bench.PRESETS[size], mesh, cfg, prompt_len=64, warmup=warmup, repeats=repeats, split=True)
    r["impl"] = "rlhf_jax PPO" + ("-ptx" if ptx else "") + ("" if exact_ratio else " (exact_ratio off)")
    r["rollout_and_scoring_s"] = r.pop("rollout_s")
    return r


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peer-python", default=None, help="python with torch 2.13 + trl 1.12 for the peer side")
    args = ap.parse_args(argv)

    results = {"size": args.size, "rlhf_jax": {}}
    for ptx in (False, True):
        for exact in (True, False):
            r = bench_rlhf_jax(args.size, ptx=ptx, warmup=args.warmup, repeats=args.repeats, exact_ratio=exact)
            results["rlhf_jax"][("ppo_ptx" if ptx else "ppo") + ("" if exact else "_inexact")] = r
    if args.peer_python:
        results["peer"] = run_peer(
            args.peer_python, sizes=args.size, only="ppo", repeats=args.repeats, warmup=args.warmup
        )

    print(f"{'implementation':<44} {'episodes/s':>10} {'iter s':>8} {'rollout s':>10} {'update s':>9}")
    rows = list(results["rlhf_jax"].values())
    peer_rows = []
    if "peer" in results:
        for size_results in results["peer"].get("results", {}).values():
            peer_rows += [e for e in size_results.values() if isinstance(e, dict) and "episodes_per_s" in e]
    for r in rows + peer_rows:
        ro = r.get("rollout_and_scoring_s", {}).get("median", float("nan"))
        up = r.get("update_s", {}).get("median", float("nan"))
        print(
            f"{r.get('impl', '?')[:44]:<44} {r['episodes_per_s']:10.2f} {r['iter_s']['median']:8.3f} {ro:10.3f} {up:9.3f}"
        )
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
