"""Non-finite values (issue 8, item 5): NaN or Inf in a reward, the logits, the gradients or
the advantages makes the step skip itself. The library is poisoned from outside: the stages
are built with ``tests.poison.PoisonedLM`` networks whose outputs (or gradients) turn
non-finite when a trigger token opens the batch, and the test sends it at chosen steps. Shown
through ``train_loop.run`` with a save every step, for SFT, the reward model and PPO-ptx:

* the checkpoint after the poisoned step equals the one before it, bitwise (params,
  optimizer state and counts, step, RNG; for PPO also EMA params, KL coefficient, iteration);
* ``metrics.jsonl`` shows the skip, which quantity, and the running counters;
* training goes on after an isolated skip;
* ``max_consecutive_skips`` skips in a row stop the run with an error naming the step and
  the quantity, and no checkpoint on disk is ever non-finite.

Each stage's step is compiled once (each case has its own trigger token) on a one-device mesh (the first of the 8 fake devices), with tiny models.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import reward, sft, sharding, train_loop
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.config import MeshConfig, ModelConfig, OptimConfig
from rlhf_jax.models.params import init_params
from rlhf_jax.optim import init_train_state, logits_finite, make_optimizer, norm_finite, skip_nonfinite
from tests import stage_fixtures as F
from tests import test_ppo as T
from tests.poison import PoisonedLM

STEPS = 4
FAULT_STEP = 2
GPT2 = ModelConfig(
    family="gpt2",
    vocab_size=24,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    tie_word_embeddings=True,
    max_position_embeddings=32,
)


# Each case poisons one quantity of one stage: a trigger token (distinct per case, so one
# compiled step per stage serves all its cases) makes a PoisonedLM's output non-finite.
CASES = [
    ("sft", "logits", "nan"),
    ("sft", "grads", "inf"),
    ("rm", "reward", "nan"),
    ("rm", "grads", "-inf"),
    ("ppo", "reward", "nan"),
    ("ppo", "logits", "inf"),
    ("ppo", "advantages", "nan"),
    ("ppo", "grads", "nan"),
]
# (stage, quantity) -> (which network of the stage, which of its outputs); the others follow from it
POISONED_OUTPUT = {
    ("sft", "logits"): ("policy", "logits"),
    ("sft", "grads"): ("policy", "grads"),
    ("rm", "reward"): ("rm", "values"),
    ("rm", "grads"): ("rm", "grads"),
    ("ppo", "reward"): ("rm", "values"),
    ("ppo", "logits"): ("policy", "logits"),
    ("ppo", "advantages"): ("value", "values"),
    ("ppo", "grads"): ("policy", "grads"),
}
VOCAB = {"sft": GPT2.vocab_size, "rm": GPT2.vocab_size, "ppo": T.V}


def trigger_token(stage: str, quantity: str) -> int:
    """The stage's cases take the top token ids of its vocabulary, one each."""
    cases = [q for s, q, _ in CASES if s == stage]
    return VOCAB[stage] - 1 - cases.index(quantity)


def triggers(stage: str, network: str) -> tuple[tuple[int, str, str], ...]:
    """The ``PoisonedLM.triggers`` of one network of ``stage``."""
    return tuple(
        (trigger_token(s, q), POISONED_OUTPUT[s, q][1], v)
        for s, q, v in CASES
        if s == stage and POISONED_OUTPUT[s, q][0] == network
    )


def without_triggers(stage: str, batch: dict) -> dict:
    """The base batch with no trigger token anywhere (ids >= the lowest trigger become 2)."""
    lowest = min(trigger_token(s, q) for s, q, _ in CASES if s == stage)
    return {k: np.where(v >= lowest, 2, v).astype(v.dtype) if k.endswith("ids") else v for k, v in batch.items()}


class FaultyBatches:
    """The same base batch every step; at the steps in ``poison`` its first row opens with a
    trigger token. Resumable (``state``/``restore``)."""

    def __init__(self, base: dict, ids_key: str) -> None:
        self.base, self.ids_key = base, ids_key
        self.position = 0
        self.poison: tuple[int | None, set[int]] = (None, set())

    def __call__(self) -> dict:
        self.position += 1
        token, steps = self.poison
        if token is None or self.position not in steps:
            return self.base
        ids = self.base[self.ids_key].copy()
        ids.reshape(-1, ids.shape[-1])[0, 0] = token  # the first row's first (real) token
        return {**self.base, self.ids_key: ids}

    def state(self) -> dict:
        return {"position": self.position}

    def restore(self, state: dict) -> None:
        self.position = state["position"]


