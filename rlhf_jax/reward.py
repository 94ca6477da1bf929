"""The reward model: the SFT network with a scalar head, trained on K-way rankings.

InstructGPT eq. 1: for each prompt, all C(K,2) ordered pairs of its K ranked responses
form ONE batch element, so a prompt costs K forward passes (not C(K,2)) and no response
is seen K-1 times per epoch. The score r(x, y) is read at the last real token of the
response (its EOS), never at a pad. After training a bias is set so that the labelers'
demonstrations score mean 0 (the loss is shift-invariant; only the scale the KL
coefficient is measured against changes); it is stored in the run's model.json and
added to the score head whenever the run is loaded.

Batches: ``input_ids`` / ``attention_mask`` [B, K, L] (prompt + response + EOS, right
padded), ``ranks`` [B, K] (0 = best), ``valid`` [B, K], ``end_index`` [B, K].
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import losses, ops
from rlhf_jax.config import RewardConfig
from rlhf_jax.models import CausalLM
from rlhf_jax.optim import TrainState, all_finite, gradient_step, inject_fault, make_optimizer

log = logging.getLogger(__name__)


def score_sequences(model: CausalLM, params: Any, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """r(x, y) of each sequence [B, T]: the scalar head at the last real token -> [B]."""
    values = model.apply({"params": params}, input_ids, attention_mask=attention_mask).values  # [B, T]
    last = ops.last_token_index(attention_mask)  # [B]
    return jnp.take_along_axis(values, last[:, None], axis=1)[:, 0]


def ranking_rewards(model: CausalLM, params: Any, batch: dict) -> jax.Array:
    """Scores of every response slot: one forward pass per response -> [B, K]."""
    b, k, length = batch["input_ids"].shape
    flat_ids = batch["input_ids"].reshape(b * k, length)  # [B*K, L]
    flat_mask = batch["attention_mask"].reshape(b * k, length)
    values = model.apply({"params": params}, flat_ids, attention_mask=flat_mask).values  # [B*K, L]
    end = batch["end_index"].reshape(b * k)
    return jnp.take_along_axis(values, end[:, None], axis=1).reshape(b, k)  # [B, K]


def reward_objective(model: CausalLM, params: Any, batch: dict, *, margin: float = 0.0, center_coef: float = 0.0):
    """K-way ranking loss of the batch's scores; metrics add the ``finite/reward`` flag."""
    rewards = inject_fault("reward", ranking_rewards(model, params, batch), batch)  # [B, K]
    loss, metrics = losses.k_way_ranking_loss(rewards, batch["ranks"], batch["valid"], margin=margin,
                                              center_coef=center_coef)  # fmt: skip
    return loss, {**metrics, "finite/reward": all_finite(rewards)}


def make_train_step(model: CausalLM, optimizer: optax.GradientTransformation, *, margin: float = 0.0,
                    center_coef: float = 0.0) -> Callable:  # fmt: skip
    """``step(state, batch) -> (state, metrics)``; skipped when the scores, loss or gradients are not finite."""

    def train_step(state: TrainState, batch: dict):
        def loss_fn(params):
            return reward_objective(model, params, batch, margin=margin, center_coef=center_coef)

        return gradient_step(state, loss_fn, optimizer, faults=batch)

    return train_step


def make_eval_step(model: CausalLM) -> Callable:
    def eval_step(params: Any, batch: dict):
        metrics = reward_objective(model, params, batch)[1]
        return {k: v for k, v in metrics.items() if not k.startswith("finite/")}

    return eval_step


def evaluate_rankings(eval_fn: Callable, params: Any, dataset: Any, *, batch_size: int, max_batches: int, mesh) -> dict:
    """Pair-weighted validation loss and pair accuracy."""
    from rlhf_jax import sharding
    from rlhf_jax.data import BatchIterator

    it = BatchIterator(dataset.arrays, batch_size=min(batch_size, len(dataset)), seed=0, shuffle=False)
    pairs = loss = acc = 0.0
    for _ in range(min(max_batches, it.steps_per_epoch)):
        batch = {k: v for k, v in next(it).items() if k not in ("example_id", "prompt_len")}
        m = jax.device_get(eval_fn(params, sharding.shard_batch(batch, mesh)))
        n = float(m["num_pairs"])
        pairs += n
        loss += float(m["ranking_loss"]) * n
        acc += float(m["accuracy"]) * n
    return {"val/loss": loss / max(pairs, 1.0), "val/accuracy": acc / max(pairs, 1.0), "val/num_pairs": pairs}


def demonstration_bias(model: CausalLM, params: Any, dataset: Any, *, batch_size: int = 32) -> float:
    """The bias that makes the demonstrations (prompt + response + EOS) score mean 0."""
    from rlhf_jax import rl

    score = jax.jit(lambda p, ids, m: score_sequences(model, p, ids, m))
    ids, mask = dataset.arrays["input_ids"], dataset.arrays["attention_mask"]
    scores = [np.asarray(score(params, ids[i : i + batch_size], mask[i : i + batch_size]))
              for i in range(0, len(ids), batch_size)]  # fmt: skip
    return float(rl.reward_bias(jnp.asarray(np.concatenate(scores))))


