"""``rlhf_jax.shared_jit``: closures that lower to one program compile once per process, and
nothing that differs in what XLA would run (constants, pytree structures, devices, host
callbacks) is ever shared; a stage run twice in one process compiles its step once and
trains bitwise as it did the first time."""

from __future__ import annotations

from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax import shared_jit as sj
from rlhf_jax import train_loop
from rlhf_jax.drivers import run_sft
from tests import stage_fixtures as F


@pytest.fixture(autouse=True)
def no_programs_yet(monkeypatch):
    """Each test starts from an empty program table (the worker's other tests may have filled it)."""
    monkeypatch.setattr(sj, "_PROGRAMS", OrderedDict())


def counts() -> tuple[int, int]:
    return sj.STATS["compiled"], sj.STATS["shared"]


def scaled_sum(c: float):
    """A fresh closure each call: the same program when ``c`` is the same."""

    def step(state, x):
        return jax.tree.map(lambda s: s + c * x.sum(), state), {"mean": x.mean()}

    return step


def test_closures_of_one_program_compile_once_and_donate():
    state = {"w": jnp.ones((5,)), "b": jnp.zeros((3,))}
    x = jnp.arange(4.0) + 0.5
    c0, s0 = counts()
    saved0 = sj.STATS["saved_s"]
    first = sj.shared_jit(scaled_sum(2.0), donate_argnums=(0,))
    second = sj.shared_jit(scaled_sum(2.0), donate_argnums=(0,))
    a_in = jax.tree.map(jnp.copy, state)
    a, ma = first(a_in, x)
    assert counts() == (c0 + 1, s0)
    b, mb = second(jax.tree.map(jnp.copy, state), x)
    assert counts() == (c0 + 1, s0 + 1)
    assert sj.STATS["saved_s"] > saved0  # the first compile's seconds, counted as saved
    want, want_m = jax.jit(scaled_sum(2.0))(state, x)
    F.assert_trees_equal((a, ma), (want, want_m))
    F.assert_trees_equal((b, mb), (want, want_m))
    assert a_in["w"].is_deleted()  # donation survives the sharing
    first(a, x)  # the same signature again: no new lowering or compile
    assert counts() == (c0 + 1, s0 + 1)


def test_programs_that_differ_are_compiled_apart():
    x = jnp.arange(3.0) + 0.25
    state = {"w": jnp.ones((2,))}
    c0, _ = counts()
    out = {c: sj.shared_jit(scaled_sum(c))(state, x)[0]["w"] for c in (3.0, 4.0)}  # constants in the program
    np.testing.assert_allclose(out[3.0], 1 + 3.0 * 3.75)
    np.testing.assert_allclose(out[4.0], 1 + 4.0 * 3.75)
    # the same computation with other pytree structures: each keeps its own
    as_tuple = sj.shared_jit(lambda s, y: (s["w"] * 7.0, y.sum()))(state, x)
    as_dict = sj.shared_jit(lambda s, y: {"a": s["w"] * 7.0, "b": y.sum()})(state, x)
    assert isinstance(as_tuple, tuple) and isinstance(as_dict, dict)
    assert counts()[0] == c0 + 4


def test_host_callbacks_are_never_shared():
    def with_callback(value: float):
        return lambda x: x + jax.pure_callback(lambda: np.float32(value), jax.ShapeDtypeStruct((), jnp.float32))

    x = jnp.zeros((2,)) + 0.125
    assert float(sj.shared_jit(with_callback(1.0))(x)[0]) == 1.125
    assert float(sj.shared_jit(with_callback(2.0))(x)[0]) == 2.125  # not the first closure's callback


def test_other_devices_get_their_own_program():
    if jax.device_count() < 2:
        pytest.skip("needs 2 devices")
    outs = []
    for device in jax.devices()[:2]:
        mesh = jax.sharding.Mesh(np.array([device]), ("data",))
        sharding = NamedSharding(mesh, P())
        fn = sj.shared_jit(lambda v: v * 5.0 + 0.375, in_shardings=(sharding,), out_shardings=sharding)
        outs.append(fn(jax.device_put(jnp.ones(6), sharding)))
    assert [o.devices() for o in outs] == [{jax.devices()[0]}, {jax.devices()[1]}]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_a_stage_run_twice_in_one_process_compiles_its_step_once(tmp_path_factory, tmp_path, monkeypatch):
    """The second SFT run (another output directory, the same config) takes the first run's
    compiled programs, compiles none, and ends bitwise where the first ended."""
    world = F.shared_world(tmp_path_factory, "world_shared_jit")
    steps = []
    real = train_loop._compile_step

    def spy(stage, batch, mesh):
        fn = real(stage, batch, mesh)
        steps.append(fn)
        return fn

    monkeypatch.setattr(train_loop, "_compile_step", spy)
    runs = []
    for name in ("first", "second"):
        cfg = F.sft_config(world, tmp_path / name, max_steps=4)
        c0, s0 = counts()
        run_sft(cfg)
        runs.append((counts()[0] - c0, counts()[1] - s0))
    (compiled_first, _), (compiled_second, shared_second) = runs
    assert compiled_first >= 1  # the train step (once per bucket shape)
    assert compiled_second == 0 and shared_second == compiled_first
    assert steps[0] is not steps[1]  # two jitted objects, one program
    first, _, _ = F.read_checkpoint(tmp_path / "first")
    second, _, _ = F.read_checkpoint(tmp_path / "second")
    F.assert_trees_equal(first, second)
    assert F.train_losses(tmp_path / "first") == F.train_losses(tmp_path / "second")
