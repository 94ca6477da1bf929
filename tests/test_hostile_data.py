"""Hostile data: hypothesis-generated files that mix valid and broken rows, for every loader.

Every loader kind (text, demonstrations, rankings, prompts) in every source format
(JSONL, JSON array, parquet, a hub dataset) is fed files whose rows are valid rows, valid rows with one
injected fault, or raw junk lines. Each generated row carries its oracle: the reason it
must be rejected with, or None if it must be kept (plus the duplicate responses it must
lose). The properties:

* strict mode raises one DataError naming the file, the line (JSONL) or row, and the
  reason of the FIRST bad row;
* skip mode keeps exactly the valid rows and counts every other one by its reason, so
  ``kept + sum(skips) == rows``: no silent drops;
* every example that survives tokenisation satisfies the invariants (lengths within the
  limits, ids inside the vocabulary, K >= 2 distinct responses with an ordered pair, EOS
  where required, a non-empty loss mask), and tokenisation too accounts for every record;
* the skip-rate ceiling aborts exactly when the skipped fraction is above it.

Runs are deterministic (``derandomize=True``, no example database). The number of rows
fuzzed is printed at the end of the module (the README's reliability table quotes it).
"""

from __future__ import annotations

import collections
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_jax.data import (
    NOTE_REASONS,
    DataError,
    cap_per_user,
    check_vocab,
    dedup_by_prefix,
    load_records,
    split_by_user,
    tokenize_demonstrations,
    tokenize_prompts,
    tokenize_rankings,
    tokenize_text,
)
from tests.test_data import WORDS, make_bpe_tokenizer, make_tokenizer

EXAMPLES_PER_CASE = 80  # x 4 formats = 320 files per loader kind
FORMATS = ("jsonl", "json", "parquet", "hub")
HUB_NAME = "org/hostile"
KINDS = ("text", "demonstrations", "rankings", "prompts")
SETTINGS = settings(
    max_examples=EXAMPLES_PER_CASE,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Tokenisation limits (word-level tokenizers; x4 for the byte-level BPE): small, so that
# over-length prompts, responses and dialogues are common.
LIMITS = {"seq_len": 24, "max_prompt": 10, "max_response": 6}

ROWS_FUZZED = collections.Counter()  # loader kind -> rows written into hostile files


@pytest.fixture(scope="module")
def toks():
    """Word-level tokenizers without and with a BOS in front of plain text, and a byte-level BPE."""
    return make_tokenizer(), make_tokenizer(bos_post_processor=True), make_bpe_tokenizer()


@pytest.fixture(scope="module", autouse=True)
def report_rows_fuzzed(request):
    """Prints how many rows this module fuzzed (deterministic: the README quotes it)."""
    yield
    if ROWS_FUZZED:
        total = sum(ROWS_FUZZED.values())
        by_kind = ", ".join(f"{k}={v}" for k, v in sorted(ROWS_FUZZED.items()))
        plugins = request.config.pluginmanager
        reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"\nhostile data: {total} rows fuzzed ({by_kind})")


# ============================================================================ valid rows

# Word pool: in-vocabulary words, out-of-vocabulary words, and special-token spellings.
POOL = [*WORDS[:12], "zebra", "naïve", "日本", "<eos>", "<pad>", "<|assistant|>", "<bos>", "<|endoftext|>"]
HUGE = " ".join(["sky"] * 50_000)  # 200k characters


@st.composite
def _words(draw, max_words: int = 4) -> str:
    """A non-blank string: a few pool words with unicode noise; 1 in 10 long, 1 in 60 huge."""
    size = draw(st.integers(0, 59))
    if size == 59:
        return HUGE
    if size >= 53:
        return " ".join(["the"] * draw(st.integers(8, 40)))
    words = draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=max_words))
    return " ".join(words) + draw(st.text(st.characters(blacklist_categories=("Cs",)), max_size=6))


def _extras(fmt: str) -> st.SearchStrategy[dict]:
    """Optional user_id and metadata (parquet columns need one type per column)."""
    users = st.one_of(st.none(), st.sampled_from(["u1", "u2", "ü3"]))
    if fmt != "parquet":
        users = st.one_of(users, st.integers(0, 3))
    meta = st.one_of(st.none(), st.sampled_from(["web", "labeler 7"]))
    return st.fixed_dictionaries({}, optional={"user_id": users, "source": meta})


