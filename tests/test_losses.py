"""Tests for rlhf_jax.losses against naive numpy loops, plus hypothesis properties."""

import contextlib
import functools
import io
import math
import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rlhf_jax import losses

# The markdown file whose "## Use the losses in your own JAX code" section is executed.
SNIPPET_PATH = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SNIPPET_HEADING = "## Use the losses in your own JAX code"

FEW = settings(max_examples=50, deadline=None)
finite = functools.partial(st.floats, allow_nan=False, allow_infinity=False, width=32)

# ----------------------------------------------------------------------------- naive


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def naive_k_way(rewards, ranks, valid, margin=0.0, center_coef=0.0):
    """InstructGPT eq. 1, one prompt and one pair at a time."""
    prompt_losses, n_pairs, n_correct, diffs = [], 0, 0, []
    for b in range(rewards.shape[0]):
        pair_losses = []
        for i in range(rewards.shape[1]):
            for j in range(rewards.shape[1]):
                if valid[b, i] and valid[b, j] and ranks[b, i] < ranks[b, j]:
                    d = float(rewards[b, i]) - float(rewards[b, j])
                    pair_losses.append(-log_sigmoid(d - margin))
                    n_correct += d > 0
                    diffs.append(d)
        if pair_losses:
            prompt_losses.append(sum(pair_losses) / len(pair_losses))
        n_pairs += len(pair_losses)
    loss = sum(prompt_losses) / len(prompt_losses) if prompt_losses else 0.0
    valid_r = [float(rewards[b, k]) for b in range(rewards.shape[0]) for k in range(rewards.shape[1]) if valid[b, k]]
    mean = sum(valid_r) / len(valid_r) if valid_r else 0.0
    if center_coef:
        loss += center_coef * (sum(r * r for r in valid_r) / len(valid_r) if valid_r else 0.0)
    std = math.sqrt(sum((r - mean) ** 2 for r in valid_r) / len(valid_r)) if valid_r else 0.0
    return loss, {
        "accuracy": n_correct / n_pairs if n_pairs else 0.0,
        "num_pairs": n_pairs,
        "num_prompts_with_pairs": len(prompt_losses),
        "reward_mean": mean,
        "reward_std": std,
        "margin": sum(diffs) / len(diffs) if diffs else 0.0,
    }


def naive_ppo(lp, old, adv, mask, eps):
    total, clipped, kl, n = 0.0, 0.0, 0.0, 0.0
    for b in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if not mask[b, t]:
                continue
            ratio = math.exp(float(lp[b, t]) - float(old[b, t]))
            a = float(adv[b, t])
            unclipped = -a * ratio
            clip = -a * min(max(ratio, 1 - eps), 1 + eps)
            total += max(unclipped, clip)
            clipped += clip > unclipped
            kl += 0.5 * (float(lp[b, t]) - float(old[b, t])) ** 2
            n += 1
    n = max(n, 1)
    return total / n, clipped / n, kl / n


def naive_ppo_aggregated(lp, old, adv, mask, eps, aggregation):
    """The clipped surrogate summed per sequence, then reduced the three ways."""
    sums, counts = [], []
    for b in range(lp.shape[0]):
        total, n = 0.0, 0
        for t in range(lp.shape[1]):
            if mask[b, t]:
                ratio = math.exp(float(lp[b, t]) - float(old[b, t]))
                a = float(adv[b, t])
                total += max(-a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps))
                n += 1
        sums.append(total)
        counts.append(n)
    if aggregation == "token_mean":
        return sum(sums) / max(sum(counts), 1)
    if aggregation == "sequence_mean":
        per_seq = [s / n for s, n in zip(sums, counts) if n > 0]
        return sum(per_seq) / len(per_seq) if per_seq else 0.0
    return sum(sums) / lp.size  # token_sum: B * T


def naive_value_loss(v, old, ret, mask, eps):
    total, clipped, n = 0.0, 0.0, 0.0
    for b in range(v.shape[0]):
        for t in range(v.shape[1]):
            if not mask[b, t]:
                continue
            vc = float(old[b, t]) + min(max(float(v[b, t]) - float(old[b, t]), -eps), eps)
            e1 = (float(v[b, t]) - float(ret[b, t])) ** 2
            e2 = (vc - float(ret[b, t])) ** 2
            total += 0.5 * max(e1, e2)
            clipped += e2 > e1
            n += 1
    n = max(n, 1)
    return total / n, clipped / n


