"""Tests for rlhf_jax.data.buckets: batches cut to bucket lengths, never a real token lost."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.data import bucket_length, trim_batch


def naive_bucket(longest: int, cap: int) -> int:
    """The smallest of 16, 32, ..., 512, 768, 1024, ... that holds ``longest``, at most ``cap``."""
    sizes = [16 * 2**i for i in range(6)] + [512 + 256 * i for i in range(1, 64)]
    return min(next(s for s in sizes if s >= longest), cap)


@given(st.integers(1, 4096), st.integers(1, 4096))
@settings(max_examples=300, deadline=None)
def test_bucket_length_matches_the_table(longest, cap):
    if longest > cap:
        with pytest.raises(ValueError, match="longer than the cap"):
            bucket_length(longest, cap)
    else:
        assert bucket_length(longest, cap) == naive_bucket(longest, cap)


def _rows(lengths, cap, *, left, k=None):
    rng = np.random.default_rng(0)
    n = len(lengths)
    ids = np.zeros((n, cap), np.int32)
    mask = np.zeros((n, cap), np.int32)
    for i, m in enumerate(lengths):
        sl = slice(cap - m, cap) if left else slice(0, m)
        ids[i, sl] = rng.integers(3, 50, m)
        mask[i, sl] = 1
    if k is not None:  # [N // k, k, cap]: ranking groups
        ids, mask = ids.reshape(n // k, k, cap), mask.reshape(n // k, k, cap)
    return {"input_ids": ids, "attention_mask": mask, "other": np.arange(len(ids))}


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("k", [None, 2])
def test_trim_keeps_every_real_token_and_cuts_to_the_bucket(left, k):
    lengths = [5, 37, 12, 1]
    batch = _rows(lengths, 128, left=left, k=k)
    out = trim_batch(batch, keys=("input_ids", "attention_mask"), mask_key="attention_mask", left=left)
    assert out["input_ids"].shape[-1] == 64  # the longest row, 37, in the 64 bucket
    assert out["attention_mask"].sum() == batch["attention_mask"].sum() == sum(lengths)
    real = batch["attention_mask"] > 0
    np.testing.assert_array_equal(
        np.sort(out["input_ids"][out["attention_mask"] > 0]), np.sort(batch["input_ids"][real])
    )
    np.testing.assert_array_equal(out["other"], batch["other"])  # arrays outside ``keys`` untouched
    if left:  # left-padded rows keep their right end
        np.testing.assert_array_equal(out["input_ids"], batch["input_ids"][..., -64:])
    else:
        np.testing.assert_array_equal(out["input_ids"], batch["input_ids"][..., :64])


def test_trim_at_the_cap_returns_the_batch_itself():
    batch = _rows([100, 3], 128, left=False)
    assert trim_batch(batch, keys=("input_ids", "attention_mask"), mask_key="attention_mask", left=False) is batch
    empty = {"input_ids": np.zeros((2, 40), np.int32), "attention_mask": np.zeros((2, 40), np.int32)}
    out = trim_batch(empty, keys=("input_ids", "attention_mask"), mask_key="attention_mask", left=True)
    assert out["input_ids"].shape == (2, 16)
