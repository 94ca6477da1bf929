"""The mixed-precision matmul contract (``models.matmul``): in bfloat16 every matmul of the
model, forward and backward, takes bfloat16 operands and accumulates in float32; in float32
the model computes bitwise what plain ``x @ w`` computed."""

from __future__ import annotations

import collections
import contextlib
import functools
import re
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import sft
from rlhf_jax.config import LoRAConfig, ModelConfig
from rlhf_jax.models import CausalLM, attention, layers, lm_head, quant, transformer
from rlhf_jax.models.matmul import mixed_matmul

TINY = dict(
    family="llama",
    vocab_size=256,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=128,
    activation="silu",
    tie_word_embeddings=True,
)


def _batch(b=2, t=16, seed=0):
    ids = np.random.default_rng(seed).integers(0, TINY["vocab_size"], (b, t)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, -3:] = 0  # some right padding
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "loss_mask": jnp.asarray(mask)}


@functools.cache
def _params(cfg):
    """Random float32 params of ``cfg``'s model (shapes by ``eval_shape``: an eager init takes seconds)."""
    shapes = nn.unbox(jax.eval_shape(CausalLM(cfg).init, jax.random.PRNGKey(0), _batch()["input_ids"])["params"])
    rng = np.random.default_rng(0)

    def leaf(path, s):
        base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0  # norm scales near 1
        return jnp.asarray(base + 0.05 * rng.normal(size=s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _loss(cfg):
    model = CausalLM(cfg)
    return lambda params, batch: sft.lm_objective(model, params, batch, chunk=None)[0]


def _jaxpr_dots(jaxpr) -> list:
    """Every dot_general equation of a (closed) jaxpr and of the jaxprs nested in it."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    out.extend(_jaxpr_dots(sub))
    return out


_DEF = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[")
_PARAM = re.compile(r"([\w.\-]+): (\w+)\[")
_DOT = re.compile(r"= (\w+)\[[^=]*? dot\(%?([\w.\-]+), %?([\w.\-]+)\)")


def _hlo_dots(hlo: str) -> collections.Counter:
    """The dot instructions of an optimized HLO module's text by operand and result types
    (the same parser as benchmarks/bf16_matmul.py)."""
    types = {}
    for line in hlo.splitlines():
        m = _DEF.match(line)
        if m:
            types[m.group(1)] = m.group(2)
    for m in _PARAM.finditer(hlo):
        types.setdefault(m.group(1), m.group(2))
    return collections.Counter(
        f"{types.get(m.group(2))} x {types.get(m.group(3))} -> {m.group(1)}"
        for m in map(_DOT.search, hlo.splitlines())
        if m
    )


def _cpu_has_bf16_dots() -> bool:
    """XLA's CPU backend keeps a bf16 dot in bf16 only on a CPU with AVX512-BF16 (or AMX)."""
    if jax.default_backend() != "cpu":
        return False
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def test_bf16_gradient_dots_are_bf16_with_f32_accumulation():
    cfg = ModelConfig(**TINY, dtype="bfloat16", lora=LoRAConfig(rank=4, alpha=8.0))
    params, batch = _params(cfg.replace(dtype="float32")), _batch()  # float32 master weights
    grad = jax.grad(_loss(cfg))
    traced = jax.jit(grad).trace(params, batch)  # traced once, for the jaxpr and the HLO
    dots = _jaxpr_dots(traced.jaxpr)
    # 7 projections (+ 2 LoRA products each) and 2 attention products, forward and backward, + the LM head
    assert len(dots) >= 3 * (9 + 1)
    kinds = collections.Counter(
        (str(e.invars[0].aval.dtype), str(e.invars[1].aval.dtype), str(e.params["preferred_element_type"]))
        for e in dots
    )
    assert set(kinds) == {("bfloat16", "bfloat16", "float32")}, kinds
    if _cpu_has_bf16_dots():  # and XLA keeps them so (no dot converted to float32 x float32)
        hlo = _hlo_dots(traced.lower().compile().as_text())
        assert hlo and set(hlo) == {"bf16 x bf16 -> f32"}, hlo


def test_mixed_matmul_gradients():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 3, 8, 16)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(2, 3, 16, 12)), jnp.float32)  # a float32 master weight

    def f(x, w):
        return jnp.sum(jnp.sin(mixed_matmul(x, w, jnp.bfloat16)))

    def ref(x, w):  # the same products in float32 from the bf16-rounded operands
        return jnp.sum(jnp.sin(x.astype(jnp.float32) @ w.astype(jnp.bfloat16).astype(jnp.float32)))

    (dx, dw), (rx, rw) = jax.grad(f, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w)
    assert mixed_matmul(x, w, jnp.bfloat16).dtype == jnp.float32
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32  # each in its input's dtype
    np.testing.assert_allclose(np.asarray(dx, np.float32), rx, rtol=0, atol=0.02 * float(jnp.abs(rx).max()))
    np.testing.assert_allclose(dw, rw, rtol=0, atol=0.02 * float(jnp.abs(rw).max()))


