"""The only impure place: mesh, jit with shardings and donation, the loop, logging, checkpoints.

A stage (SFT, reward model, PPO) describes itself as a :class:`Stage`: its initial state
and that state's shardings, a pure ``train_step(state, batch, *frozen) -> (state,
metrics)``, a host-side ``next_batch()``, the data iterators whose positions are
checkpointed, and an optional evaluation. :func:`run` does the rest: resume from the
latest checkpoint, jit the step once with in/out shardings and state donation, loop with
a progress bar, write ``metrics.jsonl``, evaluate, save (latest-N + best-N), and on
SIGTERM save at the next step boundary and exit with status ``EXIT_PREEMPTED``.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.checkpoint import Checkpointer, abstract_like
from rlhf_jax.config import RunConfig
from rlhf_jax.optim import NONFINITE_QUANTITIES, all_finite

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


class _Preemption:
    """Turns SIGTERM into a flag checked at step boundaries."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_Preemption":
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
    state = stage.state
    start = 0
    skips = SkipCounter(stage.name, run_cfg.max_consecutive_skips)
    try:
        if ckpt.latest_step() is not None:
            state, meta, start = ckpt.restore(abstract_like(stage.state), fallback=run_cfg.restore_fallback)
            for name, it in stage.iterators.items():
                it.restore(meta["iterators"][name])
            if "nonfinite" in meta:
                skips.restore(meta["nonfinite"])
            stage.restore_extra(meta)
            log.info("%s: resumed from step %d", stage.name, start)
    except BaseException:  # e.g. a damaged checkpoint: do not leak the manager's background threads
        ckpt.close()
        raise

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

    # this invocation stops at ``end``; the schedule (built from total_steps) is unaffected
    end = stage.total_steps if run_cfg.stop_at_step is None else min(stage.total_steps, run_cfg.stop_at_step)
    first = stage.next_batch() if start < end else None
    trace = (run_dir / "data_trace.jsonl").open("a") if run_cfg.trace_data else None
    first_ids = _batch_ids(stage) if trace is not None and first is not None else None
    step_fn = None
    if first is not None:
        frozen_shardings = jax.tree.map(lambda x: x.sharding, stage.frozen)
        step_fn = jax.jit(
            stage.train_step,
            in_shardings=(stage.state_shardings, _batch_shardings(first, mesh), *frozen_shardings),
            out_shardings=(stage.state_shardings, sharding.replicated(mesh)),
            donate_argnums=(0,),
        )
    writer = MetricsWriter(run_dir)
    pending: list[dict] = []  # device metrics of the steps since the last log
    counted = 0  # how many of ``pending`` the skip counter has seen
    state_finite = jax.jit(all_finite)

    def count_skips() -> None:  # host-read the guard's flags of the steps not counted yet
        nonlocal counted
        flags = jax.device_get([{k: v for k, v in m.items() if k.startswith("nonfinite/")} for m in pending[counted:]])
        for i, f in enumerate(flags):
            skips.add(step - len(pending) + counted + i + 1, f)
        counted = len(pending)

    saved_at = [start]  # the step of the last save this run started (a resume starts at a saved step)

    def save(st, **kw) -> None:  # a non-finite state is never saved
        count_skips()
        skips.check()
        if not bool(state_finite(st)):
            raise NonFiniteError(f"{stage.name}: step {step}: the train state is not finite; not saving it")
        ckpt.save(step, st, meta(), **kw)
        saved_at[0] = step

    step = start
    bar = None
    if run_cfg.progress and start < end:
        from tqdm.auto import tqdm

        bar = tqdm(total=stage.total_steps, initial=start, desc=stage.name, dynamic_ncols=True, file=sys.stderr)
    t_last, steps_since = time.perf_counter(), 0
    try:
        with _Preemption() as preempt, sharding.use_mesh(mesh):
            batch, ids = first, first_ids
            while step < end:
                device_batch = sharding.shard_batch(batch, mesh)
                state, metrics = step_fn(state, device_batch, *stage.frozen)
                step += 1
                steps_since += 1
                pending.append(metrics)
                if trace is not None:
                    trace.write(json.dumps({"step": step, **ids}) + "\n")
                    trace.flush()
                if bar is not None:
                    bar.update(1)
                if step % run_cfg.log_every == 0 or step == end:
                    count_skips()
                    host = jax.device_get(pending)
                    avg = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
                    avg |= {f"nonfinite/{k}": float(v) for k, v in skips.state().items()}
                    dt = time.perf_counter() - t_last
                    avg["perf/steps_per_s"] = steps_since / dt
                    if stage.tokens_per_batch:
                        avg["perf/tokens_per_s"] = stage.tokens_per_batch * steps_since / dt
                    writer.write(step, {f"train/{k}" if "/" not in k else k: v for k, v in avg.items()})
                    if bar is not None:
                        bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in list(avg.items())[:3]})
                    pending, counted, t_last, steps_since = [], 0, time.perf_counter(), 0
                    skips.check()  # after the row is written: the log shows the skips that stopped the run
                eval_metrics = None
                if stage.evaluate is not None and (step % run_cfg.eval_every == 0 or step == stage.total_steps):
                    eval_metrics = stage.evaluate(state)
                    writer.write(step, eval_metrics)
                if eval_metrics is not None or step % run_cfg.save_every == 0 or step == end:
                    ranked = eval_metrics if eval_metrics and stage.best_metric in eval_metrics else None
                    save(state, metrics=ranked)
                if preempt.requested:
                    if saved_at[0] != step:  # (a save of this step may still be in flight: wait() below)
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
    return {name: np.asarray(it.last_ids).tolist() for name, it in stage.iterators.items()
            if getattr(it, "last_ids", None) is not None}  # fmt: skip