def _dialogue(kind: str) -> st.SearchStrategy[list[dict]]:
    """A valid dialogue: demonstrations end anywhere after an assistant turn, prompts end with a user turn."""

    @st.composite
    def build(draw):
        msgs = [{"role": "system", "content": draw(_words(3))}] if draw(st.booleans()) else []
        for _ in range(draw(st.integers(1, 3))):
            msgs.append({"role": "user", "content": draw(_words(3))})
            msgs.append({"role": "assistant", "content": draw(_words(3))})
        if kind != "demonstrations":
            msgs[-1] = {"role": "user", "content": draw(_words(3))}
        return msgs

    return build()


@st.composite
def _ranking_group(draw, k: int | None = None) -> tuple[list[str], list[int]]:
    """K in {2, 9, 20} responses (duplicates possible) with ranks that keep an ordered pair."""
    k = k or draw(st.sampled_from([2, 9, 20]))
    pool = draw(st.lists(_words(2), min_size=2, max_size=k, unique=True))
    responses = [pool[i % len(pool)] for i in range(k)]  # fewer distinct than K: duplicates
    if draw(st.booleans()):
        responses = pool + [pool[0]] * (k - len(pool))
    ranks = draw(st.lists(st.integers(0, k - 1), min_size=k, max_size=k))
    if _group_problem(responses, ranks) is not None:  # make it valid: distinct responses, distinct ranks
        responses, ranks = pool, list(range(len(pool)))
    return responses, ranks


def _group_problem(responses: list, ranks: list[int]) -> str | None:
    """The oracle's reading of the ranking rules: all tied, or no ordered pair after dedup."""
    if len(set(ranks)) < 2:
        return "ties_only"
    best: dict = {}
    for r, k in zip(responses, ranks):
        best[r] = min(k, best.get(r, k))
    if len(best) < 2 or len(set(best.values())) < 2:
        return "duplicate_responses_only"
    return None


def valid_row(kind: str, fmt: str) -> st.SearchStrategy[dict]:
    """A row the loader must keep."""

    @st.composite
    def build(draw):
        extras = draw(_extras(fmt))
        if kind == "text":
            return {"text": draw(_words()), **extras}
        if kind == "prompts":
            if draw(st.booleans()):
                return {"messages": draw(_dialogue(kind)), **extras}
            return {"prompt": draw(_words(12)), **extras}
        if kind == "demonstrations":
            if draw(st.booleans()):
                return {"messages": draw(_dialogue(kind)), **extras}
            return {"prompt": draw(_words(12)), "response": draw(_words()), **extras}
        prompt = {"messages": draw(_dialogue(kind))} if draw(st.booleans()) else {"prompt": draw(_words(12))}
        if draw(st.booleans()):
            chosen, rejected = draw(st.lists(_words(2), min_size=2, max_size=2, unique=True))
            return {**prompt, "chosen": chosen, "rejected": rejected, **extras}
        responses, ranks = draw(_ranking_group())
        return {**prompt, "responses": responses, "ranks": ranks, **extras}

    return build()


# ============================================================================ faults

SURROGATE = "bad \ud800 text"
WRONG_TYPES = [3, 1.5, True, ["a"], {"a": 1}]


def _string_slots(row: dict, kind: str) -> list[tuple]:
    """Paths of the required string fields of a valid row (where a field-level fault goes)."""
    if "messages" in row:
        slots = [("messages", i, "content") for i in range(len(row["messages"]))]
    elif kind == "text":
        slots = [("text",)]
    else:
        slots = [("prompt",)] + ([("response",)] if kind == "demonstrations" else [])
    if "responses" in row:
        slots += [("responses", j) for j in range(len(row["responses"]))]
    if "chosen" in row:
        slots += [("chosen",), ("rejected",)]
    return slots


def _put(row: dict, path: tuple, value) -> dict:
    row = json.loads(json.dumps(row))  # a deep copy
    target = row
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return row


