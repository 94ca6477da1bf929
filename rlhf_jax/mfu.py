"""Model FLOPs utilisation: the FLOPs each step does and the peak FLOP/s it is measured against.

Model FLOPs (what MFU counts; recomputation, padding and masked attention are not counted):

* forward, per token: ``2 * N_body`` (every matmul weight of the blocks once) plus
  attention ``4 * L * H * Dh * C`` (QK^T and AV, ``C`` = keys attended on average: ``T / 2``
  for a causal pass over ``T`` tokens, ``P + R / 2`` while decoding after a ``P``-token
  prompt), plus the head: ``2 * D * V`` for every position whose logits are computed
  (``2 * D`` for a scalar head). Embedding look-ups are free.
* training: 3x the forward (backward = 2x forward), so an SFT step of ``B x T`` tokens is
  ``B * T * (6 * (N_body + D * V) + 6 * L * H * Dh * T)`` — ``ModelConfig.flops_per_token``.
* RM step: the same with the scalar head, over ``B * K`` sequences.
* PPO iteration: rollout = generation (prefill + ``R - 1`` decode steps) + one scoring
  forward per model (policy and reference with the LM head on the ``R`` response
  positions, value and reward model with scalar heads); update = ``epochs x`` training of
  the policy (LM head on the response positions) and the value network over the batch,
  plus the pretraining (ptx) rows with the full LM head.

MFU = model FLOPs / step time / peak FLOP/s. The peak is looked up per device kind
(dense bf16 numbers, :data:`PEAK_FLOPS`) times the device count, or measured with a
2048^3 float32 matmul on CPU (the machine's practical peak, whatever the number of fake
devices), or given with ``--peak-tflops``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax.config import ModelConfig, PPOHyperparams

# Dense bf16 peak FLOP/s per chip (vendor figures), matched as substrings of
# ``jax.Device.device_kind`` in this order (so "TPU v5 lite" wins over "TPU v5").
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5"
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM; the PCIe card is 756e12
    ("A100", 312e12),
)


def stats(xs: list[float]) -> dict:
    """median, min, max and count of a list of timings."""
    return dict(median=statistics.median(xs), min=min(xs), max=max(xs), n=len(xs))


# ----------------------------------------------------------------------------- FLOPs
def forward_flops(
    cfg: ModelConfig, *, tokens: float, context: float, head_tokens: float, lm_head: bool = True
) -> float:
    """Model FLOPs of a forward pass: ``tokens`` positions through the blocks, each attending
    ``context`` keys on average, and the head at ``head_tokens`` positions."""
    body = cfg.num_params(with_embeddings=False)
    attn = 4 * cfg.num_layers * cfg.num_heads * cfg.dim_per_head * context
    head = 2 * cfg.hidden_size * (cfg.vocab_size if lm_head else 1)
    return tokens * (2 * body + attn) + head_tokens * head


def train_flops(cfg: ModelConfig, *, sequences: int, seq_len: int, lm_head: bool = True) -> float:
    """Forward + backward (3x forward) over ``sequences x seq_len`` tokens, head at every position."""
    n = sequences * seq_len
    return 3 * forward_flops(cfg, tokens=n, context=seq_len / 2, head_tokens=n, lm_head=lm_head)


def generate_flops(cfg: ModelConfig, *, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Prefill of ``batch x prompt_len`` (head at the last prompt token) + ``new_tokens - 1`` decode steps."""
    prefill = forward_flops(cfg, tokens=batch * prompt_len, context=prompt_len / 2, head_tokens=batch)
    steps = batch * (new_tokens - 1)
    return prefill + forward_flops(cfg, tokens=steps, context=prompt_len + new_tokens / 2, head_tokens=steps)


def ppo_flops(
    cfg: ModelConfig, ppo: PPOHyperparams, *, prompt_len: int, ptx_seq_len: int | None = None
) -> dict[str, float]:
    """Rollout, update and total model FLOPs of one PPO iteration (separate value network);
    with ``ptx_seq_len``, PPO-ptx's pretraining rows of that length too."""
    b, r = ppo.batch_size, ppo.max_new_tokens
    t = prompt_len + r
    gen = generate_flops(cfg, batch=b, prompt_len=prompt_len, new_tokens=r)
    lm_pass = forward_flops(cfg, tokens=b * t, context=t / 2, head_tokens=b * r)  # head on response positions
    scalar_pass = forward_flops(cfg, tokens=b * t, context=t / 2, head_tokens=b * r, lm_head=False)
    rollout = gen + 2 * lm_pass + 2 * scalar_pass  # policy, reference; value, reward model
    update = ppo.ppo_epochs * 3 * (lm_pass + scalar_pass)
    if ptx_seq_len is not None:
        rows = ppo.updates_per_iteration * ppo.rows_per_ptx_minibatch
        update += train_flops(cfg, sequences=rows, seq_len=ptx_seq_len)
    return dict(rollout=rollout, update=update, total=rollout + update)


# ----------------------------------------------------------------------------- peaks
def device_peak_flops(device: Any) -> float | None:
    """Dense bf16 peak FLOP/s of one accelerator from :data:`PEAK_FLOPS`; None if unknown or CPU."""
    kind = str(getattr(device, "device_kind", ""))
    for name, peak in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return peak
    return None


def measure_matmul_peak(n: int = 2048, repeats: int = 10) -> dict:
    """FLOP/s of an ``n^3`` float32 matmul on the default device (the practical peak of a CPU)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    for _ in range(3):
        mm(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    s = stats(times)
    return dict(n=n, seconds=s, flops_median=2 * n**3 / s["median"], flops_best=2 * n**3 / s["min"])


def peak_flops(devices: list, override_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of the whole mesh, where the number comes from)."""
    if override_tflops is not None:
        return override_tflops * 1e12, "given (--peak-tflops)"
    per_device = [device_peak_flops(d) for d in devices]
    if all(p is not None for p in per_device):
        return float(sum(per_device)), f"table: {devices[0].device_kind} x {len(devices)} (dense bf16)"
    m = measure_matmul_peak()
    return m["flops_best"], f"measured: {m['n']}^3 float32 matmul, best of {m['seconds']['n']}"
