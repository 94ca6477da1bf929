"""Do XLA flags help? The rlhf_jax SFT step, RM step and generation under several XLA_FLAGS settings.

XLA reads its flags once per process, so each setting runs in its own subprocess, and the
settings take turns for ``--rounds`` rounds (a busy machine then slows them alike); the
table gives each setting's median over rounds of its per-round medians, relative to the
first setting (the environment's flags, or none):

    python benchmarks/xla_flags.py --size small --flag=--xla_cpu_use_onednn=true --flag=--xla_cpu_use_xnnpack=true

Only a flag that wins clearly here (and keeps the results: the SFT loss is printed) belongs
in ``benchmarks/run.py --xla-flags`` or a user's environment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench_common import markdown, wait_quiet

CHILD = """
import json, sys
sys.path.insert(0, {bench_dir!r})
import jax, numpy as np
from rlhf_jax import bench, sharding
from rlhf_jax.config import MeshConfig, OptimConfig
from rlhf_jax.models import CausalLM
import generate as gen_bench
cfg = bench.PRESETS[{size!r}]
mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
optim = OptimConfig(learning_rate=1e-4, schedule="constant", b2=0.999, weight_decay=0.01, max_grad_norm=None)
kw = dict(warmup=2, repeats={repeats})
sft = bench.measure_sft(cfg, mesh, batch_size=8, seq_len=128, optim=optim, **kw)
rm = bench.measure_rm(cfg, mesh, prompts=4, k=4, seq_len=128, optim=optim, **kw)
model = CausalLM(cfg)
ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (16, 64)).astype(np.int32)
gen = gen_bench.measure_rlhf_jax(model, bench.random_params(model), ids, np.ones_like(ids), new=64, **kw)
print(json.dumps(dict(sft=sft["step_s"]["median"], sft_loss=sft["loss"], rm=rm["step_s"]["median"],
                      gen=gen["call_s"]["median"])))
"""


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=["small", "medium"])
    ap.add_argument(
        "--flag",
        action="append",
        default=None,
        help="an XLA_FLAGS setting to try (repeat; write --flag=--xla_...); the baseline is always first",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--wait-quiet", type=float, default=30.0)
    args = ap.parse_args(argv)
    args.flags = [os.environ.get("XLA_FLAGS", "")] + (
        args.flag or ["--xla_cpu_use_onednn=true", "--xla_cpu_use_xnnpack=true"]
    )
    code = CHILD.format(bench_dir=str(Path(__file__).resolve().parent), size=args.size, repeats=args.repeats)
    runs: dict[str, list[dict]] = {f: [] for f in args.flags}
    for r in range(args.rounds):
        for flags in args.flags:
            waited = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else 0.0
            env = {**os.environ, "XLA_FLAGS": flags}
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
            if out.returncode != 0:
                print(f"round {r} {flags or '(none)'}: failed\n{out.stderr[-1500:]}", flush=True)
                continue
            runs[flags].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r} {flags or '(none)':45s} {runs[flags][-1]} (waited {waited}s)", flush=True)
    base = (
        {k: statistics.median(x[k] for x in runs[args.flags[0]]) for k in ("sft", "rm", "gen")}
        if runs[args.flags[0]]
        else {}
    )
    rows, result = [], {}
    for flags, xs in runs.items():
        if not xs:
            continue
        med = {k: statistics.median(x[k] for x in xs) for k in ("sft", "rm", "gen")}
        result[flags] = med | {"sft_loss": xs[0]["sft_loss"], "rounds": len(xs)}
        rel = {k: f"{med[k] * 1e3:.1f} ms ({base[k] / med[k]:.2f}x)" if base else f"{med[k] * 1e3:.1f} ms" for k in med}
        rows.append([flags or "(none)", rel["sft"], rel["rm"], rel["gen"], f"{xs[0]['sft_loss']:.5f}"])
    print(markdown(["XLA_FLAGS", "SFT step", "RM step (K=4)", "generate", "SFT loss"], rows))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
