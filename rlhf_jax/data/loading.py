"""One call from a data source to tokenised train / validation / test sets (host side).

``load_split_tokenize`` is what every stage driver uses: load and validate the rows
(``records.load_records``), apply InstructGPT's data hygiene where the run asks for it
(deduplicate prompts by a long common prefix, cap prompts per user), split by user id,
tokenise each part, and check the skip ceiling on each step and on the whole file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from rlhf_jax.config import RunConfig
from rlhf_jax.data.records import SkipReport, load_records
from rlhf_jax.data.splits import cap_per_user, dedup_by_prefix, split_by_user
from rlhf_jax.data.tokenize import TokenizedDataset

log = logging.getLogger(__name__)

PROMPTED_KINDS = ("demonstrations", "rankings", "prompts")  # the kinds that carry a prompt


def apply_hygiene(records: list[dict], kind: str, run_cfg: RunConfig, source: str) -> list[dict]:
    """InstructGPT's prompt hygiene, when configured: prefix dedup, then the per-user cap.

    Both are off by default (``RunConfig.dedup_prefix_chars`` / ``max_prompts_per_user``
    None); every dropped row is counted in the log, never dropped silently.
    """
    if kind not in PROMPTED_KINDS:
        return records
    if run_cfg.dedup_prefix_chars is not None:
        records, dropped = dedup_by_prefix(records, prefix_chars=run_cfg.dedup_prefix_chars)
        if dropped:
            log.warning(
                "%s: %d rows dropped: prompt shares its first %d characters with an earlier row",
                source,
                dropped,
                run_cfg.dedup_prefix_chars,
            )
    if run_cfg.max_prompts_per_user is not None:
        records, dropped = cap_per_user(records, max_per_user=run_cfg.max_prompts_per_user)
        if dropped:
            log.warning(
                "%s: %d rows dropped: more than %d prompts from one user", source, dropped, run_cfg.max_prompts_per_user
            )
    return records


def load_split_tokenize(
    source: str,
    kind: str,
    run_cfg: RunConfig,
    tokenize: Callable[[list[dict]], TokenizedDataset],
    *,
    split: bool = True,
):
    """Load a data set, split it by user id (train, val, test) and tokenise each part.

    Malformed rows raise (or are skipped and counted, ``on_error="skip"``); the skip ceiling is
    checked on the rows, each part's length drops, and both together against the file's rows.

    Returns:
      (train, val, test, parts): the TokenizedDatasets (val/test None when ``split`` is
      False or the part is empty) and the three lists of records.
    """
    records, report = load_records(source, kind, on_error=run_cfg.on_error)
    report.check_ceiling(run_cfg.max_skip_fraction)
    if report.skipped:
        log.warning("%s: %s", source, report.summary())
    records = apply_hygiene(records, kind, run_cfg, str(source))
    parts = split_by_user(records, fractions=run_cfg.split_fractions, seed=run_cfg.seed) if split else (records, [], [])
    out = []
    whole = SkipReport(dict(report.counts), total_rows=report.total_rows, source=str(source))  # + tokenising
    for part in parts:
        if not part:
            out.append(None)
            continue
        ds = tokenize(part)
        ds.report.source = ds.report.source or str(source)  # the ceiling error names the file
        ds.report.check_ceiling(run_cfg.max_skip_fraction)
        if ds.report.skipped:
            log.warning("%s (tokenised): %s", source, ds.report.summary())
        whole.absorb(ds.report)
        out.append(ds if len(ds) else None)
    whole.check_ceiling(run_cfg.max_skip_fraction)
    if out[0] is None:
        raise ValueError(f"{source}: no training example left after loading, splitting and length filtering")
    return out[0], out[1], out[2], parts
