"""Tests for rlhf_jax.rl against naive numpy loops, plus hypothesis properties."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rlhf_jax import losses, ops, rl

FEW = settings(max_examples=50, deadline=None)
finite = functools.partial(st.floats, allow_nan=False, allow_infinity=False, width=32)
real = functools.partial(st.floats, allow_nan=False, allow_infinity=False)

# ----------------------------------------------------------------------------- naive


def naive_gae(rewards, values, mask, gamma, lam):
    """GAE one row at a time over the real tokens, walking backwards."""
    batch, length = rewards.shape
    adv = np.zeros((batch, length))
    ret = np.zeros((batch, length))
    for b in range(batch):
        real = [t for t in range(length) if mask[b, t]]
        next_value, next_adv = 0.0, 0.0
        for t in reversed(real):
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            adv[b, t] = delta + gamma * lam * next_adv
            ret[b, t] = adv[b, t] + float(values[b, t])
            next_value, next_adv = float(values[b, t]), adv[b, t]
    return adv, ret


def naive_last(row):
    last = None
    for t, m in enumerate(row):
        if m:
            last = t
    return last


def naive_shaped(scores, lp, ref, mask, kl_coef, kind):
    batch, length = lp.shape
    rewards = np.zeros((batch, length))
    kl = np.zeros((batch, length))
    for b in range(batch):
        for t in range(length):
            if mask[b, t]:
                d = float(lp[b, t]) - float(ref[b, t])
                kl[b, t] = {"k1": d, "k2": 0.5 * d * d, "k3": math.exp(-d) - 1 + d}[kind]
                rewards[b, t] = -kl_coef * kl[b, t]
        last = naive_last(mask[b])
        if last is not None:
            rewards[b, last] += float(scores[b])
    return rewards, kl


def naive_group(rewards, estimator, eps=1e-6):
    """Group baselines one prompt at a time."""
    out = np.zeros(rewards.shape)
    for n in range(rewards.shape[0]):
        row = [float(v) for v in rewards[n]]
        g = len(row)
        mean = sum(row) / g
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / (g - 1))
        for i, v in enumerate(row):
            if estimator == "grpo":
                out[n, i] = (v - mean) / (std + eps)
            elif estimator == "dr_grpo":
                out[n, i] = v - mean
            else:
                out[n, i] = v - sum(row[j] for j in range(g) if j != i) / (g - 1)
    return out


def naive_reinforce_pp(rewards, mask):
    """Reward-to-go over each row's real tokens, then whitened over all real tokens."""
    batch, length = rewards.shape
    to_go = np.zeros((batch, length))
    values = []
    for b in range(batch):
        running = 0.0
        for t in reversed(range(length)):
            if mask[b, t]:
                running += float(rewards[b, t])
                to_go[b, t] = running
                values.append(running)
    if not values:
        return to_go
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values) + 1e-8)
    return np.where(mask != 0, (to_go - mean) / std, 0.0)


def central_difference(fn, x, step=1e-3):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += step
        down[idx] -= step
        grad[idx] = (fn(up) - fn(down)) / (2 * step)
    return grad


def random_mask(rng, batch, length, kind):
    mask = np.zeros((batch, length), np.float32)
    for b in range(batch):
        if kind == "right":  # response then right padding
            mask[b, : rng.integers(1, length + 1)] = 1
        elif kind == "prefix":  # zero prefix (prompt / left padding), response, right padding
            start = rng.integers(0, length)
            mask[b, start : rng.integers(start + 1, length + 1)] = 1
        elif kind == "holes":
            mask[b] = rng.random(length) < 0.6
    if kind == "holes":
        mask[-1] = 0  # an empty row among the holes
    return mask


# ----------------------------------------------------------------------------- loops


class RLMatchesLoopsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_gae_matches_loop(self):
        rng = np.random.default_rng(0)
        fn = self.variant(lambda r, v, m, g, lm: rl.gae(r, v, m, gamma=g, lam=lm))
        for kind in ("right", "prefix", "holes"):
            for gamma, lam in ((1.0, 0.95), (0.9, 0.8)):
                rewards = rng.normal(size=(5, 9)).astype(np.float32)
                values = rng.normal(size=(5, 9)).astype(np.float32)
                mask = random_mask(rng, 5, 9, kind)
                adv, ret = fn(rewards, values, mask, gamma, lam)
                want_adv, want_ret = naive_gae(rewards, values, mask, gamma, lam)
                np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5, err_msg=kind)
                np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5, err_msg=kind)

    def test_gae_ignores_whatever_sits_at_masked_positions(self):
        rewards = jnp.array([[9.0, 0.0, 1.0, jnp.nan]])
        values = jnp.array([[jnp.inf, 0.5, 0.25, 7.0]])
        mask = jnp.array([[0, 1, 1, 0]])
        adv, ret = rl.gae(rewards, values, mask, gamma=1.0, lam=1.0)
        np.testing.assert_allclose(adv, [[0.0, 0.5, 0.75, 0.0]])
        np.testing.assert_allclose(ret, [[0.0, 1.0, 1.0, 0.0]])

    @chex.variants(with_jit=True, without_jit=True)
    def test_kl_shaped_rewards_matches_loop(self):
        rng = np.random.default_rng(1)
        for kind in ("k1", "k3"):
            fn = self.variant(
                lambda s, lp, ref, m, c, kind=kind: rl.kl_shaped_rewards(s, lp, ref, m, kl_coef=c, kind=kind)
            )
            for mask_kind in ("right", "prefix", "holes"):
                scores = rng.normal(size=5).astype(np.float32)
                lp, ref = (rng.normal(size=(5, 7)).astype(np.float32) for _ in range(2))
                mask = random_mask(rng, 5, 7, mask_kind)
                rewards, kl = fn(scores, lp, ref, mask, jnp.float32(0.05))  # beta traced under jit
                want_r, want_kl = naive_shaped(scores, lp, ref, mask, 0.05, kind)
                np.testing.assert_allclose(rewards, want_r, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(kl, want_kl, rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_update_kl_coef(self):
        fn = self.variant(lambda c, kl, n, tgt, h: rl.update_kl_coef(c, kl, n, target=tgt, horizon=h))
        cases = [  # (beta, observed KL, n, target, horizon)
            (0.1, 12.0, 512, 6.0, 10000.0),  # far above target: error clipped to +0.2
            (0.1, 0.0, 512, 6.0, 10000.0),  # far below: -0.2
            (0.2, 6.6, 64, 6.0, 1000.0),  # within the clip: error 0.1
            (0.2, 6.0, 64, 6.0, 1000.0),  # on target: unchanged
        ]
        for beta, kl, n, target, horizon in cases:
            error = min(max(kl / target - 1, -0.2), 0.2)
            want = beta * (1 + error * n / horizon)
            np.testing.assert_allclose(fn(beta, kl, n, target, horizon), want, rtol=1e-6)

    def test_reward_bias_and_gain(self):
        rng = np.random.default_rng(2)
        demo = (3.0 + 2.0 * rng.normal(size=50)).astype(np.float32)
        bias = float(rl.reward_bias(demo))
        self.assertAlmostEqual(sum(float(s) + bias for s in demo) / len(demo), 0.0, places=4)
        for target_mean, target_std in ((0.0, 1.0), (1.5, 0.5)):
            gain, bias = rl.reward_gain_bias(demo, target_mean=target_mean, target_std=target_std)
            normed = [float(gain) * float(s) + float(bias) for s in demo]
            mean = sum(normed) / len(normed)
            std = math.sqrt(sum((x - mean) ** 2 for x in normed) / len(normed))
            self.assertAlmostEqual(mean, target_mean, places=4)
            self.assertAlmostEqual(std, target_std, places=4)
        gain, bias = rl.reward_gain_bias(jnp.full((4,), 2.0))
        self.assertEqual((float(gain), float(bias)), (1.0, -2.0))


class CriticFreeAdvantagesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_group_advantages_match_loop(self):
        rng = np.random.default_rng(4)
        for group in (2, 3, 7):
            rewards = rng.normal(size=(4, group)).astype(np.float32)
            rewards[0] = -123.456  # a constant group: advantage exactly 0 (not rounding / eps, not NaN)
            for estimator in ("grpo", "dr_grpo", "rloo"):
                got = self.variant(functools.partial(rl.group_advantages, estimator=estimator))(rewards)
                self.assertEqual(got.dtype, jnp.float32)
                np.testing.assert_allclose(
                    got, naive_group(rewards, estimator), rtol=1e-5, atol=1e-5, err_msg=f"{estimator} G={group}"
                )
                np.testing.assert_array_equal(got[0], 0.0)
        got = self.variant(lambda r, e: rl.group_advantages(r, eps=e))(rewards, np.float32(0.5))  # traced eps
        np.testing.assert_allclose(got, naive_group(rewards, "grpo", eps=0.5), rtol=1e-5, atol=1e-6)

    def test_group_advantages_relations_and_errors(self):
        rng = np.random.default_rng(5)
        rewards = rng.normal(size=(3, 5)).astype(np.float32)
        dr = rl.group_advantages(rewards, estimator="dr_grpo")
        np.testing.assert_allclose(rl.group_advantages(rewards, estimator="rloo"), 5 / 4 * dr, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(jnp.sum(dr, axis=1), 0.0, atol=1e-5)
        grpo = np.asarray(rl.group_advantages(rewards, eps=0.0), np.float64)
        np.testing.assert_allclose(np.std(grpo, axis=1, ddof=1), 1.0, rtol=1e-5)
        pair = rl.group_advantages(jnp.array([[2.0, -1.0]]), estimator="rloo")
        np.testing.assert_allclose(pair, [[3.0, -3.0]])
        with self.assertRaisesRegex(ValueError, "ppo"):
            rl.group_advantages(rewards, estimator="ppo")
        with self.assertRaisesRegex(ValueError, "G >= 2"):
            rl.group_advantages(jnp.zeros((4, 1)))
        with self.assertRaises(AssertionError):  # chex: [N, G]
            rl.group_advantages(jnp.zeros(4))

    def test_group_advantages_gradient_matches_finite_differences(self):
        rng = np.random.default_rng(6)
        rewards = rng.normal(size=(2, 4)).astype(np.float32)
        weights = rng.normal(size=(2, 4))
        for estimator in ("grpo", "dr_grpo", "rloo"):
            grad = jax.jit(
                jax.grad(
                    lambda r, e=estimator: jnp.sum(
                        jnp.asarray(weights, jnp.float32) * rl.group_advantages(r, estimator=e)
                    )
                )
            )(rewards)
            want = central_difference(lambda r, e=estimator: float(np.sum(weights * naive_group(r, e))), rewards)
            np.testing.assert_allclose(grad, want, rtol=1e-3, atol=1e-4, err_msg=estimator)

    def test_group_advantages_vmap(self):
        rng = np.random.default_rng(7)
        rewards = rng.normal(size=(2, 3, 4)).astype(np.float32)
        got = jax.jit(jax.vmap(functools.partial(rl.group_advantages, estimator="rloo")))(rewards)
        for m in range(2):
            np.testing.assert_allclose(got[m], naive_group(rewards[m], "rloo"), rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_reinforce_pp_matches_loop(self):
        rng = np.random.default_rng(8)
        fn = self.variant(rl.reinforce_pp_advantages)
        for kind in ("right", "prefix", "holes"):
            rewards = rng.normal(size=(5, 7)).astype(np.float32)
            mask = random_mask(rng, 5, 7, kind)
            got = fn(rewards, mask)
            self.assertEqual(got.dtype, jnp.float32)
            np.testing.assert_allclose(got, naive_reinforce_pp(rewards, mask), rtol=1e-5, atol=1e-5, err_msg=kind)
            # the same as whitened GAE with gamma = lambda = 1 and no value function
            adv, _ = rl.gae(rewards, np.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
            np.testing.assert_allclose(got, ops.masked_whiten(adv, mask), rtol=1e-5, atol=1e-5)

    def test_reinforce_pp_masked_junk_empty_mask_and_bfloat16(self):
        rewards = jnp.array([[jnp.nan, 0.0, 1.0, jnp.inf], [0.0, 2.0, 0.0, 0.0]])
        mask = jnp.array([[0, 1, 1, 0], [1, 1, 0, 0]])
        np.testing.assert_allclose(
            rl.reinforce_pp_advantages(rewards, mask),
            naive_reinforce_pp(np.nan_to_num(np.asarray(rewards), posinf=0.0), mask),
            rtol=1e-5,
            atol=1e-6,
        )
        fn = jax.jit(jax.value_and_grad(lambda r, m: jnp.sum(rl.reinforce_pp_advantages(r, m) ** 3)))
        value, grad = fn(jnp.ones((2, 4)), jnp.zeros((2, 4)))
        self.assertEqual(float(value), 0.0)
        np.testing.assert_array_equal(grad, 0.0)
        value, grad = fn(rewards.at[0, 0].set(0.0).at[0, 3].set(0.0).astype(jnp.bfloat16), mask)
        self.assertTrue(bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(grad.astype(jnp.float32)))))

    def test_kl_shaped_rewards_uses_losses_kl_penalty(self):
        rng = np.random.default_rng(9)
        lp, ref = rng.normal(size=(2, 3)).astype(np.float32), rng.normal(size=(2, 3)).astype(np.float32)
        for kind in ("k1", "k2", "k3"):
            _, kl = rl.kl_shaped_rewards(np.zeros(2), lp, ref, np.ones((2, 3)), kl_coef=0.1, kind=kind)
            np.testing.assert_allclose(kl, losses.kl_penalty(lp, ref, kind=kind), rtol=1e-6)
        with self.assertRaisesRegex(ValueError, "k9"):
            rl.kl_shaped_rewards(np.zeros(2), lp, ref, np.ones((2, 3)), kl_coef=0.1, kind="k9")


# ----------------------------------------------------------------------------- properties

_B, _T = 3, 6
_gae = jax.jit(lambda r, v, m, g, lm: rl.gae(r, v, m, gamma=g, lam=lm))
_update = jax.jit(lambda c, kl, n, tgt, h: rl.update_kl_coef(c, kl, n, target=tgt, horizon=h))


@FEW
@given(
    rewards=hnp.arrays(np.float32, (_B, _T), elements=finite(min_value=-5, max_value=5)),
    values=hnp.arrays(np.float32, (_B, _T), elements=finite(min_value=-5, max_value=5)),
    mask=hnp.arrays(np.bool_, (_B, _T)),
)
def test_gae_with_gamma_lam_one_gives_reward_to_go(rewards, values, mask):
    adv, ret = _gae(rewards, values, mask, 1.0, 1.0)
    for b in range(_B):
        for t in range(_T):
            if not mask[b, t]:
                assert adv[b, t] == 0.0 and ret[b, t] == 0.0
                continue
            to_go = sum(float(rewards[b, u]) for u in range(t, _T) if mask[b, u])
            np.testing.assert_allclose(adv[b, t] + values[b, t], to_go, rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(ret[b, t], to_go, rtol=1e-5, atol=1e-4)


@FEW
@given(
    beta=real(min_value=1e-4, max_value=10.0),
    kl=real(min_value=0.0, max_value=100.0),
    target=real(min_value=0.1, max_value=20.0),
    n=st.integers(64, 1024),
    horizon=real(min_value=1000.0, max_value=20000.0),
)
def test_kl_controller_error_is_clipped_and_moves_toward_target(beta, kl, target, n, horizon):
    new = float(_update(beta, kl, n, target, horizon))
    beta = float(np.float32(beta))  # the controller computes in float32
    step = (new / beta - 1.0) * horizon / n  # the proportional error actually applied
    assert -0.2 - 1e-4 <= step <= 0.2 + 1e-4
    error = kl / target - 1.0
    if abs(error) <= 0.2:
        np.testing.assert_allclose(step, error, atol=1e-3)
    else:
        np.testing.assert_allclose(abs(step), 0.2, atol=1e-3)
    if kl > target * 1.001:  # too far from the reference: the penalty grows
        assert new > beta
    elif kl < target * 0.999:  # too close: the penalty shrinks
        assert new < beta


# ----------------------------------------------------------------------------- robustness


def _rl_total(values, logprobs, mask):
    scores = jnp.ones(values.shape[:1])
    rewards, _ = rl.kl_shaped_rewards(scores, logprobs, jnp.zeros_like(logprobs), mask, kl_coef=0.1, kind="k3")
    adv, ret = rl.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    return jnp.sum(adv) + jnp.sum(ret)


def test_all_zero_mask_gives_zeros_and_finite_gradients():
    x = jnp.arange(8.0).reshape(2, 4) / 10
    value, grads = jax.jit(jax.value_and_grad(_rl_total, argnums=(0, 1)))(x, -x, jnp.zeros((2, 4)))
    assert float(value) == 0.0
    assert all(bool(jnp.all(g == 0.0)) for g in grads)


def test_bfloat16_inputs_give_finite_gradients():
    x = (jnp.arange(8.0).reshape(2, 4) / 10).astype(jnp.bfloat16)
    mask = jnp.array([[0, 1, 1, 0], [1, 1, 1, 1]], jnp.bfloat16)
    value, grads = jax.jit(jax.value_and_grad(_rl_total, argnums=(0, 1)))(x, -x, mask)
    assert value.dtype == jnp.float32 and bool(jnp.isfinite(value))
    for g in grads:
        assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


def test_vmap_over_groups():
    rng = np.random.default_rng(3)
    rewards, values = (rng.normal(size=(2, 3, 5)).astype(np.float32) for _ in range(2))
    mask = (rng.random((2, 3, 5)) < 0.7).astype(np.float32)
    adv, ret = jax.jit(jax.vmap(functools.partial(rl.gae, gamma=0.99, lam=0.95)))(rewards, values, mask)
    for g in range(2):
        want_adv, want_ret = naive_gae(rewards[g], values[g], mask[g], 0.99, 0.95)
        np.testing.assert_allclose(adv[g], want_adv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret[g], want_ret, rtol=1e-5, atol=1e-5)
    scores = rng.normal(size=(2, 3)).astype(np.float32)
    shaped = jax.jit(jax.vmap(lambda s, lp, m: rl.kl_shaped_rewards(s, lp, 0 * lp, m, kl_coef=0.1)))
    got, _ = shaped(scores, values, mask)
    for g in range(2):
        np.testing.assert_allclose(
            got[g], naive_shaped(scores[g], values[g], 0 * values[g], mask[g], 0.1, "k1")[0], rtol=1e-5, atol=1e-6
        )
