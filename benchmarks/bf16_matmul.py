"""Mixed-precision matmuls on CPU: the SFT loss's forward + backward in float32, in bfloat16 the
old way (bf16 x bf16 -> bf16 dots) and in bfloat16 through ``models.matmul.mixed_matmul``
(bf16 x bf16 -> f32 dots, its own VJP so the gradient dots are bf16 x bf16 -> f32 too).

XLA's CPU backend rewrites a bf16 x bf16 -> bf16 dot into converts plus an f32 x f32 -> f32 dot,
so bfloat16 without f32 accumulation gets none of the CPU's bf16 matmul units (AMX, AVX512-BF16).
For each setting the script prints the operand and result dtypes of every ``dot`` of the
compiled forward and forward + backward (HLO instructions: a loop body's count once), how many
of them run in an XNNPACK / YNNPACK fusion, and the median of ``--repeats`` timed forward +
backward passes after ``--warmup`` (the load average is printed: on a busy machine the times
are only comparable with each other, which is why the settings take turns round by round):

    python benchmarks/bf16_matmul.py --layers 4 --repeats 5

The model is SmolLM2-135M's shape (llama family, hidden 576, 9 heads / 3 KV heads, MLP 1536,
vocabulary 49152, tied embeddings) with ``--layers`` of its 30 layers, random weights;
the batch is 8 x 128 tokens, the loss ``sft.lm_objective`` (its chunked LM head included).
"bf16-old" swaps the helper for the pre-change product ``(x @ w)`` in the compute dtype in
every model module that calls it, which gives the dots of the code before ``models.matmul``
(the HLO dot counts match it); only the bias and LoRA sums stay in float32, as now.
Measured on a 2-core AMX machine shared with other jobs (load average 2.8 at the start, 3.6
at the end; medians of 5 after 2 warm-up passes, 4 layers):

    float32     4043 ms   32 dots f32 x f32 -> f32, 22 of them in library fusions
    bf16-old    4323 ms   32 dots f32 x f32 -> f32 (XLA converted every bf16 dot), 22 in fusions
    bf16-mixed  2814 ms   32 dots bf16 x bf16 -> f32, all 32 in YNNPACK fusions (1.44x float32)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import statistics
import time
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sft
from rlhf_jax.config import ModelConfig
from rlhf_jax.models import CausalLM, attention, layers, transformer

_DEF = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[")
_PARAM = re.compile(r"([\w.\-]+): (\w+)\[")
_DOT = re.compile(r"= (\w+)\[[^=]*? dot\(%?([\w.\-]+), %?([\w.\-]+)\)")


def dot_dtypes(hlo: str) -> dict[str, int]:
    """``{"bf16 x bf16 -> f32": n, ...}``: the ``dot`` instructions of an HLO module's text by
    operand and result element types (instruction names are unique in a module)."""
    types = {}
    for line in hlo.splitlines():
        m = _DEF.match(line)
        if m:
            types[m.group(1)] = m.group(2)
    for m in _PARAM.finditer(hlo):  # parameters of fused / called computations' signatures
        types.setdefault(m.group(1), m.group(2))
    counts = collections.Counter()
    for line in hlo.splitlines():
        m = _DOT.search(line)
        if m:
            counts[f"{types.get(m.group(2), '?')} x {types.get(m.group(3), '?')} -> {m.group(1)}"] += 1
    return dict(sorted(counts.items()))


def library_dots(hlo: str) -> int:
    """How many of an HLO module's ``dot`` instructions sit in an XNNPACK / YNNPACK fusion."""
    bodies, name = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%(\S+) \(", line)
        if m:
            name = m.group(1)
            bodies[name] = 0
        elif name is not None and " dot(" in line:
            bodies[name] += 1
    called = set(re.findall(r"calls=%([\w.\-]+)[^\n]*__[xy]nn_fusion", hlo))
    return sum(n for name, n in bodies.items() if name in called)


def _old_matmul(x, w, dtype):
    """The pre-change product: both operands in the compute dtype, a result in the compute dtype."""
    return (x.astype(dtype) @ w.astype(dtype)).astype(jnp.float32)


@contextlib.contextmanager
def old_matmuls():
    """``mixed_matmul`` replaced by :func:`_old_matmul` where the model modules call it (clear
    JAX's caches before tracing under it, and after)."""
    with contextlib.ExitStack() as stack:
        for module in (layers, attention, transformer):
            stack.enter_context(mock.patch.object(module, "mixed_matmul", _old_matmul))
        yield


def smollm2_like(layers_: int, dtype: str) -> ModelConfig:
    return ModelConfig(
        family="llama",
        vocab_size=49152,
        hidden_size=576,
        num_layers=layers_,
        num_heads=9,
        num_kv_heads=3,
        intermediate_size=1536,
        activation="silu",
        tie_word_embeddings=True,
        dtype=dtype,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    load_start = os.getloadavg()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49152, (args.batch, args.seq_len)).astype(np.int32)
    batch = {
        "input_ids": jnp.asarray(ids),
        "attention_mask": jnp.ones_like(ids),
        "loss_mask": jnp.ones_like(ids),
    }
    init = CausalLM(smollm2_like(args.layers, "float32")).init(jax.random.PRNGKey(0), batch["input_ids"][:1, :8])
    params = nn.unbox(init["params"])  # float32 master weights for every setting
    settings = {"float32": ("float32", False), "bf16-old": ("bfloat16", True), "bf16-mixed": ("bfloat16", False)}
    compiled, results = {}, {}
    for name, (dtype, old) in settings.items():
        model = CausalLM(smollm2_like(args.layers, dtype))

        def loss(p, model=model):
            return sft.lm_objective(model, p, batch)[0]

        jax.clear_caches()  # JAX keeps traces of inner functions (jax.checkpoint, scan bodies)
        with old_matmuls() if old else contextlib.nullcontext():
            fwd = jax.jit(loss).lower(params).compile()
            step = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
        compiled[name] = step
        results[name] = {
            "dots_forward": dot_dtypes(fwd.as_text()),
            "dots_forward_backward": dot_dtypes(step.as_text()),
            "library_dots_forward_backward": library_dots(step.as_text()),
            "loss": float(step(params)[0]),
            "seconds": [],
        }
        for _ in range(args.warmup):
            jax.block_until_ready(step(params))
    for _ in range(args.repeats):  # the settings take turns, so a load change hits them alike
        for name, step in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(step(params))
            results[name]["seconds"].append(time.perf_counter() - t0)
    base = statistics.median(results["float32"]["seconds"])
    print(
        f"load average (1, 5, 15 min): {load_start} at the start, {os.getloadavg()} at the end, {os.cpu_count()} CPUs"
    )
    print(f"SmolLM2-135M-like, {args.layers} layers, batch {args.batch} x {args.seq_len}, loss fwd + bwd")
    for name, r in results.items():
        med = statistics.median(r["seconds"])
        r["median_s"] = med
        print(f"\n{name}: median {med * 1e3:.0f} ms ({base / med:.2f}x float32), loss {r['loss']:.5f}")
        print(f"  times (ms): {[round(s * 1e3) for s in r['seconds']]}")
        print(f"  forward dots:            {r['dots_forward']}")
        print(
            f"  forward + backward dots: {r['dots_forward_backward']}, {r['library_dots_forward_backward']} in library fusions"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"loadavg": [load_start, os.getloadavg()], "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