def make_sample_scorer(rm_source: str, policy: CausalLM, tokenizer: Any, prompts: Any, *, max_new_tokens: int,
                       seed: int = 0) -> Callable[[Any], float]:  # fmt: skip
    """``score(policy_params) -> mean RM score`` of samples on fixed prompts (SFT model selection)."""
    from rlhf_jax.checkpoint import load_model
    from rlhf_jax.sampling import generate

    rm_model, rm_params, _ = load_model(rm_source, head="scalar")
    ids = jnp.asarray(prompts.arrays["input_ids"])
    mask = jnp.asarray(prompts.arrays["attention_mask"])
    rm_score = jax.jit(lambda p, i, m: score_sequences(rm_model, p, i, m))

    def scorer(policy_params: Any) -> float:
        out = generate(policy, policy_params, ids, mask, jax.random.key(seed), max_new_tokens=max_new_tokens,
                       temperature=1.0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        full = jnp.concatenate([ids, out.tokens], axis=1)
        full_mask = jnp.concatenate([mask, out.mask], axis=1)
        return float(jnp.mean(rm_score(rm_params, full, full_mask)))

    return scorer


def run_rm(cfg: RewardConfig) -> Path:
    """Train a reward model run; returns the run directory."""
    from rlhf_jax import checkpoint, data, sharding, train_loop

    run = cfg.run
    out = Path(cfg.out)
    model, params, tokenizer = checkpoint.load_model(cfg.init, head="scalar", dtype=run.dtype)
    model = CausalLM(model.config.replace(dropout=0.0, remat=run.remat), head="scalar")
    data.check_vocab(tokenizer, model.config.vocab_size)
    tokenize = lambda recs: data.tokenize_rankings(  # noqa: E731
        recs, tokenizer, max_prompt_len=cfg.max_prompt_len, max_response_len=cfg.max_response_len, max_k=cfg.max_k
    )
    train, val, _, _ = train_loop.load_split_tokenize(cfg.data, "rankings", run, tokenize)
    if val is not None and val.arrays["input_ids"].shape[1] != train.arrays["input_ids"].shape[1]:
        k = train.arrays["input_ids"].shape[1]  # the validation split must have the same K slots
        val = _pad_k(val, k)
    train_it = data.BatchIterator(train.arrays, batch_size=min(cfg.batch_size, len(train)), seed=run.seed,
                                  process_index=jax.process_index(), process_count=jax.process_count())  # fmt: skip
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * train_it.steps_per_epoch))

    mesh = sharding.make_mesh(run.mesh)
    optimizer = make_optimizer(cfg.optim, total)
    state, shardings = train_loop.sharded_train_state(model, params, optimizer, run.seed, mesh)
    eval_fn = None
    if val is not None:
        eval_step = jax.jit(make_eval_step(model))

        def eval_fn(st: TrainState) -> dict:
            with sharding.use_mesh(mesh):
                return evaluate_rankings(eval_step, st.params, val, batch_size=cfg.batch_size,
                                         max_batches=run.eval_batches, mesh=mesh)  # fmt: skip

    checkpoint.write_model_info(out, model, tokenizer)
    keep = ("input_ids", "attention_mask", "ranks", "valid", "end_index")
    stage = train_loop.Stage(
        name="rm",
        state=state,
        state_shardings=shardings,
        train_step=make_train_step(model, optimizer, margin=cfg.margin, center_coef=cfg.center_coef),
        next_batch=lambda: {k: v for k, v in next(train_it).items() if k in keep},
        iterators={"train": train_it},
        total_steps=total,
        evaluate=eval_fn,
        best_metric="val/accuracy" if eval_fn else None,
        best_mode="max",
        tokens_per_batch=int(np.prod(train.arrays["input_ids"].shape[1:])) * train_it.batch_size,
    )
    train_loop.run(stage, run, mesh, out, config_json=dataclasses.asdict(cfg))

    bias = 0.0
    if cfg.demonstrations is not None:
        demos, _ = data.load_records(cfg.demonstrations, "demonstrations", on_error=run.on_error)
        demo_ds = data.tokenize_demonstrations(demos, tokenizer, seq_len=cfg.max_prompt_len + cfg.max_response_len)
        best_model, best_params, _ = checkpoint.load_model(out, head="scalar")
        bias = demonstration_bias(best_model, best_params, demo_ds)
        log.info("reward model: demonstrations scored mean %.4f; bias %.4f stored", -bias, bias)
    checkpoint.write_model_info(out, model, tokenizer, extra={"reward_bias": bias})
    return out


def _pad_k(dataset: Any, k: int) -> Any:
    """Pad (never cut) the K axis of a tokenised ranking set to ``k`` invalid slots."""
    arrays = dict(dataset.arrays)
    have = arrays["input_ids"].shape[1]
    if have > k:
        raise ValueError(f"validation rankings have K={have} > training K={k}; set max_k")
    for name in ("input_ids", "attention_mask", "ranks", "valid", "end_index"):
        a = arrays[name]
        fill = {"ranks": -1, "valid": False}.get(name, 0)
        pad = np.full((a.shape[0], k - have, *a.shape[2:]), fill, dtype=a.dtype)
        arrays[name] = np.concatenate([a, pad], axis=1)
    return dataclasses.replace(dataset, arrays=arrays)
