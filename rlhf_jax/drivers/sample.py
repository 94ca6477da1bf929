"""``rlhf-jax sample``: best-of-n sampling (rejection sampling) with a reward model.

For each prompt, ``best_of`` responses are sampled from the policy and scored by the reward
model (``reward.sample_and_score``); the highest-scoring candidate is kept. The output is
demonstration JSONL, so it is SFT data as it stands (rejection-sampling fine-tuning, as in
Llama 2 / Nakano et al.'s best-of-n): ``{"prompt", "response", "score", "scores",
"eligible"}`` per prompt (a ``{"messages"}`` prompt gets ``{"messages": [..., assistant
reply], ...}``), with the prompt's ``user_id`` when it has one. ``scores`` are all n RM
scores (each read at the sample's EOS, or its last token), ``eligible`` which were candidates.

Prompts are processed in fixed-size batches (the last one filled with copies), each prompt
repeated n times, so generation compiles once. With ``require_eos`` (the default) only
responses that emitted EOS within ``max_new_tokens`` are candidates (a cut-off response
would teach the model to stop mid-sentence); an empty response never is, nor one with a
special token before its EOS (a stray BOS or chat-template token: its text would not
round-trip as demonstration data). The response text is the sampled tokens before the EOS.
A prompt without any candidate is left out and counted in the log, as are prompts too long.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from rlhf_jax import checkpoint, data
from rlhf_jax.drivers.scoring import bind_sample_and_score
from rlhf_jax.models import CausalLM

log = logging.getLogger(__name__)


def pick_best(scores: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """Index of the highest score among the eligible samples of each prompt, -1 where none is.

    Args:
      scores: [B, N] RM scores; eligible: [B, N] bool.

    >>> pick_best(np.array([[0.1, 0.9, 0.5], [1.0, 2.0, 3.0]]), np.array([[1, 0, 1], [0, 0, 0]], bool)).tolist()
    [2, -1]
    """
    masked = np.where(eligible, scores, -np.inf)
    best = np.argmax(masked, axis=1)
    return np.where(eligible.any(axis=1), best, -1)


def decode_samples(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(texts before the EOS, ended with EOS, free of special tokens) of sampled rows [M, R]."""
    special = set(tokenizer.all_special_ids)
    texts, ended, clean = [], [], []
    for row, m in zip(tokens, mask):
        real = row[m > 0].tolist()
        stop = bool(real) and real[-1] == tokenizer.eos_token_id
        body = real[:-1] if stop else real
        texts.append(tokenizer.decode(body, skip_special_tokens=False).strip())
        ended.append(stop)
        clean.append(not special.intersection(body))
    return texts, np.asarray(ended, bool), np.asarray(clean, bool)


def _output_row(record: dict, response: str, score: float, scores: list[float], eligible: list[bool]) -> dict:
    if record.get("messages") is not None:
        row = {"messages": [*record["messages"], {"role": "assistant", "content": response}]}
    else:
        row = {"prompt": record["prompt"], "response": response}
    row |= {"score": score, "scores": scores, "eligible": eligible}
    if record.get("user_id") is not None:
        row["user_id"] = record["user_id"]
    return row


