"""The building blocks of the decoder: norms, linear maps, rotary embeddings, the MLP.

Parameters carry logical axis names only ('embed', 'mlp', 'heads', 'kv_heads', 'kv',
'vocab'); ``rlhf_jax.sharding.LOGICAL_RULES`` maps them to mesh axes.

LoRA lives in :class:`Linear`: with ``config.lora`` set, the projections it names (q, k, v,
o, gate, up, down: each ``dense`` call's name) add ``lora_a`` [*in, r] and ``lora_b`` [r, *out]
beside their kernel (stacked [L, ...] by the layer scan like every block parameter);
``rlhf_jax.models.lora`` splits such a tree into the frozen base and the adapters and merges
them back. Google's qwix (0.1.8) was tried first: it intercepts ``jax.lax.dot_general`` /
``jnp.einsum`` only, so the ``@`` below got no adapter; with ``dot_general`` it did create
stacked adapters under the layer scan, but (i) its float32 adapters promote a bfloat16 block's
output to float32 and the layer scan rejects the carry, (ii) its adapter dropout is always on
(every apply, evaluation and RL scoring included, needs a 'dropout' rng), and (iii) the
adapters of multi-axis kernels get logical names guessed from flattened shapes. Twenty lines
here avoid all three. QLoRA's quantized base (``LoRAConfig.base_bits``) is ``models.quant``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.config import ModelConfig
from rlhf_jax.models.matmul import mixed_matmul
from rlhf_jax.models.quant import QUANT_LEAVES, qmatmul

Array = jax.Array
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(name: str) -> Any:
    return _DTYPES[name]


def constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
    """Sharding constraint by logical axis names (a no-op outside a mesh context)."""
    return nn.with_logical_constraint(x, axes)


def param_init(init, axes: tuple[str | None, ...]):
    """An initialiser whose parameter carries the logical ``axes``."""
    return nn.with_logical_partitioning(init, axes)


def positions_from_mask(mask: Array) -> Array:
    """Position ids from an attention mask [B, T]: cumsum(mask) - 1, clipped at 0.

    Gives the same positions to a sequence whatever its left or right padding."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def positions_from_segments(segment_ids: Array) -> Array:
    """Position ids [B, T] that restart at 0 where ``segment_ids`` [B, T] changes (packed rows).

    >>> positions_from_segments(jnp.array([[1, 1, 1, 2, 2, 0]])).tolist()
    [[0, 1, 2, 0, 1, 0]]
    """
    t = segment_ids.shape[-1]
    index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1
    )
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)


