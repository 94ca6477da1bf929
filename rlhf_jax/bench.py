"""``rlhf-jax bench``: step time, tokens/s, peak memory and MFU of the SFT, RM and PPO steps,
per model size and per device-mesh shape.

Every model is built from its config with random weights (nothing is downloaded); every
batch is random token ids of full length. This module holds the command: the model
presets, the mesh shapes, :class:`BenchArgs` and :func:`run_bench`, which measures every
(preset, mesh, stage). The timed steps themselves (jitted as ``train_loop`` jits them,
medians over ``repeats`` calls after ``warmup`` calls): :mod:`rlhf_jax.bench_measure`;
model FLOPs and peaks: :mod:`rlhf_jax.mfu`; tables and plots: :mod:`rlhf_jax.bench_report`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import jax

from rlhf_jax import sharding
from rlhf_jax.bench_measure import (
    PPOBenchSpec,
    measure_ppo,
    measure_rm,
    measure_sft,
    peak_memory_bytes,
    ppo_config,
    random_params,
    ranking_batch,
    time_calls,
)
from rlhf_jax.bench_report import format_row, write_outputs
from rlhf_jax.config import DType, MeshConfig, ModelConfig, OptimConfig, Remat
from rlhf_jax.mfu import peak_flops

_GPT2 = dict(family="gpt2", qkv_bias=True, out_bias=True, mlp_bias=True, tie_word_embeddings=True)
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        **_GPT2, vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=256
    ),
    # the peer baseline's two CPU models (../shared/bench/trl_baseline.py)
    "small": ModelConfig(
        **_GPT2, vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, max_position_embeddings=256
    ),
    "medium": ModelConfig(
        **_GPT2, vocab_size=8192, hidden_size=512, num_layers=6, num_heads=8, max_position_embeddings=256
    ),
    # real sizes; GPT-2's vocabulary 50257 padded to 50304 (a multiple of 128, as nanoGPT does) so it shards evenly
    "gpt2-124m": ModelConfig(
        **_GPT2, vocab_size=50304, hidden_size=768, num_layers=12, num_heads=12, max_position_embeddings=1024
    ),
    "gpt2-355m": ModelConfig(
        **_GPT2, vocab_size=50304, hidden_size=1024, num_layers=24, num_heads=16, max_position_embeddings=1024
    ),
    # GPT-3 Small's shape (the GPT-3 paper): GPT-2's decoder with alternating dense and locally banded layers
    "gpt3-125m": ModelConfig(
        **_GPT2,
        vocab_size=50304,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        max_position_embeddings=2048,
        layer_types=("full_attention", "sliding_attention"),
        sliding_window=256,
    ),
    # TinyLlama-1.1B's shape: 22 layers, d 2048, GQA 32 query / 4 KV heads, SwiGLU 5632
    "1b": ModelConfig(
        family="llama",
        vocab_size=32000,
        hidden_size=2048,
        num_layers=22,
        num_heads=32,
        num_kv_heads=4,
        intermediate_size=5632,
        activation="silu",
        max_position_embeddings=2048,
    ),
}

# Mesh shapes (data, fsdp, tensor) tried by --check-meshes, kept where they fit the device count.
CHECK_MESHES: tuple[tuple[int, int, int], ...] = (
    (8, 1, 1),
    (1, 8, 1),
    (2, 2, 2),
    (1, 4, 2),
    (2, 4, 1),
    (4, 1, 2),
    (4, 2, 1),
    (2, 1, 1),
    (1, 2, 1),
    (1, 1, 2),
    (4, 1, 1),
    (1, 4, 1),
    (2, 2, 1),
    (1, 2, 2),
    (1, 1, 1),
)

Stage = Literal["sft", "rm", "ppo"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchArgs:
    """Step time, tokens/s, peak memory and MFU of the SFT, RM and PPO steps per model size and mesh."""

    presets: tuple[str, ...] = ("tiny", "small")  # from: tiny, small, medium, gpt2-124m, gpt2-355m, 1b
    meshes: tuple[str, ...] = ("1,-1,1",)  # data,fsdp,tensor; -1 = all remaining devices
    check_meshes: bool = False  # run one step of every stage on every mesh in CHECK_MESHES that fits
    stages: tuple[Stage, ...] = ("sft", "rm", "ppo")
    out: str = "bench_out"  # directory for results.json, results.md, results.png
    dtype: DType = "float32"  # compute dtype ("bfloat16" on accelerators); parameters and losses stay float32
    remat: Remat = "dots"  # what each block keeps for the backward pass (RunConfig.remat's default)
    batch_size: int = 8  # SFT rows; RM prompts = batch_size // 2 (K responses each); PPO episodes = 2 x batch_size
    seq_len: int = 128  # SFT and RM sequence length; PPO prompt and response = seq_len // 2 each
    rm_k: int = 4  # responses ranked per prompt (C(K,2) comparisons from K forward passes)
    ppo_ptx: bool = True  # PPO-ptx: + a pretraining minibatch per PPO minibatch
    ppo_split: bool = False  # also time rollout and update separately (two more compiles)
    warmup: int = 2
    repeats: int = 5
    peak_tflops: float | None = None  # override the looked-up / measured peak (whole mesh)


# ----------------------------------------------------------------------------- the command
def parse_mesh(text: str) -> MeshConfig:
    """Parse "data,fsdp,tensor" (one of them may be -1) into a MeshConfig."""
    parts = [int(x) for x in text.replace("x", ",").split(",")]
    if len(parts) != 3:
        raise ValueError(f"a mesh is data,fsdp,tensor (e.g. 2,2,2 or 1,-1,1), got {text!r}")
    return MeshConfig(data=parts[0], fsdp=parts[1], tensor=parts[2])


def meshes_that_fit(num_devices: int, model_cfg: ModelConfig, batch_rows: int) -> list[tuple[int, int, int]]:
    """The CHECK_MESHES shapes for ``num_devices`` whose axes divide the heads and the batch."""
    out = []
    for d, f, t in CHECK_MESHES:
        if d * f * t != num_devices or model_cfg.num_heads % t or model_cfg.kv_heads % t or batch_rows % (d * f):
            continue
        out.append((d, f, t))
    return out


def run_bench(args: BenchArgs) -> dict:
    """Measure every (preset, mesh, stage); write results.json, results.md and results.png to ``args.out``."""
    unknown = [p for p in args.presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; choose from {sorted(PRESETS)}")
    devices = jax.devices()
    peak, peak_source = peak_flops(devices, args.peak_tflops)
    optim = OptimConfig(learning_rate=1e-4, schedule="constant", max_grad_norm=1.0, weight_decay=0.01)
    half = args.seq_len // 2
    rows = []
    for preset in args.presets:
        model_cfg = PRESETS[preset].replace(dtype=args.dtype, remat=args.remat)
        if args.seq_len > model_cfg.max_position_embeddings:
            raise ValueError(f"--seq-len {args.seq_len} > {preset}'s {model_cfg.max_position_embeddings} positions")
        # --check-meshes: 2 rows per device, so that every mesh's batch axes divide the RM's B / 2 prompts
        batch_size = 2 * len(devices) if args.check_meshes else args.batch_size
        shapes = (
            meshes_that_fit(len(devices), model_cfg, batch_size // 2)
            if args.check_meshes
            else [parse_mesh(m).shape(len(devices)) for m in args.meshes]
        )
        for shape in shapes:
            if (batch_size // 2) % (shape[0] * shape[1]):
                raise ValueError(
                    f"mesh {shape}: data x fsdp = {shape[0] * shape[1]} must divide the RM's "
                    f"{batch_size // 2} prompts (--batch-size / 2)"
                )
            mesh = sharding.make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]), devices)
            row: dict[str, Any] = dict(preset=preset, mesh=list(shape), params=model_cfg.num_params())
            warmup, repeats = (1, 1) if args.check_meshes else (args.warmup, args.repeats)
            if "sft" in args.stages:
                row["sft"] = measure_sft(
                    model_cfg,
                    mesh,
                    batch_size=batch_size,
                    seq_len=args.seq_len,
                    optim=optim,
                    warmup=warmup,
                    repeats=repeats,
                )
            if "rm" in args.stages:
                row["rm"] = measure_rm(
                    model_cfg,
                    mesh,
                    prompts=max(batch_size // 2, 1),
                    k=args.rm_k,
                    seq_len=args.seq_len,
                    optim=optim,
                    warmup=warmup,
                    repeats=repeats,
                )
            if "ppo" in args.stages:
                cfg = ppo_config(
                    batch=2 * batch_size, minibatch=batch_size, prompt_len=half, new_tokens=half, ptx=args.ppo_ptx
                )
                row["ppo"] = measure_ppo(
                    model_cfg, mesh, cfg, prompt_len=half, warmup=warmup, repeats=repeats, split=args.ppo_split
                )
            for stage in ("sft", "rm", "ppo"):
                if stage in row:
                    r = row[stage]
                    seconds = r["iter_s" if stage == "ppo" else "step_s"]["median"]
                    total = r["flops"]["total"] if stage == "ppo" else r["flops"]
                    r["flops_per_s"] = total / seconds
                    r["mfu"] = r["flops_per_s"] / peak
            row["peak_memory_bytes"], row["memory_source"] = peak_memory_bytes(list(mesh.devices.flat))
            rows.append(row)
            print(format_row(row), flush=True)
    result = dict(
        device=devices[0].device_kind,
        platform=devices[0].platform,
        num_devices=len(devices),
        process_count=jax.process_count(),
        peak_flops=peak,
        peak_source=peak_source,
        dtype=args.dtype,
        remat=args.remat,
        check_meshes=args.check_meshes,
        args=dataclasses.asdict(args),
        rows=rows,
    )
    write_outputs(result, Path(args.out))
    return result


# The timing harness's names stay importable from here (``bench.measure_ppo``, ``bench.ppo_config``, ...).
__all__ = [
    "CHECK_MESHES",
    "PRESETS",
    "BenchArgs",
    "PPOBenchSpec",
    "measure_ppo",
    "measure_rm",
    "measure_sft",
    "meshes_that_fit",
    "parse_mesh",
    "peak_memory_bytes",
    "ppo_config",
    "random_params",
    "ranking_batch",
    "run_bench",
    "time_calls",
]
