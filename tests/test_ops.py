"""Tests for rlhf_jax.ops against naive numpy loops, with and without jit."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import ops

# ----------------------------------------------------------------------------- naive


def naive_masked_mean(x, mask):
    total, count = 0.0, 0.0
    for value, m in zip(np.ravel(x), np.ravel(mask)):
        if m:
            total += float(value) * float(m)
            count += float(m)
    return total / count if count else 0.0


def naive_masked_var(x, mask, unbiased):
    vals = [float(v) for v, m in zip(np.ravel(x), np.ravel(mask)) if m]
    n = len(vals)
    if n == 0:
        return 0.0
    mean = sum(vals) / n
    ss = sum((v - mean) ** 2 for v in vals)
    if unbiased:
        return ss / (n - 1) if n > 1 else 0.0
    return ss / n


def naive_logprob(logits_row, token, temperature):
    scaled = [float(v) / temperature for v in logits_row]
    top = max(scaled)
    lse = top + math.log(sum(math.exp(v - top) for v in scaled))
    return scaled[token] - lse


def naive_entropy(logits_row):
    top = max(float(v) for v in logits_row)
    exps = [math.exp(float(v) - top) for v in logits_row]
    z = sum(exps)
    return -sum((e / z) * math.log(e / z) for e in exps if e > 0)


def naive_last_index(row):
    last = 0
    for t, m in enumerate(row):
        if m:
            last = t
    return last


def random_mask(rng, batch, length, kind):
    """Right-padded, left-padded (zero prefix), holed or all-zero masks."""
    mask = np.zeros((batch, length), np.float32)
    for b in range(batch):
        if kind == "right":
            mask[b, : rng.integers(1, length + 1)] = 1
        elif kind == "left":
            mask[b, rng.integers(0, length) :] = 1
        elif kind == "prefix":  # prompt prefix of zeros, response, then right padding
            start = rng.integers(0, length)
            mask[b, start : rng.integers(start + 1, length + 1)] = 1
        elif kind == "holes":
            mask[b] = rng.random(length) < 0.5
    return mask


# ----------------------------------------------------------------------------- tests


class MaskedReductionTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_mean_sum_var_match_loops(self):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(3, 7)).astype(np.float32)
        mean_fn = self.variant(ops.masked_mean)
        sum_fn = self.variant(ops.masked_sum)
        var_u = self.variant(functools.partial(ops.masked_var, unbiased=True))
        var_b = self.variant(functools.partial(ops.masked_var, unbiased=False))
        for kind in ("right", "left", "prefix", "holes"):
            mask = random_mask(rng, 3, 7, kind)
            np.testing.assert_allclose(mean_fn(x, mask), naive_masked_mean(x, mask), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(sum_fn(x, mask), np.sum(x * mask), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(var_u(x, mask), naive_masked_var(x, mask, True), rtol=1e-5)
            np.testing.assert_allclose(var_b(x, mask), naive_masked_var(x, mask, False), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_mean_along_axis(self):
        rng = np.random.default_rng(1)
        x = rng.normal(size=(4, 5)).astype(np.float32)
        mask = random_mask(rng, 4, 5, "holes")
        mask[2] = 0  # an empty row gives 0
        got = self.variant(functools.partial(ops.masked_mean, axis=1))(x, mask)
        want = [naive_masked_mean(x[b], mask[b]) for b in range(4)]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        self.assertEqual(float(got[2]), 0.0)

    def test_masked_values_do_not_leak(self):
        x = jnp.array([1.0, jnp.nan, jnp.inf, 3.0])
        mask = jnp.array([1.0, 0.0, 0.0, 1.0])
        self.assertEqual(float(ops.masked_mean(x, mask)), 2.0)
        grad = jax.grad(lambda v: ops.masked_mean(v, mask))(x)
        np.testing.assert_array_equal(grad, [0.5, 0.0, 0.0, 0.5])

    def test_all_zero_mask_gives_zero_and_finite_grads(self):
        x = jnp.arange(6.0).reshape(2, 3)
        mask = jnp.zeros((2, 3))
        for fn in (
            ops.masked_sum,
            ops.masked_mean,
            ops.masked_var,
            lambda v, m: jnp.sum(ops.masked_whiten(v, m)),
            lambda v, m: jnp.sum(ops.masked_whiten(v, m, shift_mean=False)),
        ):
            value, grad = jax.jit(jax.value_and_grad(fn))(x, mask)
            self.assertEqual(float(value), 0.0)
            self.assertTrue(bool(jnp.all(grad == 0.0)))

    def test_bool_mask_equals_float_mask(self):
        x = jnp.array([[1.0, 2.0, 4.0]])
        np.testing.assert_allclose(
            ops.masked_mean(x, jnp.array([[True, False, True]])),
            ops.masked_mean(x, jnp.array([[1.0, 0.0, 1.0]])),
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_whiten(self):
        rng = np.random.default_rng(2)
        x = (3.0 + 2.0 * rng.normal(size=(4, 9))).astype(np.float32)
        mask = random_mask(rng, 4, 9, "prefix")
        for shift_mean in (True, False):
            got = np.asarray(self.variant(functools.partial(ops.masked_whiten, shift_mean=shift_mean))(x, mask))
            mean = naive_masked_mean(x, mask)
            std = math.sqrt(naive_masked_var(x, mask, unbiased=False) + 1e-8)
            for b in range(4):
                for t in range(9):
                    want = 0.0
                    if mask[b, t]:
                        want = (x[b, t] - mean) / std + (0.0 if shift_mean else mean)
                    np.testing.assert_allclose(got[b, t], want, rtol=1e-4, atol=1e-5)
            self.assertAlmostEqual(naive_masked_var(got, mask, unbiased=False), 1.0, places=4)
            self.assertAlmostEqual(naive_masked_mean(got, mask), 0.0 if shift_mean else mean, places=4)


class LogprobTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_gather_logprobs_matches_loop(self):
        rng = np.random.default_rng(3)
        logits = (3 * rng.normal(size=(2, 5, 11))).astype(np.float32)
        tokens = rng.integers(0, 11, size=(2, 5))
        for temperature in (1.0, 0.7):
            got = self.variant(functools.partial(ops.gather_logprobs, temperature=temperature))(logits, tokens)
            self.assertEqual(got.dtype, jnp.float32)
            for b in range(2):
                for t in range(5):
                    want = naive_logprob(logits[b, t], tokens[b, t], temperature)
                    np.testing.assert_allclose(got[b, t], want, rtol=1e-5, atol=1e-5)

    def test_gather_logprobs_bfloat16_and_traced_temperature(self):
        rng = np.random.default_rng(4)
        logits = jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.bfloat16)
        tokens = jnp.asarray(rng.integers(0, 7, size=(2, 3)))
        got = jax.jit(lambda lg, tk, tau: ops.gather_logprobs(lg, tk, temperature=tau))(logits, tokens, 0.5)
        self.assertEqual(got.dtype, jnp.float32)
        lg32 = np.asarray(logits.astype(jnp.float32))
        want = [[naive_logprob(lg32[b, t], int(tokens[b, t]), 0.5) for t in range(3)] for b in range(2)]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        grad = jax.jit(jax.grad(lambda lg, tk: jnp.sum(ops.gather_logprobs(lg, tk))))(logits, tokens)
        self.assertEqual(grad.dtype, jnp.bfloat16)
        self.assertTrue(bool(jnp.all(jnp.isfinite(grad.astype(jnp.float32)))))

    @chex.variants(with_jit=True, without_jit=True)
    def test_entropy_matches_loop(self):
        rng = np.random.default_rng(5)
        logits = (2 * rng.normal(size=(2, 4, 6))).astype(np.float32)
        got = self.variant(ops.entropy_from_logits)(logits)
        for b in range(2):
            for t in range(4):
                np.testing.assert_allclose(got[b, t], naive_entropy(logits[b, t]), rtol=1e-5, atol=1e-6)

    def test_entropy_with_banned_tokens_is_finite(self):
        logits = jnp.array([[[0.0, 0.0, -jnp.inf, -jnp.inf]]])
        np.testing.assert_allclose(ops.entropy_from_logits(logits), [[math.log(2)]], rtol=1e-6)
        grad = jax.jit(jax.grad(lambda lg: jnp.sum(ops.entropy_from_logits(lg))))(logits)
        self.assertTrue(bool(jnp.all(jnp.isfinite(grad))))


class LastTokenIndexTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_loop_for_all_padding_kinds(self):
        rng = np.random.default_rng(6)
        fn = self.variant(ops.last_token_index)
        for kind in ("right", "left", "prefix", "holes", "zeros"):
            mask = random_mask(rng, 6, 8, kind)
            got = fn(mask)
            self.assertEqual(got.dtype, jnp.int32)
            np.testing.assert_array_equal(got, [naive_last_index(row) for row in mask])
            np.testing.assert_array_equal(fn(mask.astype(bool)), got)

    def test_explicit_cases(self):
        mask = jnp.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
        np.testing.assert_array_equal(ops.last_token_index(mask), [2, 4, 3, 0, 4])


def test_vmap_over_an_extra_axis():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3, 2, 5)).astype(np.float32)
    mask = (rng.random((3, 2, 5)) < 0.6).astype(np.float32)
    got = jax.vmap(ops.masked_mean)(x, mask)
    np.testing.assert_allclose(got, [naive_masked_mean(x[i], mask[i]) for i in range(3)], rtol=1e-5, atol=1e-6)
    idx = jax.vmap(ops.last_token_index)(mask)
    np.testing.assert_array_equal(idx, [[naive_last_index(r) for r in m] for m in mask])
    whitened = jax.jit(jax.vmap(ops.masked_whiten))(x, mask)
    assert whitened.shape == (3, 2, 5)


def test_kl_estimators_live_only_in_losses():
    # one implementation: losses.kl_penalty (tested in test_losses.py)
    assert not hasattr(ops, "kl_estimate") and "kl_estimate" not in ops.__all__


def test_shape_mismatch_is_an_error():
    try:
        ops.masked_mean(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    except AssertionError:
        pass
    else:
        raise AssertionError("expected a chex shape assertion")
