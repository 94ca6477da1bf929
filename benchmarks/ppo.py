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
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    "small": dict(num_layers=4, hidden_size=256, num_heads=4),
    "medium": dict(num_layers=6, hidden_size=512, num_heads=8),
}


def _stats(xs: list[float]) -> dict:
    return dict(median=statistics.median(xs), min=min(xs), max=max(xs), n=len(xs))


def bench_rlhf_jax(size: str, *, ptx: bool, warmup: int, repeats: int, exact_ratio: bool = True) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from rlhf_jax.config import ModelConfig, OptimConfig, PPOConfig
    from rlhf_jax.models import CausalLM
    from rlhf_jax.optim import make_optimizer
    from rlhf_jax.ppo import init_ppo_state, make_iteration, make_rollout, make_update

    b, p, r, mb = 16, 64, 64, 8
    model_cfg = ModelConfig(family="gpt2", vocab_size=8192, max_position_embeddings=256, qkv_bias=True,
                            out_bias=True, mlp_bias=True, tie_word_embeddings=True, **SIZES[size])  # fmt: skip
    cfg = PPOConfig(prompts="-", policy="-", reward="-", out="-", ptx_data="-" if ptx else None, batch_size=b,
                    minibatch_size=mb, ppo_epochs=1, max_prompt_len=p, max_new_tokens=r, temperature=0.7,
                    kl_coef=0.05, ptx_rows=mb, ptx_seq_len=p + r, exact_ratio=exact_ratio,
                    optim=OptimConfig(learning_rate=1e-5, schedule="constant", max_grad_norm=None))  # fmt: skip
    policy, scalar = CausalLM(model_cfg), CausalLM(model_cfg, head="scalar")
    init = lambda m, s: nn.unbox(m.init(jax.random.key(s), jnp.zeros((1, 2), jnp.int32))["params"])  # noqa: E731
    policy_params, value_params, rm_params = init(policy, 0), init(scalar, 1), init(scalar, 2)
    opt = make_optimizer(cfg.optim, 1000)
    state = init_ppo_state(policy_params, value_params, opt, opt, kl_coef=cfg.kl_coef, seed=0)
    eos, pad = 8191, 0
    iteration = jax.jit(make_iteration(cfg, policy, scalar, scalar, opt, opt, eos_token_id=eos, pad_token_id=pad),
                        donate_argnums=(0,))  # fmt: skip
    rollout = jax.jit(make_rollout(cfg, policy, scalar, scalar, eos_token_id=eos, pad_token_id=pad))
    update = jax.jit(make_update(cfg, policy, scalar, opt, opt))
    rng = np.random.default_rng(0)

    def batch() -> dict:
        out = {"prompt_ids": rng.integers(3, 8190, (b, p)).astype(np.int32), "prompt_mask": np.ones((b, p), np.int32)}
        if ptx:
            ids = rng.integers(3, 8190, (2 * mb, p + r)).astype(np.int32)
            out |= {"ptx_input_ids": ids, "ptx_attention_mask": np.ones_like(ids),
                    "ptx_loss_mask": np.ones(ids.shape, np.float32)}  # fmt: skip
        return out

    ref = jax.tree.map(lambda x: jnp.array(x, copy=True), policy_params)  # never aliased with the donated state
    total, roll, upd = [], [], []
    for i in range(warmup + repeats):
        bt = {k: jnp.asarray(v) for k, v in batch().items()}
        t0 = time.perf_counter()
        state, metrics = iteration(state, bt, ref, rm_params)
        jax.block_until_ready(metrics)
        t1 = time.perf_counter()
        ro = rollout(state, bt["prompt_ids"], bt["prompt_mask"], ref, rm_params)
        jax.block_until_ready(ro)
        t2 = time.perf_counter()
        ptx_b = {k[4:]: v for k, v in bt.items() if k.startswith("ptx_")} or None
        out = update(state, ro, ptx_b)
        jax.block_until_ready(out)
        t3 = time.perf_counter()
        if i >= warmup:
            total.append(t1 - t0)
            roll.append(t2 - t1)
            upd.append(t3 - t2)
    s = _stats(total)
    return dict(impl="rlhf_jax PPO" + ("-ptx" if ptx else "") + ("" if exact_ratio else " (exact_ratio off)"), iter_s=s, rollout_and_scoring_s=_stats(roll),
                update_s=_stats(upd), episodes_per_s=b / s["median"])  # fmt: skip


def run_peer(python: str, size: str, repeats: int) -> dict:
    script = Path(__file__).resolve().parents[1].parent / "shared" / "bench" / "trl_baseline.py"
    if not script.exists():
        raise FileNotFoundError(f"{script} not found (the peer baseline lives in ../shared/bench)")
    cmd = [python, str(script), "--sizes", size, "--only", "ppo", "--repeats", str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": ""})
    return json.loads(out.stdout.strip().splitlines()[-1])


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
        results["peer"] = run_peer(args.peer_python, args.size, args.repeats)

    print(f"{'implementation':<44} {'episodes/s':>10} {'iter s':>8} {'rollout s':>10} {'update s':>9}")
    rows = list(results["rlhf_jax"].values())
    peer_rows = []
    if "peer" in results:
        for size_results in results["peer"].get("results", {}).values():
            peer_rows += [e for e in size_results.values() if isinstance(e, dict) and "episodes_per_s" in e]
    for r in rows + peer_rows:
        ro = r.get("rollout_and_scoring_s", {}).get("median", float("nan"))
        up = r.get("update_s", {}).get("median", float("nan"))
        print(f"{r.get('impl', '?')[:44]:<44} {r['episodes_per_s']:10.2f} {r['iter_s']['median']:8.3f} {ro:10.3f} {up:9.3f}")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