def run_sample(
    policy: str,
    reward: str,
    prompts: str,
    out: str,
    *,
    best_of: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    max_prompt_len: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    require_eos: bool = True,
    on_error: str = "raise",
    progress: bool = True,
) -> Path:
    """Write the best of ``best_of`` samples per prompt to ``out`` (JSONL); returns its path.

    Args:
      policy: a run directory or HF directory with an LM head.
      reward: a reward-model run directory (its demonstration bias included).
      prompts: a prompts file (``{"prompt"}`` or ``{"messages"}`` rows).
      batch_size: prompts per generation batch (``batch_size * best_of`` sequences).
      temperature: sampling temperature (> 0; 0 would give n identical greedy samples).
    """
    if best_of < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError("sample: best_of, batch_size and max_new_tokens must be >= 1")
    if temperature <= 0:
        raise ValueError("sample: temperature must be > 0 (greedy decoding gives n identical samples)")
    model, params, tok = checkpoint.load_model(policy, head="lm")
    rm, rm_params, rm_tok = checkpoint.load_model(reward, head="scalar")
    if tok.get_vocab() != rm_tok.get_vocab():
        raise ValueError(f"--policy {policy} and --reward {reward} use different tokenizers")
    model = CausalLM(model.config.replace(dropout=0.0, remat="none"), head="lm")
    rm = CausalLM(rm.config.replace(dropout=0.0, remat="none"), head="scalar")

    records, report = data.load_records(prompts, "prompts", on_error=on_error)
    if report.skipped:
        log.warning("%s: %s", prompts, report.summary())
    ds = data.tokenize_prompts(records, tok, max_prompt_len=max_prompt_len)
    if ds.report.skipped:
        log.warning("%s (tokenised): %s", prompts, ds.report.summary())
    by_id = {r["example_id"]: r for r in records}
    ids, mask, example_ids = ds.arrays["input_ids"], ds.arrays["attention_mask"], ds.arrays["example_id"]

    sample = jax.jit(bind_sample_and_score(model, rm, max_new_tokens, temperature, tok))
    key = jax.random.key(seed)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    kept, no_candidate, best_sum, all_sum = 0, 0, 0.0, 0.0
    bar = tqdm(total=len(ds), unit="prompt", desc=f"best-of-{best_of}", disable=not progress, dynamic_ncols=True)
    with tmp.open("w") as f:
        for start in range(0, len(ds), batch_size):
            rows = np.arange(start, start + batch_size)
            rows[rows >= len(ds)] = start  # fill the last batch with copies: one compiled shape
            n = min(batch_size, len(ds) - start)
            rep_ids = np.repeat(ids[rows], best_of, axis=0)  # [bs * N, P]: prompt b's samples are rows b*N .. b*N+N-1
            rep_mask = np.repeat(mask[rows], best_of, axis=0)
            gen, scores = sample(
                params, rm_params, jnp.asarray(rep_ids), jnp.asarray(rep_mask), jax.random.fold_in(key, start)
            )
            flat_texts, ended, clean = decode_samples(
                tok, np.asarray(gen.tokens)[: n * best_of], np.asarray(gen.mask)[: n * best_of]
            )
            texts = [flat_texts[b * best_of : (b + 1) * best_of] for b in range(n)]  # [n][N]
            scores = np.asarray(scores, np.float64).reshape(batch_size, best_of)[:n]  # [n, N]
            nonempty = np.array([[bool(t) for t in row] for row in texts]).reshape(n, best_of)
            eligible = nonempty & clean.reshape(n, best_of) & (ended.reshape(n, best_of) | (not require_eos))
            best = pick_best(scores, eligible)
            for b in range(n):
                all_sum += float(scores[b].mean())
                if best[b] < 0:
                    no_candidate += 1
                    continue
                rec = by_id[int(example_ids[start + b])]
                row = _output_row(
                    rec, texts[b][best[b]], float(scores[b, best[b]]), scores[b].tolist(), eligible[b].tolist()
                )
                f.write(json.dumps(row) + "\n")
                kept += 1
                best_sum += float(scores[b, best[b]])
            bar.update(n)
    bar.close()
    os.replace(tmp, out_path)  # a killed run never leaves a partial file under the final name
    if no_candidate:
        log.warning(
            "sample: %d of %d prompts left out: no sample %s",
            no_candidate,
            len(ds),
            "was a candidate (non-empty, no special token" + (", ended with EOS)" if require_eos else ")"),
        )
    log.info(
        "sample: wrote %d responses to %s; mean RM score of the kept best-of-%d %.4f, of all samples %.4f",
        kept,
        out_path,
        best_of,
        best_sum / max(kept, 1),
        all_sum / max(len(ds), 1),
    )
    return out_path
