"""Exact resume everywhere (issue 8, item 4): for SFT, the reward model and PPO-ptx, N
steps straight equal k steps + restart + N - k steps for EVERY k in 1..N-1, across an
epoch boundary, bitwise: the whole train state (params, optimizer state and counts, step,
RNG; PPO: policy and value networks, EMA params, KL coefficient, iteration), both data
iterators' positions, the non-finite counters, every step's loss, and the example ids
each step trained on (``RunConfig.trace_data``): the multiset of ids seen equals the
uninterrupted run's, with every epoch visiting each training example exactly once.

A second test lists every mutable training quantity of each stage and checks that each
one is in the checkpoint (and that the checkpoint holds nothing unlisted).

The restarts here are in-process (a new ``run_*`` call resumes from the run directory);
the new-process resumes are in test_sft.py, test_reward.py and test_kill.py. Each run
re-jits its step; a persistent compilation cache (a temporary directory, this module
only) makes the repeated compiles cheap, and the runs use one device.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from rlhf_jax import train_loop
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.config import MeshConfig, PPOConfig, PPOHyperparams
from rlhf_jax.drivers import run_ppo, run_rm, run_sft
from rlhf_jax.tasks import tiny
from tests import stage_fixtures as F

N = 3  # steps; every k in 1..N-1 is a restart point (epoch 0 is steps 1-2)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """One device and a persistent compilation cache for this module's many identical compiles.

    The runs' meshes are built on the first of the 8 fake devices (``sharding.make_mesh`` is
    patched for this module): one-device programs compile fastest and have no collectives
    (meshes are tested in test_sft.py, test_checkpoint.py and test_ppo.py). Afterwards the
    old settings come back.
    """
    import functools

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
    new = dict(zip(names, (str(tmp_path_factory.mktemp("jax_cache")), 0.0, 0)))
    for n, v in new.items():
        jax.config.update(n, v)
    cc.reset_cache()
    yield
    patch.undo()
    for n, v in old.items():
        jax.config.update(n, v)
    cc.reset_cache()


def _world(root: Path) -> SimpleNamespace:
    """The tiny world with 20 rows per file: PPO's 8-prompt batches make a 2-step epoch."""
    tok = tiny.make_tokenizer(root / "tokenizer", num_words=24)
    base = tiny.make_model_dir(root / "base", vocab_size=len(tok), tokenizer=tok, hidden_size=32, num_layers=1)
    files = tiny.write_data(root / "data", num_words=24, n=20)
    return SimpleNamespace(tok=tok, base=base, files=files)


def _run_cfg(**changes):
    return F.run_config(
        trace_data=True,
        save_every=1,
        keep_last=N,
        keep_best=0,
        split_fractions=(1.0, 0.0, 0.0),
        mesh=MeshConfig(),
        **changes,
    )


def _sft(world, out: Path, **run_changes):
    # 20 demonstrations, batches of 8: 2 steps per epoch; dropout on, so a wrong RNG restore shows
    return run_sft, F.sft_config(world, out, max_steps=N, batch_size=8, dropout=0.1, run=_run_cfg(**run_changes))


def _rm(world, out: Path, **run_changes):
    return run_rm, F.rm_config(world, out, max_steps=N, batch_size=8, run=_run_cfg(**run_changes))


