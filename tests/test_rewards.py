"""Tests for rlhf_jax.rewards (several rewards in one score, Sparrow-style) and its use in PPO.

* ``RewardSum``: the weighted sum of two reward models and a rule reward equals the
  components computed separately, inside the PPO rollout too, and the iteration logs each
  component as ``objective/scores/<name>`` beside ``objective/scores``.
* The example rules match naive loops and work under ``jax.jit``.
* ``load_rule``: importlib by ``module:function``, clear errors naming the string.
* The command line: ``--reward a`` alone, and ``--reward a b --reward-weights ... --rule-reward ...``.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import tyro

from rlhf_jax import cli, rewards
from rlhf_jax.config import PPOConfig
from rlhf_jax.optim import make_optimizer
from rlhf_jax.ppo import init_ppo_state, make_iteration, make_rollout
from rlhf_jax.reward import score_sequences
from tests import test_ppo as T
from tests.test_ppo import nets  # noqa: F401  (the module-scoped fixture of the tiny networks)

WEIGHTS = (1.0, 0.5, 2.0)  # rm, rm1, the rule


def two_rms_and_a_rule(nets):  # noqa: F811
    """(RewardSum of the tiny RM, a second RM (other params) and length_penalty; its params)."""
    reward = rewards.RewardSum(models=(nets.rm, nets.rm), rules=(rewards.length_penalty,), weights=WEIGHTS)
    return reward, (nets.rm_params, nets.value_params)


def random_sequences(seed: int = 0):
    """[B, P+R] left-padded prompts + right-padded responses, and the mask."""
    rng = np.random.default_rng(seed)
    b = T.make_prompts(seed=seed)
    lens = rng.integers(1, T.R + 1, T.B)
    resp = rng.integers(2, T.V, (T.B, T.R)).astype(np.int32)
    resp_mask = (np.arange(T.R)[None] < lens[:, None]).astype(np.int32)
    seq = np.concatenate([b["prompt_ids"], np.where(resp_mask > 0, resp, T.PAD)], axis=1)
    return seq, np.concatenate([b["prompt_mask"], resp_mask], axis=1)


def test_reward_sum_is_the_weighted_sum_of_its_components(nets):  # noqa: F811
    reward, params = two_rms_and_a_rule(nets)
    assert reward.names == ("rm", "rm1", "length_penalty")
    seq, mask = random_sequences()
    parts = jax.jit(reward.components, static_argnums=3)(params, seq, mask, T.P)
    rm0 = score_sequences(nets.rm, nets.rm_params, seq, mask)
    rm1 = score_sequences(nets.rm, nets.value_params, seq, mask)
    rule = rewards.length_penalty(seq[:, : T.P], seq[:, T.P :], mask[:, T.P :])
    assert set(parts) == {"rm", "rm1", "length_penalty"}
    for name, want in zip(reward.names, (rm0, rm1, rule)):
        np.testing.assert_allclose(np.asarray(parts[name]), np.asarray(want), rtol=0, atol=1e-6, err_msg=name)
    assert np.abs(np.asarray(rm0) - np.asarray(rm1)).max() > 1e-3  # two different reward models
    np.testing.assert_allclose(np.asarray(reward.total(parts)), np.asarray(rm0 + 0.5 * rm1 + 2.0 * rule), atol=1e-6)
    one = rewards.RewardSum(models=(nets.rm,))
    np.testing.assert_array_equal(np.asarray(one.total({"rm": rm0})), np.asarray(rm0))  # weight 1: bit for bit
    with pytest.raises(ValueError, match="3 weights for 2 components"):
        rewards.RewardSum(models=(nets.rm,), rules=(rewards.length_penalty,), weights=(1.0, 1.0, 1.0))
    assert rewards.unique_names(["rm", "rm", "rm_1"]) == ("rm", "rm_1", "rm_1_1")


def test_ppo_rollout_and_iteration_use_the_weighted_sum(nets):  # noqa: F811
    """In the rollout, the score is w . (components computed separately on its sequences); the
    iteration logs each component's mean beside the total, and sum_i w_i * mean_i = the total."""
    reward, params = two_rms_and_a_rule(nets)
    cfg = T.ppo_config(no_eos_penalty=None)
    opt = make_optimizer(T.OPTIM, 10)
    state = init_ppo_state(nets.policy_params, nets.value_params, opt, opt, kl_coef=cfg.kl_coef, seed=0)
    batch = T.make_prompts()
    rollout = jax.jit(make_rollout(cfg, nets.policy, nets.rm, reward, eos_token_id=T.EOS, pad_token_id=T.PAD))
    ro = rollout(state, batch["prompt_ids"], batch["prompt_mask"], nets.policy_params, params)
    seq, mask = np.asarray(ro.sequences), np.asarray(ro.sequence_mask)
    want = {
        "rm": score_sequences(nets.rm, nets.rm_params, seq, mask),
        "rm1": score_sequences(nets.rm, nets.value_params, seq, mask),
        "length_penalty": rewards.length_penalty(seq[:, : T.P], seq[:, T.P :], mask[:, T.P :]),
    }
    assert set(ro.score_components) == set(want)
    for name, w in want.items():
        np.testing.assert_allclose(np.asarray(ro.score_components[name]), np.asarray(w), atol=1e-5, err_msg=name)
    total = want["rm"] + 0.5 * want["rm1"] + 2.0 * want["length_penalty"]
    np.testing.assert_allclose(np.asarray(ro.scores), np.asarray(total), rtol=0, atol=1e-5)

    step = jax.jit(make_iteration(cfg, nets.policy, nets.rm, reward, opt, opt, eos_token_id=T.EOS, pad_token_id=T.PAD))
    _, metrics = step(state, batch, nets.policy_params, params)
    m = {k: float(v) for k, v in metrics.items()}
    parts = [m[f"objective/scores/{n}"] for n in ("rm", "rm1", "length_penalty")]
    assert m["objective/scores"] == pytest.approx(sum(w * p for w, p in zip(WEIGHTS, parts)), abs=1e-5)
    assert all(np.isfinite(v) for v in m.values())


