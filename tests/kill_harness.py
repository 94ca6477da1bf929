"""Kill -9 harness (issue 8, item 1), shared by tests/test_kill.py and experiments/kill_loop.py.

A child process (``python -m tests.kill_harness STAGE WORLD OUT SLOW STEPS``) trains a tiny SFT
or PPO-ptx run with a checkpoint every step (latest 2 kept, so every save also deletes
one). With ``SLOW > 0`` it widens two windows by that many seconds, so that a parent can
kill it inside them: a save in flight (its temporary directory fully written, the rename
that commits it not done yet) and the deletion of an old checkpoint (retention renamed it
into ``.deleted/``; the child has removed part of its files and not the rest).

:func:`kill_cycle` is the parent: it starts the child, SIGKILLs it at a chosen moment
(``save``: a temporary directory is on disk; ``delete``: ``.deleted/`` holds a partly
removed checkpoint; ``random``: a random time after the child's first new checkpoint),
checks the run directory after every kill (every listed checkpoint restores and is
finite, no temporary directory is listed), restarts it, and at the end compares the
finished run with an uninterrupted one, bitwise.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

STEPS = {"sft": 14, "ppo": 12}  # enough for the CI's kills: each leg makes 1-2 steps of progress
KILL_KINDS = ("save", "delete", "random")


# ----------------------------------------------------------------------------- the child


def make_world(root: Path) -> None:
    """Tokenizer, one-layer base model and 32-row data files under ``root`` (the parent builds it once)."""
    from rlhf_jax.tasks import tiny

    tok = tiny.make_tokenizer(root / "tokenizer", num_words=24)
    tiny.make_model_dir(root / "base", vocab_size=len(tok), tokenizer=tok, hidden_size=32, num_layers=1)
    tiny.write_data(root / "data", num_words=24, n=32)


def _config(stage: str, world: Path, out: Path, steps: int):
    from rlhf_jax.config import MeshConfig, PPOConfig, PPOHyperparams
    from tests import stage_fixtures as F

    files = {k: str(world / "data" / f"{k}.jsonl") for k in ("demonstrations", "prompts", "text")}
    run = F.run_config(save_every=1, keep_last=2, keep_best=0, split_fractions=(1.0, 0.0, 0.0), mesh=MeshConfig())
    if stage == "sft":
        w = SimpleNamespace(base=world / "base", files={"demonstrations": files["demonstrations"]})
        return F.sft_config(w, out, max_steps=steps, batch_size=8, dropout=0.1, run=run)
    return PPOConfig(
        prompts=files["prompts"],
        policy=str(world / "base"),
        reward=str(world / "base"),
        out=str(out),
        ptx_data=files["text"],
        max_steps=steps,
        max_prompt_len=8,
        ptx_seq_len=12,
        run=run,
        hparams=PPOHyperparams(
            batch_size=8,
            minibatch_size=4,
            ppo_epochs=2,
            max_new_tokens=5,
            adaptive_kl=True,
            kl_target=0.01,
            kl_horizon=50,
        ),
        optim=dataclasses.replace(PPOConfig.optim, learning_rate=3e-3, warmup_steps=1),
    )


def _widen_windows(seconds: float) -> None:
    """Test only: sleep before each save's commit (rename) and in the middle of each deletion."""
    import asyncio

    from orbax.checkpoint._src.path import atomicity

    from rlhf_jax.checkpoint import TRASH, Checkpointer

    commit = atomicity.AtomicRenameTemporaryPath.finalize

    async def slow_commit(self, *args, **kwargs):
        await asyncio.sleep(seconds)
        return await commit(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = slow_commit
    purge = Checkpointer._purge_trash

    def slow_purge(self) -> None:
        trash = self.directory / TRASH
        if trash.is_dir() and any(trash.iterdir()):
            for entry in trash.iterdir():  # remove part of each unlisted checkpoint, then pause
                files = sorted(p for p in entry.rglob("*") if p.is_file())
                for p in files[: len(files) // 2]:
                    p.unlink()
            time.sleep(seconds)
        purge(self)

    Checkpointer._purge_trash = slow_purge


def child_main(argv: list[str]) -> None:
    stage, world, out, slow, steps = argv[0], Path(argv[1]), Path(argv[2]), float(argv[3]), int(argv[4])
    if slow > 0:
        _widen_windows(slow)
    cfg = _config(stage, world, out, steps)
    if stage == "sft":
        from rlhf_jax.drivers import run_sft

        run_sft(cfg)
    else:
        from rlhf_jax.drivers import run_ppo

        run_ppo(cfg)


# ----------------------------------------------------------------------------- the parent


@dataclass
class KillStats:
    """What a kill cycle did (the README's reliability table counts these)."""

    kills: int = 0
    kills_during_save: int = 0  # a temporary (uncommitted) checkpoint directory was on disk
    kills_during_delete: int = 0  # a partly removed checkpoint was in .deleted/
    sigterms: int = 0
    resumes: int = 0  # restarts that found a checkpoint to resume from
    checkpoints_restored: int = 0
    corrupt_restores: int = 0
    kinds: list[str] = field(default_factory=list)

    def add(self, other: KillStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def child_env(cache_dir: Path | None) -> dict:
    """One CPU device, offline, and a persistent compilation cache shared by the children."""
    from tests import stage_fixtures as F

    env = F.subprocess_env(1)
    if cache_dir is not None:
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(cache_dir),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
    return env


def start_child(
    stage: str, world: Path, out: Path, *, slow: float, env: dict, log: Path, steps: int | None = None
) -> subprocess.Popen:
    """The child training ``stage`` in ``out`` (``steps`` defaults to STEPS[stage]), stderr appended to ``log``."""
    from tests import stage_fixtures as F

    args = [stage, str(world), str(out), str(slow), str(steps or STEPS[stage])]
    with log.open("a") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.kill_harness", *args],
            env=env,
            cwd=F.REPO,
            stdout=subprocess.DEVNULL,
            stderr=f,
        )


def _tmp_dirs(ckpt_dir: Path) -> list[Path]:
    return [p for p in ckpt_dir.glob("*.orbax-checkpoint-tmp*")] if ckpt_dir.is_dir() else []


def _deleting(ckpt_dir: Path) -> bool:
    from rlhf_jax.checkpoint import TRASH

    trash = ckpt_dir / TRASH
    return trash.is_dir() and any(trash.iterdir())


def _committed(ckpt_dir: Path) -> set[int]:
    return {int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()} if ckpt_dir.is_dir() else set()


def check_run_dir(out: Path, stats: KillStats) -> int | None:
    """After a kill: no temporary directory is listed, every listed checkpoint restores and is
    finite. Returns the latest step (None if there is none yet)."""
    import jax
    import numpy as np

    from rlhf_jax.checkpoint import Checkpointer

    ckpt_dir = out / "checkpoints"
    if not ckpt_dir.is_dir():
        return None
    tmp_steps = {int(p.name.split(".")[0]) for p in _tmp_dirs(ckpt_dir)}
    with Checkpointer(ckpt_dir) as ckpt:
        steps = ckpt.all_steps()
        assert not tmp_steps & (set(steps) - _committed(ckpt_dir)), f"a temporary directory is listed: {steps}"
        for s in steps:
            try:
                state, _ = ckpt.restore_raw(s)
                leaves = [np.asarray(x) for x in jax.tree.leaves(state)]
                assert all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.floating)), s
            except Exception as e:  # counted and reported; the caller asserts there are none
                stats.corrupt_restores += 1
                raise AssertionError(f"{out}: listed checkpoint {s} does not restore after a kill: {e}") from e
            stats.checkpoints_restored += 1
    return steps[-1] if steps else None