def shard_state(init_fn: Callable[[Any], Any], boxed_init_fn: Callable[[], Any], params: Any, mesh) -> tuple[Any, Any]:
    """Build a state from ``params`` directly into its shardings.

    Args:
      init_fn: ``params -> state`` (pure; e.g. ``init_train_state`` with an optimizer).
      boxed_init_fn: ``() -> state`` built from the model's *boxed* (logically annotated)
        init; traced with ``jax.eval_shape`` only, to derive the shardings of every leaf,
        optimizer moments included.
      params: the starting parameters (host or device arrays).

    Returns:
      (state, state_shardings).
    """
    shardings = sharding.param_shardings(boxed_init_fn, mesh)
    with sharding.use_mesh(mesh):
        state = jax.jit(init_fn, out_shardings=shardings)(params)
    return state, shardings


def sharded_train_state(model, params: Any, optimizer, seed: int, mesh) -> tuple[Any, Any]:
    """A TrainState for ``params`` placed by the model's logical axes (optimizer moments included)."""
    import jax.numpy as jnp

    from rlhf_jax.optim import init_train_state

    def boxed():
        return init_train_state(model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"], optimizer, seed)

    return shard_state(lambda p: init_train_state(p, optimizer, seed), boxed, params, mesh)


def load_split_tokenize(source: str, kind: str, run_cfg: RunConfig, tokenize: Callable, *, split: bool = True):
    """Load a data set, split it by user id (train, val, test) and tokenise each part.

    Malformed rows raise (or are skipped and counted, ``on_error="skip"``); the skip ceiling is
    checked on the rows, each part's length drops, and both together against the file's rows.
    Returns the three TokenizedDatasets (val/test None when ``split`` is False) and the records.
    """
    from rlhf_jax.data import SkipReport, load_records, split_by_user

    records, report = load_records(source, kind, on_error=run_cfg.on_error)
    report.check_ceiling(run_cfg.max_skip_fraction)
    if report.skipped:
        log.warning("%s: %s", source, report.summary())
    parts = split_by_user(records, fractions=run_cfg.split_fractions, seed=run_cfg.seed) if split else (records, [], [])
    out = []
    whole = SkipReport(dict(report.counts), total_rows=report.total_rows, source=str(source))  # + tokenising
    for part in parts:
        if not part:
            out.append(None)
            continue
        ds = tokenize(part)
        ds.report.source = ds.report.source or str(source)  # the ceiling error names the file
        ds.report.check_ceiling(run_cfg.max_skip_fraction)
        if ds.report.skipped:
            log.warning("%s (tokenised): %s", source, ds.report.summary())
        whole.absorb(ds.report)
        out.append(ds if len(ds) else None)
    whole.check_ceiling(run_cfg.max_skip_fraction)
    if out[0] is None:
        raise ValueError(f"{source}: no training example left after loading, splitting and length filtering")
    return out[0], out[1], out[2], parts
