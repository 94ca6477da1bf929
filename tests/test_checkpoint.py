"""Checkpointer: latest-N + best-N retention, loud failures on damaged checkpoints with an
opt-in fallback, atomic saves (temporary directories are never checkpoints), restores onto
another mesh, and what a training run does with a damaged latest checkpoint."""

from __future__ import annotations

import glob
import logging
import os
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax import checkpoint, sharding, train_loop
from rlhf_jax.checkpoint import Checkpointer, CheckpointRestoreError, abstract_like
from rlhf_jax.config import MeshConfig, ModelConfig
from rlhf_jax.drivers import run_sft
from rlhf_jax.drivers.common import sharded_train_state
from rlhf_jax.models import CausalLM
from tests import stage_fixtures as F


def _state(step: int) -> dict:
    return {
        "params": {"w": jnp.full((8, 4), float(step)), "b": jnp.arange(4.0) + step},
        "step": jnp.asarray(step, jnp.int32),
        "rng": jax.random.key_data(jax.random.key(step)),
    }


def _abstract() -> dict:
    return jax.eval_shape(lambda: _state(0))


def _save_steps(ckpt: Checkpointer, steps, losses: dict | None = None) -> None:
    for s in steps:
        metrics = None if losses is None or s not in losses else {"val/loss": losses[s]}
        ckpt.save(s, _state(s), {"iterators": {"train": {"seed": 0, "epoch": 0, "position": s}}}, metrics=metrics)
    ckpt.wait()


# ----------------------------------------------------------------------------- retention


def test_latest_n_plus_best_n_retention(tmp_path):
    losses = {1: 3.0, 2: 0.5, 3: 2.0, 4: 1.5, 5: 1.2, 6: 1.1}  # step 2 is best (lowest)
    with Checkpointer(tmp_path, keep_last=2, keep_best=1, best_metric="val/loss", best_mode="min") as ckpt:
        _save_steps(ckpt, range(1, 7), losses)
        assert ckpt.all_steps() == [2, 5, 6]
        # dropped checkpoints were renamed into .deleted/ (atomically unlisted), then removed
        assert sorted(os.listdir(tmp_path)) == [checkpoint.TRASH, "2", "5", "6"]
        assert os.listdir(tmp_path / checkpoint.TRASH) == []
        assert ckpt.best_step() == 2
        assert ckpt.latest_step() == 6
    # after a restart the persisted metrics still rank the checkpoints: best survives more saves
    with Checkpointer(tmp_path, keep_last=2, keep_best=1, best_metric="val/loss", best_mode="min") as ckpt:
        _save_steps(ckpt, [7, 8], {7: 0.9, 8: 1.0})
        assert ckpt.all_steps() == [2, 7, 8]
        assert ckpt.best_step() == 2
        state, meta, step = ckpt.restore(_abstract(), step=2)
    assert step == 2 and meta["iterators"]["train"]["position"] == 2
    F.assert_trees_equal(state, jax.device_get(_state(2)))


def test_best_n_max_mode_and_unscored_steps(tmp_path):
    acc = {2: 0.9, 4: 0.6, 6: 0.7}  # odd steps saved without metrics (periodic saves)
    with Checkpointer(tmp_path, keep_last=1, keep_best=2, best_metric="val/accuracy", best_mode="max") as ckpt:
        for s in range(1, 8):
            m = {"val/accuracy": acc[s]} if s in acc else None
            ckpt.save(s, _state(s), {}, metrics=m)
        ckpt.wait()
        assert ckpt.all_steps() == [2, 6, 7]  # best two by accuracy + the latest
        assert ckpt.best_step() == 2


def test_without_best_metric_keeps_latest_only(tmp_path):
    with Checkpointer(tmp_path, keep_last=3) as ckpt:
        _save_steps(ckpt, range(1, 6))
        assert ckpt.all_steps() == [3, 4, 5]
        assert ckpt.best_step() is None


# ----------------------------------------------------------------------------- damage and atomicity


def _damage(step_dir: str, how: str) -> None:
    if how == "truncate_data":
        files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
        assert files
        for f in files:
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
    elif how == "delete_data":
        files = sorted(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True))
        assert files
        os.remove(files[0])
    elif how == "delete_metadata":
        os.remove(os.path.join(step_dir, "state", "_METADATA"))
    else:
        raise AssertionError(how)