def naive_repetition(ids, mask):
    out = []
    for row, m in zip(ids, mask):
        n = sum(m)
        out.append(-sum(1 for t in range(1, len(row)) if m[t] and m[t - 1] and row[t] == row[t - 1]) / max(n, 1))
    return np.array(out)


def test_example_rules_match_loops_under_jit():
    rng = np.random.default_rng(3)
    prompt = rng.integers(2, 6, (6, 4)).astype(np.int32)
    ids = rng.integers(2, 5, (6, 7)).astype(np.int32)  # a small alphabet: repeats happen
    lens = np.array([7, 1, 3, 5, 6, 2])
    mask = (np.arange(7)[None] < lens[:, None]).astype(np.int32)
    ids = np.where(mask > 0, ids, 3)  # padding that would count if the mask were ignored
    np.testing.assert_allclose(np.asarray(jax.jit(rewards.length_penalty)(prompt, ids, mask)), -lens / 7, atol=1e-7)
    np.testing.assert_allclose(
        np.asarray(jax.jit(rewards.repetition_penalty)(prompt, ids, mask)), naive_repetition(ids, mask), atol=1e-7
    )
    rule = rewards.banned_tokens([3, 4], penalty=0.5)
    want = [-0.5 * sum(1 for t, k in zip(r, m) if k and t in (3, 4)) for r, m in zip(ids, mask)]
    np.testing.assert_allclose(np.asarray(jax.jit(rule)(prompt, ids, mask)), want, atol=1e-7)
    assert rewards.load_rule("rlhf_jax.rewards:repetition_penalty") is rewards.repetition_penalty


@pytest.mark.parametrize(
    "spec, message",
    [
        ("rlhf_jax.rewards", "expected 'module:function'"),
        ("rlhf_jax.no_such_module:f", "cannot import module 'rlhf_jax.no_such_module'"),
        ("rlhf_jax.rewards:no_such_rule", "has no attribute 'no_such_rule'"),
        ("rlhf_jax.rewards:unique_names", "must take"),  # one argument
        ("rlhf_jax.rewards:banned_tokens", "must take"),  # a factory, not a rule
        ("rlhf_jax.rewards:__all__", "is not callable"),
    ],
)
def test_bad_rule_names_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message) as e:
        rewards.load_rule(spec)
    assert repr(spec) in str(e.value)


def test_config_and_command_line():
    """``--reward a`` alone is one reward as before; several rewards, weights and rules parse;
    weights must match the rewards; a rule spec must be 'module:function'."""
    flat = cli._flat_hparams(PPOConfig)
    base = ["--prompts", "p.jsonl", "--policy", "runs/sft", "--out", "runs/ppo"]
    one = cli._as_base(tyro.cli(flat, args=[*base, "--reward", "runs/rm"]))
    assert one.reward == ("runs/rm",) and one.weights == (1.0,) and one.rule_reward == ()
    assert PPOConfig(prompts="p", policy="s", reward="runs/rm", out="o").reward == ("runs/rm",)  # a str: one path
    many = cli._as_base(
        tyro.cli(
            flat,
            args=[
                *base,
                "--reward",
                "runs/rm_a",
                "runs/rm_b",
                "--reward-weights",
                "1",
                "0.5",
                "-2",
                "--rule-reward",
                "rlhf_jax.rewards:length_penalty",
                "--estimator",
                "grpo",
                "--group-size",
                "4",
                "--kl-in",
                "loss",
            ],
        )
    )
    assert many.reward == ("runs/rm_a", "runs/rm_b") and many.weights == (1.0, 0.5, -2.0)
    assert many.rule_reward == ("rlhf_jax.rewards:length_penalty",)
    assert (many.hparams.estimator, many.hparams.group_size, many.hparams.kl_in) == ("grpo", 4, "loss")
    with pytest.raises(ValueError, match="2 weights for 3 rewards"):
        PPOConfig(prompts="p", policy="s", reward=("a", "b"), rule_reward="m:f", out="o", reward_weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="'length_penalty' is not of the form"):
        PPOConfig(prompts="p", policy="s", reward="a", rule_reward=("length_penalty",), out="o")
