"""Host-side data: loading, validation, tokenisation, splits and batch iteration.

numpy only; nothing here is traced by jax. The pipeline is::

    records, report = load_records("demos.jsonl", "demonstrations", on_error="skip")
    report.check_ceiling(0.01)
    train, val, test = split_by_user(records)
    ds = tokenize_demonstrations(train, tokenizer, seq_len=512)
    batches = BatchIterator(ds.arrays, batch_size=64, seed=0)

``load_split_tokenize(source, kind, run_cfg, tokenize)`` does all of it for the stage drivers.
"""

from rlhf_jax.data.buckets import bucket_length, pack_batch, pack_ranking_slots, trim_batch
from rlhf_jax.data.encoding import check_vocab
from rlhf_jax.data.iterators import BatchIterator
from rlhf_jax.data.loading import load_split_tokenize
from rlhf_jax.data.records import KINDS, NOTE_REASONS, DataError, SkipReport, load_records
from rlhf_jax.data.splits import cap_per_user, dedup_by_prefix, prompt_text, split_by_user
from rlhf_jax.data.tokenize import (
    TokenizedDataset,
    tokenize_demonstrations,
    tokenize_prompts,
    tokenize_rankings,
    tokenize_text,
)

__all__ = [
    "KINDS",
    "NOTE_REASONS",
    "BatchIterator",
    "DataError",
    "SkipReport",
    "TokenizedDataset",
    "bucket_length",
    "pack_batch",
    "pack_ranking_slots",
    "cap_per_user",
    "check_vocab",
    "dedup_by_prefix",
    "load_records",
    "load_split_tokenize",
    "prompt_text",
    "split_by_user",
    "tokenize_demonstrations",
    "tokenize_prompts",
    "tokenize_rankings",
    "tokenize_text",
    "trim_batch",
]