@pytest.mark.parametrize("chunk", [None, 8])
def test_tied_lm_head_gradient_runs_and_matches_float32(chunk):
    """The gradient of the LM head's token statistics (PPO's log-probs and entropy) with a tied
    embedding, executed: XLA's CPU backend once turned its weight-gradient dot into one it could
    not run ("Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32")."""
    rng = np.random.default_rng(2)
    emb = jnp.asarray(0.05 * rng.normal(size=(TINY["vocab_size"], TINY["hidden_size"])), jnp.float32)  # [V, D]
    hidden = jnp.asarray(rng.normal(size=(4, 24, TINY["hidden_size"])), jnp.float32)  # [B, T, D]
    targets = jnp.asarray(rng.integers(0, TINY["vocab_size"], (4, 24)), jnp.int32)  # [B, T]

    def grads(dtype):
        cfg = ModelConfig(**TINY, dtype=dtype)

        def f(emb, hidden):
            unembed = transformer.unembedding({"embed": {"embedding": emb}}, cfg)
            s = lm_head.token_stats(hidden, unembed, targets, cfg, temperature=0.7, chunk=chunk)
            return jnp.sum(s["logprob"]) + jnp.sum(s["entropy"])

        return jax.jit(jax.grad(f, argnums=(0, 1)))(emb, hidden)

    for got, want in zip(grads("bfloat16"), grads("float32")):
        assert got.dtype == jnp.float32 and np.isfinite(np.asarray(got)).all()
        np.testing.assert_allclose(got, want, rtol=0, atol=0.03 * float(jnp.abs(want).max()))


def _plain_matmul(x, w, dtype):
    return x.astype(dtype) @ w.astype(dtype)


