"""Tests for the critic-free estimators of rlhf_jax.ppo (GRPO, Dr. GRPO, RLOO, REINFORCE++),
the KL in the loss (``kl_in="loss"``) and group sampling (``group_size``), on the tiny setups of
tests/test_ppo.py: a one-layer Llama-style policy, left-padded prompts of mixed lengths, PAD (0)
distinct from EOS (1), and a fixed reward that counts a TARGET token.

Each configuration's iteration (or rollout) is compiled once, in module-scoped fixtures. The
fixed reward's scale is a parameter, so a NaN scale poisons the reward without a new compile.
The driver test runs ``run_ppo`` with GRPO on the tiny offline world (two reward models and a
rule reward) and checks that resuming is exact and the checkpoint holds no value network.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses, rl, train_loop
from rlhf_jax.config import MeshConfig, OptimConfig, PPOConfig, PPOHyperparams
from rlhf_jax.drivers import run_ppo
from rlhf_jax.optim import make_optimizer
from rlhf_jax.ppo import init_ppo_state, make_iteration, make_rollout
from tests import stage_fixtures as F
from tests import test_ppo as T
from tests.test_ppo import nets  # noqa: F401  (the module-scoped fixture of the tiny networks)

OPTIM = T.OPTIM


class ParamCountRM(nn.Module):
    """``value[b, t] = scale x #TARGET tokens up to t`` with ``scale`` a parameter (tests/test_ppo.py's
    CountRM; a NaN scale poisons every score without recompiling)."""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        scale = self.param("scale", lambda key: jnp.float32(0.25))
        hits = (input_ids == T.TARGET) & (attention_mask > 0)
        return SimpleNamespace(values=scale * jnp.cumsum(hits, axis=1).astype(jnp.float32))


RM_PARAMS = {"scale": jnp.float32(0.25)}


def prompts(n: int) -> dict:
    """The first n of tests/test_ppo.py's left-padded prompts, with no TARGET token in them."""
    b = T.make_prompts()
    ids = np.where(b["prompt_ids"] == T.TARGET, T.TARGET + 1, b["prompt_ids"]).astype(np.int32)
    return {"prompt_ids": ids[:n], "prompt_mask": b["prompt_mask"][:n]}


def hparams(estimator: str, group_size: int, **changes) -> PPOHyperparams:
    """8 episodes (8 / G prompts x G), 2 minibatches x 2 epochs, as tests/test_ppo.py."""
    kw = dict(estimator=estimator, group_size=group_size, no_eos_penalty=None, kl_coef=0.05)
    return T.ppo_config(**(kw | changes))


class Setup:
    """One critic-free (or GAE) configuration with the fixed reward, its iteration compiled once."""

    def __init__(self, cfg: PPOHyperparams, nets, optim: OptimConfig = OPTIM) -> None:  # noqa: F811
        self.cfg, self.nets = cfg, nets
        steps = T.MAX_STEPS * cfg.updates_per_iteration
        self.opt = make_optimizer(optim, steps)
        self.value = nets.rm if cfg.uses_critic else None
        value_opt = make_optimizer(optim, steps) if cfg.uses_critic else None
        self.state0 = init_ppo_state(
            nets.policy_params,
            nets.value_params if cfg.uses_critic else None,
            self.opt,
            value_opt,
            kl_coef=cfg.kl_coef,
            seed=0,
        )
        self.step = jax.jit(
            make_iteration(
                cfg,
                nets.policy,
                self.value,
                ParamCountRM(),
                self.opt,
                value_opt,
                eos_token_id=T.EOS,
                pad_token_id=T.PAD,
            )
        )
        self.batch = prompts(cfg.num_prompts)

    def run(self, n: int, state=None, rm_params=RM_PARAMS):
        state = self.state0 if state is None else state
        history = []
        for _ in range(n):
            state, metrics = self.step(state, self.batch, self.nets.policy_params, rm_params)
            history.append({k: float(v) for k, v in metrics.items()})
        return state, history


ESTIMATORS = {  # name -> hyperparameters of its learning run
    "grpo": lambda: hparams("grpo", 4),
    "dr_grpo": lambda: hparams("dr_grpo", 4),
    "rloo": lambda: hparams("rloo", 4, kl_in="reward"),
    "reinforce_pp": lambda: hparams("reinforce_pp", 2),
    "gae_kl_in_loss": lambda: hparams("gae", 2, kl_in="loss"),
}


