"""On a GPU: do the attention kernels agree, and what does each cost? (``--run.attention``)

    python benchmarks/gpu_check.py --out gpu_check.json

For three model families (Llama with grouped-query heads and a sliding layer, Gemma 3, GPT-2) at
head dim 64, the SFT-style loss ``sum(tanh(logits))`` over real tokens and its gradient with
respect to every parameter are computed in bfloat16 with each kernel ("einsum": ours; "jax":
``jax.nn.dot_product_attention``'s XLA implementation; "cudnn": cuDNN's fused flash kernel; "auto":
what the library picks; default: einsum and cudnn) and once in float32 with "einsum" as the reference. Reported per kernel:
relative error ``|x - ref| / |ref|`` of the logits and of the gradient (all leaves stacked), and the
median time of the jitted forward + backward after a warm-up, on padded and on packed rows.
bf16 operands give errors of 1e-3 to 1e-2 against float32; the kernels should be alike, not equal.
On a CPU only "einsum" and "jax" run (cuDNN needs a GPU). Prints a table, writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import ModelConfig
from rlhf_jax.models import CausalLM
from rlhf_jax.models.attention import attention_kernel
from rlhf_jax.models.params import init_params

COMMON = dict(vocab_size=2048, hidden_size=512, num_layers=4, num_heads=8, intermediate_size=1536, head_dim=64)
FAMILIES = {
    "llama": ModelConfig(  # grouped-query heads, one dense and one sliding layer
        family="llama", activation="silu", num_kv_heads=2, layer_types=("full_attention", "sliding_attention"),
        sliding_window=128, **COMMON,
    ),
    "gemma3": ModelConfig(  # q/k norms, query pre-attention scalar, local + global RoPE
        family="gemma3", activation="gelu_tanh", num_kv_heads=1, query_pre_attn_scalar=64.0,
        layer_types=("sliding_attention", "full_attention"), sliding_window=128, rope_local_theta=10_000.0,
        rope_theta=1_000_000.0, tie_word_embeddings=True, **COMMON,
    ),
    "gpt2": ModelConfig(family="gpt2", max_position_embeddings=1024, **COMMON),
}  # fmt: skip


def batch(b: int, t: int, *, packed: bool, seed: int = 0) -> tuple[jax.Array, dict]:
    """Token ids [B, T] and the model's keyword inputs: right-padded rows, or rows packed with segment ids."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, COMMON["vocab_size"], (b, t)).astype(np.int32)
    if packed:  # 3 documents a row, the last one cut short: segment ids 1..3, then padding (0)
        cuts = np.sort(rng.integers(1, t, (b, 3)), axis=1)
        pos = np.arange(t)[None]
        segments = 1 + (pos >= cuts[:, :1]).astype(np.int32) + (pos >= cuts[:, 1:2])
        segments = np.where(pos >= cuts[:, 2:], 0, segments).astype(np.int32)
        return jnp.asarray(ids), {"segment_ids": jnp.asarray(segments), "attention_mask": jnp.asarray(segments > 0)}
    lengths = rng.integers(t // 2, t + 1, b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    return jnp.asarray(ids), {"attention_mask": jnp.asarray(mask)}


def loss_and_grad(cfg: ModelConfig, kernel: str, dtype, ids, kw):
    model = CausalLM(cfg.replace(attention=kernel, dtype=jnp.dtype(dtype).name))
    real = kw["attention_mask"].astype(bool)

    def loss(p):
        logits = model.apply({"params": p}, ids, **kw).logits  # [B, T, V]
        return jnp.sum(jnp.where(real[..., None], jnp.tanh(logits.astype(jnp.float32)), 0.0)), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def median_time(fn, params, repeats: int) -> float:
    jax.block_until_ready(fn(params))  # compile + warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--kernels", default=None, help="comma-separated (default: einsum,cudnn on a GPU, else einsum,jax)")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated from: {', '.join(FAMILIES)}")
    a = ap.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    kernels = a.kernels.split(",") if a.kernels else ["einsum", "cudnn"] if on_gpu else ["einsum", "jax"]
    rows = []
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, B {a.batch} x T {a.seq_len}", flush=True)
    for name in a.families.split(","):
        cfg = FAMILIES[name]
        params = init_params(CausalLM(cfg), jax.random.key(0))
        for packed in (False, True):
            ids, kw = batch(a.batch, a.seq_len, packed=packed)
            real = np.asarray(kw["attention_mask"], bool)
            (_, ref_logits), ref_grad = loss_and_grad(cfg, "einsum", jnp.float32, ids, kw)(params)
            ref_logits, ref_grad = np.asarray(ref_logits)[real], flat(ref_grad)
            for kernel in kernels:
                row = {"family": name, "rows": "packed" if packed else "padded", "kernel": kernel,
                       "resolved": attention_kernel(cfg.replace(attention=kernel), jnp.bfloat16)}  # fmt: skip
                try:
                    fn = loss_and_grad(cfg, kernel, jnp.bfloat16, ids, kw)
                    (loss, logits), grad = fn(params)
                    row |= {"logits_rel_err": rel(np.asarray(logits)[real], ref_logits),
                            "grad_rel_err": rel(flat(grad), ref_grad), "finite": bool(np.isfinite(float(loss))),
                            "fwd_bwd_ms": 1e3 * median_time(fn, params, a.repeats)}  # fmt: skip
                except Exception as e:  # noqa: BLE001 - a refused kernel is a result, not a crash
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| family | rows | kernel (resolved) | logits rel. err | grad rel. err | fwd+bwd ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['family']} | {r['rows']} | {r['kernel']} ({r['resolved']}) | failed: {r['error'][:80]} | | |")
        else:
            print(f"| {r['family']} | {r['rows']} | {r['kernel']} ({r['resolved']}) | {r['logits_rel_err']:.2e} "
                  f"| {r['grad_rel_err']:.2e} | {r['fwd_bwd_ms']:.1f} |")  # fmt: skip
    with open(a.out, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "batch": a.batch,
                   "seq_len": a.seq_len, "rows": rows}, f, indent=1)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