@st.composite
def faulty_row(draw, kind: str, fmt: str) -> tuple[object, str]:
    """A valid row with one injected fault, and the reason the loader must give."""
    row = draw(valid_row(kind, fmt))
    typed = fmt != "parquet"  # parquet columns have one type: wrong types cannot be written
    faults = ["null", "missing", "empty", "surrogate" if typed else "null", "bad_user"]
    if typed:
        faults += ["wrong_type", "not_an_object"]
    if "messages" in row:
        faults += ["bad_role", "no_role"]
    if "responses" in row:
        faults += ["k_too_small", "ties", "duplicates", "ranks_mismatch", "negative_rank"]
        if typed:
            faults += ["float_rank", "bool_rank", "responses_not_list"]
    fault = draw(st.sampled_from(faults))
    slots = _string_slots(row, kind)
    slot = draw(st.sampled_from(slots))
    if fault == "null":
        return _put(row, slot, None), "missing_field"
    if fault == "missing":
        key = draw(st.sampled_from([s[0] for s in slots] + (["ranks"] if "ranks" in row else [])))
        return {k: v for k, v in row.items() if k != key}, "missing_field"
    if fault == "empty":
        blank = draw(st.sampled_from(["", "  ", "\t \u3000"]))
        if "messages" in row and slot[0] == "messages":  # empty only if no turn that matters has text
            turns = [i for i, m in enumerate(row["messages"]) if kind != "demonstrations" or m["role"] == "assistant"]
            for i in turns:
                row = _put(row, ("messages", i, "content"), blank)
            return row, "empty_string"
        return _put(row, slot, blank), "empty_string"
    if fault == "surrogate":  # anywhere in the row, even in a field that is not read
        if draw(st.booleans()):
            return {**row, "note": SURROGATE}, "invalid_encoding"
        return _put(row, slot, SURROGATE), "invalid_encoding"
    if fault == "bad_user":
        if typed and draw(st.booleans()):
            return {**row, "user_id": draw(st.sampled_from([1.5, [1], {"u": 1}, False]))}, "wrong_type"
        return {**row, "user_id": " "}, "empty_string"
    if fault == "wrong_type":
        return _put(row, slot, draw(st.sampled_from(WRONG_TYPES))), "wrong_type"
    if fault == "not_an_object":
        return draw(st.sampled_from([None, 3, "text", [row], True])), "not_an_object"
    if fault in ("bad_role", "no_role"):
        i = draw(st.integers(0, len(row["messages"]) - 1))
        if fault == "bad_role":
            return _put(row, ("messages", i, "role"), draw(st.sampled_from(["bot", "User", ""]))), "bad_role"
        return _put(row, ("messages", i, "role"), None), "missing_field"
    k = len(row["responses"])
    if fault == "k_too_small":
        n = draw(st.sampled_from([0, 1]))
        return {**row, "responses": row["responses"][:n], "ranks": row["ranks"][:n]}, "too_few_responses"
    if fault == "ties":
        return {**row, "ranks": [draw(st.integers(0, 3))] * k}, "ties_only"
    if fault == "duplicates":
        return {**row, "responses": [row["responses"][0]] * k, "ranks": list(range(k))}, "duplicate_responses_only"
    if fault == "ranks_mismatch":
        ranks = row["ranks"][:-1] if draw(st.booleans()) else [*row["ranks"], 0]
        return {**row, "ranks": ranks}, "ranks_length_mismatch"
    if fault == "negative_rank":
        return _put(row, ("ranks", draw(st.integers(0, k - 1))), -1), "bad_rank"
    if fault in ("float_rank", "bool_rank"):
        value = 1.0 if fault == "float_rank" else True
        return _put(row, ("ranks", draw(st.integers(0, k - 1))), value), "wrong_type"
    return {**row, "responses": "a b"}, "wrong_type"  # responses_not_list


BOM_LINE = b"\xef\xbb\xbf{}"
# Raw JSONL lines that are not a valid JSON object, with the reason (JSONL only).
JUNK_LINES = st.sampled_from(
    [
        (b'{"text": "a"', "invalid_json"),
        (b'{"prompt": "hi", "response": "a",}', "invalid_json"),
        (b"{'text': 'a'}", "invalid_json"),
        (b'{"text": "a\xff\xfe"}', "invalid_encoding"),
        (b'{"text": "\xed\xa0\x80"}', "invalid_encoding"),  # a UTF-8-encoded surrogate
        (BOM_LINE, "invalid_json"),  # a BOM that does not open the file
        (b'{"n": ' + b"9" * 5000 + b"}", "invalid_json"),  # longer than Python's int limit
        (b"[" * 5000 + b"]" * 5000, "invalid_json"),  # nesting too deep
        (b"\x00", "invalid_json"),
        (b"\x0c", "invalid_json"),
        (b"NaN", "not_an_object"),
        (b"null", "not_an_object"),
        (b'"just a string"', "not_an_object"),
    ]
)


