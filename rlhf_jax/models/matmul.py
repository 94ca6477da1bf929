"""Mixed-precision matmul: operands in the compute dtype, accumulation and result in float32.

Every matmul of the models (``layers.Linear`` and its LoRA adapter, the QLoRA base's
``quant.qmatmul``, attention's q.k and p.v, the LM head) goes through :func:`mixed_matmul`
(or, in ``qmatmul``'s own VJP, :func:`product`). In float32 it is the plain ``x @ w`` it
replaced, so a float32 model computes bitwise what it did. In bfloat16 / float16 the dot is
``dot_general(..., preferred_element_type=float32)``: half-precision inputs, float32
accumulation and output, as on GPU / TPU; the caller casts back to the compute dtype where it
carries on in it (the LM head keeps its float32 logits).

Its VJP is ours, not JAX's transpose rule: that one multiplies the float32 cotangent with a
half-precision operand, and XLA's CPU backend runs such a mixed dot (like any bf16 x bf16 ->
bf16 dot) as converts plus a float32 x float32 dot, without the CPU's bf16 units (AMX,
AVX512-BF16). Here the cotangent is cast to the compute dtype first (what a bf16 product's
cotangent always was), so both gradient dots are half x half -> float32 too, and each gradient
comes back in its input's dtype without a detour through the compute dtype (a float32
master weight's gradient is never rounded to bf16). On CPU the operands are also made
row-major (:func:`_row_major`). ``benchmarks/bf16_matmul.py`` measures it;
``tests/test_mixed_precision.py`` checks that no dot of a bfloat16 model's gradient is float32.
(XLA's CPU backend has no fast float16 matmul yet and converts float16 dots whatever we do.)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def product(x: Array, w: Array) -> Array:
    """``x [..., N, K] @ w [..., K, M]`` (equal leading batch dims, equal dtypes) accumulated in
    float32: [..., N, M] float32. No VJP of its own (JAX's transpose rule).

    On CPU, half-precision operands are laid out row-major first (:func:`_row_major`), which
    XLA's CPU backend needs to keep the dot in half precision. (GPU and TPU matmuls take
    transposed operands as they come, so there nothing is copied.)"""
    if x.dtype != jnp.float32 and jax.default_backend() == "cpu":
        x, w = _row_major(x), _row_major(w)
    nb = x.ndim - 2
    batch = tuple(range(nb))
    return jax.lax.dot_general(x, w, (((nb + 1,), (nb,)), (batch, batch)), preferred_element_type=jnp.float32)


def _row_major(a: Array) -> Array:
    """``a`` itself, stored row-major: a transposed array (a transpose, or an elementwise op of
    one) is copied, any other is untouched (the reshapes are bitcasts).

    XLA's CPU backend decides whether a half-precision dot runs in a library (XNNPACK / YNNPACK,
    on AMX or AVX512-BF16) or is converted to a float32 dot before it assigns layouts, from the
    layouts the HLO arrives with; there a transpose (and whatever is computed elementwise from
    it) is column-major, and a dot with such an operand is converted. Reshaping to 1-D makes the
    copy, the barrier keeps XLA from folding the reshapes (and the transpose) back into the dot.
    """
    return jax.lax.optimization_barrier(a.reshape(-1)).reshape(a.shape)


def mixed_matmul(x: Array, w: Array, dtype: Any) -> Array:
    """``x [..., N, K] @ w [..., K, M]`` (equal leading batch dims) with both cast to ``dtype``
    and the products accumulated in float32: [..., N, M] float32.

    In float32 exactly ``x @ w``. Otherwise a custom VJP (see the module docstring): the gradient
    dots are ``dtype`` x ``dtype`` -> float32 too, and the gradients come back in x's and w's dtypes.
    """
    if jnp.dtype(dtype) == jnp.float32:
        return jnp.matmul(x.astype(dtype), w.astype(dtype))
    return _mixed(x, w, jnp.dtype(dtype), jnp.dtype(x.dtype), jnp.dtype(w.dtype))


def _swap(a: Array) -> Array:
    return jnp.swapaxes(a, -1, -2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _mixed(x: Array, w: Array, dtype, x_dtype, w_dtype) -> Array:
    return product(x.astype(dtype), w.astype(dtype))


def _mixed_fwd(x, w, dtype, x_dtype, w_dtype):
    xc, wc = x.astype(dtype), w.astype(dtype)
    return product(xc, wc), (xc, wc)  # the residuals in the compute dtype, as JAX's own rule keeps them


def _mixed_bwd(dtype, x_dtype, w_dtype, res, g):
    xc, wc = res
    gc = g.astype(dtype)  # [..., N, M]
    dx = product(gc, _swap(wc))  # [..., N, K]
    dw = _fixed_layout(product(_swap(xc), gc))  # [..., K, M]
    return dx.astype(x_dtype), dw.astype(w_dtype)


def _fixed_layout(a: Array) -> Array:
    """``a`` (a half-precision dot's float32 result), on CPU behind a barrier: XLA's CPU backend
    otherwise folds a transpose that follows (a tied embedding's gradient is ``dw.T``) into the
    dot, computing ``gc.T @ xc`` with a transposed half-precision operand, which its libraries
    do not take and its fallback dot kernel cannot run ("Unsupported element type for
    DotThunk::Execute: BF16 x BF16 = F32"). The transpose is then a float32 copy after the dot."""
    if jax.default_backend() != "cpu":
        return a
    return jax.lax.optimization_barrier(a)


_mixed.defvjp(_mixed_fwd, _mixed_bwd)
