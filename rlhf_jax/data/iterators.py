"""A deterministic, resumable, host-sharded batch iterator over numpy arrays."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


class BatchIterator:
    """Deterministic, resumable, host-sharded batches over a TokenizedDataset's arrays.

    The stream is endless: epoch ``e`` visits the N rows in the order
    ``np.random.default_rng([seed, e]).permutation(N)`` (or ``arange(N)`` without
    shuffling), ``batch_size`` rows at a time; after its last batch the next epoch
    starts. ``batch_size`` is the GLOBAL batch: host ``process_index`` of
    ``process_count`` gets rows ``[i * b, (i + 1) * b)`` of each global batch, with
    ``b = batch_size // process_count``, so every host must hold the same arrays and
    advance in lockstep. :meth:`state` is the same on all hosts.

    With ``drop_last=False`` the last batch of an epoch is short (``N % batch_size``
    rows, split across hosts as evenly as possible): meant for evaluation.

    Args:
      arrays: name -> array [N, ...] (or a TokenizedDataset).
      batch_size: global batch size; a multiple of ``process_count``.
      seed: non-negative int seeding each epoch's permutation.
      shuffle: permute rows each epoch.
      drop_last: drop the incomplete last batch of each epoch.
      process_index: this host's index (``jax.process_index()``).
      process_count: number of hosts (``jax.process_count()``).

    >>> it = BatchIterator({"x": np.arange(6)}, batch_size=2, seed=0, shuffle=False)
    >>> [next(it)["x"].tolist() for _ in range(4)]
    [[0, 1], [2, 3], [4, 5], [0, 1]]
    >>> it.state()
    {'seed': 0, 'epoch': 1, 'position': 2}
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray] | Any,
        *,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        process_index: int = 0,
        process_count: int = 1,
    ) -> None:
        arrays = getattr(arrays, "arrays", arrays)  # accept a TokenizedDataset
        if not arrays:
            raise ValueError("BatchIterator needs at least one array")
        sizes = {k: np.shape(v)[0] for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"arrays disagree on the leading dimension: {sizes}")
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
        if batch_size <= 0 or batch_size % process_count:
            raise ValueError(
                f"batch_size ({batch_size}) must be a positive multiple of process_count ({process_count})"
            )
        self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self._n = next(iter(sizes.values()))
        self.batch_size = batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.process_index, self.process_count = process_index, process_count
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self._n} rows give no full batch of {batch_size} (drop_last=True)")
        self._set(seed, 0, 0)
        self.last_ids: np.ndarray | None = None  # this host's example ids (or row indices) of the last batch

    @property
    def num_rows(self) -> int:
        """N, the number of rows per epoch."""
        return self._n

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch."""
        full, rest = divmod(self._n, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _set(self, seed: int, epoch: int, position: int) -> None:
        for name, v in (("seed", seed), ("epoch", epoch), ("position", position)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"iterator {name} must be a non-negative int, got {v!r}")
        if position > self._n:
            raise ValueError(f"iterator position {position} is beyond the {self._n} rows of an epoch")
        self.seed, self.epoch, self.position = int(seed), int(epoch), int(position)
        self._order = self._epoch_order(self.epoch)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self._n)
        return np.random.default_rng([self.seed, epoch]).permutation(self._n)

    def _epoch_done(self) -> bool:
        left = self._n - self.position
        return left <= 0 or (self.drop_last and left < self.batch_size)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._epoch_done():
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        rows = self._order[self.position : self.position + self.batch_size]  # [B] global batch
        self.position += rows.shape[0]
        if rows.shape[0] == self.batch_size:
            per_host = self.batch_size // self.process_count
            local = rows[self.process_index * per_host : (self.process_index + 1) * per_host]
        else:  # short last batch (drop_last=False)
            local = np.array_split(rows, self.process_count)[self.process_index]
        self.last_ids = self._arrays["example_id"][local] if "example_id" in self._arrays else local
        return {k: v[local] for k, v in self._arrays.items()}

    def state(self) -> dict[str, int]:
        """The position in the stream: ``{"seed", "epoch", "position"}`` (JSON-serialisable).

        ``position`` counts the rows of epoch ``epoch`` already served (globally).
        """
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continues the stream exactly where :meth:`state` was taken (the seed included)."""
        missing = {"seed", "epoch", "position"} - set(state)
        if missing:
            raise ValueError(f"iterator state lacks {sorted(missing)}: {dict(state)}")
        self._set(state["seed"], state["epoch"], state["position"])