# ============================================================================ files


@st.composite
def hostile_file(draw, kind: str, fmt: str) -> dict:
    """Rows (valid, faulty, junk) and how they are written: BOM, CRLF, blank lines."""
    valid = valid_row(kind, fmt).map(lambda r: (r, None))
    options = [valid, valid, faulty_row(kind, fmt)]
    if fmt == "jsonl":
        options.append(JUNK_LINES)
    rows = draw(st.lists(st.one_of(options), min_size=1 if fmt == "parquet" else 0, max_size=24))
    bom = fmt in ("jsonl", "json") and draw(st.booleans())
    if rows and rows[0] == (BOM_LINE, "invalid_json") and not bom:  # then it is the file's own BOM
        rows[0] = (BOM_LINE, "missing_field")  # and the line is "{}"
    return {
        "rows": rows,
        "bom": bom,
        "newline": draw(st.sampled_from([b"\n", b"\r\n"])),
        "blank_after": draw(st.sets(st.integers(0, 24), max_size=3)) if fmt == "jsonl" else set(),
        "ensure_ascii": draw(st.booleans()),
    }


def write_file(tmp_path, kind: str, fmt: str, spec: dict, hub: dict):
    """Writes the file (or serves the rows as the hub dataset ``HUB_NAME``); returns (source,
    location of each row: line number (JSONL) or row index)."""
    path = tmp_path / f"hostile_{kind}.{fmt}"
    rows = [obj for obj, _ in spec["rows"]]
    if fmt == "hub":
        hub[HUB_NAME] = rows
        return HUB_NAME, list(range(len(rows)))
    if fmt == "parquet":
        pq.write_table(table_of(rows), path)
        return path, list(range(len(rows)))
    bom = b"\xef\xbb\xbf" if spec["bom"] else b""
    if fmt == "json":
        path.write_bytes(bom + json.dumps(rows, indent=1).encode())  # \ud800 escapes keep it valid JSON
        return path, list(range(len(rows)))
    lines, where = [], []
    for i, obj in enumerate(rows):
        if isinstance(obj, bytes):
            lines.append(obj)
        else:  # a lone surrogate written unescaped is not UTF-8: invalid either way
            lines.append(json.dumps(obj, ensure_ascii=spec["ensure_ascii"]).encode("utf-8", "surrogatepass"))
        where.append(len(lines))
        if i in spec["blank_after"]:
            lines.append(b"  \t")
    path.write_bytes(bom + spec["newline"].join(lines) + spec["newline"])
    return path, where


def table_of(rows: list[dict]) -> pa.Table:
    """A table with the union of the rows' keys as columns (from_pylist takes the first row's keys only)."""
    keys = list(dict.fromkeys(k for r in rows for k in r)) or ["note"]  # parquet needs a column to count rows
    return pa.table({k: [r.get(k) for r in rows] for k in keys})


def skips(report) -> collections.Counter:
    return collections.Counter({k: v for k, v in report.counts.items() if k not in NOTE_REASONS})


def duplicates_in(row) -> int:
    if isinstance(row, dict) and isinstance(row.get("responses"), list):
        return len(row["responses"]) - len(set(row["responses"]))
    return 0


# ============================================================================ invariants after tokenisation


