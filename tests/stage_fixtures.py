"""Shared helpers for the stage tests (SFT, reward model, checkpoints, CLI): a tiny offline
world (word-level tokenizer, random GPT-2-style model directory, JSONL data from
``rlhf_jax.tasks.tiny``), tiny stage configs, and readers of a run directory's checkpoints.

Everything is small enough for a CPU with 2 cores: hidden 32, 2 layers, sequences <= 16
tokens, batches <= 16, a few dozen steps at most.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np

from rlhf_jax import checkpoint, train_loop
from rlhf_jax.config import MeshConfig, RewardConfig, RunConfig, SFTConfig
from rlhf_jax.tasks import tiny

REPO = Path(__file__).resolve().parents[1]
HIDDEN = 32
SFT_SEQ_LEN = 16
RM_PROMPT_LEN = 8
RM_RESPONSE_LEN = 8


def make_world(root: Path, *, seed: int = 0, n: int = 64, num_users: int = 8) -> SimpleNamespace:
    """Tokenizer, random base model (HF directory) and data files under ``root``."""
    root = Path(root)
    tok = tiny.make_tokenizer(root / "tokenizer")
    base = tiny.make_model_dir(root / "base", vocab_size=len(tok), tokenizer=tok, hidden_size=HIDDEN, seed=seed)
    files = tiny.write_data(root / "data", seed=seed, n=n, num_users=num_users)
    return SimpleNamespace(root=root, tok=tok, base=base, files=files)


def build_once(tmp_path_factory, name: str, build: Callable[[Path], dict]) -> tuple[Path, dict]:
    """``build(path)`` once per test session, shared by every pytest-xdist worker.

    The first worker to ask builds ``path`` under a file lock and records ``build``'s JSON
    result; the others wait and reuse it (the pattern pytest-xdist documents for expensive
    session data). Without xdist it is simply built once. Tests must only read ``path``.
    """
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of this session
    path = base / name
    with FileLock(str(path) + ".lock"):
        done = path / "built.json"
        if not done.is_file():
            if path.exists():  # left by a build that failed
                shutil.rmtree(path)
            path.mkdir(parents=True)
            done.write_text(json.dumps(build(path)))
        return path, json.loads(done.read_text())


def shared_world(tmp_path_factory, name: str) -> SimpleNamespace:
    """:func:`make_world` built once per session (see :func:`build_once`), read back from disk."""
    from rlhf_jax.models import load_tokenizer

    root, _ = build_once(tmp_path_factory, name, lambda p: (make_world(p), {})[1])
    files = {k: root / "data" / f"{k}.jsonl" for k in ("demonstrations", "rankings", "prompts", "text")}
    return SimpleNamespace(root=root, tok=load_tokenizer(root / "tokenizer"), base=root / "base", files=files)


def run_config(**changes) -> RunConfig:
    """Quiet, per-step logging, no periodic evaluation or saving unless asked."""
    kw = dict(progress=False, log_every=1, eval_every=1000, save_every=1000)
    kw.update(changes)
    return RunConfig(**kw)


def sft_config(
    world: SimpleNamespace, out: Path, *, run: RunConfig | None = None, lr: float = 3e-3, **changes
) -> SFTConfig:
    kw = dict(
        data=str(world.files["demonstrations"]),
        init=str(world.base),
        out=str(out),
        max_steps=12,
        batch_size=16,
        seq_len=SFT_SEQ_LEN,
        run=run or run_config(),
        optim=dataclasses.replace(SFTConfig.optim, learning_rate=lr),
    )
    kw.update(changes)
    return SFTConfig(**kw)


def rm_config(
    world: SimpleNamespace,
    out: Path,
    *,
    init: str | Path | None = None,
    run: RunConfig | None = None,
    lr: float = 1e-3,
    **changes,
) -> RewardConfig:
    kw = dict(
        data=str(world.files["rankings"]),
        init=str(init or world.base),
        out=str(out),
        max_steps=12,
        batch_size=8,
        max_prompt_len=RM_PROMPT_LEN,
        max_response_len=RM_RESPONSE_LEN,
        run=run or run_config(),
        optim=dataclasses.replace(RewardConfig.optim, learning_rate=lr),
    )
    kw.update(changes)
    return RewardConfig(**kw)


def cli_args(cfg: SFTConfig | RewardConfig, **run_changes) -> list[str]:
    """The command-line flags that reproduce ``cfg`` (the subset the tiny configs set)."""
    run = dataclasses.replace(cfg.run, **run_changes)
    args = [
        "--data",
        cfg.data,
        "--init",
        cfg.init,
        "--out",
        cfg.out,
        "--max-steps",
        str(cfg.max_steps),
        "--batch-size",
        str(cfg.batch_size),
        "--optim.learning-rate",
        repr(cfg.optim.learning_rate),
        "--optim.schedule",
        cfg.optim.schedule,
        "--optim.final-lr-fraction",
        repr(cfg.optim.final_lr_fraction),
        "--run.seed",
        str(run.seed),
        "--run.log-every",
        str(run.log_every),
        "--run.eval-every",
        str(run.eval_every),
        "--run.save-every",
        str(run.save_every),
        "--run.mesh.data",
        str(run.mesh.data),
        "--run.mesh.fsdp",
        str(run.mesh.fsdp),
        "--run.mesh.tensor",
        str(run.mesh.tensor),
        "--run.split-fractions",
        *map(str, run.split_fractions),
    ]
    args.append("--run.progress" if run.progress else "--run.no-progress")
    if run.stop_at_step is not None:
        args += ["--run.stop-at-step", str(run.stop_at_step)]
    if isinstance(cfg, SFTConfig):
        args += ["--seq-len", str(cfg.seq_len), "--dropout", repr(cfg.dropout)]
    else:
        args += ["--max-prompt-len", str(cfg.max_prompt_len), "--max-response-len", str(cfg.max_response_len)]
        if cfg.demonstrations is not None:
            args += ["--demonstrations", cfg.demonstrations]
    return args


def subprocess_env(num_devices: int | None = None) -> dict:
    """The test process's environment (fake CPU devices, offline) for a child python."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    if num_devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    return env


