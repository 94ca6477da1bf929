"""Generation speed: rlhf_jax.sampling.generate against transformers' torch generate, same model.

Both sides run the same random GPT-2 model (imported into rlhf_jax from the very
safetensors transformers wrote), the same left-padded prompt batch, sampling at
temperature 1 with a KV cache, and exactly ``--new`` new tokens per row (no EOS stop).
Prints one line per side and their ratio, plus a JSON line.

    python benchmarks/generate.py                      # CPU, GPT-2 4 layers d256 vocab 8192
    python benchmarks/generate.py --size 124m --batch 64   # GPU: the 124M GPT-2 config

Timings are medians over ``--repeats`` runs after ``--warmup`` runs (compilation excluded).
``benchmarks/run.py`` runs the same measurement against the peer script's transformers side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from bench_common import fmt_stats, timed

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SIZES = {
    "small": dict(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, n_positions=256),
    "medium": dict(n_layer=6, n_embd=512, n_head=8, vocab_size=8192, n_positions=256),
    "124m": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
}


def measure_rlhf_jax(
    model, params, ids, mask, *, new: int, warmup: int, repeats: int, temperature: float = 1.0
) -> dict:
    """Timing of ``rlhf_jax.sampling.generate`` (exactly ``new`` tokens per row, no EOS stop)
    on prompts ids/mask [B, P]; adds new_tokens_per_s."""
    import jax
    import jax.numpy as jnp

    from rlhf_jax.sampling import generate

    keys = iter(jax.random.split(jax.random.key(0), warmup + repeats))
    jids, jmask = jnp.asarray(ids), jnp.asarray(mask)

    def run():
        out = generate(
            model,
            params,
            jids,
            jmask,
            next(keys),
            max_new_tokens=new,
            temperature=temperature,
            eos_token_id=None,
            pad_token_id=0,
        )
        out.tokens.block_until_ready()

    result = {"call_s": timed(run, warmup=warmup, repeats=repeats)}
    result["new_tokens_per_s"] = ids.shape[0] * new / result["call_s"]["median"]
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip-torch", action="store_true", help="measure rlhf_jax only")
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_jax.models import from_pretrained

    torch.manual_seed(0)
    hf_model = GPT2LMHeadModel(GPT2Config(**SIZES[args.size], resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d)
        model, params = from_pretrained(d)
    hf_model.to(device)
    vocab = SIZES[args.size]["vocab_size"]
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, (args.batch, args.prompt)).astype(np.int32)
    mask = np.ones_like(ids)
    for i in range(args.batch):  # left padding of 0..15 tokens
        mask[i, : i % 16] = 0
    ids[mask == 0] = 0
    new_tokens = args.batch * args.new

    results = {"config": {**vars(args), **SIZES[args.size]}, "device": str(jax.devices()[0].device_kind)}
    results["rlhf_jax"] = measure_rlhf_jax(
        model, params, ids, mask, new=args.new, warmup=args.warmup, repeats=args.repeats
    )

    if not args.skip_torch:
        tids, tmask = torch.tensor(ids, dtype=torch.long, device=device), torch.tensor(mask, device=device)

        def run_torch():
            with torch.no_grad():
                hf_model.generate(
                    tids,
                    attention_mask=tmask,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=args.new,
                    min_new_tokens=args.new,
                    pad_token_id=0,
                    eos_token_id=None,
                    use_cache=True,
                )
            if device == "cuda":
                torch.cuda.synchronize()

        results["transformers"] = {"call_s": timed(run_torch, warmup=args.warmup, repeats=args.repeats)}
        results["transformers"]["new_tokens_per_s"] = new_tokens / results["transformers"]["call_s"]["median"]
        results["speedup"] = results["rlhf_jax"]["new_tokens_per_s"] / results["transformers"]["new_tokens_per_s"]

    for side in ("rlhf_jax", "transformers"):
        if side in results:
            r = results[side]
            print(f"{side:>12}: {r['new_tokens_per_s']:9.0f} new tok/s  ({fmt_stats(r['call_s'])})")
    if "speedup" in results:
        print(f"     speedup: {results['speedup']:.2f}x")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
