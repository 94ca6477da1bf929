"""GPT-3 style attention on the GPT-2 family: layers alternating dense and locally banded.

``ModelConfig(family="gpt2", layer_types=("full_attention", "sliding_attention"),
sliding_window=W)`` is the same per-layer mechanism as Mistral's window and Gemma 3's
layer_types. transformers has no GPT-2 with banded layers, so the reference is a naive
numpy GPT-2 with a mask per layer, itself checked against transformers' GPT-2 on the
dense configuration; the banded model is checked against it, and export is refused.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import CausalLM, CheckpointError, from_pretrained, init_cache, save_pretrained
from tests import hf_fixtures as F

T, W = 12, 3  # sequences 4x longer than the band
LEFT, RIGHT = [12, 7, 3], [5, 12, 9]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(torch GPT-2, our dense model, params) from the shared tiny GPT-2 fixture."""
    d, torch_model = F.build("gpt2", tmp_path_factory.mktemp("banded"))
    model, params = from_pretrained(d, dtype=jnp.float32)
    return torch_model, model, params


def _gpt3(model: CausalLM, window: int = W) -> CausalLM:
    return CausalLM(model.config.replace(layer_types=("full_attention", "sliding_attention"), sliding_window=window))


def _layernorm(x, p, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def naive_gpt2(params: dict, cfg, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Logits [B, T, V] of a GPT-2 written out in float64 numpy, one explicit mask per layer:
    key s is visible to query q iff s <= q, s is real, and (dense layer or pos[q] - pos[s] < window)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)  # [B, T]
    x = p["embed"]["embedding"][ids] + p["pos_embed"]["embedding"][pos]  # [B, T, D]
    causal = np.tril(np.ones((ids.shape[1],) * 2, bool))[None] & (mask[:, None, :] > 0)  # [B, T, S]
    distance = pos[:, :, None] - pos[:, None, :]  # [B, T, S]
    gelu = lambda z: 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))  # noqa: E731
    for layer, window in enumerate(cfg.layer_windows):
        lp = jax.tree.map(lambda a, layer=layer: a[layer], p["layers"])
        a = lp["attn"]
        h = _layernorm(x, lp["attn_norm"], cfg.norm_eps)
        q, k, v = (np.einsum("btd,dhk->bthk", h, a[n]["kernel"]) + a[n]["bias"] for n in "qkv")  # [B, T, H, Dh]
        scores = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(cfg.dim_per_head)  # [B, H, T, S]
        allowed = causal & ((distance < window) if window else True)  # [B, T, S]
        scores = np.where(allowed[:, None], scores, -1e30)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        o = np.einsum("bhqs,bshk->bqhk", probs, v)  # [B, T, H, Dh]
        x = x + np.einsum("bqhk,hkd->bqd", o, a["o"]["kernel"]) + a["o"]["bias"]
        h = _layernorm(x, lp["mlp_norm"], cfg.norm_eps)
        up = gelu(h @ lp["mlp"]["up"]["kernel"] + lp["mlp"]["up"]["bias"])  # [B, T, F]
        x = x + up @ lp["mlp"]["down"]["kernel"] + lp["mlp"]["down"]["bias"]
    x = _layernorm(x, p["final_norm"], cfg.norm_eps)
    return x @ p["embed"]["embedding"].T  # [B, T, V]


def _close(ours, ref, mask, atol, what):
    m = np.asarray(mask).astype(bool)
    diff = np.abs(np.asarray(ours, np.float64) - ref)[m].max()
    assert diff <= atol, f"{what}: max |diff| {diff:.3g} > {atol}"


@pytest.mark.parametrize("side", ["left", "right"])
def test_reference_is_gpt2_on_dense_layers(side, gpt2):
    """The naive reference with every layer dense is transformers' GPT-2 (so is our model)."""
    torch_model, model, params = gpt2
    ids, mask = F.padded_batch(LEFT if side == "left" else RIGHT, T, side=side, seed=3)
    ref, _ = F.hf_forward(torch_model, ids, mask)
    assert model.config.layer_windows == (0, 0)
    _close(naive_gpt2(params, model.config, ids, mask), ref, mask, 1e-4, "naive dense vs transformers")
    ours = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
    _close(ours, ref, mask, 1e-4, "ours dense vs transformers")
    # a banded layer whose band covers the whole sequence is a dense layer
    wide = _gpt3(model, window=T).apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    _close(wide.logits, ref, mask, 1e-4, "band >= length vs transformers")


@pytest.mark.parametrize("side", ["left", "right"])
def test_banded_layers_match_the_naive_reference(side, gpt2):
    torch_model, dense, params = gpt2
    model = _gpt3(dense)
    assert model.config.layer_kinds == ("full_attention", "sliding_attention")
    assert model.config.layer_windows == (0, W)
    ids, mask = F.padded_batch(LEFT if side == "left" else RIGHT, T, side=side, seed=4)
    ref = naive_gpt2(params, model.config, ids, mask)
    ours = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
    _close(ours, ref, mask, 1e-4, f"GPT-3 style ({side}-padded) vs naive reference")
    # the band really cuts: long rows differ from the dense model past the band, not before it
    dense_logits = np.asarray(
        dense.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
    )
    real = np.asarray(mask).astype(bool)
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    diff = np.abs(np.asarray(ours) - dense_logits).max(-1)  # [B, T]
    assert diff[real & (pos < W)].max() < 1e-5
    assert diff[real & (pos >= W + 1)].min() > 1e-4


def test_banded_cache_decoding_and_generation(gpt2):
    """Prefill + token-by-token decoding through the stacked cache equals the full forward."""
    _, dense, params = gpt2
    model = _gpt3(dense)
    ids, mask = F.padded_batch([10, 6, 2], T, side="left", seed=5)
    full = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    step = jax.jit(lambda p, i, m, c: model.apply({"params": p}, i, attention_mask=m, cache=c))
    out = step(
        params, jnp.asarray(ids[:, :8]), jnp.asarray(mask[:, :8]), init_cache(model.config, batch_size=3, max_length=T)
    )
    got = [np.asarray(out.logits)]
    for t in range(8, T):
        out = step(params, jnp.asarray(ids[:, t : t + 1]), jnp.asarray(mask[:, t : t + 1]), out.cache)
        got.append(np.asarray(out.logits))
    _close(np.concatenate(got, 1), full, mask, 1e-5, "banded cached decoding")


def test_export_is_refused(gpt2, tmp_path):
    _, dense, params = gpt2
    with pytest.raises(CheckpointError, match="sliding"):
        save_pretrained(_gpt3(dense), params, tmp_path / "gpt3")
    assert not (tmp_path / "gpt3").exists()
    save_pretrained(dense, params, tmp_path / "gpt2")  # the dense model still exports
