"""Tests of rlhf_jax.data: loading/validation, tokenisation, splits, batch iteration (CPU, no downloads)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rlhf_jax.data import (
    NOTE_REASONS,
    BatchIterator,
    DataError,
    SkipReport,
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

WORDS = (
    "hi hello there how are you fine thanks bye ok yes no a b c d e f g h the cat dog sat on mat "
    "good bad answer question what is sky blue red write poem sea"
).split()
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}<eos> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

MSG_U = {"role": "user", "content": "hi"}
MSG_A = {"role": "assistant", "content": "hello"}


def make_tokenizer(*, pad="<pad>", bos_post_processor=False, template=TEMPLATE):
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos_post_processor:  # Llama-style: a BOS in front of plain text
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    hf.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>"]})
    hf.chat_template = template
    return hf


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def ids(tok, text):
    """Token ids of whitespace-separated tokens, e.g. ids(tok, "hello <eos>")."""
    return tok.convert_tokens_to_ids(text.split())


def write_lines(path, lines, *, newline=b"\n", bom=False):
    data = newline.join(x if isinstance(x, bytes) else x.encode() for x in lines) + newline
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return path


def write_jsonl(path, rows, **kw):
    return write_lines(path, [r if isinstance(r, (str, bytes)) else json.dumps(r) for r in rows], **kw)


def skips(report):
    return sum(v for k, v in report.counts.items() if k not in NOTE_REASONS)


# ============================================================================ records: formats


def test_text_records_ids_user_meta(tmp_path):
    rows = [{"text": "a b", "user_id": 7, "source": "x"}, {"text": "c", "user_id": None}]
    p = write_jsonl(tmp_path / "t.jsonl", rows)
    recs, rep = load_records(p, "text")
    assert recs == [
        {"text": "a b", "user_id": "7", "meta": {"source": "x"}, "example_id": 0},
        {"text": "c", "user_id": None, "meta": {}, "example_id": 1},
    ]
    assert (rep.total_rows, rep.kept, rep.skipped) == (2, 2, 0)


def test_demonstration_formats(tmp_path):
    msgs = [{"role": "system", "content": "be good"}, MSG_U, MSG_A]
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "response": "hello"}, {"messages": msgs}])
    recs, _ = load_records(p, "demonstrations")
    assert recs[0]["prompt"] == "hi" and recs[0]["response"] == "hello"
    assert recs[1]["messages"] == msgs and recs[1]["example_id"] == 1


def test_ranking_formats(tmp_path):
    msgs = [{"role": "user", "content": "hi"}]
    rows = [
        {"prompt": "q", "responses": ["a", "b", "c"], "ranks": [2, 0, 0]},
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"messages": msgs, "responses": ["a", "b"], "ranks": [1, 0]},
        {"messages": msgs, "chosen": "a", "rejected": "b"},
    ]
    recs, rep = load_records(write_jsonl(tmp_path / "r.jsonl", rows), "rankings")
    assert rep.kept == 4
    assert recs[0]["responses"] == ["a", "b", "c"] and recs[0]["ranks"] == [2, 0, 0]  # ties allowed
    assert recs[1]["responses"] == ["good", "bad"] and recs[1]["ranks"] == [0, 1]  # pair = K=2
    assert recs[2]["messages"] == msgs and recs[2]["ranks"] == [1, 0]
    assert recs[3]["responses"] == ["a", "b"] and recs[3]["ranks"] == [0, 1]


def test_prompt_formats(tmp_path):
    msgs = [MSG_U, MSG_A, {"role": "user", "content": "ok"}]
    recs, _ = load_records(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"messages": msgs}]), "prompts")
    assert recs[0]["prompt"] == "hi" and recs[1]["messages"] == msgs


def test_duplicate_responses_keep_best_rank(tmp_path):
    rows = [{"prompt": "q", "responses": ["a", "b", "a", "c"], "ranks": [2, 1, 0, 3]}]
    recs, rep = load_records(write_jsonl(tmp_path / "r.jsonl", rows), "rankings")
    assert recs[0]["responses"] == ["a", "b", "c"] and recs[0]["ranks"] == [0, 1, 3]
    assert rep.counts == {"duplicate_response": 1} and rep.kept == 1 and rep.skipped == 0
    assert "duplicate_response=1" in rep.summary()


def test_parquet_and_bad_row_index(tmp_path):
    rows = [
        {"prompt": "q", "responses": ["a", "b"], "ranks": [0, 1], "user_id": "u1"},
        {"prompt": "q", "responses": ["a", "b"], "ranks": [0, 1], "user_id": "u2"},
        {"prompt": "q", "responses": ["a", "b"], "ranks": [0], "user_id": "u3"},
    ]
    p = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    with pytest.raises(DataError, match=r"r\.parquet: row 2: ranks_length_mismatch") as e:
        load_records(p, "rankings")
    assert e.value.row == 2 and e.value.line is None
    recs, rep = load_records(p, "rankings", on_error="skip")
    assert [r["user_id"] for r in recs] == ["u1", "u2"] and rep.counts == {"ranks_length_mismatch": 1}


def test_parquet_mixed_pairs_and_lists(tmp_path):
    # Columns of a union schema are null where a row uses the other format.
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b", "responses": None, "ranks": None},
        {"prompt": "q", "chosen": None, "rejected": None, "responses": ["a", "b", "c"], "ranks": [0, 1, 2]},
    ]
    p = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    recs, _ = load_records(p, "rankings")
    assert [len(r["responses"]) for r in recs] == [2, 3] and recs[0]["meta"] == {}


def test_json_array_file(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"text": "a"}, {"text": ""}]))
    with pytest.raises(DataError, match=r"a\.json: row 1: empty_string"):
        load_records(p, "text")


def test_bom_crlf_blank_lines(tmp_path):
    lines = [json.dumps({"text": "a"}), "", json.dumps({"text": "b"}), "   ", "{bad", json.dumps({"text": "c"})]
    p = write_lines(tmp_path / "w.jsonl", lines, newline=b"\r\n", bom=True)
    with pytest.raises(DataError) as e:
        load_records(p, "text")
    assert "w.jsonl:5: invalid_json" in str(e.value) and e.value.line == 5 and e.value.row == 2
    recs, rep = load_records(p, "text", on_error="skip")
    assert [r["text"] for r in recs] == ["a", "b", "c"]
    assert [r["example_id"] for r in recs] == [0, 1, 3]  # blank lines are not rows
    assert (rep.total_rows, rep.kept, rep.counts) == (4, 3, {"invalid_json": 1})


BAD_ROWS = [
    ("text", b'{"text": "a"', "invalid_json"),
    ("text", b'["a"]', "not_an_object"),
    ("text", b'{"txt": "a"}', "missing_field"),
    ("text", b'{"text": null}', "missing_field"),
    ("text", b'{"text": 3}', "wrong_type"),
    ("text", b'{"text": "  "}', "empty_string"),
    ("text", b'{"text": "a\xff"}', "invalid_encoding"),
    ("text", b'{"text": "a\\ud800"}', "invalid_encoding"),
    ("text", b'{"text": "a", "user_id": [1]}', "wrong_type"),
    ("demonstrations", b'{"prompt": "hi"}', "missing_field"),
    ("demonstrations", b'{"prompt": "hi", "response": ""}', "empty_string"),
    ("demonstrations", json.dumps({"messages": [MSG_U, {"role": "bot", "content": "x"}]}).encode(), "bad_role"),
    ("demonstrations", json.dumps({"messages": [MSG_A, MSG_U]}).encode(), "bad_role"),
    ("demonstrations", json.dumps({"messages": [MSG_U]}).encode(), "missing_field"),
    ("demonstrations", json.dumps({"messages": [MSG_U, {**MSG_A, "content": ""}]}).encode(), "empty_string"),
    ("demonstrations", json.dumps({"messages": [MSG_U, {"role": "assistant", "content": 5}]}).encode(), "wrong_type"),
    ("demonstrations", json.dumps({"messages": "hi"}).encode(), "wrong_type"),
    ("prompts", json.dumps({"messages": [MSG_U, MSG_A]}).encode(), "bad_role"),
    ("prompts", b'{"prompt": ["hi"]}', "wrong_type"),
    ("rankings", b'{"prompt": "q", "responses": ["a"], "ranks": [0]}', "too_few_responses"),
    ("rankings", b'{"prompt": "q", "responses": ["a", "b"], "ranks": [0, 1, 2]}', "ranks_length_mismatch"),
    ("rankings", b'{"prompt": "q", "responses": ["a", "b"], "ranks": [0, -1]}', "bad_rank"),
    ("rankings", b'{"prompt": "q", "responses": ["a", "b"], "ranks": [0, 1.5]}', "wrong_type"),
    ("rankings", b'{"prompt": "q", "responses": ["a", "b"], "ranks": [1, 1]}', "ties_only"),
    ("rankings", b'{"prompt": "q", "chosen": "a", "rejected": "a"}', "duplicate_responses_only"),
    ("rankings", b'{"prompt": "q", "responses": ["a", "a", "b"], "ranks": [0, 1, 0]}', "duplicate_responses_only"),
    ("rankings", b'{"prompt": "q", "chosen": "a"}', "missing_field"),
    ("rankings", b'{"prompt": "q"}', "missing_field"),
    ("rankings", b'{"prompt": "q", "responses": "ab", "ranks": [0, 1]}', "wrong_type"),
]
GOOD_ROW = {
    "text": {"text": "a"},
    "demonstrations": {"prompt": "hi", "response": "hello"},
    "prompts": {"prompt": "hi"},
    "rankings": {"prompt": "q", "chosen": "a", "rejected": "b"},
}


@pytest.mark.parametrize("kind,bad,reason", BAD_ROWS, ids=[f"{k}-{r}-{i}" for i, (k, _, r) in enumerate(BAD_ROWS)])
def test_bad_rows_strict_and_skip(tmp_path, kind, bad, reason):
    good = json.dumps(GOOD_ROW[kind])
    p = write_lines(tmp_path / "bad.jsonl", [good, good, b"", bad, good])
    with pytest.raises(DataError) as e:
        load_records(p, kind)
    assert f"bad.jsonl:4: {reason}" in str(e.value)
    assert (e.value.line, e.value.row, e.value.reason) == (4, 2, reason)
    recs, rep = load_records(p, kind, on_error="skip")
    assert len(recs) == rep.kept == 3 and rep.total_rows == 4
    assert rep.counts == {reason: 1} and rep.kept + skips(rep) == rep.total_rows
    assert [r["example_id"] for r in recs] == [0, 1, 3]


def test_json_value_errors_are_row_errors(tmp_path):
    # regression: a > 4300-digit int makes json.loads raise a plain ValueError (not JSONDecodeError)
    huge = b'{"text": "b", "n": ' + b"1" * 5000 + b"}"
    p = write_lines(tmp_path / "big.jsonl", [b'{"text": "a"}', huge])
    with pytest.raises(DataError, match=r"big\.jsonl:2: invalid_json: .*digits"):
        load_records(p, "text")
    assert load_records(p, "text", on_error="skip")[1].counts == {"invalid_json": 1}
    # regression: a JSON array file that is too deep or holds a too long int is a DataError
    for name, body in [("deep.json", b"[" * 100_000 + b"]" * 100_000), ("int.json", b"[" + huge + b"]")]:
        (tmp_path / name).write_bytes(body)
        with pytest.raises(DataError, match=rf"{name}: cannot parse the JSON array"):
            load_records(tmp_path / name, "text", on_error="skip")


def test_only_json_whitespace_makes_a_blank_line(tmp_path):
    # regression: a form-feed line was dropped as blank without being counted
    p = write_lines(tmp_path / "ff.jsonl", [b'{"text": "a"}', b"\x0c", b" \t", b"\x0b"])
    _, rep = load_records(p, "text", on_error="skip")
    assert (rep.total_rows, rep.kept, rep.counts) == (3, 1, {"invalid_json": 2})


def test_parquet_bad_utf8_string_is_a_row_error(tmp_path):
    # regression: to_pylist's UnicodeDecodeError escaped as a crash
    col = pa.array([b"fine", b"bad \xff", b"ok"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": col}), tmp_path / "u.parquet")
    with pytest.raises(DataError, match=r"u\.parquet: row 1: invalid_encoding"):
        load_records(tmp_path / "u.parquet", "text")
    recs, rep = load_records(tmp_path / "u.parquet", "text", on_error="skip")
    assert [r["example_id"] for r in recs] == [0, 2] and rep.counts == {"invalid_encoding": 1}


def test_parquet_damaged_page_is_a_data_error(tmp_path):
    # regression: a damaged data page raised a bare OSError; with page checksums it is always found
    p = tmp_path / "c.parquet"
    rows = [{"text": f"row {i}"} for i in range(5000)]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, p, compression="none", use_dictionary=False, data_page_size=4096, write_page_checksum=True)
    data = bytearray(p.read_bytes())
    data[data.index(b"row 4500")] ^= 0x01  # a byte in the values of the second batch of 4096 rows
    p.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"c\.parquet: row 4096: unreadable: cannot decode.*CRC") as e:
        load_records(p, "text", on_error="skip")
    assert e.value.row == 4096 and e.value.reason == "unreadable"


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.jsonl", "text")
    with pytest.raises(DataError, match="directory"):
        load_records(tmp_path, "text")
    (tmp_path / "x.csv").write_text("text\na\n")
    with pytest.raises(DataError, match="unknown file type"):
        load_records(tmp_path / "x.csv", "text")
    (tmp_path / "y.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read parquet"):
        load_records(tmp_path / "y.parquet", "text")
    with pytest.raises(ValueError, match="kind"):
        load_records(tmp_path / "x.csv", "pictures")
    with pytest.raises(ValueError, match="on_error"):
        load_records(tmp_path / "x.csv", "text", on_error="ignore")


def test_hub_name_uses_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return [{"prompt": "hi"}, {"prompt": 3}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(DataError, match=r"org/prompts\[test\]: row 1: wrong_type"):
        load_records("org/prompts", "prompts", split="test")
    recs, rep = load_records("org/prompts", "prompts", split="test", on_error="skip")
    assert calls == [("org/prompts", "test")] * 2 and len(recs) == 1 and rep.counts == {"wrong_type": 1}


def test_skip_report_ceiling():
    rep = SkipReport(counts={"invalid_json": 2, "duplicate_response": 5}, total_rows=10, kept=8)
    rep.check_ceiling(0.2)
    with pytest.raises(DataError, match="skipped 2/10"):
        rep.check_ceiling(0.1)
    assert rep.summary() == "kept 8/10 rows (2 skipped: invalid_json=2); notes: duplicate_response=5"
    SkipReport().check_ceiling(0.0)


# hypothesis: random junk lines among good ones; line numbers and counts must add up.
JUNK = st.one_of(
    st.text(alphabet=st.characters(blacklist_characters="\n\r"), max_size=12).map(
        lambda s: s.encode("utf-8", "surrogatepass")  # lone surrogates become invalid UTF-8
    ),
    st.binary(max_size=8).filter(lambda b: b"\n" not in b),
    st.sampled_from([b"{}", b"null", b'{"text": 1}', b'{"text": ""}', b'{"text": "\\udc80"}', b"[1, 2]", b'"s"']),
    st.builds(lambda s: json.dumps({"text": s}).encode(), st.text(max_size=6)),
)


def _oracle_valid(line: bytes) -> bool | None:
    """None for a blank line (only JSON whitespace), else whether it is a valid text row."""
    if not line.strip(b" \t\r"):
        return None
    try:
        obj = json.loads(line.decode("utf-8"))
        obj["text"].encode("utf-8")
    except (UnicodeError, ValueError, TypeError, KeyError, AttributeError):
        return False
    return isinstance(obj, dict) and isinstance(obj["text"], str) and bool(obj["text"].strip())


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(JUNK, st.just(b'{"text": "fine"}')), max_size=12))
def test_random_lines_strict_and_skip(tmp_path, lines):
    p = write_lines(tmp_path / "h.jsonl", lines)
    bom = b"\xef\xbb\xbf"  # a BOM opening the file is the utf-8-sig signature, not data
    status = [_oracle_valid(x[3:] if i == 0 and x.startswith(bom) else x) for i, x in enumerate(lines)]
    rows = [s for s in status if s is not None]
    bad_lines = [i + 1 for i, s in enumerate(status) if s is False]
    if bad_lines:
        with pytest.raises(DataError) as e:
            load_records(p, "text")
        assert e.value.line == bad_lines[0] and f"h.jsonl:{bad_lines[0]}: " in str(e.value)
    else:
        recs, _ = load_records(p, "text")
        assert len(recs) == len(rows)
    recs, rep = load_records(p, "text", on_error="skip")
    assert rep.total_rows == len(rows) and rep.kept == len(recs) == sum(rows)
    assert rep.kept + skips(rep) == rep.total_rows


# ============================================================================ tokenisation


def test_pad_equal_eos_is_rejected():
    bad = make_tokenizer(pad="<eos>")
    for fn, kw in [
        (tokenize_text, {"seq_len": 4}),
        (tokenize_demonstrations, {"seq_len": 4}),
        (tokenize_prompts, {"max_prompt_len": 4}),
        (tokenize_rankings, {"max_prompt_len": 4, "max_response_len": 4}),
    ]:
        with pytest.raises(ValueError, match=r"pad_token_id \(1\) == eos_token_id \(1\)"):
            fn([], bad, **kw)
    with pytest.raises(ValueError, match="pad_token_id"):
        check_vocab(bad, 100)


def test_check_vocab(tok):
    check_vocab(tok, len(tok))
    with pytest.raises(ValueError, match=f"has {len(tok)} tokens but the model's vocab_size is 10"):
        check_vocab(tok, 10)

    class Stub:
        pad_token_id, eos_token_id, bos_token_id = 0, 1, 99

        def __len__(self):
            return 5

    with pytest.raises(ValueError, match="bos_token_id 99 is outside"):
        check_vocab(Stub(), 50)


def make_bpe_tokenizer():
    """A tiny byte-level BPE tokenizer (GPT-2 style: EOS spelt "<|endoftext|>", which is not a word)."""
    from tokenizers import decoders, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    core.train_from_iterator(
        [" ".join(WORDS)] * 4, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=alphabet)
    )
    bpe = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<pad>")
    bpe.add_special_tokens({"additional_special_tokens": specials[2:]})
    bpe.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}<|endoftext|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return bpe


def test_special_token_spelling_in_data_is_plain_text():
    """regression: a literal "<|endoftext|>" in data text became the EOS token (SFT learnt to stop
    mid-response, packing split documents); data text is now encoded literally."""
    bpe = make_bpe_tokenizer()
    eos, hostile = bpe.eos_token_id, "say <|endoftext|> hi"
    ds = tokenize_demonstrations([{"prompt": hostile, "response": hostile}], bpe, seq_len=64)
    assert (ds.arrays["input_ids"] == eos).sum() == 1  # only the EOS that closes the response
    assert (tokenize_prompts([{"prompt": hostile}], bpe, max_prompt_len=64).arrays["input_ids"] != eos).all()
    assert (tokenize_text([{"text": hostile}] * 2, bpe, seq_len=8).arrays["input_ids"] == eos).sum() <= 2
    ds = tokenize_rankings(
        [{"prompt": hostile, "responses": [hostile, "hi"], "ranks": [0, 1]}],
        bpe,
        max_prompt_len=32,
        max_response_len=32,
    )
    assert (ds.arrays["input_ids"] == eos).sum() == 2  # one per response
    ds = tokenize_prompts([{"messages": [MSG_U, MSG_A, MSG_U]}], bpe, max_prompt_len=16)
    assert (ds.arrays["input_ids"] == eos).sum() == 1  # a chat template's own special tokens stay special


@pytest.mark.parametrize("spelling", ["<|endoftext|>", "<|user|>", "x<pad>y"])
def test_dialogue_spelling_a_special_token_is_dropped(spelling):
    """regression: a special token spelt in a message became that control token inside the
    rendered dialogue (an EOS mid-turn, a fake user turn); such dialogues are dropped and counted."""
    bpe = make_bpe_tokenizer()
    bad = [MSG_U, {"role": "assistant", "content": f"hi {spelling} there"}]
    recs = [{"messages": bad, "example_id": 0}, {"messages": [MSG_U, MSG_A], "example_id": 1}]
    ds = tokenize_demonstrations(recs, bpe, seq_len=64)
    assert ds.arrays["example_id"].tolist() == [1] and ds.report.counts == {"special_token_in_text": 1}
    prompt = [{"role": "system", "content": spelling}, MSG_U]
    ds = tokenize_prompts([{"messages": prompt}, {"messages": [MSG_U]}], bpe, max_prompt_len=16)
    assert len(ds) == 1 and ds.report.counts == {"special_token_in_text": 1}
    ranked = {"messages": prompt, "responses": ["a", "b"], "ranks": [0, 1]}
    ds = tokenize_rankings([ranked], bpe, max_prompt_len=16, max_response_len=4)
    assert len(ds) == 0 and ds.report.counts == {"special_token_in_text": 1}


def test_text_packing(tok):
    recs = [{"text": "a b c", "example_id": 10}, {"text": "d e", "example_id": 11}, {"text": "f", "example_id": 12}]
    ds = tokenize_text(recs, tok, seq_len=4)
    stream = ids(tok, "a b c <eos> d e <eos> f <eos>")
    np.testing.assert_array_equal(ds.arrays["input_ids"], np.asarray(stream[:8]).reshape(2, 4))
    assert ds.arrays["input_ids"].dtype == np.int32 and ds.arrays["loss_mask"].dtype == np.float32
    assert ds.arrays["example_id"].tolist() == [10, 11]  # row 1 starts inside record 11
    assert ds.arrays["attention_mask"].all() and ds.arrays["loss_mask"].all()
    assert ds.report.counts == {"packing_remainder_tokens": 1} and ds.report.kept == 3 and len(ds) == 2
    ds = tokenize_text(recs, tok, seq_len=3)  # stream of 9 = 3 rows exactly
    assert len(ds) == 3 and ds.report.counts == {}
    ds = tokenize_text(recs, tok, seq_len=7)  # record 12 ("f <eos>") lies wholly in the remainder
    assert ds.report.counts == {"packing_remainder_tokens": 2, "packing_remainder": 1} and ds.report.kept == 2


def test_text_unpacked_drops_too_long(tok):
    recs = [{"text": "a b c d", "example_id": 0}, {"text": "a b", "example_id": 1}]
    ds = tokenize_text(recs, tok, seq_len=4, pack=False)
    assert ds.arrays["input_ids"].tolist() == [ids(tok, "a b <eos> <pad>")]
    assert ds.arrays["loss_mask"].tolist() == [[1, 1, 1, 0]] and ds.arrays["example_id"].tolist() == [1]
    assert ds.report.counts == {"too_long": 1} and ds.report.kept + skips(ds.report) == 2


def test_bos_prefix_for_llama_style_tokenizer():
    btok = make_tokenizer(bos_post_processor=True)
    ds = tokenize_text([{"text": "a b"}], btok, seq_len=5, pack=False)
    assert ds.arrays["input_ids"][0].tolist() == ids(btok, "<bos> a b <eos> <pad>")
    ds = tokenize_prompts([{"prompt": "hi"}, {"messages": [MSG_U]}], btok, max_prompt_len=4)
    assert ds.arrays["input_ids"].tolist() == [
        ids(btok, "<pad> <pad> <bos> hi"),
        ids(btok, "<pad> <|user|> hi <|assistant|>"),  # the chat template decides about BOS
    ]


def test_demonstrations_prompt_response(tok):
    recs = [{"prompt": "what is sky", "response": "blue", "example_id": 4}]
    ds = tokenize_demonstrations(recs, tok, seq_len=7)
    assert ds.arrays["input_ids"][0].tolist() == ids(tok, "what is sky blue <eos> <pad> <pad>")
    assert ds.arrays["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert ds.arrays["loss_mask"][0].tolist() == [0, 0, 0, 1, 1, 0, 0]  # targets: "blue", "<eos>"
    assert ds.arrays["example_id"].tolist() == [4]
    ds = tokenize_demonstrations(recs, tok, seq_len=7, prompt_loss=True)
    assert ds.arrays["loss_mask"][0].tolist() == [1, 1, 1, 1, 1, 0, 0]


def test_demonstrations_messages_loss_on_assistant_only(tok):
    msgs = [
        {"role": "system", "content": "be good"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ok"},
    ]
    ds = tokenize_demonstrations([{"messages": msgs, "example_id": 0}], tok, seq_len=20)
    row, mask = ds.arrays["input_ids"][0], ds.arrays["loss_mask"][0]
    expected = "<|system|> be good <|user|> hi <|assistant|> hello there <eos> <|user|> bye <|assistant|> ok <eos>"
    assert row[: len(expected.split())].tolist() == ids(tok, expected)
    targets = tok.convert_ids_to_tokens(row[mask == 1].tolist())
    assert targets == ["hello", "there", "<eos>", "ok", "<eos>"]
    assert mask.tolist() == [0] * 6 + [1, 1, 1] + [0] * 3 + [1, 1] + [0] * 6


def test_demonstrations_drops_too_long_and_empty(tok):
    recs = [
        {"prompt": "a b c", "response": "d e f", "example_id": 0},  # 7 tokens > 6
        {"prompt": "a", "response": "b", "example_id": 1},
        {"prompt": "a", "response": "   ", "example_id": 2},  # encodes to nothing
        {"messages": [MSG_U, MSG_A, MSG_U, MSG_A], "example_id": 3},  # 9 tokens > 6
    ]
    ds = tokenize_demonstrations(recs, tok, seq_len=6)
    assert ds.arrays["example_id"].tolist() == [1]
    assert ds.report.counts == {"too_long": 2, "empty_response": 1}
    assert ds.report.kept + skips(ds.report) == len(recs)
    assert (ds.arrays["attention_mask"].sum(1) <= 6).all()  # nothing truncated, just dropped


def test_demonstrations_non_incremental_template_is_dropped():
    odd = make_tokenizer(template="{% if messages|length > 2 %}the {% endif %}" + TEMPLATE)
    ds = tokenize_demonstrations([{"messages": [MSG_U, MSG_A, MSG_U, MSG_A]}], odd, seq_len=20)
    assert len(ds) == 0 and ds.report.counts == {"chat_template_not_incremental": 1}


def test_rankings_arrays(tok):
    recs = [
        {"prompt": "q", "responses": ["a", "b c", "d"], "ranks": [1, 0, 2], "example_id": 5},
        {"messages": [MSG_U], "responses": ["yes", "no"], "ranks": [0, 1], "example_id": 6},
    ]
    ds = tokenize_rankings(recs, tok, max_prompt_len=3, max_response_len=3)
    a = ds.arrays
    assert a["input_ids"].shape == (2, 3, 6) and a["ranks"].shape == (2, 3)
    assert a["input_ids"][0, 1].tolist() == ids(tok, "<unk> b c <eos> <pad> <pad>")  # "q" is out of vocabulary
    assert a["input_ids"][1, 0].tolist() == ids(tok, "<|user|> hi <|assistant|> yes <eos> <pad>")
    assert a["ranks"].tolist() == [[1, 0, 2], [0, 1, -1]]
    assert a["valid"].tolist() == [[True, True, True], [True, True, False]]
    assert a["prompt_len"].tolist() == [1, 3] and a["example_id"].tolist() == [5, 6]
    eos = tok.eos_token_id
    for b, k in zip(*np.nonzero(a["valid"])):
        e = a["end_index"][b, k]
        assert a["input_ids"][b, k, e] == eos and a["attention_mask"][b, k, e + 1 :].sum() == 0
        assert a["attention_mask"][b, k, : e + 1].all()
    assert (a["input_ids"][1, 2] == tok.pad_token_id).all() and a["attention_mask"][1, 2].sum() == 0
    assert a["input_ids"].dtype == np.int32 and a["valid"].dtype == bool


def test_rankings_length_drops_never_truncate(tok):
    recs = [
        {"prompt": "a b c d", "responses": ["a", "b"], "ranks": [0, 1]},  # prompt 4 > 3
        {"prompt": "a", "responses": ["a b c", "b", "c"], "ranks": [0, 1, 2]},  # one response 4 > 3
        {"prompt": "a", "responses": ["a b c", "b"], "ranks": [0, 1]},  # only 1 left
        {"prompt": "a", "responses": ["a b c", "b", "c"], "ranks": [0, 1, 1]},  # left: a tie only
    ]
    ds = tokenize_rankings(recs, tok, max_prompt_len=3, max_response_len=3)
    assert len(ds) == 1 and ds.arrays["input_ids"].shape == (1, 2, 6)
    assert ds.arrays["ranks"].tolist() == [[1, 2]]
    assert ds.report.counts == {"prompt_too_long": 1, "response_too_long": 3, "too_few_responses_after_length": 2}
    assert ds.report.kept + skips(ds.report) == len(recs)


def test_rankings_dedup_after_tokenisation_and_max_k(tok):
    recs = [
        {"prompt": "a", "responses": ["b  c", "b c", "d"], "ranks": [2, 0, 1]},  # same tokens: keep rank 0
        {"prompt": "a", "responses": ["b  c", "b c"], "ranks": [0, 1]},  # nothing ordered left
        {"prompt": "a", "responses": ["b", "c", "d", "e"], "ranks": [0, 1, 2, 3]},  # K=4 > max_k
    ]
    ds = tokenize_rankings(recs, tok, max_prompt_len=2, max_response_len=4, max_k=3)
    assert ds.arrays["ranks"].tolist() == [[0, 1, -1]] and ds.arrays["valid"].sum() == 2
    assert ds.report.counts == {"duplicate_response": 1, "duplicate_responses_only": 1, "too_many_responses": 1}
    ds = tokenize_rankings(recs[2:], tok, max_prompt_len=2, max_response_len=4)  # K_max from the data
    assert ds.arrays["input_ids"].shape == (1, 4, 6)
    with pytest.raises(ValueError, match="max_k"):
        tokenize_rankings(recs, tok, max_prompt_len=2, max_response_len=4, max_k=1)


def test_prompts_left_padded(tok):
    recs = [
        {"prompt": "what is sky", "example_id": 0},
        {"messages": [{"role": "system", "content": "a"}, MSG_U], "example_id": 1},
        {"prompt": "a b c d e f", "example_id": 2},
    ]
    ds = tokenize_prompts(recs, tok, max_prompt_len=5)
    assert ds.arrays["input_ids"].tolist() == [
        ids(tok, "<pad> <pad> what is sky"),
        ids(tok, "<|system|> a <|user|> hi <|assistant|>"),
    ]
    assert ds.arrays["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert ds.arrays["example_id"].tolist() == [0, 1] and ds.report.counts == {"prompt_too_long": 1}


def test_file_to_batches_end_to_end(tmp_path, tok):
    rows = [{"prompt": "hi", "chosen": "good", "rejected": "bad", "user_id": f"u{i}"} for i in range(8)]
    recs, rep = load_records(write_jsonl(tmp_path / "pairs.jsonl", rows), "rankings")
    ds = tokenize_rankings(recs, tok, max_prompt_len=2, max_response_len=2)
    batch = next(BatchIterator(ds.arrays, batch_size=4, seed=0))
    assert batch["input_ids"].shape == (4, 2, 4) and batch["ranks"].tolist() == [[0, 1]] * 4


# ============================================================================ splits


def test_split_by_user_disjoint_and_deterministic():
    recs = [{"user_id": f"u{i % 23}", "example_id": i} for i in range(300)]
    recs += [{"user_id": None, "example_id": 300 + i} for i in range(30)]
    train, val, test = split_by_user(recs, seed=3)
    users = [{r["user_id"] for r in part if r["user_id"]} for part in (train, val, test)]
    assert not (users[0] & users[1] or users[0] & users[2] or users[1] & users[2])
    assert sorted(r["example_id"] for part in (train, val, test) for r in part) == list(range(330))
    assert 0.6 < len(train) / 330 < 0.95 and val and test
    assert (train, val, test) == split_by_user(recs, seed=3)
    assert split_by_user(recs, seed=4) != (train, val, test)
    assert split_by_user(recs, fractions=(1.0, 0.0, 0.0))[0] == recs
    with pytest.raises(ValueError, match="fractions"):
        split_by_user(recs, fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="fractions"):  # regression: NaN passed the checks, all went to test
        split_by_user(recs, fractions=(float("nan"), 0.5, 0.5))


def test_dedup_by_prefix():
    system = {"role": "system", "content": "a long system prompt shared by every dialogue"}
    recs = [
        {"prompt": "the cat sat on the mat and then", "example_id": 0},
        {"prompt": "the cat sat on the mat and also", "example_id": 1},
        {"prompt": "a dog", "example_id": 2},
        {"messages": [system, {"role": "user", "content": "x"}], "example_id": 3},
        {"messages": [system, {"role": "user", "content": "y"}], "example_id": 4},
        {"messages": [{"role": "user", "content": "x"}], "example_id": 5},
    ]
    kept, dropped = dedup_by_prefix(recs, prefix_chars=20)
    assert [r["example_id"] for r in kept] == [0, 2, 3, 4] and dropped == 2


def test_cap_per_user():
    recs = [{"user_id": u, "example_id": i} for i, u in enumerate(["a", "a", "b", "a", None, None, None])]
    kept, dropped = cap_per_user(recs, max_per_user=2)
    assert [r["example_id"] for r in kept] == [0, 1, 2, 4, 5, 6] and dropped == 1
    for bad in (0, 1.5, float("nan"), True):  # regression: NaN and floats were accepted (NaN: no cap)
        with pytest.raises(ValueError, match="max_per_user must be a positive int"):
            cap_per_user(recs, max_per_user=bad)
        with pytest.raises(ValueError, match="prefix_chars must be a positive int"):
            dedup_by_prefix(recs, prefix_chars=bad)


# ============================================================================ iterator


def _arrays(n=12):
    return {"x": np.arange(n) * 10, "example_id": np.arange(n, dtype=np.int64), "m": np.ones((n, 3), np.float32)}


def _take(it, k):
    return [next(it)["example_id"].tolist() for _ in range(k)]


def test_iterator_deterministic_and_epochs():
    it = BatchIterator(_arrays(), batch_size=4, seed=1)
    assert it.steps_per_epoch == 3
    batches = _take(it, 9)
    assert batches == _take(BatchIterator(_arrays(), batch_size=4, seed=1), 9)
    assert batches != _take(BatchIterator(_arrays(), batch_size=4, seed=2), 9)
    epochs = [sorted(sum(batches[e * 3 : e * 3 + 3], [])) for e in range(3)]
    assert all(e == list(range(12)) for e in epochs)  # every example once per epoch
    assert batches[:3] != batches[3:6]  # a new permutation each epoch
    b = next(BatchIterator(_arrays(), batch_size=4, seed=1))
    np.testing.assert_array_equal(b["x"], b["example_id"] * 10)
    assert b["m"].shape == (4, 3) and set(b) == {"x", "example_id", "m"}


def test_iterator_resume_exact():
    straight = _take(BatchIterator(_arrays(), batch_size=4, seed=7), 10)
    for k in (0, 2, 3, 5):
        it = BatchIterator(_arrays(), batch_size=4, seed=7)
        first = _take(it, k)
        state = json.loads(json.dumps(it.state()))
        resumed = BatchIterator(_arrays(), batch_size=4, seed=123)
        resumed.restore(state)
        assert first + _take(resumed, 10 - k) == straight
    with pytest.raises(ValueError, match="position"):
        resumed.restore({"seed": 0, "epoch": 0, "position": 99})


def test_iterator_drop_last():
    it = BatchIterator(_arrays(10), batch_size=4, seed=0)
    assert it.steps_per_epoch == 2 and all(len(b) == 4 for b in _take(it, 5))
    it = BatchIterator(_arrays(10), batch_size=4, seed=0, drop_last=False)
    batches = _take(it, 3)
    assert it.steps_per_epoch == 3 and [len(b) for b in batches] == [4, 4, 2]
    assert sorted(sum(batches, [])) == list(range(10))
    with pytest.raises(ValueError, match="no full batch"):
        BatchIterator(_arrays(3), batch_size=4, seed=0)


def test_iterator_host_sharding():
    glob = _take(BatchIterator(_arrays(), batch_size=4, seed=5), 6)
    hosts = [_take(BatchIterator(_arrays(), batch_size=4, seed=5, process_index=i, process_count=2), 6) for i in (0, 1)]
    for g, h0, h1 in zip(glob, *hosts):
        assert len(h0) == len(h1) == 2 and not set(h0) & set(h1) and h0 + h1 == g
    with pytest.raises(ValueError, match="multiple of process_count"):
        BatchIterator(_arrays(), batch_size=3, seed=0, process_count=2)
    with pytest.raises(ValueError, match="leading dimension"):
        BatchIterator({"a": np.zeros(3), "b": np.zeros(4)}, batch_size=1, seed=0)


def test_iterator_unshuffled_order():
    it = BatchIterator(_arrays(6), batch_size=3, seed=0, shuffle=False)
    assert _take(it, 3) == [[0, 1, 2], [3, 4, 5], [0, 1, 2]]