@pytest.fixture(scope="module")
def setups(nets):  # noqa: F811
    made: dict[str, Setup] = {}

    def get(name: str) -> Setup:
        if name not in made:
            if name == "frozen_grpo":
                made[name] = Setup(hparams("grpo", 4), nets, OptimConfig(learning_rate=0.0, schedule="constant"))
            else:
                made[name] = Setup(ESTIMATORS[name](), nets)
        return made[name]

    return get


# ----------------------------------------------------------------------------- configuration


def test_hyperparameters_resolve_auto_per_estimator_and_validate_groups():
    gae, grpo, dr = (
        PPOHyperparams(),
        PPOHyperparams(estimator="grpo", group_size=4),
        PPOHyperparams(estimator="dr_grpo", group_size=4),
    )
    assert (gae.kl_in_loss, gae.kl_estimator, gae.policy_aggregation, gae.uses_critic) == (
        False,
        "k1",
        "token_mean",
        True,
    )
    assert (grpo.kl_in_loss, grpo.kl_estimator, grpo.policy_aggregation, grpo.uses_critic) == (
        True,
        "k3",
        "sequence_mean",
        False,
    )
    assert dr.policy_aggregation == "token_sum" and grpo.num_prompts == 16
    rpp = PPOHyperparams(estimator="reinforce_pp")
    assert (rpp.kl_in_loss, rpp.kl_estimator, rpp.uses_critic, rpp.num_prompts) == (False, "k1", False, 64)
    explicit = PPOHyperparams(estimator="grpo", group_size=2, kl_in="reward", kl_kind="k2", aggregation="token_mean")
    assert (explicit.kl_in_loss, explicit.kl_estimator, explicit.policy_aggregation) == (False, "k2", "token_mean")
    with pytest.raises(ValueError, match="group_size >= 2"):
        PPOHyperparams(estimator="rloo")
    with pytest.raises(ValueError, match="multiple of group_size=3"):
        PPOHyperparams(estimator="grpo", group_size=3, batch_size=64)
    with pytest.raises(ValueError, match="estimator must be one of"):
        PPOHyperparams(estimator="ppo2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a critic"):
        PPOConfig(prompts="p", policy="x", reward="r", out="o", value_head="shared", hparams=grpo)


def test_networks_must_match_the_estimator(nets):  # noqa: F811
    opt = make_optimizer(OPTIM, 10)
    with pytest.raises(ValueError, match="critic-free"):
        make_iteration(
            hparams("grpo", 4), nets.policy, nets.rm, ParamCountRM(), opt, opt, eos_token_id=1, pad_token_id=0
        )
    with pytest.raises(ValueError, match="needs a value network"):
        make_iteration(hparams("gae", 1), nets.policy, None, ParamCountRM(), opt, None, eos_token_id=1, pad_token_id=0)


# ----------------------------------------------------------------------------- the rollout


ROLLOUTS = {  # name -> (hyperparameters, reference params: "other" makes the KL non-zero)
    "grpo": lambda: hparams("grpo", 4),
    "dr_grpo": lambda: hparams("dr_grpo", 4, kl_in="reward"),
    "rloo": lambda: hparams("rloo", 2),
    "reinforce_pp": lambda: hparams("reinforce_pp", 2, kl_in="reward"),
}