def run_cli(args: list[str], *, num_devices: int | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m rlhf_jax.cli ARGS`` in a new process."""
    return subprocess.run(
        [sys.executable, "-m", "rlhf_jax.cli", *args],
        env=subprocess_env(num_devices),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Background:
    """``python -m rlhf_jax.cli ARGS`` started now in a new process; :meth:`result` waits for it.

    Lets independent runs overlap with the in-process ones (the tests are CPU-bound but a
    child spends much of its time importing)."""

    def __init__(self, args: list[str], log_path: Path, *, num_devices: int | None = None) -> None:
        self.log_path = Path(log_path)
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rlhf_jax.cli", *args],
            env=subprocess_env(num_devices),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def result(self, timeout: float = 240) -> tuple[int, str]:
        """(exit status, stderr)."""
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            self.close()
        return rc, self.log_path.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def read_checkpoint(run_dir: str | Path, step: int | None = None) -> tuple[dict, dict, int]:
    """(state as a tree of numpy arrays, meta JSON, step) of a run's checkpoint (latest by default)."""
    ckpt = checkpoint.Checkpointer(Path(run_dir) / "checkpoints")
    try:
        step = ckpt.latest_step() if step is None else step
        state, meta = ckpt.restore_raw(step)  # no abstract target: what was saved, as saved
    finally:
        ckpt.close()
    return jax.tree.map(np.asarray, state), meta, step


def train_losses(run_dir: str | Path) -> dict[int, float]:
    """step -> train/loss from metrics.jsonl (the last row wins if a step was logged twice)."""
    return {m["step"]: m["train/loss"] for m in train_loop.read_metrics(run_dir) if "train/loss" in m}


def assert_trees_equal(a, b, *, atol: float | None = None) -> None:
    """Same structure; leaves bitwise equal (atol None) or within ``atol``."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb, f"tree structures differ:\n{ta}\n{tb}"
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(a)[0]]
    for path, x, y in zip(paths, la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype, f"{path}: {x.shape}/{x.dtype} vs {y.shape}/{y.dtype}"
        if atol is None:
            assert np.array_equal(x, y), f"{path}: not bitwise equal (max |diff| {np.max(np.abs(x - y))})"
        else:
            np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=path)


def write_good_then_bad(path, good: dict, bad_lines: list[str], *, n_good: int = 60):
    """``n_good`` copies of the valid row ``good`` (4 users), then ``bad_lines`` verbatim: the
    first bad line is line ``n_good + 1``. Returns ``path``."""
    rows = [dict(good, user_id=f"u{i % 4}") for i in range(n_good)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(b + "\n" for b in bad_lines))
    return path


MESH_1x8x1 = MeshConfig(data=1, fsdp=8, tensor=1)
MESH_2x2x2 = MeshConfig(data=2, fsdp=2, tensor=2)
MESH_8x1x1 = MeshConfig(data=8, fsdp=1, tensor=1)


def one_device_and_compilation_cache(tmp_path_factory):
    """Generator for a module fixture: runs on one device with a per-module persistent
    compilation cache (repeated compiles of a resume test become cache hits); the old
    settings come back afterwards."""
    import functools

    import jax
    import pytest
    from jax._src import compilation_cache as cc

    from rlhf_jax import sharding

    patch = pytest.MonkeyPatch()
    patch.setattr(sharding, "make_mesh", functools.partial(sharding.make_mesh, devices=jax.devices()[:1]))
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {n: getattr(jax.config, n) for n in names}
    for n, v in zip(names, (str(tmp_path_factory.mktemp("jax_cache")), 0.0, 0)):
        jax.config.update(n, v)
    cc.reset_cache()
    yield
    patch.undo()
    for n, v in old.items():
        jax.config.update(n, v)
    cc.reset_cache()