def check_tokenized(kind: str, records: list[dict], toks, *, seed: int) -> None:
    """Tokenises the kept records; every example satisfies the invariants, nothing is lost."""
    rng = random.Random(seed)
    tok = toks[seed % len(toks)]
    vocab = len(tok)
    check_vocab(tok, vocab)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    # With the BPE tokenizer data text never encodes to EOS (plain strings are encoded
    # literally, dialogues spelling a special token are dropped), so EOS appears exactly
    # where it is required: after each assistant turn of a dialogue and closing each reply.
    literal = tok is toks[2]
    scale = 4 if literal else 1
    seq_len, max_prompt, max_response = (scale * LIMITS[k] for k in ("seq_len", "max_prompt", "max_response"))
    by_id = {r["example_id"]: r for r in records}

    def eos_ok(row: np.ndarray, example_id, closing: int) -> bool:
        """True unless the BPE tokenizer's row holds another number of EOS than required."""
        turns = by_id[int(example_id)].get("messages") or []
        return not literal or (row == eos).sum() == sum(m["role"] == "assistant" for m in turns) + closing

    if kind == "text":
        pack = rng.random() < 0.5
        ds = tokenize_text(records, tok, seq_len=seq_len, pack=pack)
        ids, att = ds.arrays["input_ids"], ds.arrays["attention_mask"]
        assert ids.shape[1:] == (seq_len,)
        if not pack:
            for row, mask in zip(ids, att):
                n = int(mask.sum())
                assert n >= 2 and mask[:n].all() and row[n - 1] == eos  # a text and its EOS, never cut
                assert not literal or (row == eos).sum() == 1
        if pack:
            assert att.all()
    elif kind == "demonstrations":
        ds = tokenize_demonstrations(records, tok, seq_len=seq_len)
        ids, att, loss = ds.arrays["input_ids"], ds.arrays["attention_mask"], ds.arrays["loss_mask"]
        for row, mask, target, example_id in zip(ids, att, loss, ds.arrays["example_id"]):
            n = int(mask.sum())
            assert eos_ok(row, example_id, closing=0 if "messages" in by_id[int(example_id)] else 1)
            assert mask[:n].all() and not mask[n:].any()  # right-padded, within seq_len
            assert target.any() and not (target * (1 - mask)).any()  # targets exist, only on real tokens
            assert row[np.nonzero(target)[0][-1]] == eos  # the last target closes the reply
    elif kind == "rankings":
        max_k = rng.choice([None, 2, 4, 20])
        ds = tokenize_rankings(records, tok, max_prompt_len=max_prompt, max_response_len=max_response, max_k=max_k)
        a = ds.arrays
        ids = a["input_ids"]
        assert ids.shape[2:] == (max_prompt + max_response,)
        if max_k is not None:
            assert ids.shape[1] == max_k
        for b in range(ids.shape[0]):
            p = int(a["prompt_len"][b])
            valid = np.nonzero(a["valid"][b])[0]
            assert len(valid) >= 2 and p <= max_prompt
            ranks = a["ranks"][b, valid]
            assert len(set(ranks.tolist())) >= 2 and (ranks >= 0).all()
            responses = set()
            for k in valid:
                end = int(a["end_index"][b, k])
                assert ids[b, k, end] == eos and a["attention_mask"][b, k, : end + 1].all()
                assert not a["attention_mask"][b, k, end + 1 :].any() and 0 < end + 1 - p <= max_response
                assert eos_ok(ids[b, k], a["example_id"][b], closing=1)
                responses.add(tuple(ids[b, k, p : end + 1].tolist()))
            assert len(responses) == len(valid)  # distinct responses
            empty = ~a["valid"][b]
            assert (ids[b, empty] == pad).all() and not a["attention_mask"][b, empty].any()
            assert (a["ranks"][b, empty] == -1).all()
    else:
        ds = tokenize_prompts(records, tok, max_prompt_len=max_prompt)
        ids = ds.arrays["input_ids"]
        for row, mask, example_id in zip(ids, ds.arrays["attention_mask"], ds.arrays["example_id"]):
            n = int(mask.sum())
            assert n >= 1 and mask[max_prompt - n :].all()  # left-padded, non-empty
            assert eos_ok(row, example_id, closing=0)
    assert ((ids >= 0) & (ids < vocab)).all()
    rep = ds.report
    assert rep.total_rows == len(records) and rep.kept + sum(skips(rep).values()) == len(records)
    assert set(ds.arrays["example_id"].tolist()) <= {r["example_id"] for r in records}


def check_hygiene(kind: str, records: list[dict]) -> None:
    """Splits, prefix dedup and per-user caps account for every record and keep users apart."""
    parts = split_by_user(records, fractions=(0.5, 0.25, 0.25), seed=1)
    assert sorted(r["example_id"] for part in parts for r in part) == [r["example_id"] for r in records]
    users = [{r["user_id"] for r in part if r["user_id"] is not None} for part in parts]
    assert not (users[0] & users[1] or users[0] & users[2] or users[1] & users[2])
    key = "text" if kind == "text" else "prompt"
    kept, dropped = dedup_by_prefix(records, prefix_chars=8, key=key)
    assert len(kept) + dropped == len(records)
    kept, dropped = cap_per_user(records, max_per_user=1)
    assert len(kept) + dropped == len(records) and len({r["user_id"] for r in kept if r["user_id"]}) == sum(
        1 for r in kept if r["user_id"]
    )


