"""Convert public RLHF data sets into rlhf_jax's JSONL formats (run once, on a machine online).

    python experiments/prepare_data.py tldr data/tldr     # trl-lib/tldr + trl-lib/tldr-preference
    python experiments/prepare_data.py hh   data/hh       # Anthropic/hh-rlhf (dialogues)

Writes demonstrations.jsonl, rankings.jsonl, prompts.jsonl and (for ptx) text.jsonl in the
formats of the README ("Data formats"). Nothing here runs in CI or the tests: the hub is
not reachable there. Column names are those the data sets' cards document; if a data set
changes them, the converter fails with the missing column's name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _write(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def prepare_tldr(out: Path) -> None:
    from datasets import load_dataset

    sft = load_dataset("trl-lib/tldr", split="train")  # columns: prompt, completion
    pref = load_dataset("trl-lib/tldr-preference", split="train")  # columns: prompt, chosen, rejected
    print(
        "demonstrations",
        _write(
            out / "demonstrations.jsonl", ({"prompt": r["prompt"], "response": r["completion"].strip()} for r in sft)
        ),
    )
    print(
        "rankings",
        _write(
            out / "rankings.jsonl",
            ({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in pref),
        ),
    )
    print("prompts", _write(out / "prompts.jsonl", ({"prompt": r["prompt"]} for r in sft)))
    print("text", _write(out / "text.jsonl", ({"text": r["prompt"] + r["completion"]} for r in sft)))


def _split_hh(text: str) -> list[dict]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> chat messages."""
    messages = []
    for chunk in text.split("\n\nHuman: ")[1:]:
        human, _, assistant = chunk.partition("\n\nAssistant: ")
        messages.append({"role": "user", "content": human.strip()})
        if assistant.strip():
            messages.append({"role": "assistant", "content": assistant.strip()})
    return messages


def prepare_hh(out: Path) -> None:
    from datasets import load_dataset

    ds = load_dataset("Anthropic/hh-rlhf", split="train")  # columns: chosen, rejected (whole dialogues)
    demos, ranks, prompts = [], [], []
    for r in ds:
        chosen, rejected = _split_hh(r["chosen"]), _split_hh(r["rejected"])
        if len(chosen) < 2 or chosen[-1]["role"] != "assistant" or chosen[:-1] != rejected[:-1]:
            continue  # not a comparison of two final assistant turns
        context = chosen[:-1]
        demos.append({"messages": chosen})
        ranks.append(
            {"messages": context, "responses": [chosen[-1]["content"], rejected[-1]["content"]], "ranks": [0, 1]}
        )
        prompts.append({"messages": context})
    print("demonstrations", _write(out / "demonstrations.jsonl", demos))
    print("rankings", _write(out / "rankings.jsonl", ranks))
    print("prompts", _write(out / "prompts.jsonl", prompts))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("tldr", "hh"):
        sys.exit(__doc__)
    {"tldr": prepare_tldr, "hh": prepare_hh}[sys.argv[1]](Path(sys.argv[2]))
