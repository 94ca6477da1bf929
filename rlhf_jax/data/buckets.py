"""Shapes that follow the data: each batch is cut to a bucket length above its longest row.

Tokenised sets are padded to the configured maximum (``seq_len``, ``max_prompt_len``, ...);
a batch of short chat rows would then pay for hundreds of pad tokens. :func:`trim_batch`
removes the all-pad columns down to :func:`bucket_length` of the batch's longest row, a
small set of lengths (16, 32, 64, ... 512, then multiples of 256, never above the cap), so
each compiled step is traced once per bucket and reused. Only padding is removed: no real
token is ever cut, and results change by float reassociation at most.
"""

from __future__ import annotations

from collections.abc import Sequence

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
