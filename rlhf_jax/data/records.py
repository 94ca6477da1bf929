"""Loading and schema validation of JSONL / parquet / hub data into normalised records.

Every loader returns plain Python dicts in one normalised schema per ``kind`` (see
:func:`load_records`), plus a :class:`SkipReport`. Bad rows raise a :class:`DataError`
naming the file, the 1-based line (JSONL) or 0-based row index (parquet, JSON array,
hub), and the reason; with ``on_error="skip"`` they are counted by reason instead.
Nothing is dropped without being counted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_jax.data.schema import KINDS, RowError, normalise_row

#: Keys of ``SkipReport.counts`` that are notes (counted items that are not whole skipped rows).
NOTE_REASONS = frozenset({"duplicate_response", "response_too_long", "packing_remainder_tokens"})

_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
_JSON_BLANK = b" \t\r"  # JSON's whitespace within a line: a line of only these is blank


class DataError(ValueError):
    """A data problem: a bad row (file, line or row, reason) or too many skipped rows.

    Attributes:
      source: the file or dataset name, or None.
      line: 1-based line number in a JSONL file, or None.
      row: 0-based row index (parquet, JSON array, hub dataset), or None.
      reason: a short machine-readable reason, e.g. ``"invalid_json"``, or None.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
        row: int | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.source, self.line, self.row, self.reason = source, line, row, reason


@dataclass
class SkipReport:
    """Counts of rows kept and skipped, by reason.

    ``counts`` maps a reason to a count. Reasons in :data:`NOTE_REASONS` are notes (e.g.
    duplicate responses removed from a group that was kept, tokens lost at the end of
    packing); every other reason counts whole skipped rows, so
    ``sum(skip counts) == total_rows - kept``. ``source`` (the file or dataset the rows
    came from, if known) names it in the ceiling's error.

    >>> r = SkipReport(total_rows=4, kept=3, counts={"invalid_json": 1})
    >>> r.summary()
    'kept 3/4 rows (1 skipped: invalid_json=1)'
    """

    counts: dict[str, int] = field(default_factory=dict)
    total_rows: int = 0
    kept: int = 0
    source: str | None = None

    @property
    def skipped(self) -> int:
        """Number of rows not kept."""
        return self.total_rows - self.kept

    def add(self, reason: str, n: int = 1) -> None:
        """Adds ``n`` to the count of ``reason`` (a skip or a note)."""
        if n:
            self.counts[reason] = self.counts.get(reason, 0) + n

    def absorb(self, other: SkipReport) -> None:
        """Adds the kept rows and the counts of ``other``, a later stage on part of these rows."""
        self.kept += other.kept
        for reason, n in other.counts.items():
            self.add(reason, n)

    def summary(self) -> str:
        """One line: kept/total, skipped rows by reason, then notes."""
        skips = {k: v for k, v in sorted(self.counts.items()) if k not in NOTE_REASONS}
        notes = {k: v for k, v in sorted(self.counts.items()) if k in NOTE_REASONS}
        text = f"kept {self.kept}/{self.total_rows} rows"
        if self.skipped or skips:
            text += f" ({self.skipped} skipped: " + ", ".join(f"{k}={v}" for k, v in skips.items()) + ")"
        if notes:
            text += "; notes: " + ", ".join(f"{k}={v}" for k, v in notes.items())
        return text

    def check_ceiling(self, max_skip_fraction: float) -> None:
        """Raises DataError if more than ``max_skip_fraction`` of the rows were skipped.

        Args:
          max_skip_fraction: in [0, 1]; 0 means no row may be skipped.
        """
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        if self.total_rows and self.skipped / self.total_rows > max_skip_fraction:
            where = f"{self.source}: " if self.source else ""
            raise DataError(
                f"{where}skipped {self.skipped}/{self.total_rows} rows "
                f"({100.0 * self.skipped / self.total_rows:.1f}%), above the allowed "
                f"{100.0 * max_skip_fraction:.1f}%: {self.summary()}",
                source=self.source,
                reason="skip_ceiling",
            )


# ----------------------------------------------------------------------------- row sources

# Each source yields (location, parsed object or RowError); location = (line or None, row).


def _jsonl_rows(path: Path) -> Iterator[tuple[int | None, int, Any]]:
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # utf-8-sig
        data = data[3:]
    if path.suffix.lower() == ".json" and data.lstrip(_JSON_BLANK + b"\n")[:1] == b"[":
        try:
            rows = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # ValueError: bad UTF-8, bad JSON, a too long int
            msg = f"{path}: cannot parse the JSON array: {_json_problem(e)}"
            raise DataError(msg, source=str(path), reason="invalid_json") from None
        for row, obj in enumerate(rows):
            yield None, row, obj
        return
    row = 0
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip(_JSON_BLANK):  # blank lines are not rows
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, row, RowError("invalid_encoding", f"invalid UTF-8 at byte {e.start}")
        else:
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError) as e:
                obj = RowError("invalid_json", _json_problem(e))
            yield lineno, row, obj
        row += 1


def _json_problem(e: Exception) -> str:
    """What json.loads objected to: a syntax error (with its column), nesting, or a too long int."""
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at column {e.colno}"
    if isinstance(e, RecursionError):
        return "nesting too deep"
    return str(e)