def kill_cycle(
    stage: str,
    world: Path,
    out: Path,
    *,
    kills: int,
    seed: int,
    env: dict,
    slow: float = 0.3,
    sigterm_at: int | None = None,
    steps: int | None = None,
    timeout: float = 240.0,
) -> KillStats:
    """Train ``stage`` in ``out`` to the end, killed ``kills`` times (cycling through KILL_KINDS);
    the ``sigterm_at``-th interruption (if given) is a SIGTERM instead, which must save and exit
    with EXIT_PREEMPTED within 30 s. Returns the statistics; raises on any violation."""
    from rlhf_jax.train_loop import EXIT_PREEMPTED

    rng = random.Random(seed)
    stats = KillStats()
    log = out.parent / f"{out.name}.log"
    ckpt_dir = out / "checkpoints"
    interruptions = kills + (sigterm_at is not None)
    for i in range(interruptions + 1):
        before = check_run_dir(out, stats)
        if before is not None:
            stats.resumes += 1
        last = i == interruptions  # the last leg runs to the end (no windows to widen)
        child = start_child(stage, world, out, slow=0.0 if last else slow, env=env, log=log, steps=steps)
        deadline = time.monotonic() + timeout
        if last:
            rc = child.wait(timeout=timeout)
            assert rc == 0, f"{stage}: the final leg failed ({rc}); see {log}"
            break
        kind = "sigterm" if i == sigterm_at else KILL_KINDS[i % len(KILL_KINDS)]
        random_after = rng.uniform(0.0, 0.8)
        new_since: float | None = None
        while True:
            if child.poll() is not None:
                raise AssertionError(f"{stage}: the child ended ({child.returncode}) before kill {i}; see {log}")
            assert time.monotonic() < deadline, f"{stage}: no {kind} window seen before the timeout; see {log}"
            progressed = max(_committed(ckpt_dir), default=0) > (before or 0)  # a new checkpoint since the restart
            if progressed and new_since is None:
                new_since = time.monotonic()
            if kind == "save" and progressed and _tmp_dirs(ckpt_dir):
                break
            if kind == "delete" and progressed and _deleting(ckpt_dir):
                break
            if kind in ("random", "sigterm") and new_since is not None and time.monotonic() - new_since > random_after:
                break
            time.sleep(0.01)
        if kind == "sigterm":
            t0 = time.monotonic()
            child.send_signal(signal.SIGTERM)
            rc = child.wait(timeout=30)
            assert rc == EXIT_PREEMPTED, f"{stage}: SIGTERM gave exit status {rc}; see {log}"
            assert time.monotonic() - t0 < 30
            # it waited for its async save: committed (no temporary directory) at the last step it trained
            from rlhf_jax.train_loop import read_metrics

            assert not _tmp_dirs(ckpt_dir), f"{stage}: a save was still in flight at the exit"
            assert max(_committed(ckpt_dir)) == max(m["step"] for m in read_metrics(out))
            stats.sigterms += 1
        else:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
            stats.kills += 1
            stats.kills_during_save += bool(_tmp_dirs(ckpt_dir))
            stats.kills_during_delete += _deleting(ckpt_dir)
        stats.kinds.append(kind)
    check_run_dir(out, stats)
    return stats


def assert_same_run(got: Path, want: Path) -> None:
    """The finished runs are bitwise equal: final state, data positions and every step's metrics."""
    from rlhf_jax import train_loop
    from tests import stage_fixtures as F

    a, meta_a, step_a = F.read_checkpoint(want)
    b, meta_b, step_b = F.read_checkpoint(got)
    assert step_a == step_b
    F.assert_trees_equal(b, a)
    assert meta_a["iterators"] == meta_b["iterators"]

    def losses(run_dir):
        rows = {}
        for m in train_loop.read_metrics(run_dir):  # a step run again after a kill: its last row wins
            rows[m["step"]] = {k: v for k, v in m.items() if k.startswith(("train/loss", "loss/"))}
        return rows

    assert losses(got) == losses(want)


def fresh_copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    child_main(sys.argv[1:])
