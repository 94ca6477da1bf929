"""``rlhf-jax rm``: the reward model on K-way rankings, then the bias that makes the
labelers' demonstrations score mean 0 (InstructGPT)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax import checkpoint, data, reward, sharding, train_loop
from rlhf_jax.config import RewardConfig
from rlhf_jax.drivers.common import (
    batch_shards_per_host,
    load_stage_model,
    lora_record,
    model_inputs_only,
    shaped,
    sharded_train_state,
    split_for_training,
    weighted_eval,
    with_lora,
)
from rlhf_jax.models import lora
from rlhf_jax.optim import TrainState, make_optimizer
from rlhf_jax.shared_jit import shared_jit

log = logging.getLogger(__name__)

RANKING_INPUTS = ("input_ids", "attention_mask", "ranks", "valid", "end_index")
RANKING_BUCKETS = ((("input_ids", "attention_mask"), "attention_mask", False),)  # [B, K, L] right-padded


def run_rm(cfg: RewardConfig) -> Path:
    """Train a reward model run; returns the run directory."""
    run = cfg.run
    out = Path(cfg.out)
    model, params, tokenizer = load_stage_model(cfg.init, "scalar", run)
    tokenize = lambda recs: data.tokenize_rankings(  # noqa: E731
        recs, tokenizer, max_prompt_len=cfg.max_prompt_len, max_response_len=cfg.max_response_len, max_k=cfg.max_k
    )
    train, val, _, _ = data.load_split_tokenize(cfg.data, "rankings", run, tokenize)
    if val is not None and val.arrays["input_ids"].shape[1] != train.arrays["input_ids"].shape[1]:
        val = pad_k(val, train.arrays["input_ids"].shape[1])  # the validation split must have the same K slots
    train_it = data.BatchIterator(
        train.arrays,
        batch_size=min(cfg.batch_size, len(train)),
        seed=run.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * train_it.steps_per_epoch))

    mesh = sharding.make_mesh(run.mesh)
    optimizer = make_optimizer(cfg.optim, total)
    model = with_lora(model, cfg.lora)
    params, frozen = split_for_training(model, params, mesh, run.seed)  # LoRA: (adapters + score, (base,))
    base = frozen[0] if frozen else None
    state, shardings = sharded_train_state(model, params, optimizer, run.seed, mesh)
    eval_fn = None
    if val is not None:
        eval_step = shared_jit(reward.make_eval_step(model))

        def eval_fn(st: TrainState) -> dict:
            metrics, pairs = weighted_eval(
                eval_step,
                lora.with_base(base, st.params),
                val,
                batch_size=cfg.batch_size,
                max_batches=run.eval_batches,
                mesh=mesh,
                weight="num_pairs",
                buckets=RANKING_BUCKETS if run.pad_to != "max" else (),
                names={"ranking_loss": "val/loss", "accuracy": "val/accuracy"},
            )
            return metrics | {"val/num_pairs": pairs}

    plain = lora.without_lora(model)
    record = lora_record(cfg.lora, cfg.init, "scalar", "best")
    checkpoint.write_model_info(out, plain, tokenizer, extra=record)
    batches = model_inputs_only(lambda: next(train_it), RANKING_INPUTS)
    stage = train_loop.Stage(
        name="rm",
        state=state,
        state_shardings=shardings,
        train_step=reward.make_train_step(model, optimizer, cfg.hparams),
        next_batch=packed_rankings(batches, mesh) if run.pad_to == "pack" else shaped(run, batches, *RANKING_BUCKETS),
        iterators={"train": train_it},
        total_steps=total,
        frozen=frozen,
        evaluate=eval_fn,
        best_metric="val/accuracy" if eval_fn else None,
        best_mode="max",
        memory_flags="--batch-size (prompts, each with its K responses), --max-k, --max-prompt-len, "
        "--max-response-len, --run.remat",
        tokens_per_batch=int(np.prod(train.arrays["input_ids"].shape[1:])) * train_it.batch_size,  # (at the cap)
    )
    train_loop.run(stage, run, mesh, out, config_json=dataclasses.asdict(cfg))

    bias = 0.0
    if cfg.demonstrations is not None:
        demos, _ = data.load_records(cfg.demonstrations, "demonstrations", on_error=run.on_error)
        demo_ds = data.tokenize_demonstrations(demos, tokenizer, seq_len=cfg.max_prompt_len + cfg.max_response_len)
        best_model, best_params, _ = checkpoint.load_model(out, head="scalar")
        bias = reward.demonstration_bias(best_model, best_params, demo_ds)
        log.info("reward model: demonstrations scored mean %.4f; bias %.4f stored", -bias, bias)
    checkpoint.write_model_info(out, plain, tokenizer, extra={"reward_bias": bias, **record})
    return out


def packed_rankings(next_batch: Callable[[], dict], mesh: Any) -> Callable[[], dict]:
    """``next_batch`` with its empty response slots dropped and the real responses packed
    several to a row (``data.pack_ranking_slots``, ``--run.pad-to pack``, the default): with
    K = 4..9 a third of the slots are empty, and a short response leaves most of its row
    pad; each row is a forward and backward pass of the RM. The rows are as wide as the
    tokenised cap (``--max-prompt-len`` + ``--max-response-len``): every batch has the same
    L, so the step compiles for few row counts."""
    multiple = batch_shards_per_host(mesh)
    return lambda: data.pack_ranking_slots(next_batch(), row_multiple=multiple, process_index=jax.process_index())


def pad_k(dataset: Any, k: int) -> Any:
    """Pad (never cut) the K axis of a tokenised ranking set to ``k`` invalid slots."""
    arrays = dict(dataset.arrays)
    have = arrays["input_ids"].shape[1]
    if have > k:
        raise ValueError(f"validation rankings have K={have} > training K={k}; set max_k")
    for name in RANKING_INPUTS:
        a = arrays[name]
        fill = {"ranks": -1, "valid": False}.get(name, 0)
        pad = np.full((a.shape[0], k - have, *a.shape[2:]), fill, dtype=a.dtype)
        arrays[name] = np.concatenate([a, pad], axis=1)
    return dataclasses.replace(dataset, arrays=arrays)
