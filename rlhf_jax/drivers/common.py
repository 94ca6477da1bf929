"""What the stage drivers share: loading a stage's model, placing its state, weighted evaluation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import optax

from rlhf_jax import checkpoint, data, sharding
from rlhf_jax.config import LoRAConfig, RunConfig
from rlhf_jax.models import CausalLM, lora, quant
from rlhf_jax.models.params import init_params
from rlhf_jax.optim import TrainState, init_train_state


def load_stage_model(
    source: str, head: str, run: RunConfig, *, dropout: float = 0.0, which: str = "best"
) -> tuple[CausalLM, Any, Any]:
    """(model, params, tokenizer) of ``source`` for training: the run's dtype, remat and attention
    kernel, ``dropout``."""
    model, params, tokenizer = checkpoint.load_model(source, head=head, dtype=run.dtype, which=which)
    model = CausalLM(model.config.replace(dropout=dropout, remat=run.remat, attention=run.attention), head=head)
    data.check_vocab(tokenizer, model.config.vocab_size)
    return model, params, tokenizer


def boxed_trainable(model: CausalLM) -> Any:
    """The boxed (logically annotated) tree of what ``model`` trains: every param, or with LoRA
    the adapters and score head only (``models.lora.split``). Traced under ``jax.eval_shape``."""
    boxed = init_params(model, boxed=True)
    return boxed if model.config.lora is None else lora.split(boxed)[1]


def with_lora(model: CausalLM, lora_cfg: LoRAConfig) -> CausalLM:
    """``model`` with adapters when ``lora_cfg.rank > 0``, else unchanged."""
    return model.clone(config=model.config.replace(lora=lora_cfg)) if lora_cfg.enabled else model


def split_for_training(model: CausalLM, params: Any, mesh, seed: int = 0) -> tuple[Any, tuple]:
    """(the params the optimizer trains, the step's frozen arguments) of loaded ``params``.

    Full fine-tuning: ``(params, ())``. LoRA (``model.config.lora``): fresh adapters plus the
    score head, if any (``models.lora.trainable_init``), and ``(base,)``: the loaded weights,
    placed once by their logical axes and passed to every step, never donated or checkpointed;
    QLoRA (``lora.base_bits``): the adapted kernels of the base quantized (``models.quant``).
    """
    if model.config.lora is None:
        return params, ()
    base_model = lora.without_lora(model)
    trainable = lora.trainable_init(model, params, seed)
    base = quant.quantize_base({k: v for k, v in params.items() if k not in lora.TRAINABLE_HEADS}, model.config.lora)
    base_sh = sharding.param_shardings(lambda: lora.split(init_params(base_model, boxed=True))[0], mesh)
    return trainable, (jax.device_put(base, quant.quantize_shardings(base_sh, model.config.lora)),)


def lora_record(lora_cfg: LoRAConfig, base_source: str, base_head: str, which: str) -> dict:
    """What model.json says about a LoRA run (``checkpoint.load_model`` merges from it): the
    adapters' config and where the frozen base comes from. Empty for full fine-tuning."""
    if not lora_cfg.enabled:
        return {}
    base = {"source": str(Path(base_source).absolute()), "head": base_head, "which": which}
    return {"lora": {**dataclasses.asdict(lora_cfg), "base": base}}


def sharded_train_state(
    model: CausalLM, params: Any, optimizer: optax.GradientTransformation, seed: int, mesh
) -> tuple[TrainState, Any]:
    """A TrainState for ``params`` placed by the model's logical axes (optimizer moments included);
    with LoRA, ``params`` is the trainable tree (``split_for_training``)."""
    return sharding.shard_state(
        lambda p: init_train_state(p, optimizer, seed),
        lambda: init_train_state(boxed_trainable(model), optimizer, seed),
        params,
        mesh,
    )


def weighted_eval(
    eval_fn: Callable,
    params: Any,
    dataset: Any,
    *,
    batch_size: int,
    max_batches: int,
    mesh,
    weight: str,
    names: dict[str, str],
    buckets: tuple = (),
) -> tuple[dict[str, float], float]:
    """Weighted means of ``eval_fn``'s metrics over up to ``max_batches`` fixed-size batches.

    lm1b's ``compute_weighted_cross_entropy`` pattern: each batch's means are weighted by its
    ``weight`` metric (tokens for a language model, pairs for a reward model), so the result
    is the mean over all tokens / pairs, not over batches.

    Args:
      eval_fn: jitted ``(params, batch) -> metrics`` (means over the batch plus ``weight``).
      names: metric name -> name in the result (e.g. ``{"loss": "val/loss"}``).
      buckets: ``(keys, mask_key, left)`` groups: batches cut to their bucket length (``data.trim_batch``).

    Returns:
      (``{names[k]: weighted mean}``, total weight).
    """
    it = data.BatchIterator(dataset.arrays, batch_size=min(batch_size, len(dataset)), seed=0, shuffle=False)
    model_inputs = set(dataset.arrays) - {"example_id", "prompt_len"}
    sums = dict.fromkeys(names, 0.0)
    total = 0.0
    with sharding.use_mesh(mesh):
        for _ in range(min(max_batches, it.steps_per_epoch)):
            batch = {k: v for k, v in next(it).items() if k in model_inputs}
            for keys, mask_key, left in buckets:
                batch = data.trim_batch(batch, keys=keys, mask_key=mask_key, left=left)
            m = jax.device_get(eval_fn(params, sharding.shard_batch(batch, mesh)))
            w = float(m[weight])
            total += w
            for k in names:
                sums[k] += float(m[k]) * w
    return {names[k]: v / max(total, 1.0) for k, v in sums.items()}, total


def shaped(
    run: RunConfig,
    next_batch: Callable[[], dict],
    *groups: tuple,
    pack: tuple | None = None,
    row_multiple: int = 1,
) -> Callable[[], dict]:
    """``next_batch`` cut to bucket lengths (``data.trim_batch``) unless ``run.pad_to == "max"``.

    Groups (keys, mask_key, left) that name arrays the batch does not have (e.g. ptx rows in
    plain PPO) are skipped. ``pack`` = (keys, mask_key, target_mask_key): with
    ``run.pad_to == "pack"`` the batch (exactly those keys) is packed by ``data.pack_batch``
    into a multiple of ``row_multiple`` rows instead of being trimmed.
    """
    if run.pad_to == "max":
        return next_batch

    def f() -> dict:
        batch = next_batch()
        if pack is not None and run.pad_to == "pack":
            keys, mask_key, target_mask_key = pack
            return data.pack_batch(
                batch, keys=keys, mask_key=mask_key, target_mask_key=target_mask_key, row_multiple=row_multiple
            )
        for keys, mask_key, left in groups:
            if mask_key in batch:
                batch = data.trim_batch(batch, keys=keys, mask_key=mask_key, left=left)
        return batch

    return f


def batch_shards_per_host(mesh) -> int:
    """Rows of a host's batch must split evenly over this many ('data' x 'fsdp') shards."""
    return max(1, mesh.shape["data"] * mesh.shape["fsdp"] // jax.process_count())


def model_inputs_only(next_batch: Callable[[], dict], keys: tuple[str, ...]) -> Callable[[], dict]:
    """``next_batch`` restricted to ``keys``: the jitted step takes only model inputs (ids stay on the host)."""
    return lambda: {k: v for k, v in next_batch().items() if k in keys}