def _within(seconds: float, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, failing the test if it takes longer than ``seconds`` (never a hang)."""
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(fn, *args, **kwargs).result(timeout=seconds)
    except concurrent.futures.TimeoutError:
        pytest.fail(f"{fn.__name__} still running after {seconds} s")
    finally:
        pool.shutdown(wait=False)


@pytest.mark.parametrize("how", ["truncate_data", "delete_data", "delete_metadata"])
def test_damaged_latest_fails_loudly_and_falls_back(tmp_path, how):
    with Checkpointer(tmp_path, keep_last=3) as ckpt:
        _save_steps(ckpt, [1, 2, 3])
    _damage(str(tmp_path / "3"), how)
    with Checkpointer(tmp_path, keep_last=3) as ckpt:
        with pytest.raises(CheckpointRestoreError, match=r"checkpoint at step 3 cannot be restored.*fallback=True"):
            _within(60, ckpt.restore, _abstract())
        state, meta, step = _within(60, ckpt.restore, _abstract(), fallback=True)
        assert step == 2
        assert meta["iterators"]["train"]["position"] == 2
        F.assert_trees_equal(state, jax.device_get(_state(2)))
        # the damaged step was moved aside (so training can save step 3 again), not deleted
        assert ckpt.all_steps() == [1, 2] and (tmp_path / "damaged-step-3").is_dir()
        with pytest.raises(CheckpointRestoreError, match="step 3"):  # an explicit step never falls back
            ckpt.restore(_abstract(), step=3, fallback=True)


def test_all_damaged_names_every_step(tmp_path):
    with Checkpointer(tmp_path, keep_last=2) as ckpt:
        _save_steps(ckpt, [1, 2])
    for s in (1, 2):
        _damage(str(tmp_path / str(s)), "delete_metadata")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointRestoreError, match=r"(?s)no checkpoint could be restored.*step 2.*step 1"):
            ckpt.restore(_abstract(), fallback=True)


def test_empty_directory_restore_is_an_error(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [] and ckpt.latest_step() is None
        with pytest.raises(CheckpointRestoreError, match="no checkpoint"):
            ckpt.restore(_abstract())


def test_tmp_dirs_are_never_checkpoints(tmp_path):
    with Checkpointer(tmp_path, keep_last=3) as ckpt:
        _save_steps(ckpt, [1, 2])
        assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # completed saves leave no temporary directory
        # what a save killed half-way leaves behind: orbax's temporary directory for step 3
        partial = tmp_path / "3.orbax-checkpoint-tmp-1700000000"
        shutil.copytree(tmp_path / "2", partial)
        assert ckpt.all_steps() == [1, 2]
        assert ckpt.latest_step() == 2
        _, _, step = ckpt.restore(_abstract())
        assert step == 2
    # nor after a restart (the new manager also starts removing the leftover, in the background)
    with Checkpointer(tmp_path, keep_last=3) as ckpt:
        assert ckpt.all_steps() == [1, 2]
        assert ckpt.latest_step() == 2


# ----------------------------------------------------------------------------- meshes


def test_restore_onto_another_mesh(tmp_path):
    """Saved sharded over 8 devices (fsdp=8); restored onto (2,2,2) and onto one device."""
    mesh8 = sharding.make_mesh(F.MESH_1x8x1)
    state = _state(5)
    placed = {
        "params": {
            "w": jax.device_put(state["params"]["w"], NamedSharding(mesh8, P("fsdp", None))),
            "b": jax.device_put(state["params"]["b"], NamedSharding(mesh8, P())),
        },
        "step": jax.device_put(state["step"], NamedSharding(mesh8, P())),
        "rng": jax.device_put(state["rng"], NamedSharding(mesh8, P())),
    }
    assert len(placed["params"]["w"].sharding.device_set) == 8
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, placed, {"note": "fsdp8"})
        ckpt.wait()

    mesh222 = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    target = {
        "params": {"w": NamedSharding(mesh222, P("data", "tensor")), "b": NamedSharding(mesh222, P("tensor"))},
        "step": NamedSharding(mesh222, P()),
        "rng": NamedSharding(mesh222, P()),
    }
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for shardings in (target, jax.tree.map(lambda _: one, target)):
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), _abstract(), shardings)
        with Checkpointer(tmp_path) as ckpt:
            restored, meta, step = ckpt.restore(abstract)
        assert step == 5 and meta["note"] == "fsdp8"
        F.assert_trees_equal(jax.device_get(restored), jax.device_get(state))
        for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
            assert leaf.sharding.is_equivalent_to(want, leaf.ndim)


def test_abstract_like_keeps_shardings():
    mesh = sharding.make_mesh(F.MESH_2x2x2)
    x = jax.device_put(jnp.zeros((4, 4)), NamedSharding(mesh, P("data", "tensor")))
    a = abstract_like({"x": x, "y": np.zeros(3, np.int32)})
    assert a["x"].shape == (4, 4) and a["x"].sharding == x.sharding
    assert a["y"].dtype == np.int32 and a["y"].sharding is None


# ----------------------------------------------------------------------------- a run with a damaged checkpoint


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return F.shared_world(tmp_path_factory, "tiny_world")


def test_run_resume_from_damaged_latest_names_the_step(world, tmp_path):
    cfg = F.sft_config(world, tmp_path / "run", max_steps=3, run=F.run_config(save_every=1, keep_last=3))
    run_sft(cfg)
    with Checkpointer(tmp_path / "run" / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [1, 2, 3]
    assert checkpoint.read_model_info(tmp_path / "run")["head"] == "lm"
    _damage(str(tmp_path / "run" / "checkpoints" / "3"), "truncate_data")
    bigger = F.sft_config(world, tmp_path / "run", max_steps=4, run=F.run_config(save_every=1, keep_last=3))
    with pytest.raises(CheckpointRestoreError, match="step 3"):
        _within(120, run_sft, bigger)
    assert not (tmp_path / "run" / "checkpoints" / "4").exists()  # never a silent restart from scratch
    # configured to fall back: resumes from step 2 (not from scratch), trains steps 3 and 4 again
    fallback = F.sft_config(
        world, tmp_path / "run", max_steps=4, run=F.run_config(save_every=1, keep_last=3, restore_fallback=True)
    )
    _within(120, run_sft, fallback)
    with Checkpointer(tmp_path / "run" / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2, 3, 4]
    assert (tmp_path / "run" / "checkpoints" / "damaged-step-3").is_dir()
    steps_logged = [m["step"] for m in train_loop.read_metrics(tmp_path / "run") if "train/loss" in m]
    assert steps_logged == [1, 2, 3, 3, 4]


def test_load_model_best_is_ranked_by_the_runs_own_metric(world, tmp_path):
    """train_loop.run records its ranking metric; load_model(which="best") uses it (not the latest)."""

    model, params, tok = checkpoint.load_model(world.base)
    params = jax.device_get(params)  # host copies: the run donates its state buffers
    mesh = sharding.make_mesh(F.MESH_1x8x1)
    replicated = sharding.replicated(mesh)
    state = {"params": params, "step": jnp.zeros((), jnp.int32)}
    val_loss = [0.5, 0.1, 0.3, 0.4]  # step 2 is the best

    def train_step(st, batch):
        new = jax.tree.map(lambda p: p + 0.01, st["params"])
        return {"params": new, "step": st["step"] + 1}, {"loss": jnp.mean(batch["x"])}

    stage = train_loop.Stage(
        name="toy",
        state=jax.device_put(state, replicated),
        state_shardings=jax.tree.map(lambda _: replicated, state),
        train_step=train_step,
        next_batch=lambda: {"x": np.zeros((8, 1), np.float32)},
        iterators={},
        total_steps=4,
        evaluate=lambda st: {"val/loss": val_loss[int(st["step"]) - 1]},
        best_metric="val/loss",
        best_mode="min",
    )
    out = tmp_path / "toy"
    checkpoint.write_model_info(out, model, tok)
    train_loop.run(stage, F.run_config(eval_every=1, keep_last=1, keep_best=1), mesh, out)
    with Checkpointer(out / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2, 4]
    for which, step in (("best", 2), ("latest", 4)):
        _, loaded, _ = checkpoint.load_model(out, which=which)
        got, want = loaded["final_norm"]["scale"], params["final_norm"]["scale"] + 0.01 * step
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, err_msg=which)


def test_rewriting_model_info_with_another_config_warns(tmp_path, caplog):
    """A stage re-run into a finished run directory with, e.g., another ``--run.dtype``
    changes how ``load_model`` computes with its params: said, not silent."""
    # tuple fields (layer_types, rope_llama3) are read back from the JSON as lists: the same config
    cfg = ModelConfig(
        family="llama",
        vocab_size=64,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        sliding_window=4,
        layer_types=("sliding_attention", "full_attention"),
        rope_llama3=(8.0, 1.0, 4.0, 32),
    )
    model = CausalLM(cfg)
    checkpoint.write_model_info(tmp_path, model)
    assert ModelConfig(**checkpoint.read_model_info(tmp_path)["model"]) == cfg
    with caplog.at_level(logging.WARNING, logger="rlhf_jax.checkpoint"):
        checkpoint.write_model_info(tmp_path, model)  # the same config (a resume): nothing to say
        assert not caplog.records
        checkpoint.write_model_info(tmp_path, CausalLM(model.config.replace(dtype="bfloat16")))
    assert "dtype 'float32' -> 'bfloat16'" in caplog.text
    assert checkpoint.read_model_info(tmp_path)["model"]["dtype"] == "bfloat16"


@pytest.fixture(scope="module")
def fsdp8_checkpoint(world, tmp_path_factory):
    """An SFT train state (one step taken, so Adam's moments are set) saved sharded over
    8 devices (fsdp=8), and the loss of the next step on that mesh."""
    from rlhf_jax.config import OptimConfig
    from rlhf_jax.optim import make_optimizer
    from rlhf_jax.sft import make_train_step

    model, params, _ = checkpoint.load_model(world.base)
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-2, schedule="constant"), 10)
    rng = np.random.default_rng(0)
    ids = rng.integers(2, model.config.vocab_size, (8, 16)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    step = jax.jit(make_train_step(model, optimizer))
    mesh8 = sharding.make_mesh(F.MESH_1x8x1)
    state, _ = sharded_train_state(model, jax.device_get(params), optimizer, 0, mesh8)
    assert len(state.params["embed"]["embedding"].sharding.device_set) == 8
    with sharding.use_mesh(mesh8):
        state, _ = step(state, sharding.shard_batch(batch, mesh8))
        _, metrics = step(state, sharding.shard_batch(batch, mesh8))
    path = tmp_path_factory.mktemp("fsdp8") / "checkpoints"
    with Checkpointer(path) as ckpt:
        ckpt.save(1, state, {"note": "fsdp8"})
    return SimpleNamespace(
        path=path,
        state=jax.device_get(state),
        loss=float(metrics["loss"]),
        model=model,
        params=params,
        optimizer=optimizer,
        step=step,
        batch=batch,
    )


@pytest.mark.parametrize("shape", [(2, 4, 1), (1, 4, 2), "one_device"])
def test_train_state_from_fsdp8_restores_onto_other_meshes(fsdp8_checkpoint, shape):
    """Saved on (1, 8, 1); restored onto (2, 4, 1), (1, 4, 2) and one device with the model's
    own shardings there: bitwise equal, and one training step gives the same loss to 1e-5."""

    c = fsdp8_checkpoint
    if shape == "one_device":
        mesh = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    else:
        mesh = sharding.make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]))
    target, target_shardings = sharded_train_state(c.model, jax.device_get(c.params), c.optimizer, 0, mesh)
    with Checkpointer(c.path) as ckpt:
        restored, meta, step = ckpt.restore(abstract_like(target))
    assert step == 1 and meta["note"] == "fsdp8"
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target_shardings)):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    F.assert_trees_equal(jax.device_get(restored), c.state)
    with sharding.use_mesh(mesh):
        _, metrics = c.step(restored, sharding.shard_batch(c.batch, mesh))
    assert abs(float(metrics["loss"]) - c.loss) < 1e-5