@pytest.mark.parametrize("name", list(ROLLOUTS))
def test_rollout_advantages_are_the_estimators(nets, name):  # noqa: F811
    """Directly on the Rollout: prompts repeated G times (rows n*G .. n*G+G-1), no values or returns,
    and the advantages are rl.group_advantages of the sequence rewards reshaped [N, G] broadcast
    over real tokens (reinforce_pp: rl.reinforce_pp_advantages of the per-token rewards). With the
    KL in the loss the rewards are the plain score at the last token; in the reward, KL-shaped."""
    cfg = ROLLOUTS[name]()
    g, n = cfg.group_size, cfg.num_prompts
    batch = prompts(n)
    state = init_ppo_state(nets.policy_params, None, make_optimizer(OPTIM, 10), None, kl_coef=cfg.kl_coef, seed=0)
    rollout = jax.jit(make_rollout(cfg, nets.policy, None, ParamCountRM(), eos_token_id=T.EOS, pad_token_id=T.PAD))
    ro = rollout(state, batch["prompt_ids"], batch["prompt_mask"], nets.other_params, RM_PARAMS)
    assert ro.values is None and ro.returns is None
    seq, mask = np.asarray(ro.sequences), np.asarray(ro.response_mask)
    np.testing.assert_array_equal(seq[:, : T.P], np.repeat(batch["prompt_ids"], g, axis=0))
    assert len({tuple(r) for r in seq[:, T.P :]}) > n  # the G samples of a prompt are not all the same

    scores, rewards, kl = np.asarray(ro.scores), np.asarray(ro.rewards), np.asarray(ro.kl)
    logp, ref = np.asarray(ro.old_logprobs), np.asarray(ro.ref_logprobs)
    np.testing.assert_allclose(kl, np.asarray(losses.kl_penalty(logp, ref, kind=cfg.kl_estimator)) * mask, atol=1e-6)
    assert np.abs(kl).max() > 1e-3  # the reference differs: a KL term is really there
    last = mask.sum(1).astype(int) - 1  # responses are right-padded: the last real token
    at_end = np.zeros_like(rewards)
    at_end[np.arange(len(last)), last] = scores
    if cfg.kl_in_loss:  # no KL in the rewards: the score at the last token, 0 elsewhere, exactly
        np.testing.assert_array_equal(rewards, at_end)
    else:
        np.testing.assert_allclose(rewards, at_end - cfg.kl_coef * kl, rtol=0, atol=1e-6)

    adv = np.asarray(ro.advantages)
    if cfg.estimator == "reinforce_pp":
        want = rl.reinforce_pp_advantages(jnp.asarray(rewards), jnp.asarray(mask))
    else:
        seq_rewards = rewards.sum(1)
        if cfg.kl_in_loss:
            np.testing.assert_array_equal(seq_rewards, scores)
        group = rl.group_advantages(jnp.asarray(seq_rewards.reshape(n, g)), estimator=cfg.estimator)  # [N, G]
        want = np.asarray(group).reshape(-1)[:, None] * mask
        assert np.abs(want).max() > 0  # some group has different scores
    np.testing.assert_allclose(adv, np.asarray(want), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- the update


def test_critic_free_ratio_exactly_one_and_kl_zero_with_frozen_update(setups):
    """GRPO with lr 0 and ref == policy: every minibatch's ratio is bitwise 1, the in-loss KL and
    the observed KL are exactly 0; no value network anywhere (state, metrics)."""
    stage = setups("frozen_grpo")
    state, (m,) = stage.run(1)
    assert m["ppo/ratio_max_dev"] == 0.0 and m["ppo/ratio_mean"] == 1.0
    assert m["loss/kl"] == 0.0 and m["objective/kl"] == 0.0
    assert state.value is None and stage.state0.value is None
    assert not [k for k in m if k.startswith("val/") or k == "loss/value"], sorted(m)
    F.assert_trees_equal(state.policy.params, stage.state0.policy.params)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_estimator_raises_a_fixed_reward(setups, name):
    """A fixed reward (0.25 per TARGET token): each estimator raises it within 20 iterations,
    every metric stays finite; critic-free runs carry no value network or value metrics, and
    with the KL in the loss ``loss/kl`` is logged and the rewards hold no KL."""
    stage = setups(name)
    state, hist = stage.run(20)
    scores = np.array([h["objective/scores"] for h in hist])
    assert scores[-5:].mean() > scores[:3].mean() + 0.3, scores
    assert all(np.isfinite(v) for h in hist for v in h.values()), hist[-1]
    cfg = stage.cfg
    if cfg.kl_in_loss:
        assert all(np.isfinite(h["loss/kl"]) for h in hist) and hist[-1]["loss/kl"] > 0
        assert all(h["objective/non_score_reward"] == 0.0 for h in hist)  # the rewards sum to the score
    else:
        assert "loss/kl" not in hist[0]
    if not cfg.uses_critic:
        assert state.value is None
        assert not [k for k in hist[0] if k.startswith("val/") or k == "loss/value"], sorted(hist[0])
    else:
        assert state.value is not None and "loss/value" in hist[0]


def test_nonfinite_reward_skips_a_critic_free_iteration(setups):
    """A NaN score (the fixed reward's scale) in a GRPO iteration: the state comes back bitwise and
    the metrics blame the reward; the next finite iteration trains."""
    stage = setups("grpo")
    state, metrics = stage.step(stage.state0, stage.batch, stage.nets.policy_params, {"scale": jnp.float32(jnp.nan)})
    F.assert_trees_equal(state, stage.state0)
    assert float(metrics["nonfinite/reward"]) == 1.0 and float(metrics["nonfinite/skipped"]) == 1.0
    state, metrics = stage.step(state, stage.batch, stage.nets.policy_params, RM_PARAMS)
    assert float(metrics["nonfinite/skipped"]) == 0.0 and int(state.iteration) == 1


def test_ptx_with_a_critic_free_estimator(nets):  # noqa: F811
    """ptx is independent of the estimator: GRPO with pretraining rows logs a finite ``loss/ptx``
    and lowers the LM loss on those rows."""
    stage = Setup(hparams("grpo", 4, ptx_coef=27.8), nets)
    stage.batch = stage.batch | T.make_ptx(stage.cfg)
    before = T.lm_loss(nets.policy, nets.policy_params, stage.batch)
    state, hist = stage.run(3)
    assert all(np.isfinite(h["loss/ptx"]) for h in hist)
    assert T.lm_loss(nets.policy, state.policy.params, stage.batch) < before - 0.05


# ----------------------------------------------------------------------------- run_ppo


def _grpo_config(world: SimpleNamespace, out: Path, **run_changes) -> PPOConfig:
    cfg = T._resume_config(world, out, **run_changes)
    hp = dataclasses.replace(
        cfg.hparams, estimator="grpo", group_size=2, batch_size=16, minibatch_size=8, no_eos_penalty=None
    )  # the score is exactly the weighted sum
    base = str(world.base)  # two reward models: the same run twice (seeded heads), weighed 1 and 0.5
    return dataclasses.replace(
        cfg,
        hparams=hp,
        max_steps=2,
        reward=(base, base),
        reward_weights=(1.0, 0.5, 2.0),
        rule_reward=("rlhf_jax.rewards:length_penalty",),
    )


def test_run_ppo_grpo_with_several_rewards_resumes_exactly(tmp_path):
    """run_ppo with GRPO (G = 2), two reward models and a rule reward, ptx on: 2 iterations
    straight == 1 + resume + 1 (bitwise checkpoints); the checkpoint holds no value network and
    the metrics log every reward component beside the total."""
    world = T._world(tmp_path)
    straight = run_ppo(_grpo_config(world, tmp_path / "straight"))
    legs = _grpo_config(world, tmp_path / "legs", stop_at_step=1)
    run_ppo(legs)
    run_ppo(dataclasses.replace(legs, run=dataclasses.replace(legs.run, stop_at_step=None)))
    a, meta_a, step_a = F.read_checkpoint(straight)
    b, meta_b, step_b = F.read_checkpoint(legs.out)
    assert step_a == step_b == 2
    assert "value" not in a or a["value"] is None, sorted(a)
    F.assert_trees_equal(b, a)
    assert meta_a["iterators"] == meta_b["iterators"]
    rows = [m for m in train_loop.read_metrics(straight) if "objective/scores" in m]
    names = ("base", "base_1", "length_penalty")
    for m in rows:
        parts = [m[f"objective/scores/{n}"] for n in names]
        assert "loss/kl" in m and "loss/ptx" in m and "loss/value" not in m
        assert m["objective/scores"] == pytest.approx(parts[0] + 0.5 * parts[1] + 2.0 * parts[2], abs=1e-5)
        assert parts[0] == pytest.approx(parts[1], abs=1e-6)  # the same reward model twice


def test_mesh_must_split_the_prompts(tmp_path):
    """group_size shrinks the prompt batch: one the data x fsdp devices cannot split is a clear error."""
    world = T._world(tmp_path)
    cfg = _grpo_config(world, tmp_path / "run")
    cfg = dataclasses.replace(cfg, hparams=dataclasses.replace(cfg.hparams, group_size=4))  # 4 prompts, 8 devices
    with pytest.raises(ValueError, match="4 prompts per iteration"):
        run_ppo(cfg)
    assert cfg.run.mesh == MeshConfig(data=8, fsdp=1, tensor=1)
