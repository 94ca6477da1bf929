"""PPO iteration memory and time: full fine-tuning vs LoRA vs QLoRA (issue 14).

    python benchmarks/lora_memory.py                                  # /tmp/smollm2 (SmolLM2-135M-Instruct)
    python benchmarks/lora_memory.py --model-dir DIR --rank 16 --repeats 3 --configs full,lora,qlora8,qlora4
    python benchmarks/lora_memory.py --preset 1b --configs lora,qlora8 --ptx --episodes 4 --minibatch 2 \
        --prompt 16 --new 8 --warmup 0 --repeats 1                   # does PPO-ptx on a 1.1B model fit?
    python benchmarks/lora_memory.py --preset tiny --repeats 1        # a random tiny model: checks the script

Each configuration runs in its own process (so the process's peak RSS, ``ru_maxrss``, is that
configuration's alone), builds the networks the way ``drivers/ppo.py`` does, and times
``ppo.make_iteration`` jitted with the driver's shardings and donation:

* ``full``: policy and value network fully trained; the reference policy and the reward model are
  separate frozen copies (four models' weights, two optimizer states).
* ``lora``: policy = adapters on the frozen SFT weights, which are also the reference (one copy);
  value network = adapters + score head on the reward model's weights (one copy); AdamW state for
  the adapters and heads only.
* ``qlora8`` / ``qlora4``: as ``lora`` with the policy's frozen base (= the reference) quantized
  to int8 / NF4 (``LoRAConfig.base_bits``, as ``drivers/ppo.py`` does); the reward model, which is
  also the value network's base, stays float.

Workload (``rlhf_jax.bench.ppo_config``): by default 16 episodes of random 32-token prompts + 24
new tokens, 1 epoch of 2 minibatches (``--ptx``: PPO-ptx, a pretraining minibatch of as many rows
beside each), fp32 on CPU; the reward model is the model's trunk with a fresh scalar head.
Prints a markdown table: peak RSS of the process (loading included), peak RSS from compilation
on (``VmHWM`` reset through ``/proc/self/clear_refs`` after loading), RSS after loading, compile
time, median iteration time. Run it on a quiet machine; nothing here is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {"full": None, "lora": None, "qlora8": 8, "qlora4": 4}  # name -> LoRAConfig.base_bits


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Linux: VmHWM (the peak RSS) restarts from the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def _load(a: argparse.Namespace):
    """(policy model, policy params, reward model, reward params) from --model-dir or a random preset."""
    import jax

    from rlhf_jax import bench, checkpoint
    from rlhf_jax.models import CausalLM
    from rlhf_jax.models.params import init_params

    if a.preset:
        cfg = bench.PRESETS[a.preset]
        policy, scalar = CausalLM(cfg), CausalLM(cfg, head="scalar")
        init = jax.jit(init_params, static_argnums=0)
        return policy, init(policy), scalar, init(scalar, jax.random.key(1))
    policy, policy_params, _ = checkpoint.load_model(a.model_dir, head="lm")
    scalar, rm_params, _ = checkpoint.load_model(a.model_dir, head="scalar")
    return policy, policy_params, scalar, rm_params


def worker(a: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rlhf_jax import bench, sharding
    from rlhf_jax.config import LoRAConfig, MeshConfig
    from rlhf_jax.drivers.common import boxed_trainable, with_lora
    from rlhf_jax.models import lora, quant
    from rlhf_jax.models.params import init_params
    from rlhf_jax.optim import make_optimizer
    from rlhf_jax.ppo import init_ppo_state, make_iteration, reference_model

    t0 = time.perf_counter()
    policy, ref_params, rm_model, rm_params = _load(a)
    rank = 0 if a.config == "full" else a.rank
    lora_cfg = LoRAConfig(rank=rank, alpha=2.0 * a.rank, base_bits=CONFIGS[a.config])
    policy, value = with_lora(policy, lora_cfg), with_lora(rm_model, lora_cfg)
    if lora_cfg.enabled:  # as drivers/ppo.py: adapters on the shared bases
        policy_params = lora.trainable_init(policy, ref_params, 0)
        value_params = lora.trainable_init(value, rm_params, 1)
        ref_params = quant.quantize_base(ref_params, lora_cfg)  # QLoRA: the reference is the quantized base
    else:  # as drivers/ppo.py: own copies of the policy and value weights
        policy_params, value_params = jax.tree.map(jnp.copy, ref_params), jax.tree.map(jnp.copy, rm_params)
    load_s, loaded = time.perf_counter() - t0, rss_mb()

    spec = bench.ppo_config(batch=a.episodes, minibatch=a.minibatch, prompt_len=a.prompt, new_tokens=a.new, ptx=a.ptx)
    hp = spec.hparams
    mesh = sharding.make_mesh(MeshConfig())
    opt = make_optimizer(spec.optim, 10_000)

    def init(pv):
        return init_ppo_state(pv[0], pv[1], opt, opt, kl_coef=hp.kl_coef, seed=0)

    state, state_sh = sharding.shard_state(
        init, lambda: init((boxed_trainable(policy), boxed_trainable(value))), (policy_params, value_params), mesh
    )
    ref_sh = sharding.param_shardings(lambda: init_params(reference_model(policy), boxed=True), mesh)
    ref_sh = quant.quantize_shardings(ref_sh, lora_cfg)
    rm_sh = sharding.param_shardings(lambda: init_params(rm_model, boxed=True), mesh)
    ref, rm = jax.device_put(ref_params, ref_sh), jax.device_put(rm_params, rm_sh)
    del policy_params, value_params, ref_params, rm_params
    rng = np.random.default_rng(0)
    vocab = policy.config.vocab_size
    base_mb = quant.nbytes(ref) / 2**20
    host = {
        "prompt_ids": rng.integers(3, vocab - 1, (a.episodes, a.prompt)).astype(np.int32),
        "prompt_mask": np.ones((a.episodes, a.prompt), np.int32),
    }
    if a.ptx:  # one pretraining minibatch of ptx_rows rows beside each PPO minibatch
        rows, length = hp.updates_per_iteration * hp.rows_per_ptx_minibatch, spec.ptx_seq_len
        host |= {
            "ptx_input_ids": rng.integers(3, vocab - 1, (rows, length)).astype(np.int32),
            "ptx_attention_mask": np.ones((rows, length), np.int32),
            "ptx_loss_mask": np.ones((rows, length), np.int32),
        }
    batch_sh = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in host.items()}
    iteration = jax.jit(
        make_iteration(hp, policy, value, rm_model, opt, opt, eos_token_id=-1, pad_token_id=0),
        in_shardings=(state_sh, batch_sh, ref_sh, rm_sh),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    trainable = sum(x.size for x in jax.tree.leaves((state.policy.params, state.value.params)))
    times = []
    with sharding.use_mesh(mesh):
        batch = sharding.shard_batch(host, mesh)
        reset_peak_rss()
        c0 = time.perf_counter()
        compiled = iteration.lower(state, batch, ref, rm).compile()
        compile_s = time.perf_counter() - c0
        for i in range(a.warmup + a.repeats):
            t = time.perf_counter()
            state, metrics = compiled(state, batch, ref, rm)
            jax.block_until_ready((state, metrics))
            if i >= a.warmup:
                times.append(time.perf_counter() - t)
    names = {"full": "full", "lora": "LoRA", "qlora8": "QLoRA int8", "qlora4": "QLoRA NF4"}
    return {
        "config": names[a.config] + ("" if a.config == "full" else f" r={a.rank}"),
        "trainable_params": int(trainable),
        "policy_base_mb": base_mb,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_run_mb": rss_mb("VmHWM"),
        "rss_after_load_mb": loaded,
        "load_s": load_s,
        "compile_s": compile_s,
        "iter_s_median": float(np.median(times)),
        "iter_s_min": float(np.min(times)),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="/tmp/smollm2", help="an HF (safetensors) or rlhf_jax run directory")
    p.add_argument("--preset", default=None, help="a rlhf_jax.bench preset with random weights instead")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--configs", default="full,lora,qlora8", help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--episodes", type=int, default=16, help="PPO batch size (episodes per iteration)")
    p.add_argument("--minibatch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--new", type=int, default=24, help="new tokens sampled per episode")
    p.add_argument("--ptx", action="store_true", help="PPO-ptx: a pretraining minibatch beside each PPO minibatch")
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)  # the child's one configuration
    a = p.parse_args(argv)
    if a.config is not None:
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return []
    rows, load_before = [], f"{os.getloadavg()[0]:.1f}"
    for config in a.configs.split(","):
        cmd = [sys.executable, __file__, "--config", config, "--rank", str(a.rank)]
        cmd += ["--warmup", str(a.warmup), "--repeats", str(a.repeats), "--model-dir", a.model_dir]
        cmd += ["--episodes", str(a.episodes), "--minibatch", str(a.minibatch), "--prompt", str(a.prompt)]
        cmd += ["--new", str(a.new)] + (["--preset", a.preset] if a.preset else []) + (["--ptx"] if a.ptx else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.exit(f"{config} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len("RESULT ") :]))
        print("RESULT " + json.dumps(rows[-1]), flush=True)
    source = f"preset {a.preset} (random weights)" if a.preset else a.model_dir
    stage = "PPO-ptx" if a.ptx else "PPO"
    print(f"\n{stage} iteration, {source}: {a.episodes} episodes, prompt {a.prompt} + {a.new} new tokens, fp32")
    print(f"(load average before: {load_before}, after: {os.getloadavg()[0]:.1f})\n")
    print(
        "| config | trainable params | policy base (MB) | peak RSS (MB) | peak RSS from compile on (MB) "
        "| RSS after load (MB) | compile (s) | iteration (s, median) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['trainable_params']:,} | {r['policy_base_mb']:.0f} | {r['peak_rss_mb']:.0f} "
            f"| {r['peak_rss_run_mb']:.0f} | {r['rss_after_load_mb']:.0f} | {r['compile_s']:.1f} "
            f"| {r['iter_s_median']:.3f} |"
        )
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