def test_float32_model_is_bitwise_plain_matmul():
    """The logits of the whole float32 model (LoRA on) with every ``mixed_matmul`` swapped for ``x @ w``
    (gradients: the pieces' test below)."""
    cfg = ModelConfig(**TINY, dtype="float32", lora=LoRAConfig(rank=4, alpha=8.0))
    params, batch = _params(cfg), _batch()  # random LoRA B: the adapters count
    model = CausalLM(cfg)

    def run(params):
        return model.apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    got = jax.jit(run)(params)
    with contextlib.ExitStack() as stack:
        for module in (layers, attention, transformer):
            stack.enter_context(mock.patch.object(module, "mixed_matmul", _plain_matmul))
        stack.callback(jax.clear_caches)  # no trace made under the patch outlives it
        jax.clear_caches()  # nor one made before (jax.checkpoint'ed functions, scan bodies)
        want = jax.jit(run)(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def _old_linear(p, x, scale):  # Linear (bias, LoRA) as written before models.matmul, in float32
    x2 = x.reshape(-1, x.shape[-1])
    y2 = x2 @ p["kernel"]
    y2 = y2 + ((x2 @ p["lora_a"]) @ p["lora_b"]) * jnp.asarray(scale, jnp.float32)
    return y2.reshape(*x.shape[:-1], -1) + p["bias"]


@functools.partial(jax.checkpoint, static_argnums=(4,))
def _old_attend(qg, k, v, allowed, scale):  # attention._attend before models.matmul (no soft-capping)
    g = qg.shape[2] // allowed.shape[1]
    scores = jnp.matmul(qg, k).astype(jnp.float32) * scale
    mask = jnp.tile(allowed, (1, g, 1))[:, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.matmul(probs, v)


def test_float32_pieces_are_bitwise_the_old_code():
    """Linear (+ bias + LoRA), the attention core and the LM head in float32, values and
    gradients, against the code they replaced."""
    rng = np.random.default_rng(3)
    cfg = ModelConfig(**TINY, dtype="float32", qkv_bias=True, lora=LoRAConfig(rank=4, alpha=8.0, targets=("q",)))
    x = jnp.asarray(rng.normal(size=(2, 5, 64)), jnp.float32)
    lin = layers.dense(cfg, 48, ("embed", "mlp"), use_bias=True, name="q")
    p = jax.tree.map(lambda a: a + 0.01, nn.unbox(lin.init(jax.random.PRNGKey(1), x)["params"]))

    def new_lin(p, x):
        return jnp.sum(jnp.sin(lin.apply({"params": p}, x)))

    def old_lin(p, x):
        return jnp.sum(jnp.sin(_old_linear(p, x, cfg.lora.scale)))

    qg, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, 2, 10, 8), (2, 2, 8, 5), (2, 2, 5, 8)))
    allowed = jnp.asarray(rng.random((2, 5, 5)) < 0.7) | jnp.eye(5, dtype=bool)

    def new_att(qg, k, v):
        return jnp.sum(jnp.sin(attention._attend(qg, k, v, allowed, 0.35, None)))

    def old_att(qg, k, v):
        return jnp.sum(jnp.sin(_old_attend(qg, k, v, allowed, 0.35)))

    h, unembed = jnp.asarray(rng.normal(size=(2, 5, 64)), jnp.float32), jnp.asarray(rng.normal(size=(64, 256)))

    def new_head(h, u):
        return jnp.sum(jnp.sin(transformer.lm_logits(h, u, cfg)))

    def old_head(h, u):
        return jnp.sum(jnp.sin((h.reshape(-1, 64) @ u).reshape(2, 5, 256).astype(jnp.float32)))

    for new, old, args in (
        (new_lin, old_lin, (p, x)),
        (new_att, old_att, (qg, k, v)),
        (new_head, old_head, (h, unembed)),
    ):
        argnums = tuple(range(len(args)))
        got = jax.jit(jax.value_and_grad(new, argnums))(*args)
        want = jax.jit(jax.value_and_grad(old, argnums))(*args)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)


def test_qmatmul_float32_is_bitwise_plain():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(8, 64)), jnp.float32)
    leaves = dict(zip(("kernel_q", "kernel_scale"), quant.quantize_int8(rng.normal(size=(64, 32)), (0,))))
    w = quant.dequantize(leaves, (64, 32))

    def f(x):
        return jnp.sum(jnp.sin(quant.qmatmul(x, leaves, (64, 32), jnp.float32)))

    def ref(x):
        return jnp.sum(jnp.sin(x @ w))

    np.testing.assert_array_equal(jax.jit(jax.value_and_grad(f))(x)[1], jax.jit(jax.value_and_grad(ref))(x)[1])
    xb = x.astype(jnp.bfloat16)
    dxb = jax.grad(lambda x: jnp.sum(jnp.sin(quant.qmatmul(x, leaves, (64, 32), jnp.bfloat16))))(xb)
    assert dxb.dtype == jnp.bfloat16
    wb = w.astype(jnp.bfloat16).astype(jnp.float32)  # the same products in float32 from the bf16-rounded operands
    want = jax.grad(lambda x: jnp.sum(jnp.sin(x @ wb)))(xb.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(dxb, np.float32), want, rtol=0, atol=0.02 * float(jnp.abs(want).max()))