def softcap(x: Array, cap: float | None) -> Array:
    """``cap * tanh(x / cap)`` (Gemma's logit soft-capping); identity when ``cap`` is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


class Norm(nn.Module):
    """LayerNorm or RMSNorm (by ``config.norm``) over the last axis, computed in float32.

    Gemma 3's RMSNorm scales by (1 + w) (w initialised to 0) and multiplies in float32;
    Llama's casts the normalised x back to the input dtype first, then multiplies by w.
    """

    config: ModelConfig
    axis_name: str = "embed"  # logical axis of the scale (and bias)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        pdt = to_dtype(cfg.param_dtype)
        x32 = x.astype(jnp.float32)
        plus_one = cfg.family == "gemma3"
        init = nn.initializers.zeros if plus_one else nn.initializers.ones
        scale = self.param("scale", param_init(init, (self.axis_name,)), (x.shape[-1],), pdt)
        if cfg.norm == "rmsnorm":
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
            if plus_one:  # Gemma: (x / rms(x)) * (1 + w) in float32, then cast
                return (y * (1.0 + scale.astype(jnp.float32))).astype(to_dtype(cfg.dtype))
            return (y.astype(x.dtype) * scale.astype(x.dtype)).astype(to_dtype(cfg.dtype))
        bias = self.param("bias", param_init(nn.initializers.zeros, (self.axis_name,)), (x.shape[-1],), pdt)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(to_dtype(cfg.dtype))


class Linear(nn.Module):
    """y = x W (+ b), contracting the last ``in_dims`` axes of x; W [*in_shape, *features].

    W is the ``kernel`` param, or, in a QLoRA base tree, the quantized leaves that
    ``models.quant.quantize_base`` put in its place (found by name whatever the config says, so
    the adapter-free reference model applies to the same quantized tree).

    (Flax's DenseGeneral reshapes a flat kernel inside its initialiser, which breaks
    logical-partitioning constraints of multi-axis kernels under a mesh context.)"""

    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    in_dims: int
    use_bias: bool
    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        in_shape = x.shape[x.ndim - self.in_dims :]
        dtype = to_dtype(cfg.dtype)
        lead = x.shape[: x.ndim - self.in_dims]
        # One 2-D product [N, K] @ [K, M]: its gradients are 2-D products too, which XLA's
        # CPU matmul runs at full speed; dot_general over [B, T, ...] gives gradients that
        # contract two axes at once and made the CPU SFT step 12% slower (README, Performance).
        x2 = x.astype(dtype).reshape(math.prod(lead), math.prod(in_shape))  # [N, K]
        km = (math.prod(in_shape), math.prod(self.features))
        quantized = {k: self.get_variable("params", k) for k in QUANT_LEAVES if self.has_variable("params", k)}
        # Compute-dtype operands, float32 accumulation (models.matmul); the adapter and the bias
        # are added in float32 and the sum rounded once (all of it a no-op in float32).
        if quantized:  # a QLoRA base (models.quant): this layer's kernel dequantized on the fly
            y2 = qmatmul(x2, quantized, km, dtype)  # [N, M] float32
        else:
            kernel = self.param(
                "kernel",
                param_init(nn.initializers.normal(0.02), self.axes),
                (*in_shape, *self.features),
                to_dtype(cfg.param_dtype),
            )
            y2 = mixed_matmul(x2, kernel.reshape(km), dtype)  # [N, K] @ [K, M] -> [N, M] float32
        if cfg.lora is not None and self.name in cfg.lora.targets:
            y2 = y2 + self.adapter(x2, in_shape)
        y = y2.reshape(*lead, *self.features)  # [*lead, *features]
        if self.use_bias:
            bias = self.param(
                "bias",
                param_init(nn.initializers.zeros, self.axes[self.in_dims :]),
                self.features,
                to_dtype(cfg.param_dtype),
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(dtype)

    def adapter(self, x2: Array, in_shape: tuple[int, ...]) -> Array:
        """LoRA's update ``(alpha / r) * (x A) B`` [N, M] float32 of the flat inputs x2 [N, K]
        (``x A`` rounded to the compute dtype in between, both products accumulated in float32).

        A [*in_shape, r] starts like PEFT's (uniform, bound 1 / sqrt(fan_in)), B [r, *features]
        at zero, so a new adapter leaves the model unchanged; both carry the kernel's logical
        axes on their kernel-side dims and none on the rank. Dropout on x (``cfg.lora.dropout``)
        only when the call has a 'dropout' rng (a training pass with dropout on).
        """
        cfg, lora = self.config, self.config.lora
        pdt, dtype = to_dtype(cfg.param_dtype), to_dtype(cfg.dtype)
        in_axes, out_axes = self.axes[: self.in_dims], self.axes[self.in_dims :]
        fan_in = nn.initializers.variance_scaling(
            1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(self.in_dims)), out_axis=-1
        )
        a = self.param("lora_a", param_init(fan_in, (*in_axes, None)), (*in_shape, lora.rank), pdt)
        b = self.param("lora_b", param_init(nn.initializers.zeros, (None, *out_axes)), (lora.rank, *self.features), pdt)
        if lora.dropout > 0 and self.has_rng("dropout"):
            x2 = nn.Dropout(lora.dropout, deterministic=False, name="lora_dropout")(x2)
        a2 = a.reshape(x2.shape[1], lora.rank)  # [K, r]
        b2 = b.reshape(lora.rank, -1)  # [r, M]
        xa = mixed_matmul(x2, a2, dtype).astype(dtype)  # [N, r]
        return mixed_matmul(xa, b2, dtype) * jnp.asarray(lora.scale, jnp.float32)  # [N, M]


def dense(cfg: ModelConfig, features, axes, *, use_bias: bool, name: str, in_dims: int = 1) -> Linear:
    features = (features,) if isinstance(features, int) else tuple(features)
    return Linear(features=features, axes=axes, in_dims=in_dims, use_bias=use_bias, config=cfg, name=name)


def llama3_inv_freq(inv_freq: Array, factor: float, low_freq_factor: float, high_freq_factor: float, original: int):
    """Llama 3.1's RoPE scaling of the inverse frequencies ``[R/2]`` (transformers' ``"llama3"``
    rope_type): wavelengths ``2 pi / f`` above ``original / low_freq_factor`` are stretched
    ``factor`` times, those below ``original / high_freq_factor`` kept, and the ones between
    interpolated with ``s = (original / wavelength - low) / (high - low)``:
    ``f' = (1 - s) f / factor + s f``."""
    wavelen = 2 * math.pi / inv_freq  # [R/2]
    low_wavelen, high_wavelen = original / low_freq_factor, original / high_freq_factor
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rotary(
    x: Array,
    positions: Array,
    *,
    rotary_dim: int,
    theta: Array | float,
    factor: Array | float = 1.0,
    llama3: tuple[float, float, float, int] | None = None,
) -> Array:
    """Rotate the first ``rotary_dim`` features of each head (HF's rotate_half layout).

    Args:
      x: [B, T, H, Dh].
      positions: [B, T] int32 token positions.
      theta: the RoPE base (a traced per-layer scalar inside the layer scan).
      factor: linear RoPE scaling: the inverse frequencies are divided by it (1 = none).
      llama3: ``ModelConfig.rope_llama3`` (factor, low / high frequency factors, original
        context): Llama 3.1's frequency-dependent scaling (:func:`llama3_inv_freq`); None = none.

    Returns:
      [B, T, H, Dh] in x's dtype.
    """
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim  # [R/2]
    # HF rounds pow, then the reciprocal; XLA would fold 1 / pow(a, b) into pow(a, -b), one ulp off in
    # a third of the frequencies, which Gemma 3's large activations turned into 3e-3 logit differences.
    inv_freq = 1.0 / jax.lax.optimization_barrier(jnp.asarray(theta, jnp.float32) ** exponents) / factor  # [R/2]
    if llama3 is not None:
        inv_freq = llama3_inv_freq(inv_freq, *llama3)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, R]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)  # [B, T, H, R]
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)


class MLP(nn.Module):
    """[B, T, D] -> [B, T, D]: act(x W_up) W_down, or gated act(x W_gate) * (x W_up) W_down."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        act = {
            "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
            "gelu": functools.partial(jax.nn.gelu, approximate=False),
            "silu": jax.nn.silu,
        }[cfg.activation]
        up = dense(cfg, cfg.mlp_dim, ("embed", "mlp"), use_bias=cfg.mlp_bias, name="up")(x)  # [B, T, F]
        if cfg.gated_mlp:  # SwiGLU / GeGLU: act(x W_gate) * (x W_up)
            up = act(dense(cfg, cfg.mlp_dim, ("embed", "mlp"), use_bias=cfg.mlp_bias, name="gate")(x)) * up
        else:
            up = act(up)
        up = constrain(up, ("batch", "length", "mlp"))
        return dense(cfg, x.shape[-1], ("mlp", "embed"), use_bias=cfg.mlp_bias, name="down")(up)  # [B, T, D]
