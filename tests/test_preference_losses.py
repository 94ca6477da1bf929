"""Tests for the DPO / Plackett-Luce losses (rlhf_jax.losses_preference, public through
rlhf_jax.losses) against naive python loops, finite differences and analytic gradients."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax import losses

# ----------------------------------------------------------------------------- naive


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x):
    return math.exp(log_sigmoid(x))


def naive_dpo(c, r, rc, rr, beta, loss_type, ls=0.0):
    """Per pair, then the batch means; returns (loss, metrics)."""
    per, chosen, rejected, correct = [], [], [], []
    for i in range(len(c)):
        h = (float(c[i]) - float(rc[i])) - (float(r[i]) - float(rr[i]))
        if loss_type == "sigmoid":
            per.append(-(1 - ls) * log_sigmoid(beta * h) - ls * log_sigmoid(-beta * h))
        elif loss_type == "ipo":
            per.append((h - 1 / (2 * beta)) ** 2)
        else:
            per.append(max(0.0, 1 - beta * h))
        chosen.append(beta * (float(c[i]) - float(rc[i])))
        rejected.append(beta * (float(r[i]) - float(rr[i])))
        correct.append(float(chosen[-1] > rejected[-1]))
    n = len(c)
    return sum(per) / n, {
        "rewards/chosen": sum(chosen) / n,
        "rewards/rejected": sum(rejected) / n,
        "rewards/accuracies": sum(correct) / n,
        "rewards/margins": sum(a - b for a, b in zip(chosen, rejected)) / n,
    }


def naive_dpo_dloss_dh(h, beta, loss_type, ls=0.0):
    """Analytic derivative of one pair's loss with respect to h."""
    if loss_type == "sigmoid":
        return -beta * (1 - ls) * sigmoid(-beta * h) + beta * ls * sigmoid(beta * h)
    if loss_type == "ipo":
        return 2 * (h - 1 / (2 * beta))
    return -beta if 1 - beta * h > 0 else 0.0


def naive_pl(logps, ref, ranks, valid, beta):
    """Plackett-Luce NLL one prompt at a time, slots walked in rank order."""
    prompt_losses, best, worst = [], [], []
    pair_hits, pair_margins = [], []
    for b in range(logps.shape[0]):
        slots = sorted((k for k in range(logps.shape[1]) if valid[b, k]), key=lambda k: ranks[b, k])
        s = [beta * (float(logps[b, k]) - float(ref[b, k])) for k in slots]
        for i in range(len(slots)):
            for j in range(len(slots)):
                if ranks[b, slots[i]] < ranks[b, slots[j]]:
                    pair_hits.append(float(s[i] > s[j]))
                    pair_margins.append(s[i] - s[j])
        if len(slots) < 2:
            continue
        total = 0.0
        for k in range(len(s)):
            top = max(s[k:])
            lse = top + math.log(sum(math.exp(v - top) for v in s[k:]))
            total -= s[k] - lse
        prompt_losses.append(total)
        best.append(s[0])
        worst.append(s[-1])
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return mean(prompt_losses), {
        "rewards/accuracies": mean(pair_hits),
        "rewards/margins": mean(pair_margins),
        "rewards/chosen": mean(best),
        "rewards/rejected": mean(worst),
        "num_pairs": len(pair_hits),
        "num_prompts": len(prompt_losses),
    }


def random_rankings(rng, batch, k, scale=2.0):
    """Strict random orders (a permutation per prompt) with some absent slots."""
    logps = (scale * rng.normal(size=(batch, k)) - 5).astype(np.float32)
    ref = (scale * rng.normal(size=(batch, k)) - 5).astype(np.float32)
    ranks = np.stack([rng.permutation(k) for _ in range(batch)])
    valid = (rng.random((batch, k)) < 0.75).astype(np.float32)
    valid[0] = 1.0
    if batch > 2:
        valid[-1] = 0.0
        valid[-1, 0] = 1.0  # one valid slot: no loss, not counted
    return logps, ref, ranks, valid


