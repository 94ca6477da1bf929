"""PPO iteration memory and time: full fine-tuning vs LoRA (issue 14), on a real model directory.

    python benchmarks/lora_memory.py                                  # /tmp/smollm2 (SmolLM2-135M-Instruct)
    python benchmarks/lora_memory.py --model-dir DIR --rank 16 --repeats 3
    python benchmarks/lora_memory.py --preset tiny --repeats 1        # a random tiny model: checks the script

Each configuration runs in its own process (so the process's peak RSS, ``ru_maxrss``, is that
configuration's alone), builds the networks the way ``drivers/ppo.py`` does, and times
``ppo.make_iteration`` jitted with the driver's shardings and donation:

* ``full``: policy and value network fully trained; the reference policy and the reward model are
  separate frozen copies (four models' weights, two optimizer states).
* ``lora``: policy = adapters on the frozen SFT weights, which are also the reference (one copy);
  value network = adapters + score head on the reward model's weights (one copy); AdamW state for
  the adapters and heads only.

Workload (``rlhf_jax.bench.ppo_config``): 16 episodes of random 32-token prompts + 24 new tokens,
1 epoch of 2 minibatches, fp32 on CPU; the reward model is the model's trunk with a fresh scalar
head. Prints a markdown table: peak RSS, RSS after loading, compile time, median iteration time.
Run it on a quiet machine; nothing here is downloaded.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

EPISODES, MINIBATCH, PROMPT, NEW = 16, 8, 32, 24


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


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
    from rlhf_jax.models import lora
    from rlhf_jax.models.params import init_params
    from rlhf_jax.optim import make_optimizer
    from rlhf_jax.ppo import init_ppo_state, make_iteration, reference_model

    t0 = time.perf_counter()
    policy, ref_params, rm_model, rm_params = _load(a)
    lora_cfg = LoRAConfig(rank=a.rank if a.config == "lora" else 0, alpha=2.0 * a.rank)
    policy, value = with_lora(policy, lora_cfg), with_lora(rm_model, lora_cfg)
    if lora_cfg.enabled:  # as drivers/ppo.py: adapters on the shared bases
        policy_params = lora.trainable_init(policy, ref_params, 0)
        value_params = lora.trainable_init(value, rm_params, 1)
    else:  # as drivers/ppo.py: own copies of the policy and value weights
        policy_params, value_params = jax.tree.map(jnp.copy, ref_params), jax.tree.map(jnp.copy, rm_params)
    load_s, loaded = time.perf_counter() - t0, rss_mb()

    spec = bench.ppo_config(batch=EPISODES, minibatch=MINIBATCH, prompt_len=PROMPT, new_tokens=NEW, ptx=False)
    hp = spec.hparams
    mesh = sharding.make_mesh(MeshConfig())
    opt = make_optimizer(spec.optim, 10_000)

    def init(pv):
        return init_ppo_state(pv[0], pv[1], opt, opt, kl_coef=hp.kl_coef, seed=0)

    state, state_sh = sharding.shard_state(
        init, lambda: init((boxed_trainable(policy), boxed_trainable(value))), (policy_params, value_params), mesh
    )
    ref_sh = sharding.param_shardings(lambda: init_params(reference_model(policy), boxed=True), mesh)
    rm_sh = sharding.param_shardings(lambda: init_params(rm_model, boxed=True), mesh)
    ref, rm = jax.device_put(ref_params, ref_sh), jax.device_put(rm_params, rm_sh)
    del policy_params, value_params, ref_params, rm_params
    rng = np.random.default_rng(0)
    vocab = policy.config.vocab_size
    host = {
        "prompt_ids": rng.integers(3, vocab - 1, (EPISODES, PROMPT)).astype(np.int32),
        "prompt_mask": np.ones((EPISODES, PROMPT), np.int32),
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
        c0 = time.perf_counter()
        compiled = iteration.lower(state, batch, ref, rm).compile()
        compile_s = time.perf_counter() - c0
        for i in range(a.warmup + a.repeats):
            t = time.perf_counter()
            state, metrics = compiled(state, batch, ref, rm)
            jax.block_until_ready((state, metrics))
            if i >= a.warmup:
                times.append(time.perf_counter() - t)
    return {
        "config": a.config if a.config == "full" else f"lora r={a.rank}",
        "trainable_params": int(trainable),
        "peak_rss_mb": peak_rss_mb(),
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
    p.add_argument("--configs", default="full,lora")
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)  # the child's one configuration
    a = p.parse_args(argv)
    if a.config is not None:
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return []
    rows = []
    for config in a.configs.split(","):
        cmd = [sys.executable, __file__, "--config", config, "--rank", str(a.rank)]
        cmd += ["--warmup", str(a.warmup), "--repeats", str(a.repeats), "--model-dir", a.model_dir]
        cmd += ["--preset", a.preset] if a.preset else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.exit(f"{config} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len("RESULT ") :]))
    source = f"preset {a.preset} (random weights)" if a.preset else a.model_dir
    print(f"\nPPO iteration, {source}: {EPISODES} episodes, prompt {PROMPT} + {NEW} new tokens, fp32\n")
    print("| config | trainable params | peak RSS (MB) | RSS after load (MB) | compile (s) | iteration (s, median) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['trainable_params']:,} | {r['peak_rss_mb']:.0f} | {r['rss_after_load_mb']:.0f} "
            f"| {r['compile_s']:.1f} | {r['iter_s_median']:.3f} |"
        )
    if len(rows) == 2:
        print(f"\nLoRA peak RSS / full: {rows[1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f}")
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
