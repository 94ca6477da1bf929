"""Evaluation on the built-in task: sampling many prompts, held-out LM loss, gold win rates."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import checkpoint, data
from rlhf_jax.models import CausalLM
from rlhf_jax.sampling import generate
from rlhf_jax.sft import lm_objective


def sample_responses(
    model: CausalLM,
    params: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    key: jax.Array,
    max_prompt_len: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 64,
) -> list[str]:
    """One response per prompt, decoded with its ``<eos>`` when one was emitted
    (:func:`sample_with_tokens`' ``texts``)."""
    return sample_with_tokens(
        model,
        params,
        tokenizer,
        prompts,
        key=key,
        max_prompt_len=max_prompt_len,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
    )["texts"]


def sample_with_tokens(
    model: CausalLM,
    params: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    key: jax.Array,
    max_prompt_len: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 64,
) -> dict:
    """One response per prompt, with its tokens.

    A prompt is a string, or a dialogue (a list of ``{"role", "content"}`` messages) that the
    tokenizer's chat template renders with the generation prompt. Prompts are batched at a fixed ``batch_size`` (the last batch is padded with copies),
    so generation compiles once. Prompts longer than ``max_prompt_len`` raise.

    Returns:
      ``texts``: the responses, with ``<eos>`` when one was emitted; ``seq`` / ``mask``
      [N, P + R]: the left-padded prompt followed by the response; ``P``: the prompt width.
    """
    records = [
        {"prompt": p} if isinstance(p, str) else {"messages": list(p)}  # a dialogue: the chat template's prompt
        for p in prompts
    ]
    records = [r | {"example_id": i, "user_id": None} for i, r in enumerate(records)]
    ds = data.tokenize_prompts(records, tokenizer, max_prompt_len=max_prompt_len)
    if len(ds) != len(prompts):
        raise ValueError(f"{len(prompts) - len(ds)} prompts do not fit max_prompt_len={max_prompt_len}")
    ids, mask = ds.arrays["input_ids"], ds.arrays["attention_mask"]
    texts: list[str] = []
    seqs, masks = [], []
    for start in range(0, len(ids), batch_size):
        chunk_ids, chunk_mask = ids[start : start + batch_size], mask[start : start + batch_size]
        n = len(chunk_ids)
        if n < batch_size:  # pad the batch with copies of its first row: one compiled shape
            chunk_ids = np.concatenate([chunk_ids, np.repeat(chunk_ids[:1], batch_size - n, 0)])
            chunk_mask = np.concatenate([chunk_mask, np.repeat(chunk_mask[:1], batch_size - n, 0)])
        gen = generate(
            model,
            params,
            jnp.asarray(chunk_ids),
            jnp.asarray(chunk_mask),
            jax.random.fold_in(key, start),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        tokens, gmask = np.asarray(gen.tokens)[:n], np.asarray(gen.mask)[:n]
        texts += [tokenizer.decode(row[m > 0].tolist(), skip_special_tokens=False) for row, m in zip(tokens, gmask)]
        seqs.append(np.concatenate([chunk_ids[:n], tokens], axis=1))
        masks.append(np.concatenate([chunk_mask[:n].astype(np.int32), gmask.astype(np.int32)], axis=1))
    return {"texts": texts, "seq": np.concatenate(seqs), "mask": np.concatenate(masks), "P": ids.shape[1]}


def strip_eos(response: str, eos_token: str) -> tuple[str, bool]:
    """(the response text before its EOS, whether it had one): the format ranking records use."""
    words = response.split()
    if eos_token in words:
        return " ".join(words[: words.index(eos_token)]), True
    return " ".join(words), False


def sample_groups(
    policy, params, tok, texts: list[str], ks, seed: int, *, max_new_tokens: int
) -> tuple[list[list[str]], list[list[bool]], list[int]]:
    """K samples per prompt (``ks[i]`` for prompt i, temperature 1) as (response texts without
    EOS, whether each ended with EOS, the indices of the prompts kept: those with >= 2 texts)."""
    groups: list[list[str]] = [[] for _ in texts]
    ended: list[list[bool]] = [[] for _ in texts]
    for j in range(int(max(ks))):
        outs = sample_responses(
            policy,
            params,
            tok,
            texts,
            key=jax.random.key(seed + j),
            max_prompt_len=32,
            max_new_tokens=max_new_tokens,
        )
        for g, e, k, o in zip(groups, ended, ks, outs):
            text, has_eos = strip_eos(o, tok.eos_token)
            if len(g) < k and text:
                g.append(text)
                e.append(has_eos)
    keep = [i for i, g in enumerate(groups) if len(g) >= 2]
    return [groups[i] for i in keep], [ended[i] for i in keep], keep


def ranked_samples(
    world,
    model: CausalLM,
    params: Any,
    tokenizer: Any,
    records: Sequence[dict],
    ks,
    *,
    sample_seed: int,
    label_seed: int,
    max_new_tokens: int,
) -> list[dict]:
    """Ranking records of ``ks[i]`` samples (temperature 1) per prompt record (``{"prompt",
    "user_id"}``), ranked by ``world``'s simulated labelers; prompts with < 2 texts are dropped."""
    texts = [r["prompt"] for r in records]
    groups, ended, keep = sample_groups(model, params, tokenizer, texts, ks, sample_seed, max_new_tokens=max_new_tokens)
    return world.rankings(
        [texts[i] for i in keep], groups, [records[i].get("user_id") for i in keep], seed=label_seed, ended=ended
    )


_JITTED: dict = {}


def _jitted(key: tuple, build: Callable[[], Callable]) -> Callable:
    """``jax.jit(build())``, compiled once per ``key`` (a model and the static shapes it closes
    over: the evaluation judges many checkpoints of one model)."""
    try:
        hash(key)
    except TypeError:  # an unhashable model: no reuse
        return jax.jit(build())
    if key not in _JITTED:
        _JITTED[key] = jax.jit(build())
    return _JITTED[key]


def heldout_lm_loss(model: CausalLM, params: Any, dataset: Any, *, batch_size: int = 32) -> float:
    """Token-weighted next-token loss of ``model`` on a tokenised text set (the alignment tax)."""

    def build():
        def batch_loss(p, ids, attn, loss_mask):
            loss, m = lm_objective(model, p, {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask})
            return loss * m["num_tokens"], m["num_tokens"]

        return batch_loss

    batch_loss = _jitted(("heldout_lm_loss", model), build)

    a = dataset.arrays
    total = tokens = 0.0
    n = (len(dataset) // batch_size) * batch_size or len(dataset)
    for i in range(0, n, batch_size):
        s, t = batch_loss(
            params,
            a["input_ids"][i : i + batch_size],
            a["attention_mask"][i : i + batch_size],
            a["loss_mask"][i : i + batch_size],
        )
        total, tokens = total + float(s), tokens + float(t)
    return total / max(tokens, 1.0)


def win_outcomes(gold_a: np.ndarray, gold_b: np.ndarray) -> np.ndarray:
    """Per prompt: 1 where ``a``'s gold score is higher, 0.5 on a tie, 0 otherwise.

    >>> win_outcomes(np.array([1.0, 0.0, -1.0]), np.array([0.0, 0.0, 0.5])).tolist()
    [1.0, 0.5, 0.0]
    """
    gold_a, gold_b = np.asarray(gold_a), np.asarray(gold_b)
    return np.where(gold_a > gold_b, 1.0, np.where(gold_a == gold_b, 0.5, 0.0))


def win_rate(gold: Callable[[str, str], float], prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> float:
    """Fraction of prompts on which the gold preference scores ``a`` above ``b`` (ties count half)."""
    if not prompts:
        return 0.0
    ga = [gold(p, x) for p, x in zip(prompts, a)]
    gb = [gold(p, y) for p, y in zip(prompts, b)]
    return float(win_outcomes(np.asarray(ga), np.asarray(gb)).mean())


def bootstrap_ci(
    values: np.ndarray,
    *,
    resamples: int,
    seed: int,
    level: float = 0.95,
    weights: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (prompts resampled with replacement).

    With ``weights`` the statistic is the weighted mean ``sum(w v) / sum(w)`` of each resample
    (e.g. a pair accuracy: per-prompt accuracies weighted by their pair counts).

    >>> bootstrap_ci(np.ones(10), resamples=50, seed=0)
    (1.0, 1.0)
    """
    values = np.asarray(values, np.float64)
    w = np.ones_like(values) if weights is None else np.asarray(weights, np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), (resamples, len(values)))
    means = (values[idx] * w[idx]).sum(axis=1) / np.maximum(w[idx].sum(axis=1), 1e-12)
    lo, hi = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def response_logps(model, params, seq: np.ndarray, mask: np.ndarray, prompt_len: int, batch_size: int = 64):
    """Summed log-probs (temperature 1) of each row's response tokens -> [N] (PPO's scoring pass);
    ``seq`` / ``mask`` / ``prompt_len`` as :func:`sample_with_tokens` returns them."""
    from rlhf_jax.ppo import response_forward

    def build():
        def f(p, s, m):
            lp = response_forward(model, p, s, m, prompt_len).logprobs  # [B, R]
            return jnp.sum(lp * m[:, prompt_len:], axis=1)

        return f

    f = _jitted(("response_logps", model, prompt_len), build)

    out = []
    for i in range(0, len(seq), batch_size):
        s, m = seq[i : i + batch_size], mask[i : i + batch_size]
        n = len(s)
        if n < batch_size:
            s = np.concatenate([s, np.repeat(s[:1], batch_size - n, 0)])
            m = np.concatenate([m, np.repeat(m[:1], batch_size - n, 0)])
        out.append(np.asarray(f(params, jnp.asarray(s), jnp.asarray(m)))[:n])
    return np.concatenate(out).astype(np.float64)


def rm_group_accuracy(rm: CausalLM, params: Any, records: list[dict], tokenizer: Any, **lengths) -> dict:
    """The reward model's pair accuracy on ranking records, per group and in all, through the
    same tokenisation and scores as training (``lengths``: ``max_prompt_len``,
    ``max_response_len`` of ``data.tokenize_rankings``).

    ``params`` a tuple of trees of ``rm``: an ensemble, ordered by its members' mean score.

    Returns ``accuracy`` (pair weighted, as the training metric), and per kept group
    ``group_accuracy`` [G] and ``group_pairs`` [G] (for a bootstrap over prompts).
    """
    from rlhf_jax import losses, reward

    members = tuple(params) if isinstance(params, tuple) else (params,)
    recs = [{**r, "example_id": i} for i, r in enumerate(records)]
    ds = data.tokenize_rankings(recs, tokenizer, **lengths)
    batch = {k: ds.arrays[k] for k in ("input_ids", "attention_mask", "ranks", "valid", "end_index")}

    def build():
        def one_group(ps, row):  # row: one group, [1, K, ...]
            scores = sum(reward.ranking_rewards(rm, p, row) for p in ps) / len(ps)  # [1, K]
            m = losses.k_way_ranking_loss(scores, row["ranks"], row["valid"])[1]
            return m["accuracy"], m["num_pairs"]

        def per_group(ps, b):  # each group alone: [G] accuracy and pair count
            return jax.vmap(lambda row: one_group(ps, jax.tree.map(lambda x: x[None], row)))(b)

        return per_group

    per_group = _jitted(("rm_group_accuracy", rm, len(members)), build)

    acc, pairs = (np.asarray(x, np.float64) for x in per_group(members, batch))
    keep = pairs > 0
    acc, pairs = acc[keep], pairs[keep]
    return {
        "accuracy": float((acc * pairs).sum() / max(pairs.sum(), 1.0)),
        "group_accuracy": acc.tolist(),
        "group_pairs": pairs.tolist(),
    }


def checkpoint_params(run_dir: str | Path) -> Iterator[tuple[int, Any]]:
    """(step, deployable params) of every kept checkpoint of a run, oldest first (a PPO run:
    its EMA policy, as ``checkpoint.load_model`` reads the latest)."""
    info = checkpoint.read_model_info(run_dir)
    ckpt = checkpoint.Checkpointer(Path(run_dir) / "checkpoints", keep_last=10**6)
    try:
        for step in ckpt.all_steps():
            params, _ = ckpt.restore_raw(step)
            for key in info["params_path"]:
                params = params[key]
            yield step, jax.tree.map(jnp.asarray, params)
    finally:
        ckpt.close()


def tax_at_matched_kl(a: list[dict], b: list[dict]) -> dict | None:
    """Held-out loss of two trajectories (points ``{"kl", "heldout_loss"}``, e.g. from SFT at KL
    0) at the largest KL both reach, by linear interpolation in KL over the points sorted by KL
    (a trajectory whose points all lie above that KL gives its lowest point's loss):
    ``{"kl", "a", "b"}``, or None when they share no KL > 0."""
    kl = min(max(p["kl"] for p in a), max(p["kl"] for p in b))
    if kl <= 0:
        return None

    def at(points: list[dict]) -> float:
        pts = sorted((p["kl"], p["heldout_loss"]) for p in points)
        return float(np.interp(kl, [x for x, _ in pts], [y for _, y in pts]))

    return {"kl": float(kl), "a": at(a), "b": at(b)}
