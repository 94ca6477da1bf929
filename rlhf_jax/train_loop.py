"""The training loop: jit with shardings and donation, logging, evaluation, checkpoints, preemption.

A stage (SFT, reward model, PPO) describes itself as a :class:`Stage`: its initial state
and that state's shardings, a pure ``train_step(state, batch, *frozen) -> (state,
metrics)``, a host-side ``next_batch()``, the data iterators whose positions are
checkpointed, and an optional evaluation. :func:`run` does the rest: resume from the
latest checkpoint, jit the step once with in/out shardings and state donation, loop with
a progress bar, write ``metrics.jsonl``, evaluate, save (latest-N + best-N), and on
SIGTERM save at the next step boundary and exit with status ``EXIT_PREEMPTED``. The stage
drivers that build a :class:`Stage` from a config live in ``rlhf_jax.drivers``.

Non-finite values: each stage's step skips itself when a checked quantity is not finite
(``optim.skip_nonfinite``: the state comes back bitwise, its step counter included, so a
checkpoint labelled step s holds s minus the skipped steps' updates). The loop reads the
guard's ``nonfinite/*`` flags with the logged metrics and before every save (no extra
host sync per step), logs ``nonfinite/skipped_total`` and ``nonfinite/consecutive``, keeps
both counts in each checkpoint, raises :class:`NonFiniteError` naming the step and the
quantity after ``RunConfig.max_consecutive_skips`` skips in a row, and never saves a state
that is not finite.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from rlhf_jax import sharding
from rlhf_jax.checkpoint import Checkpointer, abstract_like
from rlhf_jax.config import RunConfig
from rlhf_jax.optim import NONFINITE_QUANTITIES, all_finite
from rlhf_jax.shared_jit import shared_jit

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 143  # 128 + SIGTERM: the run saved and stopped on a preemption notice


class NonFiniteError(RuntimeError):
    """Training stopped on non-finite values; the message names the step and the quantity."""


class SkipCounter:
    """Host-side count of the steps the non-finite guard skipped (checkpointed in the meta JSON).

    Attributes:
      total: steps skipped in the whole run.
      consecutive: steps skipped in a row up to the last counted step.
    """

    def __init__(self, stage: str, limit: int) -> None:
        self.stage, self.limit = stage, limit
        self.total = self.consecutive = 0
        self._tripped: str | None = None

    def add(self, step: int, flags: dict) -> None:
        """Count ``step`` from its ``nonfinite/*`` metrics (host floats); :meth:`check` raises later."""
        if float(flags.get("nonfinite/skipped", 0.0)) == 0.0:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        if self.consecutive >= self.limit and self._tripped is None:
            names = [k[len("nonfinite/") :] for k, v in flags.items() if k != "nonfinite/skipped" and float(v) > 0]
            order = {q: i for i, q in enumerate(NONFINITE_QUANTITIES)}
            names.sort(key=lambda n: order.get(n, len(order)))
            self._tripped = (
                f"{self.stage}: step {step}: {self.consecutive} consecutive steps skipped for non-finite values "
                f"(limit RunConfig.max_consecutive_skips={self.limit}); first non-finite quantity: "
                f"{names[0] if names else 'unknown'} (all: {', '.join(names) or 'unknown'})"
            )

    def check(self) -> None:
        """Raise :class:`NonFiniteError` if the limit of consecutive skips was reached."""
        if self._tripped is not None:
            raise NonFiniteError(self._tripped)

    def state(self) -> dict:
        return {"skipped_total": self.total, "consecutive": self.consecutive}

    def restore(self, state: dict) -> None:
        self.total, self.consecutive = int(state["skipped_total"]), int(state["consecutive"])


@dataclass
class Stage:
    """What a training stage hands to :func:`run`.

    Attributes:
      name: "sft", "rm", "ppo" (progress bar and metric prefix).
      state: the initial state pytree (already placed with ``state_shardings``).
      state_shardings: NamedShardings matching ``state``.
      train_step: pure ``(state, batch, *frozen) -> (state, metrics)``; jitted here.
      next_batch: host-side ``() -> dict[str, np.ndarray]`` (global batch).
      iterators: name -> object with ``state()`` / ``restore(state)`` (checkpointed).
      total_steps: the step count at which training ends.
      frozen: extra arrays passed to every step, never donated (reference policy, RM).
      evaluate: ``(state) -> dict[str, float]``, run every ``eval_every`` steps and at the end.
      best_metric / best_mode: the evaluation metric that ranks checkpoints.
      tokens_per_batch: for the throughput shown in the progress bar.
      extra_meta: ``() -> dict`` added to each checkpoint's JSON (e.g. normalisation stats).
      restore_extra: ``(meta) -> None`` called after a restore with that JSON.
      memory_flags: the flags that lower this stage's memory, named when a step runs out of it.
    """

    name: str
    state: Any
    state_shardings: Any
    train_step: Callable[..., tuple[Any, dict]]
    next_batch: Callable[[], dict]
    iterators: dict[str, Any]
    total_steps: int
    frozen: tuple = ()
    evaluate: Callable[[Any], dict] | None = None
    best_metric: str | None = None
    best_mode: str = "min"
    tokens_per_batch: int = 0
    extra_meta: Callable[[], dict] = field(default=lambda: {})
    restore_extra: Callable[[dict], None] = field(default=lambda meta: None)
    memory_flags: str = "--batch-size, the length caps, --run.remat"


class StepOutOfMemory(MemoryError):
    """A step asked the device for more memory than it has; the message names the batch shapes and flags."""


def _out_of_memory(stage: Stage, step: int, batch: dict, error: Exception) -> StepOutOfMemory:
    shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in batch.items())
    return StepOutOfMemory(
        f"{stage.name}: step {step} ran out of device memory on the batch {{{shapes}}} "
        f"(plus {len(jax.tree.leaves(stage.frozen))} frozen arrays); lower it with {stage.memory_flags}. "
        f"XLA said: {str(error).splitlines()[0][:300]}"
    )


class _Preemption:
    """Turns SIGTERM into a flag checked at step boundaries."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _Preemption:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class MetricsWriter:
    """Appends one JSON object per line to ``<run>/metrics.jsonl`` (and TensorBoard if installed)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a")
        self._tb = None
        try:  # optional
            from tensorboardX import SummaryWriter  # type: ignore

            self._tb = SummaryWriter(str(run_dir / "tb"))
        except Exception:
            self._tb = None

    def write(self, step: int, metrics: dict) -> None:
        row = {"step": int(step), **{k: _to_float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and v is not None:
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _to_float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _batch_shardings(batch: dict, mesh) -> dict:
    return {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def _compile_step(stage: Stage, first_batch: dict, mesh) -> Callable:
    """The stage's step under ``jax.jit``: state in and out with its shardings (donated), the
    batch sharded along data x fsdp, frozen arrays where they are, metrics replicated. Its
    programs are shared with any earlier stage of the process that lowered to the same ones
    (``shared_jit``: the same stage run again, e.g. PPO-ptx in each RLHF round)."""
    frozen_shardings = jax.tree.map(lambda x: x.sharding, stage.frozen)
    return shared_jit(
        stage.train_step,
        in_shardings=(stage.state_shardings, _batch_shardings(first_batch, mesh), *frozen_shardings),
        out_shardings=(stage.state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def _resume(stage: Stage, ckpt: Checkpointer, skips: SkipCounter, run_cfg: RunConfig) -> tuple[Any, int]:
    """(state, step) of the latest checkpoint, with the iterators, skip counts and extras restored;
    ``(stage.state, 0)`` for a new run."""
    if ckpt.latest_step() is None:
        return stage.state, 0
    state, meta, start = ckpt.restore(abstract_like(stage.state), fallback=run_cfg.restore_fallback)
    for name, it in stage.iterators.items():
        it.restore(meta["iterators"][name])
    if "nonfinite" in meta:
        skips.restore(meta["nonfinite"])
    stage.restore_extra(meta)
    log.info("%s: resumed from step %d", stage.name, start)
    return state, start


class _MetricsLog:
    """The device metrics of the steps since the last log row: averaged and written every
    ``log_every`` steps, their non-finite flags counted by the :class:`SkipCounter` (a host
    read only when a row is written or a checkpoint saved, never once per step)."""

    def __init__(self, stage: Stage, writer: MetricsWriter, skips: SkipCounter) -> None:
        self.stage, self.writer, self.skips = stage, writer, skips
        self.pending: list[dict] = []
        self.counted = 0  # how many of ``pending`` the skip counter has seen
        self.t_last = time.perf_counter()

    def add(self, metrics: dict) -> None:
        self.pending.append(metrics)

    def count_skips(self, step: int) -> None:
        """Host-read the guard's flags of the steps not counted yet (``step`` is the latest)."""
        flags = jax.device_get(
            [{k: v for k, v in m.items() if k.startswith("nonfinite/")} for m in self.pending[self.counted :]]
        )
        first = step - len(self.pending) + self.counted + 1
        for i, f in enumerate(flags):
            self.skips.add(first + i, f)
        self.counted = len(self.pending)

    def write_row(self, step: int) -> dict:
        """Average the pending steps into one ``metrics.jsonl`` row (with throughput); returns it."""
        self.count_skips(step)
        host = jax.device_get(self.pending)
        avg = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
        avg |= {f"nonfinite/{k}": float(v) for k, v in self.skips.state().items()}
        dt = time.perf_counter() - self.t_last
        avg["perf/steps_per_s"] = len(host) / dt
        if self.stage.tokens_per_batch:
            avg["perf/tokens_per_s"] = self.stage.tokens_per_batch * len(host) / dt
        self.writer.write(step, {f"train/{k}" if "/" not in k else k: v for k, v in avg.items()})
        self.pending, self.counted, self.t_last = [], 0, time.perf_counter()
        return avg


def _progress_bar(stage: Stage, start: int, enabled: bool):
    if not enabled:
        return None
    return tqdm(total=stage.total_steps, initial=start, desc=stage.name, dynamic_ncols=True, file=sys.stderr)


def run(stage: Stage, run_cfg: RunConfig, mesh, run_dir: str | Path, *, config_json: dict | None = None) -> Any:
    """Train ``stage`` to ``stage.total_steps`` (or only to ``run_cfg.stop_at_step``, saving
    there) in ``run_dir``, resuming from its latest checkpoint if it has one; returns the final state."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(
        run_dir / "checkpoints",
        keep_last=run_cfg.keep_last,
        keep_best=run_cfg.keep_best,
        best_metric=stage.best_metric,
        best_mode=stage.best_mode,
    )
    skips = SkipCounter(stage.name, run_cfg.max_consecutive_skips)
    try:
        state, start = _resume(stage, ckpt, skips, run_cfg)
    except BaseException:  # e.g. a damaged checkpoint: do not leak the manager's background threads
        ckpt.close()
        raise
    # this invocation stops at ``end``; the schedule (built from total_steps) is unaffected
    end = stage.total_steps if run_cfg.stop_at_step is None else min(stage.total_steps, run_cfg.stop_at_step)
    if start >= end:
        ckpt.close()
        return state

    def meta() -> dict:
        return {
            "stage": stage.name,
            "iterators": {n: it.state() for n, it in stage.iterators.items()},
            "config": config_json or {},
            "best_metric": stage.best_metric,  # how load_model(which="best") ranks the checkpoints
            "best_mode": stage.best_mode,
            "nonfinite": skips.state(),
            **stage.extra_meta(),
        }

    batch = stage.next_batch()
    trace = (run_dir / "data_trace.jsonl").open("a") if run_cfg.trace_data else None
    ids = _batch_ids(stage) if trace is not None else None
    step_fn = _compile_step(stage, batch, mesh)
    writer = MetricsWriter(run_dir)
    metrics_log = _MetricsLog(stage, writer, skips)
    state_finite = shared_jit(all_finite)
    step, saved_at = start, start  # saved_at: the step of the last save started (a resume starts at a saved one)

    def save(st, **kw) -> None:  # a non-finite state is never saved
        nonlocal saved_at
        metrics_log.count_skips(step)
        skips.check()
        if not bool(state_finite(st)):
            raise NonFiniteError(f"{stage.name}: step {step}: the train state is not finite; not saving it")
        ckpt.save(step, st, meta(), **kw)
        saved_at = step

    bar = _progress_bar(stage, start, run_cfg.progress)
    try:
        with _Preemption() as preempt, sharding.use_mesh(mesh):
            while step < end:
                try:
                    state, metrics = step_fn(state, sharding.shard_batch(batch, mesh), *stage.frozen)
                except jax.errors.JaxRuntimeError as e:
                    if "RESOURCE_EXHAUSTED" in str(e) or "Out of memory" in str(e):
                        raise _out_of_memory(stage, step + 1, batch, e) from e
                    raise
                step += 1
                metrics_log.add(metrics)
                if trace is not None:
                    trace.write(json.dumps({"step": step, **ids}) + "\n")
                    trace.flush()
                if bar is not None:
                    bar.update(1)
                if step % run_cfg.log_every == 0 or step == end:
                    avg = metrics_log.write_row(step)
                    if bar is not None:
                        bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in list(avg.items())[:3]})
                    skips.check()  # after the row is written: the log shows the skips that stopped the run
                eval_metrics = None
                if stage.evaluate is not None and (step % run_cfg.eval_every == 0 or step == stage.total_steps):
                    eval_metrics = stage.evaluate(state)
                    writer.write(step, eval_metrics)
                if eval_metrics is not None or step % run_cfg.save_every == 0 or step == end:
                    ranked = eval_metrics if eval_metrics and stage.best_metric in eval_metrics else None
                    save(state, metrics=ranked)
                if preempt.requested:
                    if saved_at != step:  # (a save of this step may still be in flight: wait() below)
                        save(state)
                    ckpt.wait()
                    log.warning("%s: SIGTERM received; saved step %d and stopping", stage.name, step)
                    raise SystemExit(EXIT_PREEMPTED)
                if step < end:
                    batch = stage.next_batch()
                    ids = _batch_ids(stage) if trace is not None else None
        ckpt.wait()
    finally:
        if bar is not None:
            bar.close()
        if trace is not None:
            trace.close()
        writer.close()
        ckpt.close()
    return state


def _batch_ids(stage: Stage) -> dict:
    """iterator name -> example ids of the batch it served last (``BatchIterator.last_ids``)."""
    return {
        name: np.asarray(it.last_ids).tolist()
        for name, it in stage.iterators.items()
        if getattr(it, "last_ids", None) is not None
    }
