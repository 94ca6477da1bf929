"""QLoRA's quantized frozen base: int8 or 4-bit NF4 kernels, dequantized one layer at a time.

With ``LoRAConfig.base_bits`` set, the driver replaces the ``kernel`` of every adapted projection
in the frozen base tree (``quantize_base``) by

  * ``base_bits=8``: ``kernel_q`` int8 [L, *in, *out] and ``kernel_scale`` float32
    [L, 1.., *out] (absmax per output channel over the input axes, kept as size-1 dims, so
    ``W ~= kernel_q * kernel_scale`` broadcasts): 8 bits + 32 / fan_in per weight;
  * ``base_bits=4``: NF4 (Dettmers et al. 2023, QLoRA): the per-layer kernel flattened
    row-major, cut into blocks of 64, each block scaled by its absmax into [-1, 1] and every
    value rounded to the nearest of 16 normal-float levels (``NF4``); two 4-bit codes per
    byte in ``kernel_nf4`` uint8 [L, n / 2] and ``kernel_absmax`` float32 [L, n / 64]:
    4.5 bits per weight (the absmax constants are not double-quantized, as QLoRA does to
    reach 4.127). Packed by hand: XLA's CPU backend allocates a ``jnp.int4`` array one byte
    per value (``on_device_size_in_bytes``), so int4 saves nothing there.

``models.layers.Linear`` finds these leaves instead of ``kernel`` and calls ``qmatmul``: the
layer scan hands it one layer's slice, which is dequantized to the compute dtype, multiplied,
and dropped; its custom VJP keeps the quantized slice, never the float weight, for the
backward pass (whatever the remat policy), and gives the base no gradient. The embeddings,
norms, biases and LM head stay float. Quantization is deterministic, so a run rebuilds the
same quantized base from ``--init`` at every start and no checkpoint stores it.

In PPO the KL reference is the policy's frozen base, so with ``base_bits`` it is the
*quantized* SFT model, not exactly the SFT weights: the policy starts on that same base
(fresh adapters: KL exactly 0 at the first step), and the KL then measures how far the
adapters moved the policy, which is QLoRA practice (one quantized copy serves both; a float
reference would add a full-precision copy and a KL offset of quantization error alone).
Export merges the adapters into the dequantized base (``lora.merge_adapters``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax.models.matmul import product

Array = jax.Array

# The 16 NF4 levels: quantiles of N(0, 1) rescaled to [-1, 1], with an exact 0 (bitsandbytes' table).
NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
NF4_BLOCK = 64
QUANT_LEAVES = ("kernel_q", "kernel_scale", "kernel_nf4", "kernel_absmax")
# input axes of each adapted projection's per-layer kernel (models/attention.py, layers.MLP)
IN_DIMS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


# ---------------------------------------------------------------------------- int8


def quantize_int8(w: Array, in_axes: tuple[int, ...]) -> tuple[Array, Array]:
    """(q int8 like ``w``, scale float32 with size 1 on ``in_axes``): ``w ~= q * scale``.

    Symmetric absmax per output channel: ``scale = max|w| / 127`` over ``in_axes``, ``q =
    round(w / scale)`` in [-127, 127]; an all-zero channel gets scale 0 and codes 0.
    """
    w = jnp.asarray(w, jnp.float32)
    absmax = jnp.max(jnp.abs(w), axis=in_axes, keepdims=True)
    scale = absmax / 127.0
    q = jnp.round(w / jnp.where(scale > 0, scale, 1.0))
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def dequantize_int8(q: Array, scale: Array) -> Array:
    """float32 ``q * scale`` (broadcast over the input axes)."""
    return q.astype(jnp.float32) * scale


# ---------------------------------------------------------------------------- NF4


def quantize_nf4(w: Array, lead: int = 0) -> tuple[Array, Array]:
    """(packed codes uint8 [*w.shape[:lead], n / 2], absmax float32 [*w.shape[:lead], n / 64]).

    ``n`` = the product of ``w.shape[lead:]`` (one layer's kernel, flattened row-major), zero
    padded to a multiple of 64. Each value / its block's absmax is rounded to the nearest NF4
    level (``searchsorted`` on the midpoints between levels: the lower level on a tie);
    the code of an even position sits in the high nibble.
    """
    lead_shape = w.shape[:lead]
    flat = jnp.asarray(w, jnp.float32).reshape(*lead_shape, -1)  # [*lead, n]
    pad = -flat.shape[-1] % NF4_BLOCK
    flat = jnp.pad(flat, [(0, 0)] * lead + [(0, pad)])
    blocks = flat.reshape(*lead_shape, -1, NF4_BLOCK)  # [*lead, n / 64, 64]
    absmax = jnp.max(jnp.abs(blocks), axis=-1)  # [*lead, n / 64]
    x = blocks / jnp.where(absmax > 0, absmax, 1.0)[..., None]
    mid = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)  # [15]
    codes = jnp.searchsorted(mid, x.reshape(-1), side="left").astype(jnp.uint8).reshape(*lead_shape, -1, 2)
    packed = (codes[..., 0] << 4) | codes[..., 1]  # [*lead, n / 2]
    return packed, absmax


def dequantize_nf4(packed: Array, absmax: Array, shape: tuple[int, ...]) -> Array:
    """float32 [*lead, *shape] from ``quantize_nf4``'s (packed [*lead, n / 2], absmax [*lead, n / 64])."""
    lead_shape = packed.shape[:-1]
    codes = jnp.stack([packed >> 4, packed & 15], axis=-1).reshape(*lead_shape, -1)  # [*lead, n]
    values = jnp.asarray(NF4)[codes.astype(jnp.int32)].reshape(*absmax.shape, NF4_BLOCK) * absmax[..., None]
    n = math.prod(shape)
    return values.reshape(*lead_shape, -1)[..., :n].reshape(*lead_shape, *shape)


# ---------------------------------------------------------------------------- in the model


def dequantize(leaves: dict[str, Array], shape: tuple[int, ...]) -> Array:
    """One layer's float32 kernel [*shape] from its quantized leaves (int8 or NF4)."""
    if "kernel_q" in leaves:
        return dequantize_int8(leaves["kernel_q"], leaves["kernel_scale"]).reshape(shape)
    return dequantize_nf4(leaves["kernel_nf4"], leaves["kernel_absmax"], shape)


def qmatmul(x2: Array, leaves: dict[str, Array], shape: tuple[int, int], dtype: Any) -> Array:
    """``x2 [N, K] @ W [K, M]`` -> [N, M] float32, with W dequantized from ``leaves`` (``shape`` =
    (K, M)): both operands in ``dtype``, accumulated in float32 (``models.matmul``)."""
    return _qmatmul(x2.astype(dtype), leaves, shape, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _qmatmul(x2: Array, leaves: dict[str, Array], shape: tuple[int, int], dtype: Any) -> Array:
    return product(x2, dequantize(leaves, shape).astype(dtype))


def _qmatmul_fwd(x2, leaves, shape, dtype):
    return _qmatmul(x2, leaves, shape, dtype), leaves  # keep the quantized slice, not the float W


def _qmatmul_bwd(shape, dtype, leaves, g):
    w = dequantize(leaves, shape).astype(dtype)  # [K, M], rebuilt for the backward pass
    # as models.matmul.mixed_matmul: the float32 cotangent cast to ``dtype``, accumulated in float32
    dx = product(g.astype(dtype), w.T).astype(dtype)  # [N, K] in x2's dtype (``dtype``)
    return dx, jax.tree.map(lambda _: None, leaves)  # the frozen base gets no gradient


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


# ---------------------------------------------------------------------------- trees


def _walk(tree: dict, targets: tuple[str, ...], leaf_fn, path: tuple[str, ...] = ()) -> dict:
    """``tree`` with each target projection's ``{"kernel": w, ...}`` replaced by ``leaf_fn(name, w) | rest``."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            if key in targets and "kernel" in value and "layers" in path:
                rest = {k: v for k, v in value.items() if k != "kernel"}
                out[key] = {**leaf_fn(key, value["kernel"]), **rest}
            else:
                out[key] = _walk(value, targets, leaf_fn, (*path, key))
        else:
            out[key] = value
    return out


def quantize_kernel(name: str, kernel: Array, bits: int) -> dict[str, Array]:
    """The quantized leaves of one stacked kernel [L, *in, *out] of projection ``name``."""
    if bits == 8:
        q, scale = jax.jit(quantize_int8, static_argnums=1)(kernel, tuple(range(1, 1 + IN_DIMS[name])))
        return {"kernel_q": q, "kernel_scale": scale}
    if bits == 4:
        packed, absmax = jax.jit(quantize_nf4, static_argnums=1)(kernel, 1)
        return {"kernel_nf4": packed, "kernel_absmax": absmax}
    raise ValueError(f"base_bits must be 8 or 4, got {bits}")


def quantize_base(base: dict, lora) -> dict:
    """The frozen base tree with the kernels of ``lora.targets`` quantized to ``lora.base_bits``
    (unchanged when ``lora`` is None or has no ``base_bits``). Kernel by kernel, so the float
    original of each can be freed as soon as the caller drops ``base``."""
    if lora is None or lora.base_bits is None:
        return base
    return _walk(base, lora.targets, lambda name, w: quantize_kernel(name, w, lora.base_bits))


def roundtrip_base(base: dict, lora) -> dict:
    """``base`` with every quantized kernel replaced by its dequantized value (kernel dtype kept):
    bitwise the weights a QLoRA run computes with. Identity without ``base_bits``."""
    if lora is None or lora.base_bits is None:
        return base

    return _walk(base, lora.targets, lambda name, w: {"kernel": _roundtrip(w, name, lora.base_bits)})


@functools.partial(jax.jit, static_argnums=(1, 2))
def _roundtrip(w: Array, name: str, bits: int) -> Array:
    """One stacked kernel [L, *in, *out] quantized, then dequantized layer by layer as ``Linear`` does."""
    if bits == 8:
        q = dict(zip(("kernel_q", "kernel_scale"), quantize_int8(w, tuple(range(1, 1 + IN_DIMS[name])))))
    else:
        q = dict(zip(("kernel_nf4", "kernel_absmax"), quantize_nf4(w, 1)))
    return jax.vmap(lambda leaves: dequantize(leaves, w.shape[1:]))(q).astype(w.dtype)


def quantize_shardings(base_sh: dict, lora) -> dict:
    """Shardings of ``quantize_base``'s tree from those of the float base (``NamedSharding``
    leaves): int8 codes shard like the kernel and the scales like its output axes; NF4's flat
    codes and block constants are replicated (they have no logical axes)."""
    if lora is None or lora.base_bits is None:
        return base_sh

    def f(name, sh):
        if lora.base_bits == 4:
            rep = NamedSharding(sh.mesh, P())
            return {"kernel_nf4": rep, "kernel_absmax": rep}
        spec = list(sh.spec) + [None] * max(0, 1 + IN_DIMS[name] - len(sh.spec))
        for i in range(1, 1 + IN_DIMS[name]):
            spec[i] = None  # the scale has size 1 on the input axes
        return {"kernel_q": sh, "kernel_scale": NamedSharding(sh.mesh, P(*spec))}

    return _walk(base_sh, lora.targets, f)


def nbytes(tree: Any) -> int:
    """Bytes held by the arrays of ``tree``."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
