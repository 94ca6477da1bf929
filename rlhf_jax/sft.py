"""Supervised fine-tuning (and plain LM pretraining): the stage's objective, steps and driver.

InstructGPT trains its SFT models with cross-entropy on the response tokens, 16 epochs,
cosine decay to 10% of the peak learning rate, residual dropout 0.2, and selects the final
checkpoint by reward-model score on validation prompts rather than by validation loss.
The policy PPO starts from is an SFT model trained with 10% pretraining data mixed in
(``ptx_fraction=0.1``).

Batches: ``input_ids`` [B, T], ``attention_mask`` [B, T], ``loss_mask`` [B, T] where
``loss_mask[b, t] = 1`` marks ``input_ids[b, t]`` as a target (predicted from t - 1).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import optax

from rlhf_jax import losses
from rlhf_jax.config import SFTConfig
from rlhf_jax.models import CausalLM
from rlhf_jax.optim import TrainState, gradient_step, inject_fault, logits_finite, make_optimizer

log = logging.getLogger(__name__)


def lm_objective(model: CausalLM, params: Any, batch: dict, *, dropout_key: jax.Array | None = None):
    """Masked next-token cross-entropy: ``mean_{t: loss_mask} -log p(x_t | x_<t)``.

    Returns (loss, metrics) with metrics loss, accuracy, num_tokens and the
    ``finite/logits`` flag (see ``optim.skip_nonfinite``).
    """
    rngs = {"dropout": dropout_key} if dropout_key is not None else None
    t = batch["input_ids"].shape[1]
    out = model.apply(
        {"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"],
        deterministic=dropout_key is None, rngs=rngs, head_slice=(0, t - 1),
    )  # fmt: skip
    logits = inject_fault("logits", out.logits, batch)  # [B, T-1, V]: position t predicts token t + 1
    loss, metrics = losses.masked_lm_loss(logits, batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:])
    return loss, {**metrics, "finite/logits": logits_finite(logits)}


def make_train_step(model: CausalLM, optimizer: optax.GradientTransformation) -> Callable:
    """``step(state, batch) -> (state, metrics)``; dropout is on when the model config has it.

    A step whose logits, loss or gradients are not finite is skipped (``optim.gradient_step``).
    """
    use_dropout = model.config.dropout > 0

    def train_step(state: TrainState, batch: dict):
        key = state.key() if use_dropout else None

        return gradient_step(state, lambda params: lm_objective(model, params, batch, dropout_key=key), optimizer,
                             faults=batch)  # fmt: skip

    return train_step


def make_eval_step(model: CausalLM) -> Callable:
    """``eval_step(params, batch) -> metrics`` (no dropout)."""

    def eval_step(params: Any, batch: dict):
        metrics = lm_objective(model, params, batch)[1]
        return {k: v for k, v in metrics.items() if not k.startswith("finite/")}

    return eval_step


def mixed_batches(main: Any, ptx: Any | None) -> Callable[[], dict]:
    """Each batch: the main iterator's rows, then the pretraining iterator's rows (loss on all)."""

    def next_batch() -> dict:
        batch = next(main)
        if ptx is None:
            return batch
        extra = next(ptx)
        return {k: np.concatenate([batch[k], extra[k]]) for k in ("input_ids", "attention_mask", "loss_mask")} | {
            "example_id": batch["example_id"]
        }

    return next_batch


def evaluate_lm(eval_fn: Callable, params: Any, dataset: Any, *, batch_size: int, max_batches: int, mesh) -> dict:
    """Average eval metrics over up to ``max_batches`` fixed-size batches of ``dataset``."""
    from rlhf_jax import sharding
    from rlhf_jax.data import BatchIterator

    n = len(dataset)
    bs = min(batch_size, n)
    it = BatchIterator(dataset.arrays, batch_size=bs, seed=0, shuffle=False)
    totals: dict[str, float] = {}
    tokens = 0.0
    for _ in range(min(max_batches, it.steps_per_epoch)):
        batch = {k: v for k, v in next(it).items() if k != "example_id"}
        m = jax.device_get(eval_fn(params, sharding.shard_batch(batch, mesh)))
        w = float(m["num_tokens"])
        tokens += w
        for k in ("loss", "accuracy"):
            totals[k] = totals.get(k, 0.0) + float(m[k]) * w
    return {f"val/{k}": v / max(tokens, 1.0) for k, v in totals.items()}


def run_sft(cfg: SFTConfig) -> Path:
    """Train an SFT (or pretraining) run; returns the run directory."""
    from rlhf_jax import checkpoint, data, sharding, train_loop

    run = cfg.run
    out = Path(cfg.out)
    model, params, tokenizer = checkpoint.load_model(cfg.init, head="lm", dtype=run.dtype, which="latest")
    model = CausalLM(model.config.replace(dropout=cfg.dropout, remat=run.remat), head="lm")
    data.check_vocab(tokenizer, model.config.vocab_size)

    if cfg.mode == "pretrain":
        kind = "text"
        tokenize = lambda recs: data.tokenize_text(recs, tokenizer, seq_len=cfg.seq_len, pack=cfg.pack)  # noqa: E731
    else:
        kind = "demonstrations"
        tokenize = lambda recs: data.tokenize_demonstrations(  # noqa: E731
            recs, tokenizer, seq_len=cfg.seq_len, prompt_loss=cfg.prompt_loss
        )
    train, val, _, parts = train_loop.load_split_tokenize(cfg.data, kind, run, tokenize)
    main_rows = cfg.batch_size - cfg.ptx_rows
    train_it = data.BatchIterator(
        train.arrays, batch_size=min(main_rows, len(train)), seed=run.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )  # fmt: skip
    iterators = {"train": train_it}
    ptx_it = None
    if cfg.ptx_data is not None:
        ptx, _, _, _ = train_loop.load_split_tokenize(
            cfg.ptx_data, "text", run, lambda r: data.tokenize_text(r, tokenizer, seq_len=cfg.seq_len), split=False
        )
        ptx_it = data.BatchIterator(ptx.arrays, batch_size=cfg.ptx_rows, seed=run.seed + 1)
        iterators["ptx"] = ptx_it
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * train_it.steps_per_epoch))

    mesh = sharding.make_mesh(run.mesh)
    optimizer = make_optimizer(cfg.optim, total)
    state, shardings = train_loop.sharded_train_state(model, params, optimizer, run.seed, mesh)

    eval_fn = None
    best_metric, best_mode = None, "min"
    if val is not None:
        eval_step = jax.jit(make_eval_step(model))
        scorer = None
        if cfg.select_by_reward is not None and cfg.mode == "sft":
            from rlhf_jax.reward import make_sample_scorer

            prompts = data.tokenize_prompts(parts[1][: cfg.select_prompts], tokenizer, max_prompt_len=cfg.seq_len // 2)
            scorer = make_sample_scorer(cfg.select_by_reward, model, tokenizer, prompts, max_new_tokens=cfg.seq_len // 2)
            best_metric, best_mode = "val/rm_score", "max"
        else:
            best_metric = "val/loss"

        def eval_fn(st: TrainState) -> dict:
            with sharding.use_mesh(mesh):
                metrics = evaluate_lm(eval_step, st.params, val, batch_size=cfg.batch_size,
                                      max_batches=run.eval_batches, mesh=mesh)  # fmt: skip
            if scorer is not None:
                metrics["val/rm_score"] = scorer(st.params)
            return metrics

    checkpoint.write_model_info(out, CausalLM(model.config.replace(dropout=0.0, remat=False)), tokenizer)
    stage = train_loop.Stage(
        name=cfg.mode,
        state=state,
        state_shardings=shardings,
        train_step=make_train_step(model, optimizer),
        next_batch=_without_ids(mixed_batches(train_it, ptx_it)),
        iterators=iterators,
        total_steps=total,
        evaluate=eval_fn,
        best_metric=best_metric,
        best_mode=best_mode,
        tokens_per_batch=cfg.batch_size * cfg.seq_len,
    )
    train_loop.run(stage, run, mesh, out, config_json=dataclasses.asdict(cfg))
    return out


def _without_ids(next_batch: Callable[[], dict]) -> Callable[[], dict]:
    """The jitted step takes only the model inputs; example ids stay on the host."""

    def f() -> dict:
        return {k: v for k, v in next_batch().items() if k != "example_id"}

    return f


__all__ = ["lm_objective", "make_eval_step", "make_train_step", "mixed_batches", "run_sft"]