def naive_kl(lp, ref, kind):
    d = lp - ref
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    return math.exp(-d) - 1 + d


def random_k_way(rng, batch, k):
    rewards = rng.normal(size=(batch, k)).astype(np.float32)
    ranks = rng.integers(0, max(2, k // 2 + 1), size=(batch, k))  # few ranks: many ties
    valid = (rng.random((batch, k)) < 0.75).astype(np.float32)
    valid[0] = 1.0
    return rewards, ranks, valid


# ----------------------------------------------------------------------------- jitted once

_B, _T = 2, 6
_ppo = jax.jit(lambda lp, old, adv, mask: losses.ppo_policy_loss(lp, old, adv, mask, clip_eps=0.2))
_ppo_grad = jax.jit(jax.grad(lambda lp, old, adv, mask: _ppo(lp, old, adv, mask)[0]))
_k_way = jax.jit(losses.k_way_ranking_loss)
_pairwise_and_grad = jax.jit(jax.value_and_grad(lambda c, r: jnp.sum(losses.pairwise_ranking_loss(c, r))))
_kl_k3 = jax.jit(functools.partial(losses.kl_penalty, kind="k3"))
_kl_k1 = jax.jit(functools.partial(losses.kl_penalty, kind="k1"))

_k_way_and_grad = jax.jit(jax.value_and_grad(losses.k_way_ranking_loss, has_aux=True))  # ((loss, metrics), grad)


# ----------------------------------------------------------------------------- loops


class LossesMatchLoopsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_token_cross_entropy_and_lm_loss(self):
        rng = np.random.default_rng(0)
        logits = (2 * rng.normal(size=(2, 6, 5))).astype(np.float32)
        targets = rng.integers(0, 5, size=(2, 6))
        mask = (rng.random((2, 6)) < 0.6).astype(np.float32)
        nll = self.variant(losses.token_cross_entropy)(logits, targets)
        loss, metrics = self.variant(losses.masked_lm_loss)(logits, targets, mask)
        total, correct, n = 0.0, 0, 0
        for b in range(2):
            for t in range(6):
                row = [float(v) for v in logits[b, t]]
                lse = math.log(sum(math.exp(v) for v in row))
                want = lse - row[targets[b, t]]
                np.testing.assert_allclose(nll[b, t], want, rtol=1e-5)
                if mask[b, t]:
                    total += want
                    correct += row.index(max(row)) == targets[b, t]
                    n += 1
        np.testing.assert_allclose(loss, total / n, rtol=1e-5)
        np.testing.assert_allclose(metrics["loss"], total / n, rtol=1e-5)
        np.testing.assert_allclose(metrics["accuracy"], correct / n, rtol=1e-6)
        self.assertEqual(float(metrics["num_tokens"]), n)

    @chex.variants(with_jit=True, without_jit=True)
    def test_lm_accuracy_counts_a_target_tied_for_the_top(self):
        logits = jnp.asarray([[[1.0, 3.0, 3.0, 0.0], [2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
        # tied top (either tied id is correct), a miss, all equal (any id is correct)
        _, m = self.variant(losses.masked_lm_loss)(logits, jnp.asarray([[2, 1, 3]]), jnp.ones((1, 3)))
        np.testing.assert_allclose(m["accuracy"], 2 / 3, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_pairwise_ranking_loss(self):
        rng = np.random.default_rng(1)
        chosen = (3 * rng.normal(size=7)).astype(np.float32)
        rejected = (3 * rng.normal(size=7)).astype(np.float32)
        got = self.variant(losses.pairwise_ranking_loss)(chosen, rejected)
        want = [-log_sigmoid(float(c) - float(r)) for c, r in zip(chosen, rejected)]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)

    @chex.variants(with_jit=True, without_jit=True)
    def test_k_way_matches_loop_for_random_k_ties_and_invalid_slots(self):
        rng = np.random.default_rng(2)
        ks = range(2, 10)
        if self._testMethodName.endswith("without_jit"):  # eager compiles op by op: fewer shapes
            ks = sorted(rng.choice(ks, size=3, replace=False))
        for k in ks:
            rewards, ranks, valid = random_k_way(rng, 3, k)
            margin, center = (0.0, 0.0) if k % 2 else (0.5, 0.01)
            fn = self.variant(functools.partial(losses.k_way_ranking_loss, margin=margin, center_coef=center))
            loss, metrics = fn(rewards, ranks, valid)
            want_loss, want = naive_k_way(rewards, ranks, valid, margin, center)
            np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6, err_msg=f"K={k}")
            for name, value in want.items():
                np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=f"K={k} {name}")

    def test_k_way_prompt_without_pairs_contributes_nothing(self):
        rewards = jnp.array([[1.0, 0.0, 3.0], [5.0, -5.0, jnp.nan]])
        ranks = jnp.array([[0, 1, 2], [0, 0, 1]])  # second prompt: a tie and an invalid slot
        valid = jnp.array([[1, 1, 1], [1, 1, 0]])
        (loss, metrics), grad = _k_way_and_grad(rewards, ranks, valid)
        (loss_first, _), _ = _k_way_and_grad(rewards[:1], ranks[:1], valid[:1])
        np.testing.assert_allclose(loss, loss_first, rtol=1e-6)
        self.assertEqual(float(metrics["num_prompts_with_pairs"]), 1.0)
        self.assertTrue(bool(jnp.all(jnp.isfinite(grad))))
        np.testing.assert_array_equal(grad[1], [0.0, 0.0, 0.0])

    def test_k_way_no_pairs_at_all(self):
        rewards = jnp.array([[1.0, 2.0], [3.0, 4.0]])
        ranks = jnp.array([[0, 0], [0, 1]])
        valid = jnp.array([[1, 1], [1, 0]])
        (loss, metrics), grad = _k_way_and_grad(rewards, ranks, valid)
        self.assertEqual(float(loss), 0.0)
        self.assertEqual(float(metrics["num_pairs"]), 0.0)
        np.testing.assert_array_equal(grad, np.zeros((2, 2)))

    def test_k_way_k2_equals_pairwise(self):
        rng = np.random.default_rng(3)
        chosen, rejected = rng.normal(size=5).astype(np.float32), rng.normal(size=5).astype(np.float32)
        loss, _ = _k_way(np.stack([chosen, rejected], 1), np.tile([0, 1], (5, 1)), np.ones((5, 2)))
        np.testing.assert_allclose(loss, np.mean(losses.pairwise_ranking_loss(chosen, rejected)), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_ppo_policy_loss_matches_loop(self):
        rng = np.random.default_rng(4)
        lp = (0.3 * rng.normal(size=(3, 8))).astype(np.float32)  # ratios on both sides of the clip
        old = np.zeros((3, 8), np.float32)
        adv = rng.normal(size=(3, 8)).astype(np.float32)
        mask = (rng.random((3, 8)) < 0.7).astype(np.float32)
        loss, metrics = self.variant(functools.partial(losses.ppo_policy_loss, clip_eps=0.2))(lp, old, adv, mask)
        want_loss, want_clip, want_kl = naive_ppo(lp, old, adv, mask, 0.2)
        self.assertGreater(want_clip, 0.0)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics["policy_loss"], want_loss, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics["clipfrac"], want_clip, rtol=1e-6)
        np.testing.assert_allclose(metrics["approx_kl"], want_kl, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_value_loss_matches_loop(self):
        rng = np.random.default_rng(5)
        v, old, ret = (rng.normal(size=(3, 8)).astype(np.float32) for _ in range(3))
        mask = (rng.random((3, 8)) < 0.7).astype(np.float32)
        loss, metrics = self.variant(functools.partial(losses.value_loss, clip_eps=0.2))(v, old, ret, mask)
        want_loss, want_clip = naive_value_loss(v, old, ret, mask, 0.2)
        self.assertTrue(0.0 < want_clip < 1.0)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
        np.testing.assert_allclose(metrics["value_loss"], want_loss, rtol=1e-5)
        np.testing.assert_allclose(metrics["vf_clipfrac"], want_clip, rtol=1e-6)

    def test_value_loss_gradient_is_zero_when_clipped(self):
        # v moved 1.5 from old (clip 0.2), past the return 1.0: the clipped error is larger.
        value_fn = jax.jit(jax.grad(lambda v, old, ret, m: losses.value_loss(v, old, ret, m, clip_eps=0.2)[0]))
        grad = value_fn(jnp.full((1, 2), 1.5), jnp.zeros((1, 2)), jnp.ones((1, 2)), jnp.ones((1, 2)))
        np.testing.assert_array_equal(grad, np.zeros((1, 2)))

    @chex.variants(with_jit=True, without_jit=True)
    def test_kl_penalty_matches_loop(self):
        rng = np.random.default_rng(6)
        lp, ref = rng.normal(size=(2, 5)).astype(np.float32), rng.normal(size=(2, 5)).astype(np.float32)
        for kind in ("k1", "k2", "k3"):
            got = self.variant(functools.partial(losses.kl_penalty, kind=kind))(lp, ref)
            want = [[naive_kl(float(lp[b, t]), float(ref[b, t]), kind) for t in range(5)] for b in range(2)]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=kind)

    def test_entropy_is_reexported(self):
        np.testing.assert_allclose(losses.entropy(jnp.zeros((1, 1, 8))), [[math.log(8)]], rtol=1e-6)


class PolicyAggregationTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_aggregations_match_loop(self):
        rng = np.random.default_rng(8)
        lp = (0.3 * rng.normal(size=(4, 7))).astype(np.float32)
        old = (0.1 * rng.normal(size=(4, 7))).astype(np.float32)
        adv = rng.normal(size=(4, 7)).astype(np.float32)
        mask = np.zeros((4, 7), np.float32)
        mask[0, :7] = 1
        mask[1, 2:4] = 1  # a short response after a prompt prefix
        mask[2] = rng.random(7) < 0.5  # holes
        mask[2, 0] = 1
        # row 3 is empty: no token, not counted by "sequence_mean"
        want_tm, want_clip, want_kl = naive_ppo(lp, old, adv, mask, 0.2)
        for aggregation in ("token_mean", "sequence_mean", "token_sum"):
            fn = self.variant(functools.partial(losses.ppo_policy_loss, clip_eps=0.2, aggregation=aggregation))
            loss, metrics = fn(lp, old, adv, mask)
            want = naive_ppo_aggregated(lp, old, adv, mask, 0.2, aggregation)
            np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6, err_msg=aggregation)
            np.testing.assert_allclose(metrics["policy_loss"], want, rtol=1e-5, atol=1e-6, err_msg=aggregation)
            np.testing.assert_allclose(metrics["clipfrac"], want_clip, rtol=1e-6, err_msg=aggregation)
            np.testing.assert_allclose(metrics["approx_kl"], want_kl, rtol=1e-5, err_msg=aggregation)
        default, _ = self.variant(functools.partial(losses.ppo_policy_loss, clip_eps=0.2))(lp, old, adv, mask)
        np.testing.assert_allclose(default, want_tm, rtol=1e-5, atol=1e-6)

    def test_aggregation_gradients_are_the_token_weights(self):
        # ratios exp(+-0.5), exp(+-0.1), 1: all away from the clip edges 0.8 / 1.2
        rng = np.random.default_rng(9)
        lp = rng.choice(np.float32([-0.5, -0.1, 0.0, 0.1, 0.5]), size=(3, 5))
        adv = rng.normal(size=(3, 5)).astype(np.float32)
        mask = np.array([[1, 1, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]], np.float32)
        for aggregation in ("token_mean", "sequence_mean", "token_sum"):
            grad = jax.jit(
                jax.grad(
                    lambda x, agg=aggregation: losses.ppo_policy_loss(
                        x, jnp.zeros_like(x), adv, mask, clip_eps=0.2, aggregation=agg
                    )[0]
                )
            )(lp)
            for b in range(3):
                for t in range(5):
                    r, a = math.exp(float(lp[b, t])), float(adv[b, t])
                    weight = {
                        "token_mean": 1 / mask.sum(),
                        "sequence_mean": 1 / (2 * mask[b].sum() or 1),
                        "token_sum": 1 / 15,
                    }[aggregation]
                    clipped = (a > 0 and r > 1.2) or (a < 0 and r < 0.8)
                    want = 0.0 if clipped or not mask[b, t] else -a * r * weight
                    np.testing.assert_allclose(grad[b, t], want, rtol=1e-5, atol=1e-8, err_msg=aggregation)

    def test_empty_masks_and_unknown_aggregation(self):
        x = jnp.arange(6.0).reshape(2, 3) / 10
        for aggregation in ("token_mean", "sequence_mean", "token_sum"):
            fn = lambda v, agg=aggregation: losses.ppo_policy_loss(  # noqa: E731
                v, jnp.zeros_like(v), jnp.ones_like(v), jnp.zeros((2, 3)), clip_eps=0.2, aggregation=agg
            )[0]
            value, grad = jax.jit(jax.value_and_grad(fn))(x)
            self.assertEqual(float(value), 0.0)
            np.testing.assert_array_equal(grad, np.zeros((2, 3)))
        with self.assertRaisesRegex(ValueError, "seq_mean"):
            losses.ppo_policy_loss(x, x, x, jnp.ones((2, 3)), clip_eps=0.2, aggregation="seq_mean")

    def test_no_gradient_through_advantages_returns_and_rollout_values(self):
        rng = np.random.default_rng(10)
        x, old, target = (rng.normal(size=(2, 4)).astype(np.float32) for _ in range(3))
        mask = np.ones((2, 4), np.float32)
        for aggregation in ("token_mean", "sequence_mean", "token_sum"):
            grads = jax.grad(
                lambda lp, o, a, agg=aggregation: losses.ppo_policy_loss(lp, o, a, mask, clip_eps=0.2, aggregation=agg)[
                    0
                ],
                argnums=(0, 1, 2),
            )(x, old, target)
            self.assertTrue(bool(jnp.any(grads[0] != 0.0)))
            np.testing.assert_array_equal(grads[1], 0.0)  # old_logprobs
            np.testing.assert_array_equal(grads[2], 0.0)  # advantages
        grads = jax.grad(lambda v, o, r: losses.value_loss(v, o, r, mask, clip_eps=0.2)[0], argnums=(0, 1, 2))(
            x, old, target
        )
        self.assertTrue(bool(jnp.any(grads[0] != 0.0)))
        np.testing.assert_array_equal(grads[1], 0.0)  # old_values
        np.testing.assert_array_equal(grads[2], 0.0)  # returns


# ----------------------------------------------------------------------------- properties


def _arrays(shape, lo, hi):
    return hnp.arrays(np.float32, shape, elements=finite(min_value=lo, max_value=hi))


@FEW
@given(log_ratio=_arrays((_B, _T), -2.0, 2.0), adv=_arrays((_B, _T), -3.0, 3.0), mask=hnp.arrays(np.bool_, (_B, _T)))
def test_ppo_gradient_is_zero_when_clipped_and_exact_inside(log_ratio, adv, mask):
    old = np.zeros((_B, _T), np.float32)
    grad = np.asarray(_ppo_grad(log_ratio, old, adv, mask.astype(np.float32)))
    ratio = np.exp(log_ratio.astype(np.float64))
    n = max(int(mask.sum()), 1)
    for b in range(_B):
        for t in range(_T):
            r, a = ratio[b, t], float(adv[b, t])
            if not mask[b, t]:
                assert grad[b, t] == 0.0
            elif (a > 0 and r > 1.2 + 1e-4) or (a < 0 and r < 0.8 - 1e-4):
                assert grad[b, t] == 0.0, (r, a)
            elif 0.8 + 1e-4 < r < 1.2 - 1e-4 or (a > 0 and r < 0.8) or (a < 0 and r > 1.2):
                # d/dlogp of -A * exp(logp - old) / n
                np.testing.assert_allclose(grad[b, t], -r * a / n, rtol=1e-4, atol=1e-7)


@FEW
@given(adv=_arrays((_B, _T), -3.0, 3.0), lp=_arrays((_B, _T), -5.0, 0.0))
def test_ppo_at_ratio_one_is_minus_mean_advantage(adv, lp):
    mask = np.ones((_B, _T), np.float32)
    loss, metrics = _ppo(lp, lp, adv, mask)
    np.testing.assert_allclose(loss, -np.mean(adv, dtype=np.float64), rtol=1e-5, atol=1e-6)
    assert float(metrics["clipfrac"]) == 0.0
    assert float(metrics["approx_kl"]) == 0.0


@FEW
@given(
    lp=_arrays((_B, _T), -3.0, 0.0),
    old=_arrays((_B, _T), -3.0, 0.0),
    adv=_arrays((_B, _T), -3.0, 3.0),
    mask=hnp.arrays(np.bool_, (_B, _T)),
    junk=_arrays((_B, 3), -50.0, 50.0),
)
def test_ppo_padding_changes_nothing(lp, old, adv, mask, junk):
    mask = mask.astype(np.float32)
    loss, metrics = _ppo(lp, old, adv, mask)
    pad = lambda x: np.concatenate([x, junk], axis=1)  # noqa: E731
    padded_mask = np.concatenate([mask, np.zeros((_B, 3), np.float32)], axis=1)
    loss2, metrics2 = _ppo(pad(lp), pad(old), pad(adv), padded_mask)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6, atol=1e-7)
    for name in metrics:
        np.testing.assert_allclose(metrics2[name], metrics[name], rtol=1e-6, atol=1e-7)
    grad = _ppo_grad(pad(lp), pad(old), pad(adv), padded_mask)
    np.testing.assert_array_equal(grad[:, _T:], 0.0)


@FEW
@given(
    a=finite(min_value=-1e4, max_value=1e4),
    shift=finite(min_value=-100.0, max_value=100.0),
    diff=finite(min_value=-1e4, max_value=1e4),
)
def test_pairwise_ties_shift_invariance_and_large_differences(a, shift, diff):
    value, grad = _pairwise_and_grad(jnp.array([a]), jnp.array([a]))
    np.testing.assert_allclose(value, math.log(2), rtol=1e-6)
    np.testing.assert_allclose(grad[0], -0.5, rtol=1e-6)
    c, r = np.float32(shift + diff / 2), np.float32(shift - diff / 2)
    base, _ = _pairwise_and_grad(jnp.array([c]), jnp.array([r]))
    shifted, _ = _pairwise_and_grad(jnp.array([c + np.float32(3.0)]), jnp.array([r + np.float32(3.0)]))
    np.testing.assert_allclose(shifted, base, rtol=1e-4, atol=1e-4)
    big, big_grad = _pairwise_and_grad(jnp.array([diff]), jnp.array([0.0]))
    assert bool(jnp.isfinite(big)) and bool(jnp.all(jnp.isfinite(big_grad)))
    np.testing.assert_allclose(big, -log_sigmoid(diff), rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_k_way_invariant_to_permuting_slots(seed):
    rng = np.random.default_rng(seed)
    rewards, ranks, valid = random_k_way(rng, 3, 5)
    perm = rng.permutation(5)
    loss, metrics = _k_way(rewards, ranks, valid)
    loss_p, metrics_p = _k_way(rewards[:, perm], ranks[:, perm], valid[:, perm])
    np.testing.assert_allclose(loss_p, loss, rtol=1e-5, atol=1e-6)
    for name in metrics:
        np.testing.assert_allclose(metrics_p[name], metrics[name], rtol=1e-5, atol=1e-6)


@FEW
@given(lp=_arrays((_B, _T), -30.0, 0.0), ref=_arrays((_B, _T), -30.0, 0.0))
def test_k3_nonnegative_and_k1_zero_at_reference(lp, ref):
    assert bool(jnp.all(_kl_k3(lp, ref) >= 0.0))
    assert bool(jnp.all(_kl_k1(lp, lp) == 0.0))
    assert bool(jnp.all(_kl_k3(lp, lp) == 0.0))


# ----------------------------------------------------------------------------- robustness


def _all_losses(x, mask, ranks, valid):
    """Every masked loss on the same [B, T] (or [B, K]) array ``x``."""
    total = losses.ppo_policy_loss(x, jnp.zeros_like(x), jnp.ones_like(x), mask, clip_eps=0.2)[0]
    total += losses.value_loss(x, jnp.zeros_like(x), jnp.ones_like(x), mask, clip_eps=0.2)[0]
    total += losses.k_way_ranking_loss(x, ranks, valid, center_coef=0.1)[0]
    logits = jnp.stack([x, -x, 0 * x], axis=-1)
    total += losses.masked_lm_loss(logits, jnp.zeros(x.shape, jnp.int32), mask)[0]
    total += jnp.sum(losses.kl_penalty(x, jnp.zeros_like(x), kind="k3") * mask)
    return total


def test_all_zero_masks_give_zero_loss_and_finite_gradients():
    x = jnp.arange(6.0).reshape(2, 3) / 10
    zeros = jnp.zeros((2, 3))
    value, grad = jax.jit(jax.value_and_grad(_all_losses))(x, zeros, jnp.zeros((2, 3), jnp.int32), zeros)
    assert float(value) == 0.0
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_bfloat16_inputs_give_float32_losses_and_finite_gradients():
    x = (jnp.arange(6.0).reshape(2, 3) / 10).astype(jnp.bfloat16)
    mask = jnp.array([[1, 1, 0], [1, 0, 0]], jnp.bfloat16)
    ranks = jnp.array([[0, 1, 2], [1, 0, 0]])
    value, grad = jax.jit(jax.value_and_grad(_all_losses))(x, mask, ranks, mask)
    assert value.dtype == jnp.float32 and bool(jnp.isfinite(value))
    assert grad.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grad.astype(jnp.float32))))
    loss16, _ = _k_way(x, ranks, mask)
    loss32, _ = _k_way(x.astype(jnp.float32), ranks, mask)
    np.testing.assert_allclose(loss16, loss32, rtol=1e-6)


