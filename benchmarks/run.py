"""rlhf_jax against the PyTorch / transformers / TRL stack: the same work, on the same machine, in one run.

    python benchmarks/run.py                                  # small + medium, both sides (~12 min on 2 cores)
    python benchmarks/run.py --sizes small --only sft,rm      # a part
    python benchmarks/run.py --peer-python /tmp/peer/bin/python --peer-ppo-python /tmp/peer-ppo/bin/python

The peer side is ``../shared/bench/trl_baseline.py`` run with ``--peer-python`` (torch 2.13 +
a TRL with SFTTrainer / RewardTrainer; default ``/tmp/peer/bin/python``, else
``/tmp/peer-ppo/bin/python``) and, for PPO, ``--peer-ppo-python`` (trl 1.12, the last TRL
with a PPO trainer; default ``/tmp/peer-ppo/bin/python``). It runs first, then rlhf_jax
runs in this process on one CPU device. Both sides: GPT-2 configs with vocab 8192 and
256 positions ("small": 4 layers d 256; "medium": 6 layers d 512), dropout 0, fp32,
random weights and random full-length token ids, medians of ``--repeats`` after
``--warmup`` (PPO: ``--ppo-repeats`` after ``--ppo-warmup``; compilation excluded), min and
max kept. A persistent XLA compilation cache (``--compile-cache``) makes a second run shorter.

What is compared (same work on both sides):

* matmul: 2048^3 float32 matmul, jax and torch: the machine's practical peak FLOP/s.
* SFT step, 8 x 128 tokens, AdamW: rlhf_jax ``sft.make_train_step`` vs a plain torch loop
  and TRL's SFTTrainer (and transformers' Trainer).
* RM step: TRL's RewardTrainer does 8 pairs = 16 sequences of 128 per step (8
  comparisons). rlhf_jax with K = 4 rankings puts the same 16 sequences in 4 groups of 4:
  4 x C(4,2) = 24 comparisons from the same 16 forward passes (InstructGPT's batching);
  with K = 2 it does TRL's 8 pairs. Reported as comparisons/s and pairs/s.
* generation: 16 prompts of 64 tokens -> 64 new tokens, sampling at temperature 1 with a
  KV cache: new tokens/s (``rlhf_jax.sampling.generate`` vs transformers' ``generate``).
* PPO / PPO-ptx iteration: 16 episodes of 64 + 64 tokens, T 0.7, policy + separate value
  network + reference + reward model, per-token KL, GAE, 1 epoch of 2 minibatches of 8;
  ptx adds 8 x 128 pretraining tokens per minibatch. Episodes/s, rollout and update apart
  (vs TRL's PPOTrainer and the peer's plain-torch PPO / PPO-ptx loop).

MFU = model FLOPs / time / the best measured matmul FLOP/s of either side (formulas in
``rlhf_jax.bench``: training 6 N + 6 L H Dh T per token with the unembedding in N; RM
without it; generation 2 N per token + attention over the cache; PPO = generation +
one scoring forward per model + 3x forward of policy and value per episode + ptx).

Every entry carries ``foreign_cores_avg`` (CPU cores other processes used while it ran):
above ~0.1 the machine was not quiet and the figure is inflated; the table flags it.
Prints a markdown table with ratios and writes everything as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from bench_common import SIZES, fmt_stats, markdown, measured, run_peer

TARGETS = {"sft": 1.2, "rm": 3.0, "gen": 3.0, "ppo": 1.5, "ppo_ptx": 1.5}
NOISY = 0.1  # foreign_cores_avg above this: flagged


def default_python(*candidates: str) -> str | None:
    return next((c for c in candidates if Path(c).exists()), None)


# ----------------------------------------------------------------------------- rlhf_jax side
def jax_side(
    size: str, only: set[str], *, warmup: int, repeats: int, ppo_warmup: int, ppo_repeats: int, wait_quiet_s: float
) -> dict:
    import generate as gen_bench
    import jax
    import numpy as np

    from rlhf_jax import bench, mfu, sharding
    from rlhf_jax.config import MeshConfig, OptimConfig
    from rlhf_jax.models import CausalLM

    model_cfg = bench.PRESETS[size]
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    # torch.optim.AdamW's defaults, no clipping: the peer loops' optimizer
    optim = OptimConfig(learning_rate=1e-4, schedule="constant", b2=0.999, weight_decay=0.01, max_grad_norm=None)
    kw = dict(warmup=warmup, repeats=repeats)
    out: dict = {"params": model_cfg.num_params()}

    def run(name, fn):
        out[name] = measured(f"{size} {name}", fn, wait_quiet_s=wait_quiet_s)

    if "sft" in only:
        run("sft", lambda: bench.measure_sft(model_cfg, mesh, batch_size=8, seq_len=128, optim=optim, **kw))
    if "rm" in only:
        run("rm_k4", lambda: bench.measure_rm(model_cfg, mesh, prompts=4, k=4, seq_len=128, optim=optim, **kw))
        run("rm_k2", lambda: bench.measure_rm(model_cfg, mesh, prompts=8, k=2, seq_len=128, optim=optim, **kw))
    if "gen" in only:

        def gen():
            model = CausalLM(model_cfg)
            ids = np.random.default_rng(0).integers(3, model_cfg.vocab_size, (16, 64)).astype(np.int32)
            r = gen_bench.measure_rlhf_jax(model, bench.random_params(model), ids, np.ones_like(ids), new=64, **kw)
            return r | {"flops": mfu.generate_flops(model_cfg, batch=16, prompt_len=64, new_tokens=64)}

        run("gen", gen)
    if "ppo" in only:
        for ptx in (False, True):
            cfg = bench.ppo_config(batch=16, minibatch=8, prompt_len=64, new_tokens=64, ptx=ptx)
            run(
                "ppo_ptx" if ptx else "ppo",
                lambda cfg=cfg: bench.measure_ppo(
                    model_cfg, mesh, cfg, prompt_len=64, split=True, warmup=ppo_warmup, repeats=ppo_repeats
                ),
            )
    return out


def jax_matmul(wait_quiet_s: float) -> dict:
    from rlhf_jax.mfu import measure_matmul_peak

    r = measured("matmul", measure_matmul_peak, wait_quiet_s=wait_quiet_s)
    if "flops_best" in r:
        r |= {"gflops_median": r["flops_median"] / 1e9, "gflops_best": r["flops_best"] / 1e9}
    return r


# ----------------------------------------------------------------------------- the table
def _get(d: dict | None, *path, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def _load(entry: dict | None) -> str:
    f = _get(entry, "foreign_cores_avg")
    if f is None:
        return "?"
    return f"{f:.2f}" + (" NOISY" if f > NOISY else "")


def build_rows(size: str, ours: dict, peer: dict, peer_ppo: dict, peak: float) -> list[dict]:
    """One dict per compared line: what, ours, theirs, ratio, target, MFU of each, load of each."""
    from rlhf_jax import bench, mfu

    cfg = bench.PRESETS[size]
    p = _get(peer, "results", size, default={})
    pp = _get(peer_ppo, "results", size, default={})
    sft_flops = mfu.train_flops(cfg, sequences=8, seq_len=128)
    rm_flops = mfu.train_flops(cfg, sequences=16, seq_len=128, lm_head=False)
    gen_flops = mfu.generate_flops(cfg, batch=16, prompt_len=64, new_tokens=64)
    specs = {
        ptx: bench.ppo_config(batch=16, minibatch=8, prompt_len=64, new_tokens=64, ptx=ptx) for ptx in (False, True)
    }
    ppo_fl = {
        ptx: mfu.ppo_flops(cfg, s.hparams, prompt_len=64, ptx_seq_len=s.ptx_seq_len)["total"]
        for ptx, s in specs.items()
    }
    rows = []

    def add(
        what,
        key,
        mine,
        theirs,
        unit,
        ours_s,
        theirs_s,
        flops,
        target=None,
        peer_entry=None,
        ours_entry=None,
        extra_ours="",
        extra_theirs="",
    ):
        ratio = mine / theirs if mine and theirs else None
        rows.append(
            {
                "size": size,
                "work": what,
                "key": key,
                "unit": unit,
                "rlhf_jax": mine,
                "peer": theirs,
                "ratio": ratio,
                "target": target,
                "met": None if ratio is None or target is None else ratio >= target,
                "rlhf_jax_time": ours_s,
                "peer_time": theirs_s,
                "mfu_rlhf_jax": flops / ours_s["median"] / peak if ours_s and peak else None,
                "mfu_peer": flops / theirs_s["median"] / peak if theirs_s and peak else None,
                "load_rlhf_jax": _load(ours_entry),
                "load_peer": _load(peer_entry),
                "extra_rlhf_jax": extra_ours,
                "extra_peer": extra_theirs,
            }
        )

    sft = ours.get("sft", {})
    for name, impl, target in (
        ("sft_torch", "plain torch loop", TARGETS["sft"]),
        ("sft_trl", "TRL SFTTrainer", None),
        ("sft_hf", "transformers Trainer", None),
    ):
        if name in p or (not p and name == "sft_torch" and "step_s" in sft):
            add(
                f"SFT step 8 x 128 vs {impl}",
                "sft",
                _get(sft, "tokens_per_s"),
                _get(p, name, "tokens_per_s"),
                "tokens/s",
                _get(sft, "step_s"),
                _get(p, name, "step_s"),
                sft_flops,
                target,
                p.get(name),
                sft,
            )
    k4, k2 = ours.get("rm_k4", {}), ours.get("rm_k2", {})
    for name, impl in (("rm_trl", "TRL RewardTrainer"), ("rm_torch", "plain torch loop")):
        if name in p or (not p and name == "rm_trl" and "step_s" in k4):
            add(
                f"RM step, 16 sequences x 128: K=4 (24 comparisons) vs {impl} (8 pairs)",
                "rm",
                _get(k4, "comparisons_per_s"),
                _get(p, name, "pairs_per_s"),
                "comparisons/s",
                _get(k4, "step_s"),
                _get(p, name, "step_s"),
                rm_flops,
                TARGETS["rm"] if name == "rm_trl" else None,
                p.get(name),
                k4,
            )
            add(
                f"RM step, 16 sequences x 128: K=2 (8 pairs) vs {impl} (8 pairs)",
                "rm_pairs",
                _get(k2, "comparisons_per_s"),
                _get(p, name, "pairs_per_s"),
                "pairs/s",
                _get(k2, "step_s"),
                _get(p, name, "step_s"),
                rm_flops,
                None,
                p.get(name),
                k2,
            )
    g = ours.get("gen", {})
    if "gen" in p or "call_s" in g:
        add(
            "generate 16 x 64 -> +64, sampling, KV cache vs transformers",
            "gen",
            _get(g, "new_tokens_per_s"),
            _get(p, "gen", "new_tokens_per_s"),
            "new tokens/s",
            _get(g, "call_s"),
            _get(p, "gen", "call_s"),
            gen_flops,
            TARGETS["gen"],
            p.get("gen"),
            g,
        )

    def split(e):
        ro = _get(e, "rollout_s") or _get(e, "rollout_and_scoring_s")
        up = _get(e, "update_s")
        return f"rollout {ro['median']:.2f} s, update {up['median']:.2f} s" if ro and up else ""

    for ptx in (False, True):
        mine = ours.get("ppo_ptx" if ptx else "ppo", {})
        peers = (
            [("ppo_ptx_torch", "plain torch PPO-ptx", TARGETS["ppo_ptx"])]
            if ptx
            else [("ppo_trl", "TRL PPOTrainer", TARGETS["ppo"]), ("ppo_torch", "plain torch PPO", None)]
        )
        for name, impl, target in peers:
            theirs = pp.get(name)
            if theirs is None and (pp or "iter_s" not in mine or name == "ppo_torch"):
                continue
            if theirs is not None and theirs.get("available") is False:
                theirs = None
            add(
                f"PPO{'-ptx' if ptx else ''} iteration, 16 episodes vs {impl}",
                "ppo_ptx" if ptx else "ppo",
                _get(mine, "episodes_per_s"),
                _get(theirs, "episodes_per_s"),
                "episodes/s",
                _get(mine, "iter_s"),
                _get(theirs, "iter_s"),
                ppo_fl[ptx],
                target,
                theirs,
                mine,
                split(mine),
                split(theirs),
            )
    return rows


def render(rows: list[dict], peak: float, peak_source: str) -> str:
    def num(x, digits=2):
        if x is None:
            return "-"
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.{digits}f}"

    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"

    header = [
        "size",
        "work",
        "rlhf_jax",
        "PyTorch side",
        "unit",
        "ratio",
        "target",
        "MFU rlhf_jax / peer",
        "time rlhf_jax",
        "time peer",
        "foreign load (cores) rlhf_jax / peer",
    ]
    body = []
    for r in rows:
        verdict = "no peer figure" if r["met"] is None else "met" if r["met"] else "missed"
        if "NOISY" in r["load_rlhf_jax"] + r["load_peer"]:
            verdict += "; busy machine, discard"
        target = "-" if r["target"] is None else f">= {r['target']}x ({verdict})"
        t_ours = fmt_stats(r["rlhf_jax_time"]) + (f"; {r['extra_rlhf_jax']}" if r["extra_rlhf_jax"] else "")
        t_peer = fmt_stats(r["peer_time"]) + (f"; {r['extra_peer']}" if r["extra_peer"] else "")
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        body.append(
            [
                r["size"],
                r["work"],
                num(r["rlhf_jax"]),
                num(r["peer"]),
                r["unit"],
                ratio,
                target,
                f"{pct(r['mfu_rlhf_jax'])} / {pct(r['mfu_peer'])}",
                t_ours,
                t_peer,
                f"{r['load_rlhf_jax']} / {r['load_peer']}",
            ]
        )
    head = f"Peak for MFU: {peak / 1e9:.0f} GFLOP/s ({peak_source}). Times: median [min-max].\n\n"
    return head + markdown(header, body) + "\n"


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small,medium", help="comma-separated: small, medium")
    ap.add_argument("--only", default="matmul,sft,rm,gen,ppo", help="comma-separated: matmul, sft, rm, gen, ppo")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ppo-repeats", type=int, default=3, help="PPO iterations are long: fewer repeats (both sides)")
    ap.add_argument("--ppo-warmup", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--peer-python",
        default=default_python("/tmp/peer/bin/python", "/tmp/peer-ppo/bin/python"),
        help="python with torch 2.13 + trl (SFT, RM, generation, matmul)",
    )
    ap.add_argument(
        "--peer-ppo-python",
        default=default_python("/tmp/peer-ppo/bin/python"),
        help="python with torch 2.13 + trl 1.12 (PPO)",
    )
    ap.add_argument("--no-peer", action="store_true", help="measure rlhf_jax only")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=30.0,
        help="before each measurement wait up to this many seconds for other processes to go idle",
    )
    ap.add_argument(
        "--compile-cache",
        default=str(Path.home() / ".cache" / "rlhf_jax_bench_xla"),
        help="XLA persistent compilation cache of the rlhf_jax side ('' = off): a second run compiles less",
    )
    ap.add_argument(
        "--xla-flags",
        default=None,
        help="XLA_FLAGS for the rlhf_jax side (default: the environment's); see benchmarks/xla_flags.py",
    )
    ap.add_argument(
        "--out", default="benchmarks/side_by_side.json", help="JSON output (the table goes next to it as .md)"
    )
    args = ap.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    only = set(args.only.split(","))
    unknown = [s for s in sizes if s not in SIZES] + sorted(only - {"matmul", "sft", "rm", "gen", "ppo"})
    if unknown:
        ap.error(f"unknown size or benchmark: {unknown}")
    t_start = time.perf_counter()
    if args.xla_flags is not None:  # read when jax's CPU backend starts, which is below
        os.environ["XLA_FLAGS"] = args.xla_flags

    import jax

    if args.compile_cache:  # compile time is never part of a timing; caching it only shortens the run
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    result: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "argv": sys.argv if argv is None else argv,
        "env": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "device": jax.devices()[0].device_kind,
            "cpu_count": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        },
        "peer": {},
        "peer_ppo": {},
        "rlhf_jax": {},
    }
    # the peer side first (its own processes), then rlhf_jax: never both at once on a 2-core machine
    peer_only = ",".join(x for x in ("matmul", "sft", "rm", "gen") if x in only)
    if not args.no_peer and peer_only and args.peer_python:
        result["peer"] = run_peer(
            args.peer_python,
            sizes=",".join(sizes),
            only=peer_only,
            repeats=args.repeats,
            warmup=args.warmup,
            wait_quiet_s=args.wait_quiet,
        )
    if not args.no_peer and "ppo" in only and args.peer_ppo_python:
        result["peer_ppo"] = run_peer(
            args.peer_ppo_python,
            sizes=",".join(sizes),
            only="ppo",
            repeats=args.ppo_repeats,
            warmup=args.ppo_warmup,
            wait_quiet_s=args.wait_quiet,
        )
    if "matmul" in only:
        result["rlhf_jax"]["matmul"] = jax_matmul(args.wait_quiet)
    for size in sizes:
        result["rlhf_jax"][size] = jax_side(
            size,
            only,
            warmup=args.warmup,
            repeats=args.repeats,
            ppo_warmup=args.ppo_warmup,
            ppo_repeats=args.ppo_repeats,
            wait_quiet_s=args.wait_quiet,
        )

    peaks = {
        "jax": _get(result["rlhf_jax"], "matmul", "flops_best"),
        "torch": (_get(result["peer"], "results", "matmul_fp32", "gflops_best") or 0) * 1e9 or None,
    }
    best = max((v, k) for k, v in peaks.items() if v) if any(peaks.values()) else (None, None)
    peak, peak_source = best[0], f"best 2048^3 fp32 matmul of this run ({best[1]})"
    if peak is None:  # matmul not measured: measure it now, quietly
        from rlhf_jax.mfu import measure_matmul_peak

        peak, peak_source = measure_matmul_peak()["flops_best"], "2048^3 fp32 matmul (jax), measured at the end"
    result["peak_flops"], result["peak_source"], result["matmul_peaks"] = peak, peak_source, peaks
    rows = []
    for size in sizes:
        rows += build_rows(size, result["rlhf_jax"][size], result["peer"], result["peer_ppo"], peak)
    result["rows"] = rows
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    table = render(rows, peak, peak_source)
    for name, side in (("peer", result["peer"]), ("peer_ppo", result["peer_ppo"])):
        if "error" in side:
            table += f"\n{name} failed: {side['error'][:500]}\n"
    print()
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    out.with_suffix(".md").write_text(table)
    print(f"wrote {out} and {out.with_suffix('.md')} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
