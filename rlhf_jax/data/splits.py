"""Data hygiene on normalised records: user-id splits, prefix dedup, per-user caps.

InstructGPT splits train / validation / test by user id so that no user's prompts are
on two sides, removes prompts that share a long common prefix, and caps prompts per
user at 200. All functions are deterministic and keep the input order within each output.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def _unit_hash(seed: int, key: str) -> float:
    """A stable hash of (seed, key) in [0, 1) (sha256; unlike hash() it is not salted per process)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _group_key(rec: dict, index: int) -> str:
    user = rec.get("user_id")
    if user is not None:
        return f"user:{user}"
    return f"example:{rec.get('example_id', index)}"


def split_by_user(
    records: Sequence[dict], *, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[list[dict], list[dict], list[dict]]:
    """Splits records into (train, validation, test) with no user on two sides.

    Records are grouped by ``user_id``; a record with ``user_id`` None is its own group
    (keyed by its ``example_id``). Groups are ordered by a seeded sha256 hash and assigned
    in that order to train until it holds ``fractions[0]`` of the records, then to
    validation up to ``fractions[0] + fractions[1]``, then to test. The result depends
    only on the records and the seed.

    Args:
      records: normalised records.
      fractions: (train, validation, test), non-negative, summing to 1.
      seed: the hash seed; another seed gives another split.

    Returns:
      (train, validation, test) lists, each in input order.

    >>> recs = [{"user_id": f"u{i % 5}", "example_id": i} for i in range(20)]
    >>> train, val, test = split_by_user(recs, fractions=(0.6, 0.2, 0.2))
    >>> len(train) + len(val) + len(test)
    20
    >>> {r["user_id"] for r in train} & {r["user_id"] for r in val}
    set()
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or not all(f >= 0 for f in fractions) or not abs(sum(fractions) - 1.0) <= 1e-6:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")  # NaN fails too
    groups: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        groups.setdefault(_group_key(rec, i), []).append(i)
    order = sorted(groups, key=lambda k: (_unit_hash(seed, k), k))
    bounds = (fractions[0] * len(records), (fractions[0] + fractions[1]) * len(records))
    side = [0] * len(records)
    done = 0
    for key in order:
        s = 0 if done < bounds[0] else 1 if done < bounds[1] else 2
        for i in groups[key]:
            side[i] = s
        done += len(groups[key])
    out: tuple[list[dict], list[dict], list[dict]] = ([], [], [])
    for i, rec in enumerate(records):
        out[side[i]].append(rec)
    return out


def prompt_text(rec: dict, key: str = "prompt") -> str:
    """The text a record is deduplicated by: ``rec[key]``, or its rendered dialogue.

    A dialogue renders as ``"role: content"`` lines without system turns (a shared
    system prompt must not make every dialogue a duplicate).
    """
    value = rec.get(key)
    if isinstance(value, str):
        return value
    messages = rec.get("messages")
    if messages is not None:
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages if m["role"] != "system")
    raise KeyError(f"record {rec.get('example_id')} has neither {key!r} nor 'messages'")


def dedup_by_prefix(records: Sequence[dict], *, prefix_chars: int = 64, key: str = "prompt") -> tuple[list[dict], int]:
    """Drops records whose prompt shares its first ``prefix_chars`` characters with an earlier one.

    Args:
      records: normalised records with ``key`` (default ``"prompt"``) or ``"messages"``.
      prefix_chars: length of the compared prefix (leading/trailing whitespace ignored).
      key: the field holding the text.

    Returns:
      (kept records in input order, number dropped).

    >>> recs = [{"prompt": "Write a poem about the sea, please"}, {"prompt": "Write a poem about cats"}]
    >>> kept, dropped = dedup_by_prefix(recs, prefix_chars=18)
    >>> dropped
    1
    """
    _positive_int("prefix_chars", prefix_chars)
    seen: set[str] = set()
    kept = []
    for rec in records:
        prefix = prompt_text(rec, key).strip()[:prefix_chars]
        if prefix in seen:
            continue
        seen.add(prefix)
        kept.append(rec)
    return kept, len(records) - len(kept)


def cap_per_user(records: Sequence[dict], *, max_per_user: int = 200) -> tuple[list[dict], int]:
    """Keeps the first ``max_per_user`` records of each user (user_id None: uncapped).

    Args:
      records: normalised records.
      max_per_user: the cap (InstructGPT: 200 prompts per user).

    Returns:
      (kept records in input order, number dropped).
    """
    _positive_int("max_per_user", max_per_user)
    counts: dict[str, int] = {}
    kept = []
    for rec in records:
        user = rec.get("user_id")
        if user is not None:
            counts[user] = counts.get(user, 0) + 1
            if counts[user] > max_per_user:
                continue
        kept.append(rec)
    return kept, len(records) - len(kept)