def _sft_setup() -> SimpleNamespace:
    model = PoisonedLM(GPT2, triggers=triggers("sft", "policy"))
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-2, schedule="constant"), STEPS)
    params = init_params(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(2, GPT2.vocab_size, (8, 8)).astype(np.int32)
    base = without_triggers(
        "sft", {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    )
    state = init_train_state(jax.device_get(params), optimizer, seed=0)
    return SimpleNamespace(
        state=state, step=sft.make_train_step(model, optimizer), base=base, ids_key="input_ids", frozen=()
    )


def _rm_setup() -> SimpleNamespace:
    model = PoisonedLM(GPT2, head="scalar", triggers=triggers("rm", "rm"))
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-2, schedule="constant"), STEPS)
    params = init_params(model, jax.random.key(1))
    rng = np.random.default_rng(1)
    b, k, length = 8, 2, 6
    ids = rng.integers(2, GPT2.vocab_size, (b, k, length)).astype(np.int32)
    base = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "ranks": np.tile(np.arange(k), (b, 1)),
        "valid": np.ones((b, k), bool),
        "end_index": np.full((b, k), length - 1, np.int32),
    }
    state = init_train_state(jax.device_get(params), optimizer, seed=0)
    return SimpleNamespace(
        state=state,
        step=reward.make_train_step(model, optimizer),
        base=without_triggers("rm", base),
        ids_key="input_ids",
        frozen=(),
    )


def _ppo_setup() -> SimpleNamespace:
    nets = T.nets.__wrapped__()
    # no EOS penalty: every episode's reward is the (poisoned) RM score, not only those that ended
    # one optimizer step per iteration: a non-finite gradient then skips the whole iteration (with
    # several minibatches the steps before the first non-finite one stand: rlhf_jax.ppo's docstring)
    cfg = T.ppo_config(ptx_coef=1.0, adaptive_kl=True, no_eos_penalty=None, minibatch_size=T.B, ppo_epochs=1)
    setup = T.PPOSetup(
        cfg,
        nets,
        policy=PoisonedLM(T.MODEL, triggers=triggers("ppo", "policy")),
        value=PoisonedLM(T.MODEL, head="scalar", triggers=triggers("ppo", "value")),
        rm=PoisonedLM(T.MODEL, head="scalar", triggers=triggers("ppo", "rm")),
    )
    base = without_triggers("ppo", {**T.make_prompts(), **T.make_ptx(cfg)})
    assert (base["prompt_mask"][0] == 1).all()  # the first row's first slot is a real prompt token
    return SimpleNamespace(
        state=setup.state0, step=setup.fn, base=base, ids_key="prompt_ids", frozen=(nets.policy_params, nets.rm_params)
    )


@pytest.fixture(scope="module")
def setups():
    """stage name -> its initial state, pure step and base batch (built lazily, once)."""
    made: dict[str, SimpleNamespace] = {}
    recipes = {"sft": _sft_setup, "rm": _rm_setup, "ppo": _ppo_setup}

    def get(name: str) -> SimpleNamespace:
        if name not in made:
            made[name] = recipes[name]()
        return made[name]

    return get


def _run(setup: SimpleNamespace, name: str, out: Path, poison: tuple[int, set[int]], **run_changes) -> None:
    """``train_loop.run`` of STEPS steps with a save every step; ``poison`` = (trigger token, steps)."""
    mesh = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    replicated = sharding.replicated(mesh)  # (host copies in: the run donates its state's buffers)
    batches = FaultyBatches(setup.base, setup.ids_key)
    batches.poison = poison
    stage = train_loop.Stage(
        name=name,
        state=jax.device_put(jax.device_get(setup.state), replicated),
        state_shardings=jax.tree.map(lambda _: replicated, setup.state),
        train_step=setup.step,
        next_batch=batches,
        iterators={"faults": batches},
        total_steps=STEPS,
        frozen=tuple(jax.device_put(f, replicated) for f in setup.frozen),
    )
    run = F.run_config(save_every=1, keep_last=STEPS, keep_best=0, **run_changes)
    train_loop.run(stage, run, mesh, out)


def _checkpoints(run_dir: Path) -> dict[int, dict]:
    with Checkpointer(run_dir / "checkpoints") as ckpt:
        steps = ckpt.all_steps()
    return {s: F.read_checkpoint(run_dir, s)[0] for s in steps}


def _assert_all_finite(states: dict[int, dict]) -> None:
    for s, st in states.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(st)[0]:
            leaf = np.asarray(leaf)
            if np.issubdtype(leaf.dtype, np.floating):
                assert np.isfinite(leaf).all(), f"checkpoint {s}{jax.tree_util.keystr(path)} is not finite"


