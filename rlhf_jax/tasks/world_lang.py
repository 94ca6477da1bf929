"""The small language of the built-in world: its words, instruction families and plain text.

Every word is lower-case ASCII without spaces, so a whitespace word-level tokenizer maps
each word to exactly one token. Prompts are at most 12 words and end with ``.`` or
``?`` (the only place those marks occur in a prompt), so the boundary between a plain
prompt and its response is visible even without a chat template. Answers are at most
6 words and never contain a :data:`FILLER` word.

Families (the payload is 3-5 words unless stated):

* ``reverse``: the nouns in reverse order.   ``reverse : cat fig box .`` -> ``box fig cat``
* ``sort``: the digits in ascending order.   ``please sort 7 2 5 .`` -> ``2 5 7``
* ``repeat``: a noun N = 2..5 times.         ``repeat owl 3 times .`` -> ``owl owl owl``
* ``replace``: one noun swapped for another (3-4 nouns).
  ``can you replace cat with hen in cat dog cat ?`` -> ``hen dog hen``
* ``count``: the number of nouns (2-6), one digit.  ``how many words in cat fig ?`` -> ``2``

>>> correct_answer("can you replace cat with hen in cat dog cat ?")
'hen dog hen'
>>> correct_answer("please sort 7 2 5 .")
'2 5 7'
"""

from __future__ import annotations

import numpy as np

ANIMALS = ("cat", "dog", "fox", "owl", "bee", "ant", "cow", "pig", "hen", "yak", "elk", "bat")
FRUITS = ("fig", "kiwi", "lime", "pear", "plum", "apple", "mango", "grape", "lemon", "melon")
THINGS = ("box", "cup", "hat", "key", "pen", "map", "bag", "jar")
#: Noun groups; each simulated user favours some groups over others.
NOUN_GROUPS = {"animals": ANIMALS, "fruits": FRUITS, "things": THINGS}
NOUNS = ANIMALS + FRUITS + THINGS
DIGITS = tuple(str(d) for d in range(10))
COLORS = ("red", "blue", "green", "pink", "gray", "gold")
#: Words of plain sentences in the pretraining corpus.
GRAMMAR = (
    "the",
    "a",
    "big",
    "small",
    "sees",
    "likes",
    "has",
    "eats",
    "see",
    "and",
    "near",
    "is",
    "it",
    "this",
    "here",
    "can",
    "you",
    "please",
    ".",
    "?",
)
#: Words that only occur in instructions.
INSTRUCTION = ("reverse", "sort", "repeat", "times", "replace", "with", "in", "count", "how", "many", "words", ":")
#: Phrases a verbose labeler (or model) puts before / after the answer.
FILLER_PREFIXES = ("sure , here it is :", "ok :", "the answer is", "here it is :", "sure :", "ok , the answer is")
FILLER_SUFFIXES = ("done .", "hope this helps", "ok ?", ".", "that is it .")
#: Words that carry no answer content; none of them occurs in a correct answer.
FILLER = frozenset(w for p in FILLER_PREFIXES + FILLER_SUFFIXES for w in p.split())

FAMILIES = ("reverse", "sort", "repeat", "replace", "count")
STYLES = ("terse", "polite", "question")
#: Prompt templates by family and user style: {xs} a word list, {w} {n} {a} {b} single words.
TEMPLATES = {
    "reverse": {"terse": "reverse : {xs} .", "polite": "please reverse {xs} .", "question": "can you reverse {xs} ?"},
    "sort": {"terse": "sort : {xs} .", "polite": "please sort {xs} .", "question": "can you sort {xs} ?"},
    "repeat": {
        "terse": "repeat {w} {n} times .",
        "polite": "please repeat {w} {n} times .",
        "question": "can you repeat {w} {n} times ?",
    },
    "replace": {
        "terse": "replace {a} with {b} : {xs} .",
        "polite": "please replace {a} with {b} in {xs} .",
        "question": "can you replace {a} with {b} in {xs} ?",
    },
    "count": {"terse": "count : {xs} .", "polite": "please count {xs} .", "question": "how many words in {xs} ?"},
}


def all_words() -> list[str]:
    """Every word of the language (nouns, digits, colours, grammar, instruction and filler words), sorted."""
    return sorted(set(NOUNS + DIGITS + COLORS + GRAMMAR + INSTRUCTION) | FILLER)


# ----------------------------------------------------------------------------- prompts and answers


def _nouns(rng: np.random.Generator, group_probs: np.ndarray, n: int, *, distinct: bool = True) -> list[str]:
    """n nouns; each drawn from a group picked by ``group_probs`` (distinct words if asked)."""
    groups = list(NOUN_GROUPS.values())
    out: list[str] = []
    while len(out) < n:
        group = groups[int(rng.choice(len(groups), p=group_probs))]
        w = group[int(rng.integers(len(group)))]
        if not (distinct and w in out):
            out.append(w)
    return out


