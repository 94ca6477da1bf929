"""Chat instructions with an exact gold judgement, for real pretrained chat models.

Six kinds of instruction (adding two numbers, multiplying with the steps shown, capitals,
listing integers, formatting JSON, sorting numbers), each with a reference answer, three
worse answers (best first) and a programmatic gold judgement that a reward model never
sees. ``benchmarks/real_model.py`` builds its chat data from them and
``experiments/smollm2_rlhf.py`` runs InstructGPT's pipeline on them with SmolLM2::

    task = make_task(random.Random(0))
    task.instruction                      # 'What is 864 + 394?'
    gold_score(task, "864 + 394 = 1258.")  # 1.0

The gold preference of a response (higher is better, in [-0.5, 1])::

    gold = correct * (1 if concise else 0.6) - 0.5 * (the response was cut, no EOS)

``correct``: the response contains the task's key (the sum, the product with at least one
intermediate step, the capitalised phrase, the listed integers, the JSON fields with their
types, the sorted numbers), with whitespace normalised; ``concise``: at most ``2 * len(reference) + 20`` characters.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

WORDS = ("green", "river", "stone", "quiet", "apple", "winter", "silver", "paper", "cloud",
         "garden", "yellow", "window", "morning", "orange")  # fmt: skip
NAMES = ("Alice", "Bob", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana")


@dataclass(frozen=True)
class ChatTask:
    """One instruction: ``answer`` is the reference (demonstrations), ``worse`` three worse
    answers, best first; ``key`` what a correct response contains (``kind`` "json": the
    reference object, compared after parsing)."""

    kind: str
    instruction: str
    answer: str
    worse: tuple[str, ...]
    key: str


def make_task(rng: random.Random) -> ChatTask:
    """A random task of a random kind (uniform over the six)."""
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        worse = (f"{a} + {b} = {a + b + rng.choice((-10, 1, 10))}.", f"The answer is {a * b}.", "I like turtles.")
        return ChatTask("add", f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", worse, str(a + b))
    if kind == 1:
        a, b = rng.randint(12, 49), rng.randint(12, 49)
        tens, ones = b // 10 * 10, b % 10
        steps = f"{a} x {b} = {a} x {tens} + {a} x {ones} = {a * tens} + {a * ones} = {a * b}."
        worse = (f"{a} x {b} = {a * b}.", f"{a} x {b} = {a + b}.", "Multiplication is repeated addition.")
        return ChatTask("multiply", f"Multiply {a} by {b} and show the steps.", steps, worse, str(a * b))
    if kind == 2:
        phrase = " ".join(rng.sample(WORDS, rng.randint(2, 5)))
        worse = (phrase.title(), phrase, "Sure! Here is the text.")
        return ChatTask("capitals", f"Rewrite in capital letters: {phrase}", phrase.upper(), worse, phrase.upper())
    if kind == 3:
        a = rng.randint(1, 60)
        b = a + rng.randint(2, 7)
        seq = ", ".join(str(i) for i in range(a, b + 1))
        worse = (", ".join(str(i) for i in range(a, b)), " ".join(str(i) for i in range(a, b + 1)), f"{a} to {b}.")
        return ChatTask("list", f"List the integers from {a} to {b}, separated by commas.", seq, worse, seq)
    if kind == 4:
        name, age = rng.choice(NAMES), rng.randint(18, 90)
        answer = json.dumps({"name": name, "age": age})
        worse = (f'{{"name": "{name}", "age": "{age}"}}', f"name={name}, age={age}", f"{name} is {age}.")
        instruction = f"Format as JSON with the keys name and age: {name} is {age} years old."
        return ChatTask("json", instruction, answer, worse, answer)
    xs = rng.sample(range(1, 100), rng.randint(3, 6))
    listed, ordered = ", ".join(map(str, xs)), ", ".join(map(str, sorted(xs)))
    worse = (", ".join(map(str, sorted(xs, reverse=True))), listed, "They are already sorted.")
    return ChatTask("sort", f"Sort these numbers in ascending order: {listed}.", ordered, worse, ordered)


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def is_correct(task: ChatTask, response: str) -> bool:
    """The response carries the task's key: a number as a whole number (1258 is not in 12580),
    JSON as an object with exactly the reference's fields and types."""
    text = _squash(response)
    if task.kind == "json":
        for match in re.finditer(r"\{[^{}]*\}", text):
            try:
                if json.loads(match.group()) == json.loads(task.key):
                    return True
            except json.JSONDecodeError:
                continue
        return False
    if task.kind in ("add", "multiply"):
        number = re.search(rf"(?<![\d.]){task.key}(?![\d]|\.\d)", text) is not None
        return number and (task.kind == "add" or text.count("=") >= 2)  # multiply: the steps shown
    return _squash(task.key) in text


def gold_score(task: ChatTask, response: str, *, ended: bool = True) -> float:
    """The gold preference (module docstring): correctness, concision, a proper end."""
    concise = len(response.strip()) <= 2 * len(task.answer) + 20
    score = float(is_correct(task, response)) * (1.0 if concise else 0.6)
    return score - (0.0 if ended else 0.5)