# ============================================================================ the properties


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_hostile_files(tmp_path, monkeypatch, toks, kind, fmt):
    import datasets

    hub: dict[str, list] = {}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: hub[name])

    @SETTINGS
    @given(spec=hostile_file(kind, fmt), ceiling=st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    def check(spec, ceiling):
        path, where = write_file(tmp_path, kind, fmt, spec, hub)
        expected = [reason for _, reason in spec["rows"]]
        ROWS_FUZZED[kind] += len(expected)
        bad = [i for i, reason in enumerate(expected) if reason is not None]

        # strict: one clear error for the first bad row
        if bad:
            with pytest.raises(DataError) as e:
                load_records(path, kind)
            first = bad[0]
            name = f"{path}[train]" if fmt == "hub" else path
            place = f"{name}:{where[first]}: " if fmt == "jsonl" else f"{name}: row {where[first]}: "
            assert str(e.value).startswith(place + expected[first] + ": "), (str(e.value)[:300], spec["rows"][first])
            assert e.value.reason == expected[first] and e.value.row == first
            assert e.value.line == (where[first] if fmt == "jsonl" else None)
        else:
            assert len(load_records(path, kind)[0]) == len(expected)

        # skip: the valid rows are kept, every other row is counted by its reason
        records, rep = load_records(path, kind, on_error="skip")
        assert [r["example_id"] for r in records] == [i for i, r in enumerate(expected) if r is None]
        assert skips(rep) == collections.Counter(r for r in expected if r is not None)
        assert rep.total_rows == len(expected) and rep.kept + sum(skips(rep).values()) == rep.total_rows
        dups = sum(duplicates_in(obj) for obj, reason in spec["rows"] if reason is None)
        assert rep.counts.get("duplicate_response", 0) == dups

        # the skip-rate ceiling aborts exactly when too many rows were skipped
        if rep.total_rows and rep.skipped / rep.total_rows > ceiling:
            with pytest.raises(DataError, match=r"skipped \d+/\d+ rows .* above the allowed") as e:
                rep.check_ceiling(ceiling)
            assert e.value.reason == "skip_ceiling" and str(e.value).startswith(f"{rep.source}: skipped ")
            assert str(path) in rep.source
        else:
            rep.check_ceiling(ceiling)

        check_hygiene(kind, records)
        check_tokenized(kind, records, toks, seed=len(records) + len(expected))

    check()


# ---------------------------------------------------------------------------- whole-file faults


@SETTINGS
@given(
    rows=st.lists(valid_row("rankings", "parquet"), min_size=1, max_size=30),
    damage=st.sampled_from(["truncate", "flip"]),
    data=st.data(),
)
def test_corrupt_parquet_is_a_clear_error(tmp_path, rows, damage, data):
    """A truncated or bit-flipped parquet file (written with page checksums) is never a crash:
    a DataError naming the file, or rows that all add up (a flip in unused metadata)."""
    ROWS_FUZZED["rankings"] += len(rows)
    path = tmp_path / "corrupt.parquet"
    pq.write_table(table_of(rows), path, write_page_checksum=True, use_dictionary=False)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4)):
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
    path.write_bytes(bytes(raw))
    try:
        records, rep = load_records(path, "rankings", on_error="skip")
    except DataError as e:
        assert str(e).startswith(str(path)) and e.reason in ("unreadable", "invalid_encoding"), str(e)
    else:
        assert damage == "flip" and rep.kept + sum(skips(rep).values()) == rep.total_rows == len(records) + rep.skipped


@SETTINGS
@given(rows=st.lists(valid_row("text", "json"), max_size=6), cut=st.integers(1, 40))
def test_broken_json_array_is_one_file_error(tmp_path, rows, cut):
    """A JSON array file with a syntax error cannot be split into rows: one file-level DataError."""
    ROWS_FUZZED["text"] += len(rows)
    path = tmp_path / "broken.json"
    text = json.dumps(rows).encode()
    path.write_bytes(text[: max(1, len(text) - cut)])
    for mode in ("raise", "skip"):
        with pytest.raises(DataError, match=r"broken\.json: cannot parse the JSON array") as e:
            load_records(path, "text", on_error=mode)
        assert e.value.reason == "invalid_json"