def central_difference(fn, x, step=1e-4):
    """d fn / d x in float64, one coordinate at a time."""
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += step
        down[idx] -= step
        grad[idx] = (fn(up) - fn(down)) / (2 * step)
    return grad


# ----------------------------------------------------------------------------- DPO


class DPOTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_loop(self):
        rng = np.random.default_rng(0)
        c, r, rc, rr = (rng.normal(size=6).astype(np.float32) - 10 for _ in range(4))
        cases = [
            ("sigmoid", 0.1, 0.0),
            ("sigmoid", 0.5, 0.2),
            ("ipo", 0.1, 0.0),
            ("ipo", 0.7, 0.0),
            ("hinge", 0.5, 0.0),
            ("hinge", 2.0, 0.0),
        ]
        for loss_type, beta, ls in cases:
            # beta and label smoothing traced under jit
            fn = self.variant(
                lambda *a, lt=loss_type: losses.dpo_loss(*a[:4], beta=a[4], loss_type=lt, label_smoothing=a[5])
            )
            loss, metrics = fn(c, r, rc, rr, np.float32(beta), np.float32(ls))
            want, want_metrics = naive_dpo(c, r, rc, rr, beta, loss_type, ls)
            msg = f"{loss_type} beta={beta} ls={ls}"
            np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6, err_msg=msg)
            np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5, atol=1e-6, err_msg=msg)
            for name, value in want_metrics.items():
                np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=f"{msg} {name}")

    def test_gradient_matches_analytic_form(self):
        rng = np.random.default_rng(1)
        inputs = [rng.normal(size=5).astype(np.float32) for _ in range(4)]
        c, r, rc, rr = inputs
        for loss_type, beta, ls in (
            ("sigmoid", 0.3, 0.0),
            ("sigmoid", 0.3, 0.1),
            ("ipo", 0.5, 0.0),
            ("hinge", 0.4, 0.0),
        ):
            grads = jax.jit(
                jax.grad(
                    lambda *a, lt=loss_type, b=beta, s=ls: losses.dpo_loss(*a, beta=b, loss_type=lt, label_smoothing=s)[
                        0
                    ],
                    argnums=(0, 1, 2, 3),
                )
            )(*inputs)
            for i in range(5):
                h = (float(c[i]) - float(rc[i])) - (float(r[i]) - float(rr[i]))
                assert abs(1 - beta * h) > 1e-3  # hinge: away from the kink
                d = naive_dpo_dloss_dh(h, beta, loss_type, ls) / 5
                for g, sign in zip(grads, (1, -1, -1, 1)):
                    np.testing.assert_allclose(g[i], sign * d, rtol=1e-4, atol=1e-7, err_msg=loss_type)

    def test_large_differences_are_finite(self):
        c, r = jnp.array([0.0, -1e4, 1e4]), jnp.array([-1e4, 0.0, -1e4])
        zeros = jnp.zeros(3)
        value, grads = jax.value_and_grad(
            lambda c, r: losses.dpo_loss(c, r, zeros, zeros, beta=1.0)[0], argnums=(0, 1)
        )(c, r)
        np.testing.assert_allclose(value, 1e4 / 3, rtol=1e-5)  # only the second pair costs: -log sigmoid(-1e4)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)

    def test_bad_arguments_raise(self):
        x = jnp.zeros(2)
        for kwargs, match in (
            ({"beta": 0.1, "loss_type": "kto"}, "kto"),
            ({"beta": 0.0}, "beta"),
            ({"beta": 0.1, "loss_type": "ipo", "label_smoothing": 0.1}, "sigmoid"),
            ({"beta": 0.1, "label_smoothing": 1.5}, "label_smoothing"),
        ):
            with self.assertRaisesRegex(ValueError, match):
                losses.dpo_loss(x, x, x, x, **kwargs)
        with self.assertRaises(AssertionError):  # chex: shapes must agree
            losses.dpo_loss(x, jnp.zeros(3), x, x, beta=0.1)


