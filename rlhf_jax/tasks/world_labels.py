"""Labelers of the built-in world: their error model, the hidden gold preference, noisy rankings.

The gold preference of a response ``y`` to a prompt ``x`` (higher is better)::

    gold(x, y) = 2 * correctness - 1                       # in [-1, 1]
                 - filler_penalty * min(#filler words, filler_cap)   # concise answers
                 - bad_end_penalty   if filler words follow the answer   # ends properly
                 - no_eos_penalty    if the response was cut (no EOS)

``correctness`` is partial credit: ``1 - edit_distance(content, answer) / max(len)`` on
words, where ``content`` is the response without filler words (for ``count``, a single
digit off by d earns ``1 - d / 2``). Labelers see the gold score through Thurstone noise:
each distinct response gets ``correctness part + m_l * style part + sigma * N(0, 1)``
(``m_l`` a per-labeler weight of style, log-normal around 1) and is ranked by that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rlhf_jax.tasks.world_lang import (
    DIGITS,
    FILLER,
    FILLER_PREFIXES,
    FILLER_SUFFIXES,
    NOUNS,
    all_words,
    answer_words,
    family_of,
)

#: Demonstration / sample error kinds: content errors then style errors.
CONTENT_ERRORS = ("drop", "dup", "swap", "wrong", "cut")
STYLE_ERRORS = ("prefix", "suffix")
ERROR_KINDS = CONTENT_ERRORS + STYLE_ERRORS
#: How often each kind is picked when a response has an error.
#: Half the errors are content errors, half style errors (verbose filler around the answer): the style
#: the gold preference dislikes is shown by the demonstrations, so SFT imitates it and RL can remove it.
ERROR_WEIGHTS = {"drop": 0.12, "dup": 0.1, "swap": 0.08, "wrong": 0.12, "cut": 0.08, "prefix": 0.3, "suffix": 0.2}
#: Special tokens that may appear in decoded model output; ``<eos>`` ends a response.
_EOS, _IGNORED = "<eos>", frozenset({"<pad>", "<bos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"})


@dataclass(frozen=True)
class GoldWeights:
    """The style terms of the gold preference (see the module docstring)."""

    filler_penalty: float = 0.1
    filler_cap: int = 5
    bad_end_penalty: float = 0.3
    no_eos_penalty: float = 0.5


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between two word sequences.

    >>> edit_distance("a b c".split(), "a c".split())
    1
    """
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def split_response(response: str, ended: bool | None = None) -> tuple[list[str], bool]:
    """Words of a response up to ``<eos>`` (special tokens removed) and whether it ended.

    A response that contains ``<eos>`` ended there (the rest is ignored). Otherwise it
    ended unless ``ended=False`` says it was cut at the length limit (a sample decoded
    without special tokens carries no EOS marker, so the caller says so).

    >>> split_response("owl cat <eos> <pad> <pad>")
    (['owl', 'cat'], True)
    >>> split_response("owl cat", ended=False)
    (['owl', 'cat'], False)
    """
    words = response.split()
    has_eos = _EOS in words
    if has_eos:
        words = words[: words.index(_EOS)]
    words = [w for w in words if w not in _IGNORED]
    return words, has_eos or ended is None or bool(ended)


def gold_parts(prompt: str, response: str, weights: GoldWeights, *, ended: bool | None = None) -> tuple[float, float]:
    """(correctness term ``2c - 1`` in [-1, 1], style term <= 0) of the gold preference."""
    words, did_end = split_response(response, ended)
    answer = answer_words(prompt)
    content = [w for w in words if w not in FILLER]
    if family_of(prompt) == "count" and len(content) == 1 and content[0] in DIGITS:
        c = max(0.0, 1.0 - abs(int(content[0]) - int(answer[0])) / 2.0)
    else:
        c = 1.0 - edit_distance(content, answer) / max(len(content), len(answer), 1)
    n_filler = len(words) - len(content)
    style = -weights.filler_penalty * min(n_filler, weights.filler_cap)
    if content and words[-1] in FILLER:  # filler after the last answer word: no proper end
        style -= weights.bad_end_penalty
    if not did_end:
        style -= weights.no_eos_penalty
    return 2.0 * c - 1.0, style


