"""Orbax checkpoints of a run: the state pytree plus a JSON record of everything else.

A checkpoint ``<run>/checkpoints/<step>/`` holds two items:
  * ``state``: the whole train-state pytree (params, optimizer state, step, RNG key data,
    and for PPO the KL coefficient and EMA params), saved asynchronously;
  * ``meta``: JSON with the data-iterator positions, the resolved config and counters.
Orbax writes each checkpoint into a temporary directory and renames it when complete,
so a killed save is never listed. Checkpoints dropped by the retention policy are first
renamed (atomically) into ``<checkpoints>/.deleted/`` and removed from there later, so a
process killed while deleting never leaves a half-deleted checkpoint that is still listed.
Latest-N plus best-N by a validation metric are kept.
Restores take an abstract state with shardings, so a checkpoint saved on one mesh
restores onto another. A LoRA run's state holds the trainable tree only (adapters, score
head, their optimizer state and EMA); its model.json names the base's source, and
:func:`load_model` reads that base again and returns the merged model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from rlhf_jax.config import LoRAConfig, ModelConfig
from rlhf_jax.data import check_vocab
from rlhf_jax.models import CausalLM, from_pretrained, load_tokenizer, lora, resize_vocab, stack_legacy_layers
from rlhf_jax.models.gguf import as_hf_dir
from rlhf_jax.models.params import init_params

log = logging.getLogger(__name__)

TRASH = ".deleted"  # under the checkpoints directory: unlisted checkpoints waiting to be removed


class CheckpointRestoreError(RuntimeError):
    """A checkpoint exists but cannot be restored (the message names the step and the cause)."""


class Checkpointer:
    """Save / restore ``(state, meta)`` pairs under ``directory``.

    Args:
      directory: the checkpoints directory (created if needed).
      keep_last: latest N checkpoints kept.
      keep_best: best N checkpoints (by ``best_metric``) kept in addition.
      best_metric: name of the metric ranking checkpoints, or None.
      best_mode: "min" or "max".
      async_save: write in a background thread while training continues.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep_last: int = 2,
        keep_best: int = 0,
        best_metric: str | None = None,
        best_mode: str = "min",
        async_save: bool = True,
    ) -> None:
        self.directory = Path(directory).absolute()
        self._best_metric, self._best_mode = best_metric, best_mode
        keep: list[Any] = [policies.LatestN(n=keep_last)]
        if best_metric is not None and keep_best > 0:
            keep.append(
                policies.BestN(
                    get_metric_fn=lambda m: float(m[best_metric]),
                    reverse=best_mode == "min",  # orbax keeps the tail of the sorted list
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            # best_fn/best_mode make orbax persist each step's metrics (BestN ranks by them after a restart)
            best_fn=(lambda m: float(m[best_metric])) if best_metric is not None else None,
            best_mode=best_mode,
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            todelete_subdir=TRASH,  # retention renames here (atomic); _purge_trash removes
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        self._purge_trash()

    def _purge_trash(self) -> None:
        """Remove the checkpoints retention has already unlisted (renamed into ``.deleted/``).

        Called only when no save is in flight (orbax renames into it from its finalize thread);
        on several hosts only the primary one deletes, as orbax does.
        """
        trash = self.directory / TRASH
        if jax.process_index() == 0 and trash.is_dir():
            for entry in trash.iterdir():
                shutil.rmtree(entry, ignore_errors=True)

    # ------------------------------------------------------------------ queries
    def all_steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self, metric: str | None = None, mode: str | None = None) -> int | None:
        """The kept step with the best ``metric`` (default ``best_metric``; None without metrics)."""
        metric, mode = metric or self._best_metric, mode or self._best_mode
        if metric is None:
            return None
        scored = []
        for step in self.all_steps():
            metrics = self._manager.metrics(step) or {}
            if metric in metrics:
                scored.append((float(metrics[metric]), step))
        if not scored:
            return None
        return (min(scored) if mode == "min" else max(scored))[1]

    # ------------------------------------------------------------------ save / restore
    def save(self, step: int, state: Any, meta: dict, *, metrics: dict | None = None, force: bool = True) -> bool:
        """Start saving ``state`` and ``meta`` at ``step`` (asynchronously); returns whether it saves."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        self.wait()  # orbax waits for the previous save here anyway; its finalize thread is done
        return self._manager.save(step, args=args, metrics=metrics, force=force)

    def wait(self) -> None:
        """Block until the in-flight save has been committed (and old checkpoints removed)."""
        self._manager.wait_until_finished()
        self._purge_trash()

    def restore(self, abstract_state: Any, step: int | None = None, *, fallback: bool = False) -> tuple[Any, dict, int]:
        """Restore ``(state, meta, step)``; ``step=None`` takes the latest.

        ``abstract_state``: the state's tree of ``jax.ShapeDtypeStruct`` with the target
        shardings (from ``jax.eval_shape`` plus the mesh's shardings). A checkpoint that
        fails to restore raises CheckpointRestoreError naming the step, unless
        ``fallback`` is set, in which case the next older one is tried (and logged) and the
        damaged newer ones are moved aside to ``<checkpoints>/damaged-step-<s>`` so that
        training can save those steps again.
        """
        steps = self.all_steps() if step is None else [step]
        if not steps:
            raise CheckpointRestoreError(f"{self.directory}: no checkpoint to restore")
        errors = []
        for s in reversed(steps):
            try:
                out = self._manager.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                    ),
                )
                for bad in steps:
                    if bad > s:
                        self._quarantine(bad)
                return out.state, dict(out.meta), s
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                errors.append(f"step {s}: {type(e).__name__}: {e}")
                if "layers_0" in str(e):  # a tree of per-layer params: written before the layers were scanned
                    raise CheckpointRestoreError(
                        f"{self.directory}: checkpoint at step {s} was written by an older rlhf_jax (one params "
                        "subtree per layer, layers_0 ...) and cannot be resumed; start a new run with --init "
                        "pointing at this run directory (its weights are converted on load)"
                    ) from e
                if not fallback:
                    raise CheckpointRestoreError(
                        f"{self.directory}: checkpoint at step {s} cannot be restored ({type(e).__name__}: {e}); "
                        "pass fallback=True to fall back to an older checkpoint"
                    ) from e
                log.warning("checkpoint at step %d cannot be restored (%s); trying an older one", s, e)
        raise CheckpointRestoreError(f"{self.directory}: no checkpoint could be restored:\n" + "\n".join(errors))

    def _quarantine(self, step: int) -> None:
        target = self.directory / f"damaged-step-{step}"
        log.warning("checkpoint at step %d could not be restored: moved to %s", step, target)
        os.replace(self.directory / str(step), target)
        self._manager.reload()

    def restore_raw(self, step: int) -> tuple[Any, dict]:
        """(state, meta) of ``step`` exactly as saved (numpy leaves, no target shardings):
        for reading a run's params without knowing its optimizer."""
        out = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        )
        return out.state, dict(out.meta)

    def restore_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        path = self.directory / str(step) / "meta" / "metadata"
        if path.is_file():
            return json.loads(path.read_text())
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out.meta)

    def close(self) -> None:
        self.wait()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def abstract_like(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves (with shardings) describing ``tree``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


# ---------------------------------------------------------------------------- run directories
MODEL_INFO = "model.json"


def write_model_info(
    run_dir: str | os.PathLike,
    model: Any,
    tokenizer: Any = None,
    *,
    params_path: tuple[str, ...] = ("params",),
    extra: dict | None = None,
) -> None:
    """Record in ``run_dir`` what the checkpoints hold: model config, head, where the params sit.

    ``params_path`` is the key path of the deployable params inside the saved state
    (``("params",)`` for SFT/RM, ``("policy", "ema_params")`` for PPO).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {
        # the attention kernel is the machine's choice (a cuDNN run's model must load on a CPU)
        "model": dataclasses.asdict(model.config.replace(attention="auto")),
        "head": model.head,
        "params_path": list(params_path),
        **(extra or {}),
    }
    path = run_dir / MODEL_INFO
    if path.is_file():  # a resumed (or re-run) stage: what load_model will read changes with it
        before = json.loads(path.read_text()).get("model", {})
        now = json.loads(json.dumps(info["model"]))  # tuples as the JSON lists they were read back as
        changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in now.items() if before.get(k) != v]
        if changed:
            log.warning("%s: %s rewritten with another model config: %s", run_dir, MODEL_INFO, ", ".join(changed))
    path.write_text(json.dumps(info, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(run_dir / "tokenizer")


def read_model_info(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / MODEL_INFO
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no {MODEL_INFO})")
    return json.loads(path.read_text())


def _restore_params(source: Path, info: dict, which: str) -> Any:
    """The deployable params tree of a run directory (``info["params_path"]`` of the chosen checkpoint)."""
    ckpt = Checkpointer(source / "checkpoints")
    step = ckpt.latest_step()
    if step is None:
        ckpt.close()
        raise FileNotFoundError(f"{source}: the run has no checkpoint yet")
    if which == "best":  # the run's own ranking metric is recorded in each checkpoint's meta (train_loop)
        ranking = ckpt.restore_meta(step)
        step = ckpt.best_step(ranking.get("best_metric"), ranking.get("best_mode")) or step
    params, _ = ckpt.restore_raw(step)
    ckpt.close()
    for key in info["params_path"]:
        params = params[key]
    params = stack_legacy_layers(params)  # a run written before the layers were scanned (layers_0, ...)
    return jax.tree.map(jnp.asarray, params)


def lora_base(info: dict) -> tuple[LoRAConfig, Any]:
    """(adapter config, frozen base params) of a LoRA run's model.json ``info``: the base is
    loaded again from the source the run started from (which must not have changed)."""
    record = dict(info["lora"])
    base = record.pop("base")
    _, base_params, _ = load_model(base["source"], head=base["head"], which=base["which"])
    return LoRAConfig(**record), base_params


def load_adapters(source: str | os.PathLike, *, which: str = "best") -> tuple[ModelConfig, LoRAConfig, Any, str]:
    """(model config, adapter config, trainable tree, base source) of a LoRA run directory:
    what ``rlhf-jax export --export-adapters`` writes in PEFT's format."""
    source = Path(source)
    info = read_model_info(source)
    if "lora" not in info:
        raise ValueError(f"{source}: not a LoRA run (trained without --lora.rank); export the full model instead")
    lora_cfg = LoRAConfig(**{k: v for k, v in info["lora"].items() if k != "base"})
    return ModelConfig(**info["model"]), lora_cfg, _restore_params(source, info, which), info["lora"]["base"]["source"]


def load_model(source: str | os.PathLike, *, head: str | None = None, dtype: str | None = None, which: str = "best"):
    """(model, params, tokenizer) from a run directory or a Hugging Face directory.

    Args:
      source: a run directory written by a stage (has model.json), an HF model dir, or a
        ``.gguf`` file (converted once through transformers' dequantizer, then cached).
      head: "lm" or "scalar"; None keeps the source's head. Switching an LM to "scalar"
        drops the unembedding and adds a fresh score head (reward model from SFT).
      dtype: compute dtype override ("float32", "bfloat16").
      which: "best" (by the run's validation metric, falling back to latest) or "latest".

    A LoRA run comes back merged (``W + (alpha / r) A B``, no adapters in the config).
    """
    source = as_hf_dir(source)  # a .gguf file: its (cached) dequantized conversion, with a warning
    if not (source / MODEL_INFO).is_file():
        want = head or "lm"
        model, params = from_pretrained(source, jnp.float32, head=want)
        if dtype is not None:
            model = CausalLM(model.config.replace(dtype=dtype), head=want)
        tokenizer = load_tokenizer(source)
        if len(tokenizer) == model.config.vocab_size + 1 and tokenizer.pad_token_id == model.config.vocab_size:
            # load_tokenizer added the pad token the checkpoint lacked (GPT-2): make room for it
            log.warning("%s: embedding grown by one row for the added pad token", source)
            model, params = resize_vocab(model, params, len(tokenizer))
        check_vocab(tokenizer, model.config.vocab_size)  # an id past the embedding would be NaN later
        return model, params, tokenizer
    info = read_model_info(source)
    cfg_dict = dict(info["model"])
    if dtype is not None:
        cfg_dict["dtype"] = dtype
    cfg = ModelConfig(**cfg_dict)
    params = _restore_params(source, info, which)
    if "lora" in info:  # the checkpoints hold the adapters (and score head); the base is read from its source
        lora_cfg, base = lora_base(info)
        params = lora.merge_adapters(lora.join(base, params), lora_cfg)
    src_head = info["head"]
    want = head or src_head
    if src_head == "scalar" and info.get("reward_bias"):  # demonstrations score mean 0 (reward.py)
        params["score"] = {**params["score"], "bias": params["score"]["bias"] + info["reward_bias"]}
    if want == "lm" and "score" in params:  # a policy trained with a shared value head
        params = {k: v for k, v in params.items() if k != "score"}
    if want != src_head:
        if (src_head, want) != ("lm", "scalar"):
            raise ValueError(f"{source}: cannot turn a {src_head!r}-head model into a {want!r}-head model")
        params = {k: v for k, v in params.items() if k != "lm_head"}
        params["score"] = init_params(CausalLM(cfg, head="scalar"))["score"]
    tokenizer = load_tokenizer(source / "tokenizer")
    check_vocab(tokenizer, cfg.vocab_size)
    return CausalLM(cfg, head=want), params, tokenizer