# ----------------------------------------------------------------------------- Plackett-Luce

_pl = jax.jit(losses.plackett_luce_dpo_loss)
_pl_and_grad = jax.jit(jax.value_and_grad(losses.plackett_luce_dpo_loss, argnums=(0, 1), has_aux=True))


class PlackettLuceTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_loop(self):
        rng = np.random.default_rng(2)
        ks = (2, 3, 4, 6, 9) if self._testMethodName.endswith("with_jit") else (3, 5)
        for k in ks:
            logps, ref, ranks, valid = random_rankings(rng, 4, k)
            for beta in (0.1, 1.0):
                loss, metrics = self.variant(lambda *a: losses.plackett_luce_dpo_loss(*a[:4], beta=a[4]))(
                    logps, ref, ranks, valid, beta
                )
                want, want_metrics = naive_pl(logps, ref, ranks, valid, beta)
                np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6, err_msg=f"K={k} beta={beta}")
                np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5, atol=1e-6)
                for name, value in want_metrics.items():
                    np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-5, err_msg=f"K={k} {name}")

    def test_k2_equals_dpo_sigmoid(self):
        rng = np.random.default_rng(3)
        logps, ref = rng.normal(size=(7, 2)).astype(np.float32), rng.normal(size=(7, 2)).astype(np.float32)
        ranks = np.stack([rng.permutation(2) for _ in range(7)])
        best, worst = np.argmin(ranks, axis=1), np.argmax(ranks, axis=1)
        pick = lambda x, idx: x[np.arange(7), idx]  # noqa: E731
        for beta in (0.1, 0.5, 3.0):
            pl, pl_metrics = _pl(logps, ref, ranks, np.ones((7, 2)), beta=beta)
            dpo, dpo_metrics = losses.dpo_loss(
                pick(logps, best), pick(logps, worst), pick(ref, best), pick(ref, worst), beta=beta
            )
            np.testing.assert_allclose(pl, dpo, rtol=1e-5)
            for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
                np.testing.assert_allclose(pl_metrics[name], dpo_metrics[name], rtol=1e-5, atol=1e-6, err_msg=name)

    def test_gradient_matches_finite_differences(self):
        rng = np.random.default_rng(4)
        logps, ref, ranks, valid = random_rankings(rng, 3, 5, scale=1.0)
        beta = 0.7
        (_, _), (grad, grad_ref) = _pl_and_grad(logps, ref, ranks, valid, beta=beta)
        want = central_difference(lambda x: naive_pl(x, ref, ranks, valid, beta)[0], logps)
        np.testing.assert_allclose(grad, want, rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(grad_ref, -want, rtol=1e-3, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(grad)[valid == 0], 0.0)

    def test_large_rewards_are_stable(self):
        # implicit rewards spread over +-1e4: the naive sum of exps would overflow / underflow
        logps = np.array([[-2e4, -5.0, 3e3, -10.0], [1e4, -1e4, 0.0, 0.0]], np.float32)
        ranks = np.array([[3, 1, 0, 2], [0, 2, 1, 3]])
        valid = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.float32)
        (loss, _), (grad, _) = _pl_and_grad(logps, np.zeros_like(logps), ranks, valid, beta=1.0)
        want, _ = naive_pl(logps, np.zeros_like(logps), ranks, valid, 1.0)
        np.testing.assert_allclose(loss, want, rtol=1e-5)
        assert bool(jnp.isfinite(loss)) and bool(jnp.all(jnp.isfinite(grad)))

    def test_invalid_slots_and_short_prompts_are_ignored(self):
        logps = np.array([[-1.0, -2.0, -3.0], [-1.0, np.nan, np.inf], [-4.0, -5.0, -6.0]], np.float32)
        ranks = np.array([[0, 1, 2], [0, 1, 2], [2, 1, 0]])
        valid = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]], np.float32)
        (loss, metrics), (grad, grad_ref) = _pl_and_grad(logps, np.zeros_like(logps), ranks, valid, beta=0.5)
        keep = [0, 2]  # the second prompt has one valid slot: no loss, not counted
        clean = np.nan_to_num(logps[keep], posinf=0.0)
        want, _ = naive_pl(clean, np.zeros_like(clean), ranks[keep], valid[keep], 0.5)
        np.testing.assert_allclose(loss, want, rtol=1e-6)
        self.assertEqual(float(metrics["num_prompts"]), 2.0)
        self.assertTrue(bool(jnp.all(jnp.isfinite(grad))) and bool(jnp.all(jnp.isfinite(grad_ref))))
        np.testing.assert_array_equal(np.asarray(grad)[valid == 0], 0.0)
        np.testing.assert_array_equal(grad[1], 0.0)

    def test_no_counted_prompt_gives_zero_loss_and_zero_gradients(self):
        logps = jnp.array([[-1.0, -2.0], [-3.0, -4.0]])
        (loss, metrics), (grad, grad_ref) = _pl_and_grad(
            logps, jnp.zeros((2, 2)), jnp.array([[0, 1], [1, 0]]), jnp.array([[1, 0], [0, 0]]), beta=0.1
        )
        self.assertEqual(float(loss), 0.0)
        self.assertTrue(all(bool(jnp.isfinite(v)) for v in metrics.values()))
        np.testing.assert_array_equal(grad, 0.0)
        np.testing.assert_array_equal(grad_ref, 0.0)

    def test_bfloat16_vmap_and_errors(self):
        rng = np.random.default_rng(5)
        batches = [random_rankings(rng, 3, 4) for _ in range(2)]
        logps, ref, ranks, valid = (np.stack(a) for a in zip(*batches))
        loss, metrics = jax.jit(jax.vmap(functools.partial(losses.plackett_luce_dpo_loss, beta=0.2)))(
            logps, ref, ranks, valid
        )
        for g in range(2):
            np.testing.assert_allclose(loss[g], naive_pl(logps[g], ref[g], ranks[g], valid[g], 0.2)[0], rtol=1e-5)
        self.assertEqual(metrics["rewards/accuracies"].shape, (2,))
        low = jnp.asarray(logps[0], jnp.bfloat16)
        (value, _), (grad, _) = _pl_and_grad(low, jnp.asarray(ref[0], jnp.bfloat16), ranks[0], valid[0], beta=0.2)
        self.assertEqual(value.dtype, jnp.float32)
        self.assertEqual(grad.dtype, jnp.bfloat16)
        self.assertTrue(bool(jnp.all(jnp.isfinite(grad.astype(jnp.float32)))))
        with self.assertRaisesRegex(ValueError, "beta"):
            losses.plackett_luce_dpo_loss(logps[0], ref[0], ranks[0], valid[0], beta=-1.0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_pl_invariant_to_permuting_slots(seed):
    rng = np.random.default_rng(seed)
    logps, ref, ranks, valid = random_rankings(rng, 3, 5)
    perm = rng.permutation(5)
    loss, metrics = _pl(logps, ref, ranks, valid, beta=0.5)
    loss_p, metrics_p = _pl(logps[:, perm], ref[:, perm], ranks[:, perm], valid[:, perm], beta=0.5)
    np.testing.assert_allclose(loss_p, loss, rtol=1e-5, atol=1e-6)
    for name in metrics:
        np.testing.assert_allclose(metrics_p[name], metrics[name], rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_pl_loss_is_a_negative_log_likelihood_of_the_order(seed):
    # >= 0, and summing the per-prompt likelihoods over all orders of a prompt's K slots gives 1
    rng = np.random.default_rng(seed)
    logps = rng.normal(size=(1, 3)).astype(np.float32)
    orders = np.array([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
    total = 0.0
    for ranks in orders:
        loss, _ = _pl(logps, np.zeros_like(logps), ranks[None], np.ones((1, 3)), beta=1.0)
        assert float(loss) >= 0.0
        total += math.exp(-float(loss))
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)
