"""The timing harness of ``rlhf-jax bench``: one SFT, RM or PPO step of a random-weight model
on random full-length batches, jitted as ``train_loop`` jits it, timed and counted.

Every step is the library's own pure step (``sft.make_train_step``,
``reward.make_train_step``, ``ppo.make_iteration``) with in/out shardings from the model's
logical axes and the state donated. Timings are medians over ``repeats`` calls after
``warmup`` calls (the first call compiles; its time is reported as ``first_call_s``).
Each ``measure_*`` returns a dict of timings, throughputs and model FLOPs
(:mod:`rlhf_jax.mfu`); :mod:`rlhf_jax.bench` runs them per preset and mesh.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from rlhf_jax import reward, sft, sharding
from rlhf_jax.config import ModelConfig, OptimConfig, PPOHyperparams
from rlhf_jax.drivers.common import sharded_train_state
from rlhf_jax.mfu import ppo_flops, stats, train_flops
from rlhf_jax.models import CausalLM
from rlhf_jax.models.params import init_params
from rlhf_jax.optim import make_optimizer
from rlhf_jax.ppo import init_ppo_state, make_iteration, make_rollout, make_update

__all__ = [
    "PPOBenchSpec",
    "measure_ppo",
    "measure_rm",
    "measure_sft",
    "peak_memory_bytes",
    "ppo_config",
    "random_params",
    "ranking_batch",
    "time_calls",
]


# ----------------------------------------------------------------------------- memory
def peak_memory_bytes(devices: list) -> tuple[int, str]:
    """Peak device memory over ``devices`` (allocator stats) or the process's peak host RSS."""
    peaks = []
    for d in devices:
        try:
            ms = d.memory_stats()
        except Exception:  # noqa: BLE001 - backends without allocator stats
            ms = None
        if ms and "peak_bytes_in_use" in ms:
            peaks.append(int(ms["peak_bytes_in_use"]))
    if peaks:
        return max(peaks), "device peak_bytes_in_use (max over devices)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host peak RSS of the process"


# ----------------------------------------------------------------------------- measurement
def time_calls(call: Callable[[], Any], *, warmup: int, repeats: int) -> tuple[dict, float]:
    """(stats of ``repeats`` timed calls after ``warmup`` calls, time of the first call)."""
    first = None
    for _ in range(warmup):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        first = first if first is not None else time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    return stats(times), times[0] if first is None else first


random_params = init_params  # unboxed random parameters of a CausalLM (float32 master weights)