@pytest.mark.parametrize(("name", "quantity", "value"), CASES, ids=[f"{n}-{q}" for n, q, _ in CASES])
def test_nonfinite_step_is_skipped_then_too_many_stop_the_run(setups, tmp_path, name, quantity, value):
    setup = setups(name)
    token = trigger_token(name, quantity)

    # one poisoned step: skipped bitwise, logged, and training goes on
    _run(setup, name, tmp_path / "once", (token, {FAULT_STEP}))
    states = _checkpoints(tmp_path / "once")
    assert sorted(states) == list(range(1, STEPS + 1))
    _assert_all_finite(states)
    F.assert_trees_equal(states[FAULT_STEP], states[FAULT_STEP - 1])  # the whole state, bitwise
    after = jax.tree.leaves(states[FAULT_STEP + 1])
    assert any(not np.array_equal(a, b) for a, b in zip(after, jax.tree.leaves(states[FAULT_STEP])))
    rows = {m["step"]: m for m in train_loop.read_metrics(tmp_path / "once")}
    assert rows[FAULT_STEP]["nonfinite/skipped"] == 1.0 and rows[FAULT_STEP][f"nonfinite/{quantity}"] == 1.0
    assert rows[FAULT_STEP]["nonfinite/skipped_total"] == 1.0 and rows[FAULT_STEP]["nonfinite/consecutive"] == 1.0
    assert rows[FAULT_STEP + 1]["nonfinite/skipped"] == 0.0 and rows[FAULT_STEP + 1]["nonfinite/consecutive"] == 0.0
    assert rows[STEPS]["nonfinite/skipped_total"] == 1.0
    assert all(rows[s]["nonfinite/skipped"] == 0.0 for s in rows if s != FAULT_STEP)

    # poisoned from FAULT_STEP on, at most 2 skips in a row: the run stops at the second one
    with pytest.raises(
        train_loop.NonFiniteError,
        match=rf"{name}: step {FAULT_STEP + 1}: 2 consecutive .* "
        rf"first non-finite quantity: {quantity} ",
    ):
        _run(setup, name, tmp_path / "stop", (token, set(range(FAULT_STEP, STEPS + 1))), max_consecutive_skips=2)
    states = _checkpoints(tmp_path / "stop")
    assert sorted(states) == [1, FAULT_STEP]  # the step that stopped the run saved nothing
    _assert_all_finite(states)
    rows = {m["step"]: m for m in train_loop.read_metrics(tmp_path / "stop")}
    assert rows[FAULT_STEP + 1]["nonfinite/consecutive"] == 2.0  # logged before stopping


def test_skip_nonfinite_is_a_bitwise_select():
    """The helper alone: any non-finite flag returns the old state bitwise (ints and -0.0 too)."""
    old = {
        "w": jnp.asarray([-0.0, 1.5, 3.0]),
        "count": jnp.asarray(7, jnp.int32),
        "key": jnp.asarray([1, 2], jnp.uint32),
    }
    new = {
        "w": jnp.asarray([0.0, 2.5, np.nan]),
        "count": jnp.asarray(8, jnp.int32),
        "key": jnp.asarray([3, 4], jnp.uint32),
    }
    state, metrics = jax.jit(skip_nonfinite)(
        new, old, {"finite/loss": jnp.asarray(True), "finite/grads": jnp.asarray(False), "loss": 1.0}
    )
    for k, want in old.items():
        assert np.asarray(state[k]).tobytes() == np.asarray(want).tobytes(), k
    assert float(metrics["nonfinite/skipped"]) == 1.0 and float(metrics["nonfinite/grads"]) == 1.0
    assert float(metrics["nonfinite/loss"]) == 0.0 and "finite/loss" not in metrics and metrics["loss"] == 1.0
    state, metrics = skip_nonfinite(new, old, {"finite/loss": jnp.asarray(True)})
    assert np.asarray(state["count"]) == 8 and float(metrics["nonfinite/skipped"]) == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_cheap_finiteness_checks_agree_with_isfinite_where_it_matters(bad):
    """``norm_finite`` (gradients, from their global norm) and ``logits_finite`` (from the
    log-normaliser) flag what an elementwise ``isfinite`` flags, except a -inf logit among
    finite ones: that is a banned token, and the softmax is still well defined."""
    import optax

    grads = {"a": jnp.ones((3, 4)), "b": jnp.arange(5.0)}
    assert bool(norm_finite(optax.tree.norm(grads)))
    poisoned = {"a": grads["a"].at[1, 2].set(bad), "b": grads["b"]}
    assert not bool(norm_finite(optax.tree.norm(poisoned)))
    assert not bool(norm_finite(optax.tree.norm({"a": jnp.full((2,), 3e19)})))  # overflowing norm: no step either

    logits = jnp.zeros((2, 3, 5))
    assert bool(logits_finite(logits))
    one_bad = logits.at[1, 2, 3].set(bad)
    assert bool(logits_finite(one_bad)) == (bad == -np.inf)
    assert not bool(logits_finite(logits.at[0, 1].set(-np.inf)))  # a position with every token banned


def test_a_nonfinite_state_is_never_saved(tmp_path):
    """A step without the guard that makes the params NaN: the run refuses to save them."""
    mesh = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    replicated = sharding.replicated(mesh)
    state = {"w": jnp.ones((4,)), "step": jnp.zeros((), jnp.int32)}

    def unguarded_step(st, batch):
        w = jnp.where(st["step"] >= 1, jnp.nan, st["w"] + batch["x"].mean())
        return {"w": w, "step": st["step"] + 1}, {"loss": jnp.mean(w)}

    stage = train_loop.Stage(
        name="toy",
        state=jax.device_put(state, replicated),
        state_shardings=jax.tree.map(lambda _: replicated, state),
        train_step=unguarded_step,
        next_batch=lambda: {"x": np.ones((2, 1), np.float32)},
        iterators={},
        total_steps=3,
    )
    with pytest.raises(train_loop.NonFiniteError, match="toy: step 2: the train state is not finite; not saving it"):
        train_loop.run(stage, F.run_config(save_every=1, keep_last=3), mesh, tmp_path)
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [1]
