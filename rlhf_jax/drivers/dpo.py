"""``rlhf-jax dpo``: direct preference optimisation of an SFT model on K-way rankings.

The policy and the reference both start from ``--init``. The reference's log-probs of every
training and validation response are computed ONCE before training (one jitted pass in
batches) and become an array column ``ref_logps`` [N, K] of the tokenised sets, so the data
iterator serves them with each batch: no reference forward pass per step, no reference
params in device memory while training. They are written to ``<run>/ref_logps.npz`` with the
example ids they belong to, and a resumed run reuses that file when it matches the data (a
recomputation gives the same numbers: the pass is deterministic), so resume stays exact.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax import checkpoint, data, dpo, sharding, train_loop
from rlhf_jax.config import DPOConfig, DPOHyperparams
from rlhf_jax.drivers.common import load_stage_model, model_inputs_only, shaped, sharded_train_state
from rlhf_jax.drivers.rm import RANKING_BUCKETS, pad_k
from rlhf_jax.models import CausalLM
from rlhf_jax.models.params import init_params
from rlhf_jax.optim import TrainState, make_optimizer

log = logging.getLogger(__name__)

DPO_INPUTS = ("input_ids", "attention_mask", "ranks", "valid", "prompt_len", "ref_logps")
REF_FILE = "ref_logps.npz"
VAL_NAMES = {
    "loss": "val/loss",
    "rewards/accuracies": "val/rewards/accuracies",
    "rewards/margins": "val/rewards/margins",
    "rewards/chosen": "val/rewards/chosen",
    "rewards/rejected": "val/rewards/rejected",
}


def reference_logps(model: CausalLM, params: Any, arrays: dict, *, batch_size: int, mesh, bucket: bool) -> np.ndarray:
    """``dpo.sequence_logps`` of every row under ``params`` -> [N, K] float32 (host loop).

    Fixed batches of ``batch_size`` rows in data order (the last one filled with copies of
    row 0), cut to their bucket length when ``bucket``: one compile per bucket.
    """
    fn = jax.jit(lambda p, b: dpo.sequence_logps(model, p, b))
    n = arrays["input_ids"].shape[0]
    out = []
    with sharding.use_mesh(mesh):
        for start in range(0, n, batch_size):
            rows = np.arange(start, start + batch_size)
            rows[rows >= n] = 0
            batch = {k: arrays[k][rows] for k in ("input_ids", "attention_mask", "prompt_len")}
            for keys, mask_key, left in RANKING_BUCKETS if bucket else ():
                batch = data.trim_batch(batch, keys=keys, mask_key=mask_key, left=left)
            out.append(np.asarray(jax.device_get(fn(params, sharding.shard_batch(batch, mesh))))[: n - start])
    return np.concatenate(out).astype(np.float32)


def cached_reference_logps(cfg: DPOConfig, model: CausalLM, params: Any, parts: dict[str, Any], mesh) -> dict:
    """``{part: ref_logps [N, K]}`` for the tokenised ``parts``, from ``<out>/ref_logps.npz`` when it
    matches them (shapes and example ids), else computed (:func:`reference_logps`) and written there."""
    path = Path(cfg.out) / REF_FILE
    parts = {name: ds for name, ds in parts.items() if ds is not None}
    if path.is_file():
        with np.load(path) as f:
            cached = {k: f[k] for k in f.files}
        if all(
            name in cached
            and cached[name].shape == ds.arrays["valid"].shape
            and np.array_equal(cached.get(f"{name}_example_id"), ds.arrays["example_id"])
            for name, ds in parts.items()
        ):
            log.info("dpo: reference log-probs reused from %s", path)
            return {name: cached[name] for name in parts}
        log.warning("dpo: %s does not match the data; recomputing the reference log-probs", path)
    ref_sh = sharding.param_shardings(lambda: init_params(model, boxed=True), mesh)
    ref_params = jax.device_put(params, ref_sh)
    out = {
        name: reference_logps(
            model, ref_params, ds.arrays, batch_size=cfg.batch_size, mesh=mesh, bucket=cfg.run.pad_to != "max"
        )
        for name, ds in parts.items()
    }
    log.info("dpo: reference log-probs of %s computed", ", ".join(f"{len(v)} {k}" for k, v in out.items()))
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("ref_logps.tmp.npz")
        np.savez(tmp, **out, **{f"{name}_example_id": ds.arrays["example_id"] for name, ds in parts.items()})
        os.replace(tmp, path)  # atomic: a killed write is never read back
    return out


def evaluate(
    eval_step,
    params: Any,
    dataset: Any,
    hparams: DPOHyperparams,
    *,
    batch_size: int,
    max_batches: int,
    mesh,
    bucket: bool,
) -> dict[str, float]:
    """Validation metrics over up to ``max_batches`` fixed-size batches, each metric weighted by
    the count it is a mean over (``dpo.metric_weights``: prompts for the loss, pairs for accuracy)."""
    it = data.BatchIterator(dataset.arrays, batch_size=min(batch_size, len(dataset)), seed=0, shuffle=False)
    weights = dpo.metric_weights(hparams)
    sums = dict.fromkeys(VAL_NAMES, 0.0)
    totals = {"num_prompts": 0.0, "num_pairs": 0.0}
    with sharding.use_mesh(mesh):
        for _ in range(min(max_batches, it.steps_per_epoch)):
            batch = {k: v for k, v in next(it).items() if k in DPO_INPUTS}
            for keys, mask_key, left in RANKING_BUCKETS if bucket else ():
                batch = data.trim_batch(batch, keys=keys, mask_key=mask_key, left=left)
            m = jax.device_get(eval_step(params, sharding.shard_batch(batch, mesh)))
            for k in totals:
                totals[k] += float(m[k])
            for k in sums:
                sums[k] += float(m[k]) * float(m[weights[k]])
    metrics = {VAL_NAMES[k]: v / max(totals[weights[k]], 1.0) for k, v in sums.items()}
    return metrics | {"val/num_pairs": totals["num_pairs"], "val/num_prompts": totals["num_prompts"]}


def run_dpo(cfg: DPOConfig) -> Path:
    """Train a DPO run; returns the run directory."""
    run, hp = cfg.run, cfg.hparams
    out = Path(cfg.out)
    model, params, tokenizer = load_stage_model(cfg.init, "lm", run)
    tokenize = lambda recs: data.tokenize_rankings(  # noqa: E731
        recs, tokenizer, max_prompt_len=cfg.max_prompt_len, max_response_len=cfg.max_response_len, max_k=cfg.max_k
    )
    train, val, _, _ = data.load_split_tokenize(cfg.data, "rankings", run, tokenize)
    if val is not None and val.arrays["input_ids"].shape[1] != train.arrays["input_ids"].shape[1]:
        val = pad_k(val, train.arrays["input_ids"].shape[1])  # the validation split must have the same K slots
    mesh = sharding.make_mesh(run.mesh)
    ref = cached_reference_logps(cfg, model, params, {"train": train, "val": val}, mesh)
    train = dataclasses.replace(train, arrays={**train.arrays, "ref_logps": ref["train"]})
    if val is not None:
        val = dataclasses.replace(val, arrays={**val.arrays, "ref_logps": ref["val"]})

    train_it = data.BatchIterator(
        train.arrays,
        batch_size=min(cfg.batch_size, len(train)),
        seed=run.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * train_it.steps_per_epoch))
    optimizer = make_optimizer(cfg.optim, total)
    state, shardings = sharded_train_state(model, params, optimizer, run.seed, mesh)
    del params
    eval_fn = None
    if val is not None:
        eval_step = jax.jit(dpo.make_eval_step(model, hp))

        def eval_fn(st: TrainState) -> dict:
            return evaluate(
                eval_step,
                st.params,
                val,
                hp,
                batch_size=cfg.batch_size,
                max_batches=run.eval_batches,
                mesh=mesh,
                bucket=run.pad_to != "max",
            )

    checkpoint.write_model_info(out, CausalLM(model.config.replace(dropout=0.0, remat="none")), tokenizer)
    stage = train_loop.Stage(
        name="dpo",
        state=state,
        state_shardings=shardings,
        train_step=dpo.make_train_step(model, optimizer, hp),
        next_batch=shaped(run, model_inputs_only(lambda: next(train_it), DPO_INPUTS), *RANKING_BUCKETS),
        iterators={"train": train_it},
        total_steps=total,
        evaluate=eval_fn,
        best_metric="val/rewards/accuracies" if eval_fn else None,
        best_mode="max",
        tokens_per_batch=int(np.prod(train.arrays["input_ids"].shape[1:])) * train_it.batch_size,  # (at the cap)
    )
    train_loop.run(stage, run, mesh, out, config_json=dataclasses.asdict(cfg))
    return out
