"""``rlhf-jax sft``: supervised fine-tuning (or ``mode="pretrain"`` on plain text), with an
optional pretraining mix and checkpoint selection by reward-model score (InstructGPT)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax import checkpoint, data, sft, sharding, train_loop
from rlhf_jax.config import SFTConfig
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
from rlhf_jax.drivers.scoring import make_sample_scorer
from rlhf_jax.models import CausalLM, lora
from rlhf_jax.optim import TrainState, make_optimizer
from rlhf_jax.shared_jit import shared_jit

LM_INPUTS = ("input_ids", "attention_mask", "loss_mask")
LM_BUCKETS = ((LM_INPUTS, "attention_mask", False),)  # right-padded rows
LM_PACK = (LM_INPUTS, "attention_mask", "loss_mask")  # data.pack_batch's (keys, mask, target mask)


def mixed_batches(main: Any, ptx: Any | None) -> Callable[[], dict]:
    """Each batch: the main iterator's rows, then the pretraining iterator's rows (loss on all)."""

    def next_batch() -> dict:
        batch = next(main)
        if ptx is None:
            return batch
        extra = next(ptx)
        return {k: np.concatenate([batch[k], extra[k]]) for k in LM_INPUTS}

    return next_batch


def run_sft(cfg: SFTConfig) -> Path:
    """Train an SFT (or pretraining) run; returns the run directory."""
    run = cfg.run
    out = Path(cfg.out)
    model, params, tokenizer = load_stage_model(cfg.init, "lm", run, dropout=cfg.dropout, which="latest")

    if cfg.mode == "pretrain":
        kind = "text"
        tokenize = lambda recs: data.tokenize_text(recs, tokenizer, seq_len=cfg.seq_len, pack=cfg.pack)  # noqa: E731
    else:
        kind = "demonstrations"
        tokenize = lambda recs: data.tokenize_demonstrations(  # noqa: E731
            recs, tokenizer, seq_len=cfg.seq_len, prompt_loss=cfg.prompt_loss
        )
    train, val, _, parts = data.load_split_tokenize(cfg.data, kind, run, tokenize)
    main_rows = cfg.batch_size - cfg.ptx_rows
    train_it = data.BatchIterator(
        train.arrays,
        batch_size=min(main_rows, len(train)),
        seed=run.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    iterators = {"train": train_it}
    ptx_it = None
    if cfg.ptx_data is not None:
        ptx, _, _, _ = data.load_split_tokenize(
            cfg.ptx_data, "text", run, lambda r: data.tokenize_text(r, tokenizer, seq_len=cfg.seq_len), split=False
        )
        ptx_it = data.BatchIterator(ptx.arrays, batch_size=cfg.ptx_rows, seed=run.seed + 1)
        iterators["ptx"] = ptx_it
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * train_it.steps_per_epoch))

    mesh = sharding.make_mesh(run.mesh)
    optimizer = make_optimizer(cfg.optim, total)
    model = with_lora(model, cfg.lora)
    params, frozen = split_for_training(model, params, mesh, run.seed)  # LoRA: (adapters, (base,))
    base = frozen[0] if frozen else None
    state, shardings = sharded_train_state(model, params, optimizer, run.seed, mesh)

    eval_fn = None
    best_metric, best_mode = None, "min"
    if val is not None:
        eval_step = shared_jit(sft.make_eval_step(model))
        scorer = None
        if cfg.select_by_reward is not None and cfg.mode == "sft":
            prompts = data.tokenize_prompts(parts[1][: cfg.select_prompts], tokenizer, max_prompt_len=cfg.seq_len // 2)
            scorer = make_sample_scorer(
                cfg.select_by_reward, model, tokenizer, prompts, max_new_tokens=cfg.seq_len // 2
            )
            best_metric, best_mode = "val/rm_score", "max"
        else:
            best_metric = "val/loss"

        def eval_fn(st: TrainState) -> dict:
            metrics, _ = weighted_eval(
                eval_step,
                lora.with_base(base, st.params),
                val,
                batch_size=cfg.batch_size,
                max_batches=run.eval_batches,
                mesh=mesh,
                weight="num_tokens",
                buckets=LM_BUCKETS if run.pad_to != "max" else (),
                names={"loss": "val/loss", "accuracy": "val/accuracy"},
            )
            if scorer is not None:
                metrics["val/rm_score"] = scorer(lora.with_base(base, st.params))
            return metrics

    checkpoint.write_model_info(
        out,
        CausalLM(model.config.replace(dropout=0.0, remat="none", lora=None)),
        tokenizer,
        extra=lora_record(cfg.lora, cfg.init, "lm", "latest"),
    )
    stage = train_loop.Stage(
        name=cfg.mode,
        state=state,
        state_shardings=shardings,
        train_step=sft.make_train_step(model, optimizer),
        next_batch=shaped(
            run,
            model_inputs_only(mixed_batches(train_it, ptx_it), LM_INPUTS),
            *LM_BUCKETS,
            pack=LM_PACK,
            row_multiple=batch_shards_per_host(mesh),
        ),
        iterators=iterators,
        total_steps=total,
        frozen=frozen,
        evaluate=eval_fn,
        best_metric=best_metric,
        best_mode=best_mode,
        tokens_per_batch=cfg.batch_size * cfg.seq_len,
        memory_flags="--batch-size, --seq-len, --run.remat, --run.dtype bfloat16",
    )
    train_loop.run(stage, run, mesh, out, config_json=dataclasses.asdict(cfg))
    return out