def _ppo(world, out: Path, **run_changes):
    cfg = PPOConfig(
        prompts=str(world.files["prompts"]),
        policy=str(world.base),
        reward=str(world.base),
        out=str(out),
        ptx_data=str(world.files["text"]),
        max_steps=N,
        max_prompt_len=8,
        ptx_seq_len=12,
        run=_run_cfg(**run_changes),
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
    return run_ppo, cfg


STAGES = {"sft": _sft, "rm": _rm, "ppo": _ppo}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return _world(tmp_path_factory.mktemp("resume_world"))


@pytest.fixture(scope="module")
def straight_runs(world, tmp_path_factory):
    """stage -> the run directory of its N steps in one go (built lazily, once)."""
    root = tmp_path_factory.mktemp("straight")
    made: dict[str, Path] = {}

    def get(stage: str) -> Path:
        if stage not in made:
            fn, cfg = STAGES[stage](world, root / stage)
            fn(cfg)
            made[stage] = Path(cfg.out)
        return made[stage]

    return get


def _trace(run_dir: Path) -> dict[int, dict]:
    """step -> {iterator: ids} (a step run again after a restart: its last line wins)."""
    rows = [json.loads(line) for line in (run_dir / "data_trace.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k != "step"} for r in rows}


def _ids_seen(trace: dict[int, dict], iterator: str) -> collections.Counter:
    return collections.Counter(i for s in sorted(trace) for i in trace[s][iterator])


def _losses(run_dir: Path) -> dict[int, dict]:
    """step -> that step's logged loss metrics (the last row of a step wins)."""
    rows = [m for m in train_loop.read_metrics(run_dir) if any(k.startswith(("train/", "loss/")) for k in m)]
    return {m["step"]: {k: v for k, v in m.items() if k.startswith(("train/loss", "loss/"))} for m in rows}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_resume_at_every_step_is_exact(world, straight_runs, tmp_path, stage):
    want_dir = straight_runs(stage)
    want, want_meta, want_step = F.read_checkpoint(want_dir)
    want_trace = _trace(want_dir)
    assert want_step == N and sorted(want_trace) == list(range(1, N + 1))
    iterators = sorted(want_meta["iterators"])
    assert iterators == (["prompts", "ptx"] if stage == "ppo" else ["train"])
    # 20 examples in batches of 8: epoch 0 is steps 1-2 (each example at most once), step 3 is in epoch 1
    main = iterators[0]
    assert want_meta["iterators"][main] == {"seed": 0, "epoch": 1, "position": 8}
    epoch0 = want_trace[1][main] + want_trace[2][main]
    assert len(set(epoch0)) == len(epoch0) == 16

    for k in range(1, N):
        out = tmp_path / f"k{k}"
        fn, first = STAGES[stage](world, out, stop_at_step=k)
        fn(first)
        _, _, step = F.read_checkpoint(out)
        assert step == k
        fn(STAGES[stage](world, out)[1])  # a new run_* call on the same directory resumes at k

        got, got_meta, got_step = F.read_checkpoint(out)
        assert got_step == N
        F.assert_trees_equal(got, want)  # every leaf of the state, bitwise
        assert got_meta["iterators"] == want_meta["iterators"], f"k={k}"
        assert got_meta["nonfinite"] == want_meta["nonfinite"] == {"skipped_total": 0, "consecutive": 0}
        assert _losses(out) == _losses(want_dir), f"k={k}"
        got_trace = _trace(out)
        assert got_trace == want_trace, f"k={k}: the steps trained on different examples"
        for name in iterators:  # the multiset of example ids seen: no repeats, no skips
            assert _ids_seen(got_trace, name) == _ids_seen(want_trace, name), f"k={k}, {name}"


# Every quantity training changes, by stage: state leaves (key paths in the checkpoint's state)
# and meta entries. ``True``: it must change between the first and the last checkpoint;
# ``False``: constant in this run but restored all the same (RNG key data: steps fold it in).
MUTABLE = {
    "sft": {
        "state": {"params": True, "opt_state": True, "step": True, "rng": False},
        "meta": ("iterators.train", "nonfinite"),
    },
    "rm": {
        "state": {"params": True, "opt_state": True, "step": True, "rng": False},
        "meta": ("iterators.train", "nonfinite"),
    },
    "ppo": {
        "state": {
            "policy.params": True,
            "policy.opt_state": True,
            "policy.step": True,
            "policy.rng": False,
            "value.params": True,
            "value.opt_state": True,
            "value.step": True,
            "value.rng": False,
            "ema_params": True,
            "kl_coef": True,
            "iteration": True,
            "rng": False,
        },
        "meta": ("iterators.prompts", "iterators.ptx", "nonfinite"),
    },
}


def _group(path) -> str:
    """'policy.params' for a leaf under state.policy.params; 'kl_coef' for a top-level leaf."""
    keys = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    return ".".join(keys[:2]) if keys[0] in ("policy", "value") else keys[0]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_mutable_quantity_is_in_the_checkpoint(straight_runs, stage):
    run_dir = straight_runs(stage)
    first, first_meta, _ = F.read_checkpoint(run_dir, 1)
    last, last_meta, _ = F.read_checkpoint(run_dir, N)
    groups: dict[str, list] = collections.defaultdict(list)
    for path, leaf in jax.tree_util.tree_flatten_with_path(last)[0]:
        groups[_group(path)].append((path, leaf))
    listed = MUTABLE[stage]["state"]
    assert set(groups) == set(listed), f"checkpoint state groups {sorted(groups)} vs listed {sorted(listed)}"
    first_leaves = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(first)[0]}
    for name, changes in listed.items():
        changed = any(not np.array_equal(first_leaves[jax.tree_util.keystr(p)], leaf) for p, leaf in groups[name])
        assert changed == changes, f"{stage}: {name} {'did not change' if changes else 'changed'} in training"
    for entry in MUTABLE[stage]["meta"]:
        node = last_meta
        for key in entry.split("."):
            assert key in node, f"{stage}: the checkpoint's meta lacks {entry}"
            node = node[key]
    assert set(last_meta["iterators"]) == {e.split(".")[1] for e in MUTABLE[stage]["meta"] if "." in e}
    assert first_meta["iterators"] != last_meta["iterators"]
    with Checkpointer(run_dir / "checkpoints") as ckpt:
        assert ckpt.all_steps() == list(range(1, N + 1))
