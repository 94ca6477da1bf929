"""Schema validation of one parsed row into a normalised record (see ``load_records``).

Each check raises ``RowError(reason, detail)``; the loader turns it into a DataError that
names the file and line, or counts it by ``reason`` in skip mode.
"""

from __future__ import annotations

from typing import Any

KINDS = ("text", "demonstrations", "rankings", "prompts")
ROLES = ("system", "user", "assistant")


class RowError(Exception):
    """One bad row: ``reason`` (a SkipReport key) and a human-readable ``detail``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------- field checks


def _present(obj: dict, key: str) -> bool:
    return obj.get(key) is not None


def _field(obj: dict, key: str) -> Any:
    value = obj.get(key)
    if value is None:
        raise RowError("missing_field", f"field {key!r} is missing or null")
    return value


def _string(value: Any, what: str) -> str:
    if value is None:
        raise RowError("missing_field", f"{what} is missing or null")
    if not isinstance(value, str):
        raise RowError("wrong_type", f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError("empty_string", f"{what} is empty")
    return value


def _messages(obj: dict, *, kind: str) -> list[dict[str, str]]:
    """Validates a dialogue; prompts must end with a user turn, demonstrations need a reply."""
    value = _field(obj, "messages")
    if not isinstance(value, list):
        raise RowError("wrong_type", f"'messages' must be a list, got {type(value).__name__}")
    if not value:
        raise RowError("missing_field", "'messages' is an empty list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RowError("wrong_type", f"messages[{i}] must be an object, got {type(m).__name__}")
        role = m.get("role")
        if role is None:
            raise RowError("missing_field", f"messages[{i}] has no 'role'")
        if not isinstance(role, str):
            raise RowError("wrong_type", f"messages[{i}].role must be a string, got {type(role).__name__}")
        if role not in ROLES:
            raise RowError("bad_role", f"messages[{i}].role is {role!r}, expected one of {ROLES}")
        content = m.get("content")
        if content is None:
            raise RowError("missing_field", f"messages[{i}] has no 'content'")
        if not isinstance(content, str):
            raise RowError("wrong_type", f"messages[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if kind == "demonstrations":
        first = next((m["role"] for m in out if m["role"] != "system"), None)
        if first == "assistant":
            raise RowError("bad_role", "a dialogue cannot start with an assistant turn (after system turns)")
        replies = [m for m in out if m["role"] == "assistant"]
        if not replies:
            raise RowError("missing_field", "'messages' has no assistant turn")
        if not any(m["content"].strip() for m in replies):
            raise RowError("empty_string", "every assistant turn in 'messages' is empty")
    else:  # prompts and ranking prompts: the model replies next
        if out[-1]["role"] != "user":
            raise RowError("bad_role", f"the last turn of a prompt must be 'user', got {out[-1]['role']!r}")
        if not any(m["content"].strip() for m in out):
            raise RowError("empty_string", "every turn in 'messages' is empty")
    return out


def _prompt(obj: dict, kind: str) -> tuple[dict, set[str]]:
    if _present(obj, "messages"):
        return {"messages": _messages(obj, kind=kind)}, {"messages"}
    if not _present(obj, "prompt"):
        raise RowError("missing_field", "field 'prompt' (or 'messages') is missing or null")
    return {"prompt": _string(obj["prompt"], "'prompt'")}, {"prompt"}


def _dedup_group(responses: list[str], ranks: list[int]) -> tuple[list[str], list[int], int]:
    """Keeps the best-ranked (lowest rank) copy of each distinct response, in first-seen order."""
    best: dict[str, int] = {}
    for r, k in zip(responses, ranks):
        best[r] = min(k, best.get(r, k))
    return list(best), list(best.values()), len(responses) - len(best)


def check_group(responses: list, ranks: list[int]) -> tuple[list, list[int], int]:
    """Validates the order of one ranked group and removes duplicate responses.

    Args:
      responses: K candidate responses (strings or token-id tuples; hashable).
      ranks: K non-negative ints, 0 = best.

    Returns:
      (responses, ranks, n_duplicates_removed).

    Raises:
      RowError: ``ties_only`` if all ranks are equal, ``duplicate_responses_only`` if after
        removing duplicates fewer than 2 distinct responses with distinct ranks remain.
    """
    if len(set(ranks)) < 2:
        raise RowError("ties_only", f"all {len(ranks)} ranks are equal: no ordered pair")
    responses, ranks, n_dup = _dedup_group(responses, ranks)
    if len(responses) < 2 or len(set(ranks)) < 2:
        raise RowError("duplicate_responses_only", "after removing duplicate responses no ordered pair remains")
    return responses, ranks, n_dup


def _rankings(obj: dict) -> tuple[dict, set[str], int]:
    prompt, used = _prompt(obj, "rankings")
    if _present(obj, "responses") or _present(obj, "ranks"):
        responses, ranks = _field(obj, "responses"), _field(obj, "ranks")
        used |= {"responses", "ranks"}
        if not isinstance(responses, list):
            raise RowError("wrong_type", f"'responses' must be a list, got {type(responses).__name__}")
        if not isinstance(ranks, list):
            raise RowError("wrong_type", f"'ranks' must be a list, got {type(ranks).__name__}")
        responses = [_string(r, f"responses[{i}]") for i, r in enumerate(responses)]
        if len(responses) < 2:
            raise RowError("too_few_responses", f"a ranking needs K >= 2 responses, got {len(responses)}")
        if len(ranks) != len(responses):
            raise RowError("ranks_length_mismatch", f"{len(responses)} responses but {len(ranks)} ranks")
        for i, k in enumerate(ranks):
            if isinstance(k, bool) or not isinstance(k, int):
                raise RowError("wrong_type", f"ranks[{i}] must be an int, got {type(k).__name__}")
            if k < 0:
                raise RowError("bad_rank", f"ranks[{i}] is {k}; ranks are non-negative (0 = best)")
    elif _present(obj, "chosen") or _present(obj, "rejected"):
        responses = [_string(obj.get("chosen"), "'chosen'"), _string(obj.get("rejected"), "'rejected'")]
        ranks = [0, 1]
        used |= {"chosen", "rejected"}
    else:
        raise RowError("missing_field", "expected 'responses' and 'ranks', or 'chosen' and 'rejected'")
    responses, ranks, n_dup = check_group(responses, ranks)
    return {**prompt, "responses": responses, "ranks": ranks}, used, n_dup


def normalise_row(obj: Any, kind: str) -> tuple[dict, int]:
    """Validates one parsed row; returns (record without ids, duplicate-response note count)."""
    if not isinstance(obj, dict):
        raise RowError("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    _check_encodable(obj)
    n_dup = 0
    if kind == "text":
        rec, used = {"text": _string(obj.get("text"), "'text'")}, {"text"}
    elif kind == "demonstrations":
        if _present(obj, "messages"):
            rec, used = {"messages": _messages(obj, kind=kind)}, {"messages"}
        elif _present(obj, "prompt") or _present(obj, "response"):
            rec = {
                "prompt": _string(obj.get("prompt"), "'prompt'"),
                "response": _string(obj.get("response"), "'response'"),
            }
            used = {"prompt", "response"}
        else:
            raise RowError("missing_field", "expected 'prompt' and 'response', or 'messages'")
    elif kind == "rankings":
        rec, used, n_dup = _rankings(obj)
    else:
        rec, used = _prompt(obj, kind)
    user = obj.get("user_id")
    if user is not None:
        if isinstance(user, bool) or not isinstance(user, (str, int)):
            raise RowError("wrong_type", f"'user_id' must be a string or int, got {type(user).__name__}")
        user = str(user)
        if not user.strip():
            raise RowError("empty_string", "'user_id' is empty")
    rec["user_id"] = user
    rec["meta"] = {k: v for k, v in obj.items() if k not in used and k != "user_id" and v is not None}
    return rec, n_dup


def _check_encodable(value: Any) -> None:
    """Rejects lone surrogates (e.g. from a JSON escape "\\ud800"): not encodable as UTF-8."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RowError("invalid_encoding", f"string contains a lone surrogate at index {e.start}") from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