def make_prompt(
    family: str, style: str, rng: np.random.Generator, group_probs: np.ndarray, list_len: tuple[int, int] = (3, 5)
) -> str:
    """One prompt of ``family`` phrased in ``style``; nouns drawn with the user's ``group_probs``.

    Args:
      family: one of :data:`FAMILIES`.
      style: one of :data:`STYLES`.
      rng: the random stream.
      group_probs: [len(NOUN_GROUPS)] probabilities of the noun groups.
      list_len: inclusive (min, max) length of a word or digit list (replace caps it at 4).
    """
    lo, hi = list_len
    n = int(rng.integers(lo, hi + 1))
    tpl = TEMPLATES[family][style]
    if family == "reverse":
        return tpl.format(xs=" ".join(_nouns(rng, group_probs, n)))
    if family == "sort":
        return tpl.format(xs=" ".join(str(int(d)) for d in rng.integers(0, 10, n)))
    if family == "repeat":
        return tpl.format(w=_nouns(rng, group_probs, 1)[0], n=int(rng.integers(2, 6)))
    if family == "replace":
        n = min(n, 4)
        a, b, *others = _nouns(rng, group_probs, n + 1)
        k = int(rng.integers(1, min(2, n - 1) + 1))  # a occurs 1 or 2 times
        xs = [a] * k + others[: n - k]
        xs = [xs[i] for i in rng.permutation(n)]
        return tpl.format(a=a, b=b, xs=" ".join(xs))
    if family == "count":
        return tpl.format(xs=" ".join(_nouns(rng, group_probs, int(rng.integers(2, 7)), distinct=False)))
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def family_of(prompt: str) -> str:
    """The instruction family of a prompt of this world (ValueError if it is none)."""
    words = prompt.split()
    for family, key in (
        ("reverse", "reverse"),
        ("sort", "sort"),
        ("repeat", "repeat"),
        ("replace", "replace"),
        ("count", "count"),
        ("count", "many"),
    ):
        if key in words:
            return family
    raise ValueError(f"not a prompt of this world: {prompt!r}")


def _payload(words: list[str], after: str) -> list[str]:
    """The words after keyword ``after`` (and an optional ':'), without the closing mark."""
    rest = words[words.index(after) + 1 :]
    if rest and rest[0] == ":":
        rest = rest[1:]
    if rest and rest[-1] in (".", "?"):
        rest = rest[:-1]
    return rest


def answer_words(prompt: str) -> list[str]:
    """The correct answer of a prompt as a list of words."""
    words = prompt.split()
    family = family_of(prompt)
    if family == "reverse":
        return _payload(words, "reverse")[::-1]
    if family == "sort":
        return sorted(_payload(words, "sort"), key=int)
    if family == "repeat":
        w, n = _payload(words, "repeat")[:2]
        return [w] * int(n)
    if family == "replace":
        i = words.index("replace")
        a, b = words[i + 1], words[i + 3]
        xs = words[i + 5 : -1]  # after ':' or 'in', before the closing mark
        return [b if x == a else x for x in xs]
    xs = _payload(words, "count") if "count" in words else _payload(words, "in")
    return [str(len(xs))]


def correct_answer(prompt: str) -> str:
    """The checkable correct answer of a prompt of this world, words joined by single spaces."""
    return " ".join(answer_words(prompt))


# ----------------------------------------------------------------------------- pretraining text


def _sentence(rng: np.random.Generator) -> list[str]:
    """One segment of plain text: a sentence, a list, a digit run or a repetition."""

    def pick(xs):
        return xs[int(rng.integers(len(xs)))]

    kind = int(rng.integers(10))
    if kind == 0:
        return [
            "the",
            pick(COLORS + ("big", "small")),
            pick(ANIMALS),
            pick(("sees", "likes", "has", "eats")),
            pick(("the", "a")),
            pick(NOUNS),
            ".",
        ]
    if kind == 1:
        return ["the", pick(ANIMALS), "has", pick(DIGITS[2:]), pick(FRUITS), "and", "a", pick(THINGS), "."]
    if kind == 2:
        return pick(
            (
                ["here", "is", "the", pick(NOUNS)],
                ["it", "is", pick(COLORS)],
                ["this", pick(NOUNS), "is", pick(COLORS)],
                ["the", pick(NOUNS), "is", "near", "the", pick(NOUNS)],
                ["ok", ",", "the", pick(ANIMALS), "is", "here"],
                ["sure", ",", "the", pick(FRUITS), "is", pick(COLORS)],
                ["hope", "this", pick(ANIMALS), "likes", "it"],
                ["that", "is", "it"],
            )
        ) + ["."]
    if kind == 3:
        return pick((["can", "you", "see", "the", pick(NOUNS), "?"], ["please", "see", "the", pick(NOUNS), "."]))
    if kind in (4, 5):  # a word list, sometimes with 'and'
        n = int(rng.integers(2, 7))
        xs = [pick(NOUNS) for _ in range(n)]
        return xs + (["and", pick(NOUNS)] if rng.random() < 0.3 else []) + ["."]
    if kind == 6:  # sorted digits
        return sorted((pick(DIGITS) for _ in range(int(rng.integers(2, 7)))), key=int) + ["."]
    if kind == 7:  # a counting run
        start = int(rng.integers(0, 7))
        return [str(d) for d in range(start, min(10, start + int(rng.integers(3, 7))))] + ["."]
    if kind == 8:  # a repetition
        return [pick(NOUNS)] * int(rng.integers(2, 6)) + ["."]
    return [pick(DIGITS) for _ in range(int(rng.integers(2, 6)))] + ["."]


def corpus_doc(rng: np.random.Generator, max_words: int = 40) -> str:
    """One pretraining document: 2-5 segments of plain text, at most ``max_words`` words."""
    words: list[str] = []
    for _ in range(int(rng.integers(2, 6))):
        seg = _sentence(rng)
        if words and len(words) + len(seg) > max_words:
            break
        words += seg
    return " ".join(words[:max_words])
