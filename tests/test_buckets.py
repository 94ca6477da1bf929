"""Tests for rlhf_jax.data.buckets: batches cut to bucket lengths, never a real token lost."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.data import bucket_length, pack_batch, trim_batch


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


# ----------------------------------------------------------------------------- packing
LM_KEYS = ("input_ids", "attention_mask", "loss_mask")


def _lm_rows(lengths, cap, seed=0):
    rng = np.random.default_rng(seed)
    n = len(lengths)
    mask = (np.arange(cap)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)  # [B, T] right-padded
    ids = rng.integers(3, 50, (n, cap)).astype(np.int32) * mask
    loss = mask * (rng.random((n, cap)) < 0.7)  # some prompt tokens carry no loss
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss.astype(np.int32)}


@given(st.lists(st.integers(0, 60), min_size=1, max_size=12), st.sampled_from([1, 2, 4]))
@settings(max_examples=200, deadline=None)
def test_pack_keeps_every_example_whole_and_apart(lengths, multiple):
    cap = 64
    lengths = lengths + [0] * (-len(lengths) % multiple)  # the batch splits over the shards
    batch = _lm_rows(lengths, cap)
    out = pack_batch(batch, keys=LM_KEYS, mask_key="attention_mask", row_multiple=multiple)
    rows, length = out["input_ids"].shape
    assert length == bucket_length(max(max(lengths), 1), cap)
    assert rows % multiple == 0 and rows <= len(lengths)
    found = []  # every (row, segment) slice of the packed batch is one input example, whole
    for r in range(rows):
        seg, pos = out["segment_ids"][r], out["position_ids"][r]
        real = out["attention_mask"][r] > 0
        assert np.array_equal(seg > 0, real)
        for s in np.unique(seg[seg > 0]):
            cols = np.flatnonzero(seg == s)
            assert np.array_equal(cols, np.arange(cols[0], cols[0] + len(cols)))  # contiguous
            assert np.array_equal(pos[cols], np.arange(len(cols)))  # positions restart
            found.append((out["input_ids"][r, cols], out["loss_mask"][r, cols]))
    examples = [i for i, n in enumerate(lengths) if n > 0]
    assert len(found) == len(examples)
    for i in examples:  # matched by content; the first token's loss flag is cleared
        n = lengths[i]
        hits = [lm for ids, lm in found if len(ids) == n and np.array_equal(ids, batch["input_ids"][i, :n])]
        assert any(np.array_equal(lm[1:], batch["loss_mask"][i, 1:n]) and lm[0] == 0 for lm in hits)


def test_pack_refuses_what_it_cannot_pack():
    batch = _lm_rows([5, 3], 16)
    with pytest.raises(ValueError, match="not per-token"):
        pack_batch({**batch, "weights": np.ones(2)}, keys=LM_KEYS, mask_key="attention_mask")
    batch["attention_mask"][1, :2] = 0  # left padding
    with pytest.raises(ValueError, match="row 1 is not right-padded"):
        pack_batch(batch, keys=LM_KEYS, mask_key="attention_mask")


@pytest.mark.parametrize("family", ["llama", "gpt2-banded"])
def test_packed_rows_give_the_loss_and_gradients_of_separate_rows(family):
    """The SFT objective of a packed batch equals that of the same examples one per row
    (float reassociation only): segments never see each other, positions restart, and
    windows (GPT-3's banded layers) count positions inside a segment."""
    import jax

    from rlhf_jax.config import ModelConfig
    from rlhf_jax.models import CausalLM
    from rlhf_jax.models.params import init_params
    from rlhf_jax.sft import lm_objective

    common = dict(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    if family == "llama":
        cfg = ModelConfig(family="llama", activation="silu", num_kv_heads=1, **common)
    else:
        cfg = ModelConfig(
            family="gpt2",
            layer_types=("full_attention", "sliding_attention"),
            sliding_window=4,
            max_position_embeddings=64,
            **common,
        )
    model = CausalLM(cfg)
    params = init_params(model, jax.random.key(0))
    batch = _lm_rows([9, 30, 4, 17, 12, 6, 1, 22], 32, seed=1)
    packed = pack_batch(batch, keys=LM_KEYS, mask_key="attention_mask")
    assert packed["input_ids"].shape[0] < 8  # it did pack
    grad = jax.jit(jax.value_and_grad(lambda p, b: lm_objective(model, p, b, chunk=None), has_aux=True))
    (loss, metrics), g = grad(params, batch)
    (ploss, pmetrics), pg = grad(params, packed)
    assert float(metrics["num_tokens"]) == float(pmetrics["num_tokens"])
    np.testing.assert_allclose(float(ploss), float(loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(pg), jax.tree.leaves(g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def _ranking_batch(ks, k_max, length, *, seed=0):
    """Ranking groups with K = ks[b] real responses of random lengths; the other slots empty."""
    rng = np.random.default_rng(seed)
    b = len(ks)
    ids = np.zeros((b, k_max, length), np.int32)
    mask = np.zeros((b, k_max, length), np.int32)
    end = np.zeros((b, k_max), np.int32)
    ranks = np.full((b, k_max), -1, np.int32)
    valid = np.zeros((b, k_max), bool)
    for g, k in enumerate(ks):
        for j in range(k):
            n = int(rng.integers(3, length + 1))
            ids[g, j, :n] = rng.integers(3, 50, n)
            mask[g, j, :n] = 1
            end[g, j] = n - 1
        ranks[g, :k] = rng.permutation(k) // 2  # ties too
        valid[g, :k] = True
    return {"input_ids": ids, "attention_mask": mask, "end_index": end, "ranks": ranks, "valid": valid}


@pytest.mark.parametrize("multiple,process_index", [(1, 0), (8, 0), (8, 2)])
def test_ranking_slots_pack_keeps_every_response_whole(multiple, process_index):
    """Every valid response is one segment of a packed row, its tokens in order, positions
    from 0, its end_index at its last token (global positions on host ``process_index``);
    empty slots leave no tokens; fewer rows than valid responses (short rows share)."""
    from rlhf_jax.data import pack_ranking_slots
    from rlhf_jax.data.buckets import NO_SLOT

    ks = [4, 9, 2, 6, 5]
    batch = _ranking_batch(ks, 9, 12)
    out = pack_ranking_slots(batch, row_multiple=multiple, process_index=process_index)
    n = sum(ks)
    rows, length = out["input_ids"].shape
    assert rows % multiple == 0 and rows < n and length == 12  # the cap: no bucket above it
    assert out["slot"].shape == out["end_index"].shape and out["slot"].shape[0] % multiple == 0
    real = out["slot"] != NO_SLOT
    assert real.sum() == n
    assert out["attention_mask"].sum() == batch["attention_mask"].sum()  # nothing lost, nothing added
    seen = set()
    for slot, end in zip(out["slot"][real], out["end_index"][real]):
        b, k = divmod(int(slot) - process_index * 5 * 9, 9)
        assert batch["valid"][b, k] and (b, k) not in seen
        seen.add((b, k))
        r, last = divmod(int(end) - process_index * rows * length, length)
        size = int(batch["end_index"][b, k]) + 1
        first = last - size + 1
        np.testing.assert_array_equal(out["input_ids"][r, first : last + 1], batch["input_ids"][b, k, :size])
        np.testing.assert_array_equal(out["position_ids"][r, first : last + 1], np.arange(size))
        segment = out["segment_ids"][r, first : last + 1]
        assert segment[0] > 0 and (segment == segment[0]).all()
        assert (out["segment_ids"][r] == segment[0]).sum() == size  # the segment is exactly this response
    assert out["ranks"] is batch["ranks"] and out["valid"] is batch["valid"]


@pytest.mark.parametrize("mesh_devices", [1, 8])
def test_packed_ranking_slots_give_the_loss_and_gradients_of_the_padded_batch(mesh_devices):
    """The K-way ranking objective on the valid slots only (rows [N, L], scores scattered back
    to [B, K]) equals the objective on every slot: float reassociation only, one device or
    eight (the rows and the groups sharded over 'data')."""
    import jax

    from rlhf_jax import reward, sharding
    from rlhf_jax.config import MeshConfig, ModelConfig, RewardHyperparams
    from rlhf_jax.data import pack_ranking_slots
    from rlhf_jax.models import CausalLM
    from rlhf_jax.models.params import init_params

    cfg = ModelConfig(family="llama", vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    model = CausalLM(cfg, head="scalar")
    params = init_params(model, jax.random.key(0))
    batch = _ranking_batch([4, 9, 2, 6, 5, 3, 7, 8], 9, 16, seed=2)
    packed = pack_ranking_slots(batch, row_multiple=mesh_devices)
    assert packed["input_ids"].shape[0] < 8 * 9 // 2  # it dropped empty slots and packed short responses
    mesh = sharding.make_mesh(MeshConfig(data=mesh_devices, fsdp=1, tensor=1), devices=jax.devices()[:mesh_devices])
    hp = RewardHyperparams(center_coef=0.01)
    grad = jax.jit(jax.value_and_grad(lambda p, b: reward.reward_objective(model, p, b, hp), has_aux=True))
    (loss, metrics), g = grad(params, sharding.shard_batch(batch, mesh))
    (ploss, pmetrics), pg = grad(params, sharding.shard_batch(packed, mesh))
    for name in ("num_pairs", "accuracy", "reward_mean", "reward_std"):
        np.testing.assert_allclose(float(pmetrics[name]), float(metrics[name]), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(float(ploss), float(loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(pg), jax.tree.leaves(g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