def _parquet_rows(path: Path) -> Iterator[tuple[int | None, int, Any]]:
    import pyarrow.parquet as pq

    try:  # page checksums are verified where the writer stored them
        batches = pq.ParquetFile(path, page_checksum_verification=True).iter_batches(batch_size=4096)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{path}: cannot read parquet file: {e}", source=str(path), reason="unreadable") from None
    row = 0
    while True:
        try:  # a damaged data page surfaces only when its batch is decoded
            batch = next(batches, None)
            objs = None if batch is None else _batch_rows(batch)
        except Exception as e:  # noqa: BLE001 - OSError, ArrowInvalid, ... for damaged pages
            msg = f"{path}: row {row}: unreadable: cannot decode the parquet data from this row on: {e}"
            raise DataError(msg, source=str(path), row=row, reason="unreadable") from None
        if objs is None:
            return
        for obj in objs:
            yield None, row, obj
            row += 1


def _batch_rows(batch: Any) -> list[Any]:
    """A record batch as dicts; a row whose strings are not UTF-8 becomes a RowError."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:  # find the offending rows one by one
        out: list[Any] = []
        for i in range(batch.num_rows):
            try:
                out.extend(batch.slice(i, 1).to_pylist())
            except UnicodeDecodeError as e:
                out.append(RowError("invalid_encoding", f"a string is not valid UTF-8 (byte {e.start})"))
        return out


def _hub_rows(name: str, split: str) -> Iterator[tuple[int | None, int, Any]]:
    import datasets

    ds = datasets.load_dataset(name, split=split)
    for row, obj in enumerate(ds):
        yield None, row, obj


def _looks_local(source: str) -> bool:
    return (
        source.lower().endswith(_LOCAL_SUFFIXES)
        or os.path.isabs(source)
        or source.startswith(("./", "../", "~", "." + os.sep))
    )


def load_records(
    source: str | os.PathLike,
    kind: str,
    *,
    on_error: str = "raise",
    split: str = "train",
) -> tuple[list[dict], SkipReport]:
    """Loads and validates one data file (or hub dataset) into normalised records.

    ``source`` is a local ``.jsonl`` / ``.json`` (JSON Lines, or one top-level array) /
    ``.parquet`` file, or else a Hugging Face hub dataset name (loaded with
    ``datasets.load_dataset(source, split=split)``). JSONL: a UTF-8 BOM and CRLF line
    ends are accepted; blank lines (only spaces, tabs, a CR) are not rows and are skipped.

    Normalised records (every one also has ``"example_id"``: the 0-based row index in
    the source, stable under skipping; ``"user_id"``: str or None; ``"meta"``: a dict of
    the row's other non-null fields):

    * ``text``: ``{"text"}``.
    * ``demonstrations``: ``{"prompt", "response"}`` or ``{"messages"}`` (roles
      system/user/assistant, at least one non-empty assistant turn).
    * ``rankings``: ``{"prompt" or "messages", "responses": [K str], "ranks": [K int]}``,
      0 = best, ties allowed, at least one ordered pair; pairs ``{"chosen", "rejected"}``
      become ``ranks=[0, 1]``. Duplicate responses keep their best-ranked copy (noted as
      ``duplicate_response``).
    * ``prompts``: ``{"prompt"}`` or ``{"messages"}`` ending with a user turn.

    Args:
      source: path or hub dataset name.
      kind: one of :data:`KINDS`.
      on_error: ``"raise"`` (first bad row raises DataError) or ``"skip"`` (count by reason).
      split: split of a hub dataset; ignored for local files.

    Returns:
      (records, report).

    Raises:
      DataError: a bad row in strict mode (message ``"{path}:{line}: {reason}: ..."`` or
        ``"{path}: row {i}: {reason}: ..."``), or an unreadable / missing file.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    name = os.fspath(source)
    path = Path(name).expanduser()
    if path.is_dir():
        msg = f"{name}: is a directory; pass a .jsonl, .json or .parquet file"
        raise DataError(msg, source=name, reason="unreadable")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            rows = _parquet_rows(path)
        elif suffix in (".jsonl", ".json"):
            rows = _jsonl_rows(path)
        else:
            msg = f"{name}: unknown file type {path.suffix!r}; use .jsonl, .json or .parquet"
            raise DataError(msg, source=name, reason="unreadable")
    elif _looks_local(name):
        raise DataError(f"{name}: no such file", source=name, reason="unreadable")
    else:
        rows = _hub_rows(name, split)
        name = f"{name}[{split}]"

    records: list[dict] = []
    report = SkipReport(source=name)
    for line, row, obj in rows:
        report.total_rows += 1
        try:
            if isinstance(obj, RowError):
                raise obj
            rec, n_dup = normalise_row(obj, kind)
        except RowError as e:
            if on_error == "raise":
                where = f"{name}:{line}" if line is not None else f"{name}: row {row}"
                msg = f"{where}: {e.reason}: {e.detail}"
                raise DataError(msg, source=name, line=line, row=row, reason=e.reason) from None
            report.add(e.reason)
            continue
        report.add("duplicate_response", n_dup)
        rec["example_id"] = row
        records.append(rec)
        report.kept += 1
    return records, report
