"""Shapes that follow the data: each batch is cut to a bucket length above its longest row.

Tokenised sets are padded to the configured maximum (``seq_len``, ``max_prompt_len``, ...);
a batch of short chat rows would then pay for hundreds of pad tokens. :func:`trim_batch`
removes the all-pad columns down to :func:`bucket_length` of the batch's longest row, a
small set of lengths (16, 32, 64, ... 512, then multiples of 256, never above the cap), so
each compiled step is traced once per bucket and reused. Only padding is removed: no real
token is ever cut, and results change by float reassociation at most.

:func:`pack_batch` goes further for LM rows (SFT, pretraining text): the batch's examples
are packed, whole, into fewer rows of the bucket length, each row holding several examples
told apart by ``segment_ids`` (attention stays inside a segment and positions restart, as
in MaxText), so a batch of short chat rows computes on few pad tokens. The same examples
make the same step; only the row layout changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

MIN_BUCKET = 16
POW2_UNTIL = 512  # powers of two up to here, then multiples of STEP
STEP = 256


def bucket_length(longest: int, cap: int) -> int:
    """The smallest bucket >= ``longest``, at most ``cap``.

    >>> [bucket_length(n, 2048) for n in (1, 17, 45, 300, 513, 1000)]
    [16, 32, 64, 512, 768, 1024]
    >>> bucket_length(45, 40)
    Traceback (most recent call last):
    ...
    ValueError: a row of 45 tokens is longer than the cap 40
    """
    if longest > cap:
        raise ValueError(f"a row of {longest} tokens is longer than the cap {cap}")
    length = MIN_BUCKET
    while length < longest and length < POW2_UNTIL:
        length *= 2
    if length < longest:
        length = -(-longest // STEP) * STEP
    return min(length, cap)


def _agree_across_hosts(longest: int) -> int:
    """Every host must cut its rows of a global batch to the same length: the max over hosts."""
    import jax

    if jax.process_count() == 1:
        return longest
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(longest, np.int32))))


def trim_batch(batch: dict, *, keys: Sequence[str], mask_key: str, left: bool) -> dict:
    """``batch`` with the sequence axis (the last) of ``keys`` cut to the bucket length.

    Args:
      batch: name -> array; ``keys`` share their last axis (the padded length T).
      keys: the arrays to cut, ``mask_key`` among them.
      mask_key: the attention mask [..., T] that says which positions are real.
      left: the rows are left-padded (prompts): keep the last L columns; else the first L.
    """
    mask = np.asarray(batch[mask_key])
    cap = mask.shape[-1]
    real = mask.reshape(-1, cap).any(axis=0)  # [T] columns with a real token in some row
    if not real.any():
        longest = 1
    elif left:
        longest = cap - int(np.argmax(real))
    else:
        longest = int(cap - np.argmax(real[::-1]))
    length = bucket_length(_agree_across_hosts(longest), cap)
    if length == cap:
        return batch
    cut = (lambda a: a[..., cap - length :]) if left else (lambda a: a[..., :length])
    return {k: cut(v) if k in keys else v for k, v in batch.items()}


ROW_STEPS = 8  # packed row counts come in steps of an eighth of the batch: at most 8 shapes per length


def packed_row_count(rows: int, multiple: int, batch: int) -> int:
    """The rows a packed batch gets: ``rows`` rounded up to a step of ``batch / ROW_STEPS``
    (itself a multiple of ``multiple``, the batch shards), at most ``batch``.

    >>> [packed_row_count(r, 1, 8) for r in (1, 3, 5, 8)]
    [1, 3, 5, 8]
    >>> [packed_row_count(r, 8, 64) for r in (1, 9, 60)]
    [8, 16, 64]
    """
    step = max(multiple, -(-batch // ROW_STEPS // multiple) * multiple)
    return max(min(-(-rows // step) * step, max(batch, multiple)), rows)


def rounded_row_count(rows: int, multiple: int) -> int:
    """``rows`` rounded up to a step of a quarter of the power of two below it (a multiple of
    ``multiple``): at most 4 shapes per octave, whatever the batch, and under 25% padding
    rows (12.5% on average).

    >>> [rounded_row_count(r, 1) for r in (3, 5, 15, 41, 66, 75, 130)]
    [3, 5, 16, 48, 80, 80, 160]
    >>> rounded_row_count(66, 32)
    96
    """
    step = 2 ** max(0, rows.bit_length() - 3)
    step = -(-step // multiple) * multiple
    return -(-rows // step) * step


def pack_batch(
    batch: dict,
    *,
    keys: Sequence[str],
    mask_key: str,
    target_mask_key: str | None = "loss_mask",
    row_multiple: int = 1,
) -> dict:
    """Right-padded rows, one example each, packed whole into fewer rows of a bucket length.

    Examples are placed first-fit by decreasing length into rows of ``L = bucket_length``
    of the longest example; the row count is rounded up by :func:`packed_row_count` (a
    multiple of ``row_multiple``, at most the input's B), so that the rows still split
    evenly over the batch shards and at most ``ROW_STEPS`` row counts compile per length.

    Args:
      batch: name -> [B, T] arrays, exactly ``keys``; row b's real tokens are its first
        ``sum(batch[mask_key][b])`` columns.
      keys: the per-token arrays to pack (``mask_key`` and ``target_mask_key`` among them).
      mask_key: the attention mask [B, T].
      target_mask_key: the loss mask; zeroed at each segment's first token, which must not
        be predicted from the previous example's last token (None: there is none).
      row_multiple: the packed row count is a multiple of this (the batch shards of this host).

    Returns:
      ``keys`` as [R, L] plus ``segment_ids`` [R, L] int32 (1, 2, ... per example in a row,
      0 at padding) and ``position_ids`` [R, L] int32 (restarting at 0 in every segment).

    Raises:
      ValueError: a row is not right-padded, or ``batch`` holds arrays outside ``keys``.

    >>> m = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]])
    >>> out = pack_batch({"input_ids": m * [[5], [6], [7], [8]], "attention_mask": m},
    ...                  keys=("input_ids", "attention_mask"), mask_key="attention_mask", target_mask_key=None)
    >>> out["input_ids"].tolist(), out["segment_ids"].tolist(), out["position_ids"].tolist()
    ([[5, 5, 5, 6], [7, 7, 8, 8]], [[1, 1, 1, 2], [1, 1, 2, 2]], [[0, 1, 2, 0], [0, 1, 0, 1]])
    """
    extra = sorted(set(batch) - set(keys))
    if extra:
        raise ValueError(f"pack_batch: arrays {extra} are not per-token arrays of the packed rows")
    mask = np.asarray(batch[mask_key])
    b, cap = mask.shape
    length = bucket_length(_agree_across_hosts(max(int(mask.sum(axis=1).max(initial=0)), 1)), cap)
    out, starts = _pack_rows(batch, keys, mask_key, lambda n: packed_row_count(n, row_multiple, b), length)
    if target_mask_key is not None:
        length = out[mask_key].shape[1]
        first = starts[starts >= 0]  # flat position of every example's first token
        out[target_mask_key][first // length, first % length] = 0
    return out


def _pack_rows(
    batch: dict, keys: Sequence[str], mask_key: str, row_count: Callable[[int], int], length: int
) -> tuple[dict, np.ndarray]:
    """:func:`pack_batch` without the loss mask, into rows of ``length`` tokens (at least the
    longest example), ``row_count(rows needed)`` rows: the packed ``keys``,
    ``segment_ids`` and ``position_ids`` [R, L], and where each input row's first token went,
    ``starts`` [B] (flat position ``r * L + column`` in the packed rows; -1 for an empty row)."""
    mask = np.asarray(batch[mask_key])
    b, cap = mask.shape
    lengths = mask.sum(axis=1).astype(np.int64)  # [B]
    if np.any(mask != (np.arange(cap)[None, :] < lengths[:, None])):
        bad = int(np.argmax(np.any(mask != (np.arange(cap)[None, :] < lengths[:, None]), axis=1)))
        raise ValueError(f"pack_batch: row {bad} is not right-padded (its real tokens are not its first columns)")
    bins: list[list[int]] = []  # example indices per packed row
    room: list[int] = []
    for i in sorted(range(b), key=lambda i: (-lengths[i], i)):  # first fit, decreasing length
        if lengths[i] == 0:
            continue
        for r, free in enumerate(room):
            if free >= lengths[i]:
                bins[r].append(i)
                room[r] -= int(lengths[i])
                break
        else:
            bins.append([i])
            room.append(length - int(lengths[i]))
    rows = row_count(_agree_across_hosts(max(len(bins), 1)))
    out = {k: np.zeros((rows, length), np.asarray(batch[k]).dtype) for k in keys}
    segment_ids = np.zeros((rows, length), np.int32)
    position_ids = np.zeros((rows, length), np.int32)
    starts = np.full(b, -1, np.int64)
    for r, members in enumerate(bins):
        start = 0
        for segment, i in enumerate(members, start=1):
            n = int(lengths[i])
            for k in keys:
                out[k][r, start : start + n] = np.asarray(batch[k])[i, :n]
            segment_ids[r, start : start + n] = segment
            position_ids[r, start : start + n] = np.arange(n)
            starts[i] = r * length + start
            start += n
    return {**out, "segment_ids": segment_ids, "position_ids": position_ids}, starts


NO_SLOT = np.iinfo(np.int32).max  # the slot of a padding entry: out of range, dropped by the scatter


def pack_ranking_slots(batch: dict, *, row_multiple: int = 1, process_index: int = 0) -> dict:
    """A K-way ranking batch's real responses packed whole into few rows: [B, K, L] -> [R, L].

    Every prompt of a ranking batch has K slots, K the largest group in the data; with
    InstructGPT's K = 4..9 a third of the slots are empty, and short responses leave most
    of a row's L tokens pad. Only the valid slots' sequences are kept, and they are packed
    whole, several to a row as wide as the input's L, by :func:`pack_batch`'s first fit
    (``segment_ids`` keep attention inside each response, positions restart), into the rows
    needed rounded up by :func:`rounded_row_count`. A caller that passes every batch at the
    tokenised cap (``drivers/rm.py``) compiles one L and row counts that vary little.
    ``end_index`` names the packed position of each response's last token (its EOS), where
    the reward is read; ``reward.ranking_rewards`` scatters the scores back into [B, K] by
    ``slot``. The ranking loss reads only valid slots, so the
    loss and gradients are those of the unpacked batch up to float reassociation.

    Args:
      batch: ``input_ids`` / ``attention_mask`` [B, K, L] (right-padded), ``end_index`` /
        ``ranks`` / ``valid`` [B, K] (``data.tokenize_rankings``' arrays).
      row_multiple: R and the number of score entries are multiples of this (the host's
        batch shards).
      process_index: this host's index when every host loads B prompts and the global
        batch is the hosts' batches in order: slots and positions are made global.

    Returns:
      ``input_ids`` / ``attention_mask`` / ``segment_ids`` / ``position_ids`` [R, L];
      ``end_index`` [S] int32, the flat position ``row * L + column`` of each response's
      last token in the global packed rows, and ``slot`` [S] int32, its global
      ``b * K + k`` (:data:`NO_SLOT` and position 0 on the padding entries; S = B * K
      rounded up to ``row_multiple``); ``ranks`` / ``valid`` [B, K] as they were.

    >>> valid = np.array([[True, True, False], [True, False, False]])
    >>> ids = np.array([[[5, 5, 0], [6, 0, 0], [0, 0, 0]], [[7, 7, 7], [0, 0, 0], [0, 0, 0]]])
    >>> out = pack_ranking_slots({"input_ids": ids, "attention_mask": (ids > 0).astype(int),
    ...                           "end_index": np.array([[1, 0, 0], [2, 0, 0]]), "ranks": np.zeros((2, 3)), "valid": valid})
    >>> out["input_ids"].tolist(), out["segment_ids"].tolist()
    ([[7, 7, 7], [5, 5, 6]], [[1, 1, 1], [1, 1, 2]])
    >>> out["slot"][:3].tolist(), out["end_index"][:3].tolist()
    ([0, 1, 3], [4, 5, 2])
    """
    valid = np.asarray(batch["valid"]).astype(bool)  # [B, K]
    b, k = valid.shape
    flat = np.flatnonzero(valid.reshape(-1))  # [n] the valid slots, b * K + k
    width = np.shape(batch["input_ids"])[-1]  # L
    keys = ("input_ids", "attention_mask")
    rows = {name: np.asarray(batch[name]).reshape(b * k, width)[flat] for name in keys}  # [n, L]
    packed, starts = _pack_rows(rows, keys, "attention_mask", lambda n: rounded_row_count(n, row_multiple), width)
    ends = starts + np.asarray(batch["end_index"]).reshape(b * k)[flat] + process_index * packed["input_ids"].size
    entries = -(-b * k // row_multiple) * row_multiple  # S
    slot = np.full(entries, NO_SLOT, np.int64)
    end_index = np.zeros(entries, np.int64)
    slot[: len(flat)] = flat + process_index * b * k
    end_index[: len(flat)] = ends
    return {
        **packed,
        "end_index": end_index.astype(np.int32),
        "slot": slot.astype(np.int32),
        "ranks": batch["ranks"],
        "valid": batch["valid"],
    }