# ----------------------------------------------------------------------------- error model


def corrupt(answer: list[str], kind: str, rng: np.random.Generator) -> list[str]:
    """The answer with one error of ``kind`` (may return the answer unchanged if ``kind`` cannot apply)."""
    out = list(answer)
    n = len(out)
    if kind == "drop" and n > 1:
        del out[int(rng.integers(n))]
    elif kind == "dup":
        i = int(rng.integers(n))
        out.insert(i, out[i])
    elif kind == "swap" and n > 1:
        i = int(rng.integers(n - 1))
        out[i], out[i + 1] = out[i + 1], out[i]
    elif kind == "wrong":
        i = int(rng.integers(n))
        if out[i] in DIGITS:
            d = int(out[i]) + int(rng.choice((-1, 1)))
            out[i] = str(d if 0 <= d <= 9 else int(out[i]) - (d - int(out[i])))
        else:
            out[i] = str(rng.choice([w for w in NOUNS if w != out[i]]))
    elif kind == "cut" and n > 1:
        out = out[: n - int(rng.integers(1, min(2, n - 1) + 1))]
    elif kind == "prefix":
        out = str(rng.choice(FILLER_PREFIXES)).split() + out
    elif kind == "suffix":
        out = out + str(rng.choice(FILLER_SUFFIXES)).split()
    return out


def with_error(answer: list[str], rng: np.random.Generator) -> tuple[list[str], str]:
    """The answer with one random error that changes it (kind drawn by ERROR_WEIGHTS); returns (words, kind)."""
    kinds = list(ERROR_WEIGHTS)
    p = np.asarray([ERROR_WEIGHTS[k] for k in kinds])
    for _ in range(20):
        kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
        out = corrupt(answer, kind, rng)
        if out != answer and out:
            return out, kind
    return corrupt(answer, "prefix", rng), "prefix"


def word_salad(rng: np.random.Generator, max_len: int = 8) -> str:
    """A random string of 1..max_len words of the language (a degenerate sample)."""
    vocab = all_words()
    return " ".join(vocab[int(i)] for i in rng.integers(0, len(vocab), int(rng.integers(1, max_len + 1))))


# ----------------------------------------------------------------------------- noisy rankings


def labeler_style_weight(seed: int, labeler: int | None, spread: float) -> float:
    """Labeler ``labeler``'s weight on the style term: exp(spread * z), z ~ N(0, 1) fixed per (seed, labeler)."""
    if labeler is None or spread == 0.0:
        return 1.0
    z = np.random.default_rng([seed, 7, int(labeler)]).standard_normal()
    return float(np.exp(spread * z))


def thurstone_ranks(
    responses: Sequence[str], utilities: dict[str, float], sigma: float, rng: np.random.Generator
) -> list[int]:
    """Ranks (0 = best) of ``responses`` by ``utilities[r] + sigma * N(0, 1)``, one draw per distinct response.

    Identical responses share one draw and hence one rank (a tie); ranks are dense.
    """
    distinct = list(dict.fromkeys(responses))
    noisy = {r: utilities[r] + sigma * float(rng.standard_normal()) for r in distinct}
    order = sorted(distinct, key=lambda r: -noisy[r])
    rank_of = {r: i for i, r in enumerate(order)}
    return [rank_of[r] for r in responses]


def pair_agreement(responses: Sequence[str], ranks_a: Sequence[int], ranks_b: Sequence[int]) -> tuple[int, int]:
    """(agreeing pairs, compared pairs) of two rankings over pairs of distinct responses that both order."""
    agree = total = 0
    k = len(responses)
    for i in range(k):
        for j in range(i + 1, k):
            if responses[i] == responses[j] or ranks_a[i] == ranks_a[j] or ranks_b[i] == ranks_b[j]:
                continue
            total += 1
            agree += (ranks_a[i] < ranks_a[j]) == (ranks_b[i] < ranks_b[j])
    return agree, total