def _sharded_step(model_cfg: ModelConfig, head: str, mesh: Any, optim: OptimConfig, make_step: Callable, batch: dict):
    """(jitted step, state placement thunk, batch) for a TrainState stage (SFT, RM)."""
    model = CausalLM(model_cfg, head=head)
    optimizer = make_optimizer(optim, 10_000)
    state, shardings = sharded_train_state(model, random_params(model), optimizer, 0, mesh)
    batch_sh = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
    step = jax.jit(
        make_step(model, optimizer),
        in_shardings=(shardings, batch_sh),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    return step, state, sharding.shard_batch(batch, mesh)


def _run_state_step(step: Callable, state: Any, batch: Any, mesh: Any, *, warmup: int, repeats: int):
    holder = [state]

    def call():
        holder[0], metrics = step(holder[0], batch)
        return holder[0], metrics

    with sharding.use_mesh(mesh):
        timing, first = time_calls(call, warmup=warmup, repeats=repeats)
        metrics = jax.device_get(call()[1])
    return timing, first, metrics


def measure_sft(
    model_cfg: ModelConfig,
    mesh: Any,
    *,
    batch_size: int,
    seq_len: int,
    optim: OptimConfig,
    warmup: int,
    repeats: int,
    seed: int = 0,
) -> dict:
    """One SFT step (causal LM loss on every token of ``batch_size x seq_len``)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, model_cfg.vocab_size, (batch_size, seq_len)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones(ids.shape, np.float32)}
    step, state, dev_batch = _sharded_step(model_cfg, "lm", mesh, optim, sft.make_train_step, batch)
    timing, first, metrics = _run_state_step(step, state, dev_batch, mesh, warmup=warmup, repeats=repeats)
    flops = train_flops(model_cfg, sequences=batch_size, seq_len=seq_len)
    return dict(
        step_s=timing,
        first_call_s=first,
        tokens_per_s=batch_size * seq_len / timing["median"],
        flops=flops,
        loss=float(metrics["loss"]),
        batch=batch_size,
        seq=seq_len,
    )


def ranking_batch(rng: np.random.Generator, *, prompts: int, k: int, seq_len: int, vocab: int) -> dict:
    """Random full-length ranked groups: [B, K, L] ids, distinct ranks (C(K,2) comparisons each)."""
    ids = rng.integers(3, vocab, (prompts, k, seq_len)).astype(np.int32)
    ranks = np.stack([rng.permutation(k) for _ in range(prompts)]).astype(np.int32)  # [B, K]
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "ranks": ranks,
        "valid": np.ones((prompts, k), bool),
        "end_index": np.full((prompts, k), seq_len - 1, np.int32),
    }


def measure_rm(
    model_cfg: ModelConfig,
    mesh: Any,
    *,
    prompts: int,
    k: int,
    seq_len: int,
    optim: OptimConfig,
    warmup: int,
    repeats: int,
    seed: int = 0,
) -> dict:
    """One reward-model step on ``prompts`` groups of ``k`` ranked responses (InstructGPT eq. 1)."""
    batch = ranking_batch(
        np.random.default_rng(seed), prompts=prompts, k=k, seq_len=seq_len, vocab=model_cfg.vocab_size
    )
    step, state, dev_batch = _sharded_step(model_cfg, "scalar", mesh, optim, reward.make_train_step, batch)
    timing, first, metrics = _run_state_step(step, state, dev_batch, mesh, warmup=warmup, repeats=repeats)
    comparisons = prompts * k * (k - 1) // 2
    med = timing["median"]
    return dict(
        step_s=timing,
        first_call_s=first,
        prompts=prompts,
        k=k,
        seq=seq_len,
        comparisons=comparisons,
        comparisons_per_s=comparisons / med,
        sequences_per_s=prompts * k / med,
        tokens_per_s=prompts * k * seq_len / med,
        pair_accuracy=float(metrics["accuracy"]),
        flops=train_flops(model_cfg, sequences=prompts * k, seq_len=seq_len, lm_head=False),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOBenchSpec:
    """One measured PPO setting: the algorithm, its optimizer, and the ptx rows' length (None: plain PPO)."""

    hparams: PPOHyperparams
    optim: OptimConfig
    ptx_seq_len: int | None = None


def ppo_placement(
    policy: CausalLM, scalar: CausalLM, spec: PPOBenchSpec, params: tuple, mesh: Any, *, seed: int
) -> dict:
    """The sharded PPO state and frozen trees of a benchmark, as ``drivers/ppo.py`` places them.

    ``params``: (policy, value, reward-model) param trees on the host; the reference is a copy of
    the policy's. Returns ``state``, ``ref``, ``rm`` on the devices, their shardings (``*_sh``)
    and the two optimizers (AdamW over a long schedule: benchmarks take few steps).
    """
    policy_params, value_params, rm_params = params
    steps = spec.hparams.updates_per_iteration
    policy_opt, value_opt = make_optimizer(spec.optim, 10_000 * steps), make_optimizer(spec.optim, 10_000 * steps)

    def init(pv):
        return init_ppo_state(pv[0], pv[1], policy_opt, value_opt, kl_coef=spec.hparams.kl_coef, seed=seed)

    def boxed():
        return init((init_params(policy, boxed=True), init_params(scalar, boxed=True)))

    state, state_sh = sharding.shard_state(init, boxed, (policy_params, value_params), mesh)
    ref_sh = sharding.param_shardings(lambda: init_params(policy, boxed=True), mesh)
    rm_sh = sharding.param_shardings(lambda: init_params(scalar, boxed=True), mesh)
    ref = jax.device_put(jax.tree.map(lambda x: np.array(x, copy=True), policy_params), ref_sh)
    rm = jax.device_put(rm_params, rm_sh)
    return dict(state=state, state_sh=state_sh, ref=ref, ref_sh=ref_sh, rm=rm, rm_sh=rm_sh,
                policy_opt=policy_opt, value_opt=value_opt)  # fmt: skip


def measure_ppo(
    model_cfg: ModelConfig,
    mesh: Any,
    spec: PPOBenchSpec,
    *,
    prompt_len: int,
    warmup: int,
    repeats: int,
    split: bool = True,
    seed: int = 0,
) -> dict:
    """One PPO(-ptx) iteration (rollout + update), and with ``split`` the rollout and the update timed apart.

    Policy, separate value network, frozen reference and reward model all of ``model_cfg``'s
    shape; prompts are full ``prompt_len`` rows; EOS is the last vocabulary id (rarely sampled,
    so responses run to ``max_new_tokens``, the same work as a fixed-length peer).
    """
    ppo = spec.hparams
    policy, scalar = CausalLM(model_cfg), CausalLM(model_cfg, head="scalar")
    policy_params, value_params, rm_params = random_params(policy), random_params(scalar), random_params(scalar)
    p = ppo_placement(policy, scalar, spec, (policy_params, value_params, rm_params), mesh, seed=seed)
    state, state_sh, ref, ref_sh, rm, rm_sh = p["state"], p["state_sh"], p["ref"], p["ref_sh"], p["rm"], p["rm_sh"]
    policy_opt, value_opt = p["policy_opt"], p["value_opt"]

    rng = np.random.default_rng(seed)
    vocab, b = model_cfg.vocab_size, ppo.batch_size
    host = {
        "prompt_ids": rng.integers(3, vocab - 1, (b, prompt_len)).astype(np.int32),
        "prompt_mask": np.ones((b, prompt_len), np.int32),
    }
    if spec.ptx_seq_len is not None:
        rows = ppo.updates_per_iteration * ppo.rows_per_ptx_minibatch
        ids = rng.integers(3, vocab - 1, (rows, spec.ptx_seq_len)).astype(np.int32)
        host |= {
            "ptx_input_ids": ids,
            "ptx_attention_mask": np.ones_like(ids),
            "ptx_loss_mask": np.ones(ids.shape, np.float32),
        }
    batch = sharding.shard_batch(host, mesh)
    batch_sh = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in host.items()}
    eos, pad = vocab - 1, 0
    iteration = jax.jit(
        make_iteration(ppo, policy, scalar, scalar, policy_opt, value_opt, eos_token_id=eos, pad_token_id=pad),
        in_shardings=(state_sh, batch_sh, ref_sh, rm_sh),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    holder = [state]

    def call_iteration():
        holder[0], metrics = iteration(holder[0], batch, ref, rm)
        return holder[0], metrics

    flops = ppo_flops(model_cfg, ppo, prompt_len=prompt_len, ptx_seq_len=spec.ptx_seq_len)
    out: dict[str, Any] = dict(
        episodes=b, prompt=prompt_len, new=ppo.max_new_tokens, ptx=spec.ptx_seq_len is not None, flops=flops
    )
    with sharding.use_mesh(mesh):
        timing, first = time_calls(call_iteration, warmup=warmup, repeats=repeats)
        out |= dict(
            iter_s=timing,
            first_call_s=first,
            episodes_per_s=b / timing["median"],
            tokens_per_s=b * (prompt_len + ppo.max_new_tokens) / timing["median"],
        )
        if split:  # the two halves jitted apart, the update donating a fresh copy of the state (as the iteration does)
            rollout = jax.jit(make_rollout(ppo, policy, scalar, scalar, eos_token_id=eos, pad_token_id=pad))
            update = jax.jit(make_update(ppo, policy, scalar, policy_opt, value_opt), donate_argnums=(0,))
            ptx = {k[4:]: v for k, v in batch.items() if k.startswith("ptx_")} or None
            ro = rollout(holder[0], batch["prompt_ids"], batch["prompt_mask"], ref, rm)
            out["rollout_s"], _ = time_calls(
                lambda: rollout(holder[0], batch["prompt_ids"], batch["prompt_mask"], ref, rm),
                warmup=warmup,
                repeats=repeats,
            )
            times = []
            for i in range(warmup + repeats):
                fresh = jax.block_until_ready(jax.tree.map(lambda x: x.copy(), holder[0]))
                t0 = time.perf_counter()
                jax.block_until_ready(update(fresh, ro, ptx))
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            out["update_s"] = stats(times)
    return out


def ppo_config(
    *, batch: int, minibatch: int, prompt_len: int, new_tokens: int, ptx: bool, ptx_seq_len: int | None = None
) -> PPOBenchSpec:
    """The peer baseline's PPO settings: 1 epoch, T 0.7, beta 0.05, lr 1e-5 constant, no clipping,
    ptx = ``minibatch`` rows of ``prompt_len + new_tokens`` per minibatch with coefficient 27.8."""
    hparams = PPOHyperparams(
        batch_size=batch,
        minibatch_size=minibatch,
        ppo_epochs=1,
        max_new_tokens=new_tokens,
        temperature=0.7,
        kl_coef=0.05,
        ptx_coef=27.8,
        ptx_rows=minibatch,
    )
    return PPOBenchSpec(
        hparams=hparams,
        optim=OptimConfig(learning_rate=1e-5, schedule="constant", max_grad_norm=None),
        ptx_seq_len=(ptx_seq_len or prompt_len + new_tokens) if ptx else None,
    )