def test_vmap_over_groups_of_batches():
    rng = np.random.default_rng(7)
    rewards, ranks, valid = (np.stack(a) for a in zip(*(random_k_way(rng, 3, 4) for _ in range(2))))
    loss, metrics = jax.jit(jax.vmap(losses.k_way_ranking_loss))(rewards, ranks, valid)
    for g in range(2):
        want, _ = naive_k_way(rewards[g], ranks[g], valid[g])
        np.testing.assert_allclose(loss[g], want, rtol=1e-5)
    assert metrics["accuracy"].shape == (2,)
    lp = rng.normal(size=(2, 3, 4)).astype(np.float32) * 0.3
    adv = rng.normal(size=(2, 3, 4)).astype(np.float32)
    mask = np.ones((2, 3, 4), np.float32)
    ppo = jax.jit(jax.vmap(functools.partial(losses.ppo_policy_loss, clip_eps=0.2)))
    got, _ = ppo(lp, np.zeros_like(lp), adv, mask)
    for g in range(2):
        np.testing.assert_allclose(got[g], naive_ppo(lp[g], np.zeros_like(lp[g]), adv[g], mask[g], 0.2)[0], rtol=1e-5)


def test_unknown_kl_kind_raises():
    try:
        losses.kl_penalty(jnp.zeros(3), jnp.zeros(3), kind="k5")
    except ValueError:
        return
    raise AssertionError("expected ValueError")


# ----------------------------------------------------------------------------- docs


def extract_snippet(path, heading=SNIPPET_HEADING):
    """The first ```python block after ``heading`` and the ```text block following it."""
    text = pathlib.Path(path).read_text()
    section = text[text.index(heading) + len(heading) :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    expected = re.search(r"```text\n(.*?)```", section[code.end() :], re.DOTALL)
    return code.group(1), (expected.group(1) if expected else None)


def test_readme_snippet_runs_and_prints_what_it_says():
    code, expected = extract_snippet(SNIPPET_PATH)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(SNIPPET_PATH), "exec"), {"__name__": "__snippet__"})  # noqa: S102
    assert expected is not None, "the snippet should show its expected output in a ```text block"
    assert out.getvalue().strip() == expected.strip()
