"""Tokenisation of normalised records into fixed-shape numpy arrays (host side only).

Every function takes the records of :func:`rlhf_jax.data.load_records`, a Hugging Face
tokenizer (``PreTrainedTokenizerBase``) whose pad id differs from its EOS id, and returns
a :class:`TokenizedDataset`. Examples that do not fit are dropped and counted by reason
in the dataset's report, never truncated. Plain strings are encoded literally; a dialogue
whose content spells a special token is dropped (``special_token_in_text``, see
:mod:`rlhf_jax.data.encoding`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from rlhf_jax.data.encoding import DropExample, bos_prefix, dialogue_ids, encode, prompt_ids, special_ids
from rlhf_jax.data.records import SkipReport
from rlhf_jax.data.schema import RowError, check_group

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class TokenizedDataset:
    """Token arrays with a common leading dimension N, and what was dropped on the way.

    Convention for causal-LM data (``tokenize_text``, ``tokenize_demonstrations``): the
    arrays hold the full sequence ``input_ids``; the model predicts token ``t + 1`` from
    position ``t``. ``loss_mask[b, t] = 1`` means that token ``input_ids[b, t]`` is a
    prediction TARGET (e.g. a response token, including its closing EOS / end-of-turn
    token). A training step therefore compares ``logits[:, :-1]`` with
    ``input_ids[:, 1:]`` weighted by ``loss_mask[:, 1:]``.

    Attributes:
      arrays: name -> array with leading dimension N (``example_id`` [N] int64 always).
      report: rows kept / dropped by reason during tokenisation (``total_rows`` is the
        number of input records).
    """

    arrays: dict[str, np.ndarray]
    report: SkipReport

    def __post_init__(self) -> None:
        sizes = {k: v.shape[0] for k, v in self.arrays.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"TokenizedDataset arrays disagree on the leading dimension: {sizes}")

    def __len__(self) -> int:
        return int(self.arrays["example_id"].shape[0])


def _example_ids(records: Sequence[dict], keep: Sequence[int]) -> np.ndarray:
    return np.asarray([records[i].get("example_id", i) for i in keep], dtype=np.int64).reshape(len(keep))


def _pad(seqs: Sequence[Sequence[int]], length: int, pad: int, *, left: bool = False) -> tuple[np.ndarray, ...]:
    """Pads sequences to [N, length]; returns (ids int32, attention_mask int32)."""
    ids = np.full((len(seqs), length), pad, dtype=np.int32)
    mask = np.zeros((len(seqs), length), dtype=np.int32)
    for b, s in enumerate(seqs):
        n = len(s)
        sl = slice(length - n, length) if left else slice(0, n)
        ids[b, sl] = s
        mask[b, sl] = 1
    return ids, mask


def _positive(**kwargs: int | None) -> None:
    for name, v in kwargs.items():
        if v is not None and (not isinstance(v, (int, np.integer)) or v <= 0):
            raise ValueError(f"{name} must be a positive int, got {v!r}")


# ----------------------------------------------------------------------------- text (pretraining / ptx)


def tokenize_text(
    records: Sequence[dict], tokenizer: PreTrainedTokenizerBase, *, seq_len: int, pack: bool = True
) -> TokenizedDataset:
    """Tokenises ``{"text"}`` records for language modelling (pretraining and ptx data).

    Each text becomes ``[bos]? + encode(text) + [eos]``. With ``pack=True`` all texts are
    concatenated into one stream cut into rows of ``seq_len`` tokens; the final partial
    row is dropped (its tokens counted as ``packing_remainder_tokens``, and records lying
    wholly inside it as ``packing_remainder``). With ``pack=False`` each text is one
    right-padded row and texts longer than ``seq_len`` are dropped (``too_long``).

    Args:
      records: text records.
      tokenizer: a tokenizer with distinct pad and EOS ids.
      seq_len: row length L.
      pack: pack texts into full rows, or one text per row.

    Returns:
      TokenizedDataset with ``input_ids`` [N, L] int32, ``attention_mask`` [N, L] int32
      (1 = real token), ``loss_mask`` [N, L] float32 (1 on every real token),
      ``example_id`` [N] int64 (the record at the start of the row).
    """
    _positive(seq_len=seq_len)
    pad, eos = special_ids(tokenizer)
    bos = bos_prefix(tokenizer)
    docs = [bos + ids + [eos] for ids in encode(tokenizer, [r["text"] for r in records])]
    report = SkipReport(total_rows=len(records))
    if pack:
        lengths = np.asarray([len(d) for d in docs], dtype=np.int64)
        stream = np.fromiter((t for d in docs for t in d), dtype=np.int32, count=int(lengths.sum()))
        owner = np.repeat(_example_ids(records, range(len(records))), lengths)  # [T]
        n = stream.shape[0] // seq_len
        input_ids = stream[: n * seq_len].reshape(n, seq_len)  # [N, L]
        example_id = owner[: n * seq_len : seq_len]  # [N]
        starts = np.cumsum(lengths) - lengths
        lost = int((starts >= n * seq_len).sum())
        report.add("packing_remainder_tokens", int(stream.shape[0] - n * seq_len))
        report.add("packing_remainder", lost)
        report.kept = len(records) - lost
        attention_mask = np.ones_like(input_ids)
    else:
        keep = [i for i, d in enumerate(docs) if len(d) <= seq_len]
        report.add("too_long", len(docs) - len(keep))
        report.kept = len(keep)
        input_ids, attention_mask = _pad([docs[i] for i in keep], seq_len, pad)
        example_id = _example_ids(records, keep)
    arrays = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": attention_mask.astype(np.float32),
        "example_id": example_id.astype(np.int64),
    }
    return TokenizedDataset(arrays, report)


# ----------------------------------------------------------------------------- demonstrations (SFT)


def tokenize_demonstrations(
    records: Sequence[dict], tokenizer: PreTrainedTokenizerBase, *, seq_len: int, prompt_loss: bool = False
) -> TokenizedDataset:
    """Tokenises SFT demonstrations with a loss mask on the response tokens.

    ``{"prompt", "response"}``: ``ids = [bos]? + encode(prompt) + encode(response) + [eos]``,
    targets = the response tokens and the EOS. ``{"messages"}``: rendered with the chat
    template; targets = each assistant turn's tokens (including its end-of-turn token).
    Examples longer than ``seq_len`` are dropped (``too_long``), never truncated; an
    empty response is dropped (``empty_response``). See :class:`TokenizedDataset` for
    the loss-mask convention.

    Args:
      records: demonstration records.
      tokenizer: a tokenizer with distinct pad and EOS ids (and a chat template for dialogues).
      seq_len: row length L; rows are right-padded.
      prompt_loss: if True, every real token is a target (prompt included).

    Returns:
      TokenizedDataset with ``input_ids`` [N, L] int32, ``attention_mask`` [N, L] int32,
      ``loss_mask`` [N, L] float32, ``example_id`` [N] int64.
    """
    _positive(seq_len=seq_len)
    pad, eos = special_ids(tokenizer)
    report = SkipReport(total_rows=len(records))
    plain = [i for i, r in enumerate(records) if r.get("messages") is None]
    prompts = prompt_ids(tokenizer, [records[i] for i in plain])
    responses = encode(tokenizer, [records[i]["response"] for i in plain])
    built: dict[int, tuple[list[int], list[int]]] = {}
    for i, p, r in zip(plain, prompts, responses):
        if not r:
            report.add("empty_response")
            continue
        built[i] = (p + r + [eos], [0] * len(p) + [1] * (len(r) + 1))
    for i, rec in enumerate(records):
        if rec.get("messages") is None:
            continue
        try:
            ids, mask = dialogue_ids(tokenizer, rec["messages"])
        except DropExample as d:
            report.add(d.reason)
            continue
        if not any(mask):
            report.add("empty_response")
            continue
        built[i] = (ids, mask)
    keep = []
    for i in sorted(built):
        if len(built[i][0]) > seq_len:
            report.add("too_long")
        else:
            keep.append(i)
    report.kept = len(keep)
    input_ids, attention_mask = _pad([built[i][0] for i in keep], seq_len, pad)
    if prompt_loss:
        loss_mask = attention_mask.astype(np.float32)
    else:
        loss_mask = _pad([built[i][1] for i in keep], seq_len, 0)[0].astype(np.float32)
    arrays = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "example_id": _example_ids(records, keep),
    }
    return TokenizedDataset(arrays, report)


# ----------------------------------------------------------------------------- rankings (reward model)


def tokenize_rankings(
    records: Sequence[dict],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_len: int,
    max_response_len: int,
    max_k: int | None = None,
) -> TokenizedDataset:
    """Tokenises ranked groups: all K responses of one prompt form one example.

    Each sequence is ``prompt + encode(response) + [eos]``, right-padded to
    ``L = max_prompt_len + max_response_len``. A prompt longer than ``max_prompt_len``
    drops the group (``prompt_too_long``); a response (with its EOS) longer than
    ``max_response_len`` is dropped (note ``response_too_long``) and the group with it
    if fewer than 2 responses with an ordered pair remain
    (``too_few_responses_after_length``). Responses identical after tokenisation keep
    their best-ranked copy (note ``duplicate_response``; the group is dropped as
    ``duplicate_responses_only`` if no ordered pair remains). Groups with more than
    ``max_k`` responses are dropped (``too_many_responses``), never truncated.

    Args:
      records: ranking records (``prompt`` or ``messages``, ``responses``, ``ranks``).
      tokenizer: a tokenizer with distinct pad and EOS ids.
      max_prompt_len: P, the longest prompt kept.
      max_response_len: R, the longest response kept (EOS included).
      max_k: slots per group; None = the largest K in the data.

    Returns:
      TokenizedDataset with ``input_ids`` [N, K, L] int32, ``attention_mask`` [N, K, L]
      int32, ``ranks`` [N, K] int32 (0 = best; -1 in padded slots), ``valid`` [N, K] bool
      (padded slots are False, all pad, attention 0), ``end_index`` [N, K] int32 (the EOS
      position = last real token, where the reward is read; 0 in padded slots),
      ``prompt_len`` [N] int32, ``example_id`` [N] int64.
    """
    _positive(max_prompt_len=max_prompt_len, max_response_len=max_response_len, max_k=max_k)
    if max_k is not None and max_k < 2:
        raise ValueError(f"max_k must be >= 2 (a ranking needs two responses), got {max_k}")
    pad, eos = special_ids(tokenizer)
    report = SkipReport(total_rows=len(records))
    prompts = prompt_ids(tokenizer, records)
    flat = encode(tokenizer, [r for rec in records for r in rec["responses"]])
    groups: list[tuple[int, list[int], list[tuple[int, ...]], list[int]]] = []
    offset = 0
    for i, (rec, p) in enumerate(zip(records, prompts)):
        resp_ids, offset = flat[offset : offset + len(rec["responses"])], offset + len(rec["responses"])
        if isinstance(p, str):
            report.add(p)
            continue
        if len(p) > max_prompt_len:
            report.add("prompt_too_long")
            continue
        seqs, ranks = [], []
        for r, k in zip(resp_ids, rec["ranks"]):
            if len(r) + 1 > max_response_len:
                report.add("response_too_long")
            else:
                seqs.append(tuple(r) + (eos,))
                ranks.append(int(k))
        if len(seqs) < 2 or len(set(ranks)) < 2:
            report.add("too_few_responses_after_length")
            continue
        try:
            seqs, ranks, n_dup = check_group(seqs, ranks)
        except RowError as e:
            report.add(e.reason)
            continue
        if max_k is not None and len(seqs) > max_k:
            report.add("too_many_responses")
            continue
        report.add("duplicate_response", n_dup)
        groups.append((i, p, seqs, ranks))
    report.kept = len(groups)
    n, length = len(groups), max_prompt_len + max_response_len
    k_max = max_k or max((len(g[2]) for g in groups), default=2)
    input_ids = np.full((n, k_max, length), pad, dtype=np.int32)
    attention_mask = np.zeros((n, k_max, length), dtype=np.int32)
    ranks_arr = np.full((n, k_max), -1, dtype=np.int32)
    valid = np.zeros((n, k_max), dtype=bool)
    end_index = np.zeros((n, k_max), dtype=np.int32)
    prompt_len = np.zeros((n,), dtype=np.int32)
    for b, (_, p, seqs, ranks) in enumerate(groups):
        prompt_len[b] = len(p)
        for j, (s, k) in enumerate(zip(seqs, ranks)):
            t = len(p) + len(s)
            input_ids[b, j, :t] = p + list(s)
            attention_mask[b, j, :t] = 1
            ranks_arr[b, j], valid[b, j], end_index[b, j] = k, True, t - 1
    arrays = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "ranks": ranks_arr,
        "valid": valid,
        "end_index": end_index,
        "prompt_len": prompt_len,
        "example_id": _example_ids(records, [g[0] for g in groups]),
    }
    return TokenizedDataset(arrays, report)


# ----------------------------------------------------------------------------- prompts (PPO rollouts)


def tokenize_prompts(
    records: Sequence[dict], tokenizer: PreTrainedTokenizerBase, *, max_prompt_len: int
) -> TokenizedDataset:
    """Tokenises prompts LEFT-padded for generation.

    String prompts are ``[bos]? + encode(prompt)``; dialogue prompts are rendered with
    ``add_generation_prompt=True``. Prompts longer than ``max_prompt_len`` are dropped
    (``prompt_too_long``), empty ones too (``empty_prompt``).

    Args:
      records: prompt records.
      tokenizer: a tokenizer with distinct pad and EOS ids.
      max_prompt_len: P.

    Returns:
      TokenizedDataset with ``input_ids`` [N, P] int32 (pad on the left),
      ``attention_mask`` [N, P] int32, ``example_id`` [N] int64.
    """
    _positive(max_prompt_len=max_prompt_len)
    pad, _ = special_ids(tokenizer)
    report = SkipReport(total_rows=len(records))
    keep, seqs = [], []
    for i, p in enumerate(prompt_ids(tokenizer, records)):
        if isinstance(p, str):
            report.add(p)
        elif not p:
            report.add("empty_prompt")
        elif len(p) > max_prompt_len:
            report.add("prompt_too_long")
        else:
            keep.append(i)
            seqs.append(p)
    report.kept = len(keep)
    input_ids, attention_mask = _pad(seqs, max_prompt_len, pad, left=True)
    arrays = {"input_ids": input_ids, "attention_mask": attention_mask, "example_id": _example_ids(records, keep)}
    return TokenizedDataset(arrays, report)
