"""rlhf_jax.models against transformers' PyTorch models (the reference).

Every family the library supports is built tiny and random by ``tests/hf_fixtures.py``,
saved as safetensors, imported with ``from_pretrained`` and compared logit for logit
with the torch model (eager attention, float32, explicit positions from the mask).
Also: export back to HF, the KV cache, bfloat16, and clear errors on bad checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from rlhf_jax.config import ModelConfig
from rlhf_jax.models import CausalLM, from_pretrained, init_cache, save_pretrained
from tests import hf_fixtures as F

FAMILIES = F.FAMILIES
# The cache path is shared by all families of a kind; these cover every distinct piece
# (learned positions, GQA RoPE, sliding window, partial rotary).
CACHE_FAMILIES = ("gpt2", "llama", "mistral_swa", "neox_parallel", "gemma3", "gemma2", "qwen3")

B, T = 3, 12
LEFT_LENGTHS = [12, 7, 3]  # one row without padding, different pad lengths
RIGHT_LENGTHS = [5, 12, 9]
ATOL = 1e-4


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def hf_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_models")


@pytest.fixture(scope="session")
def hf(hf_root):
    """name -> (directory, torch model)."""
    return lambda name: F.build(name, hf_root)


_LOADED: dict = {}


@pytest.fixture(scope="session")
def jx(hf):
    """name -> (model, params) from our from_pretrained (float32), loaded once."""

    def get(name):
        if name not in _LOADED:
            _LOADED[name] = from_pretrained(hf(name)[0], dtype=jnp.float32)
        return _LOADED[name]

    return get


_JIT: dict = {}


def forward_fn(name, model):
    """A jitted (params, ids, mask) -> (logits, hidden_states), one per loaded model."""
    key = ("fwd", name, id(model))
    if key not in _JIT:

        @jax.jit
        def fwd(params, ids, mask):
            out = model.apply({"params": params}, ids, attention_mask=mask)
            return out.logits, out.hidden_states

        _JIT[key] = fwd
    return _JIT[key]


def cached_fn(name, model):
    """A jitted (params, ids, mask, cache) -> (logits, cache)."""
    key = ("cached", name, id(model))
    if key not in _JIT:

        @jax.jit
        def step(params, ids, mask, cache):
            out = model.apply({"params": params}, ids, attention_mask=mask, cache=cache)
            return out.logits, out.cache

        _JIT[key] = step
    return _JIT[key]


def assert_close_at(ours, ref, mask, atol, what=""):
    ours, ref, mask = np.asarray(ours), np.asarray(ref), np.asarray(mask).astype(bool)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    diff = np.abs(ours - ref)[mask]
    assert np.all(np.isfinite(ours[mask])), f"{what}: non-finite values at real positions"
    assert diff.max() <= atol, f"{what}: max |diff| {diff.max():.3g} > {atol} at real positions"


# ----------------------------------------------------------------------------- import


EXPECTED_CONFIG = {
    "gpt2": dict(family="gpt2", tie_word_embeddings=True, kv_heads=4),
    "llama": dict(family="llama", tie_word_embeddings=False, kv_heads=2, rope_theta=500000.0),
    "llama_tied": dict(family="llama", tie_word_embeddings=True, kv_heads=4, rope_theta=10000.0),
    "qwen2": dict(family="llama", tie_word_embeddings=False, kv_heads=2, qkv_bias=True, rope_theta=1e6),
    "mistral": dict(family="llama", tie_word_embeddings=False, kv_heads=2),
    "llama_linear_rope": dict(family="llama", rope_scaling_factor=4.0, rope_llama3=None),
    "mistral_swa_linear_rope": dict(family="llama", sliding_window=5, rope_scaling_factor=4.0),
    "llama3_rope": dict(family="llama", kv_heads=2, rope_theta=5e5, rope_llama3=(8.0, 0.5, 4.0, 32)),
    "gemma2": dict(
        family="gemma3",
        hf_model_type="gemma2",
        qk_norm=False,
        layer_kinds=("sliding_attention", "full_attention"),
        rope_local_theta=None,
        query_pre_attn_scalar=24.0,
        attn_logit_softcap=0.05,
        final_logit_softcap=3.0,
    ),
    "qwen3": dict(
        family="llama",
        hf_model_type="qwen3",
        qk_norm=True,
        tie_word_embeddings=True,
        kv_heads=2,
        dim_per_head=24,
        qkv_bias=False,
    ),
    "mistral_swa": dict(family="llama", tie_word_embeddings=False, kv_heads=2, sliding_window=5),
    "neox_parallel": dict(family="neox", tie_word_embeddings=False, parallel_residual=True, rotary_pct=0.25),
    "neox_sequential": dict(family="neox", tie_word_embeddings=False, parallel_residual=False, rotary_pct=0.25),
    "gemma3": dict(
        family="gemma3",
        tie_word_embeddings=True,
        kv_heads=2,
        dim_per_head=16,
        sliding_window=4,
        layer_kinds=("sliding_attention", "full_attention"),
        rope_theta=1e6,
        rope_local_theta=1e4,
        rope_scaling_factor=4.0,
        query_pre_attn_scalar=24.0,
        attn_logit_softcap=None,
        final_logit_softcap=3.0,
        activation="gelu_tanh",
    ),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_from_pretrained_config_and_params(name, jx):
    model, params = jx(name)
    assert isinstance(model, CausalLM)
    cfg = model.config
    assert isinstance(cfg, ModelConfig)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (F.VOCAB, F.HIDDEN, F.LAYERS, F.HEADS)
    for field, want in EXPECTED_CONFIG[name].items():
        assert getattr(cfg, field) == want, (name, field, getattr(cfg, field), want)
    # params: a plain nested dict (not a FrozenDict) of float32 jax arrays
    assert type(params) is dict
    leaves = jax.tree_util.tree_leaves(params)
    assert leaves and all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in leaves)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_hf(name, side, hf, jx):
    _, torch_model = hf(name)
    model, params = jx(name)
    lengths = LEFT_LENGTHS if side == "left" else RIGHT_LENGTHS
    ids, mask = F.padded_batch(lengths, T, side=side, seed=1)
    ref_logits, ref_hidden = F.hf_forward(torch_model, ids, mask)

    logits, hidden = forward_fn(name, model)(params, jnp.asarray(ids), jnp.asarray(mask))
    assert logits.shape == (B, T, F.VOCAB) and logits.dtype == jnp.float32
    assert hidden.shape == (B, T, F.HIDDEN)
    assert_close_at(logits, ref_logits, mask, ATOL, f"{name} {side}-padded logits")
    assert_close_at(hidden, ref_hidden, mask, ATOL, f"{name} {side}-padded final hidden states")


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_explicit_position_ids(name, hf, jx):
    """position_ids= overrides the mask-derived positions (HF given the same positions)."""
    _, torch_model = hf(name)
    model, params = jx(name)
    ids, mask = F.padded_batch(LEFT_LENGTHS, T, side="left", seed=2)
    base = F.positions_from_mask(mask)
    # shifted starts and a gap: a uniform shift alone is invisible to RoPE (relative)
    pos = base + np.array([[3], [0], [7]], np.int32) + 2 * (base >= 2)
    ref_logits, _ = F.hf_forward(torch_model, ids, mask, position_ids=pos)
    out = model.apply(
        {"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=jnp.asarray(pos)
    )
    assert_close_at(out.logits, ref_logits, mask, ATOL, f"{name} explicit position_ids")
    # and the shift is not ignored
    unshifted, _ = F.hf_forward(torch_model, ids, mask)
    assert np.abs(np.asarray(out.logits) - unshifted)[mask == 1].max() > 1e-3


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral_swa", "gemma3"])
def test_mask_with_holes_equals_compacted(name, jx):
    """[right-padded prompt | response] (a hole of pads inside the row, as in a rollout)
    gives the same logits at real tokens as the same tokens packed to the right: the
    mask, not the slot layout, defines the sequence (positions and sliding window)."""
    model, params = jx(name)
    rng = np.random.default_rng(9)
    ids = rng.integers(0, F.VOCAB, size=(B, T), dtype=np.int32)
    holes = np.ones((B, T), np.int32)
    holes[1, 3:7] = 0  # 4 pads after a 3-token prompt
    holes[2, 1:3] = 0
    packed_ids = np.zeros_like(ids)
    packed_mask = np.zeros_like(holes)
    for b in range(B):
        real = ids[b][holes[b] == 1]
        packed_ids[b, T - real.size :] = real
        packed_mask[b, T - real.size :] = 1
    fwd = forward_fn(name, model)
    got, _ = fwd(params, jnp.asarray(ids), jnp.asarray(holes))
    ref, _ = fwd(params, jnp.asarray(packed_ids), jnp.asarray(packed_mask))
    got, ref = np.asarray(got), np.asarray(ref)
    for b in range(B):
        np.testing.assert_allclose(
            got[b][holes[b] == 1], ref[b][packed_mask[b] == 1], atol=1e-5, err_msg=f"{name} row {b}"
        )


def _rewrite_legacy_config(src, dst, name):
    """transformers-4 style config.json, as most hub checkpoints still have it."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    if name.startswith("neox"):
        cfg["rotary_pct"] = rope["partial_rotary_factor"]
        cfg["rotary_emb_base"] = rope["rope_theta"]
    else:
        cfg["rope_theta"] = rope["rope_theta"]
    with open(path, "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("name", ["llama", "neox_parallel"])
def test_legacy_transformers4_config(name, hf, tmp_path):
    """Top-level rope_theta / rotary_pct / rotary_emb_base (no rope_parameters) are honoured."""
    src, torch_model = hf(name)
    _rewrite_legacy_config(src, tmp_path / "legacy", name)
    model, params = from_pretrained(str(tmp_path / "legacy"), dtype=jnp.float32)
    ids, mask = F.padded_batch(LEFT_LENGTHS, T, side="left", seed=3)
    ref_logits, _ = F.hf_forward(torch_model, ids, mask)
    logits, _ = forward_fn(name + "_legacy", model)(params, jnp.asarray(ids), jnp.asarray(mask))
    assert_close_at(logits, ref_logits, mask, ATOL, f"{name} legacy config")


def test_llama3_rope_scaling_matches_transformers():
    """Llama 3.1's RoPE scaling at Llama 3.2-1B's settings: the inverse frequencies equal
    transformers' "llama3" ones (all three regimes occur), from the published 4.x ``rope_scaling``
    spelling and the 5.x ``rope_parameters`` alike; malformed or foreign settings are refused."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from rlhf_jax.models.hf_config import CheckpointError, config_from_hf
    from rlhf_jax.models.layers import llama3_inv_freq

    scaling = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    hf = transformers.LlamaConfig(
        hidden_size=2048,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **scaling},
    )
    want = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")[0].numpy()  # [32]
    cfg = config_from_hf(hf.to_dict())
    assert cfg.rope_llama3 == (32.0, 1.0, 4.0, 8192) and cfg.rope_theta == 500000.0
    legacy = {**hf.to_dict(), "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **scaling}}
    del legacy["rope_parameters"]
    assert config_from_hf(legacy) == cfg
    base = 1.0 / 500000.0 ** (np.arange(0, 64, 2, dtype=np.float32) / 64)
    got = np.asarray(llama3_inv_freq(jnp.asarray(base), *cfg.rope_llama3))
    np.testing.assert_allclose(got, want, rtol=2e-6)
    wavelen = 2 * np.pi / base
    assert (wavelen < 2048).any() and ((wavelen >= 2048) & (wavelen <= 8192)).any() and (wavelen > 8192).any()

    for bad, match in (
        ({"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}, "low_freq_factor"),
        ({"rope_type": "llama3", "rope_theta": 5e5, **scaling, "low_freq_factor": 5.0}, "low_freq_factor <"),
        ({"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}, "'yarn'"),
        ({"rope_type": "linear", "rope_theta": 5e5, "factor": -2.0}, "factor > 0"),
    ):
        with pytest.raises(CheckpointError, match=match):
            config_from_hf({**hf.to_dict(), "rope_parameters": bad})
    neox = F.make_config("neox_parallel").to_dict()
    with pytest.raises(CheckpointError, match="'llama3'"):
        config_from_hf({**neox, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, **scaling}})


def test_query_key_norm_exports_only_to_a_class_that_has_it():
    """``query_key_norm`` is the model's switch (Qwen3 on in the llama family, Gemma 2 off in
    Gemma's); export refuses a class whose layer does it the other way."""
    from rlhf_jax.models.hf_config import CheckpointError, config_to_hf

    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, query_key_norm=True)
    assert cfg.qk_norm and not cfg.replace(query_key_norm=None).qk_norm
    with pytest.raises(CheckpointError, match="query/key norm on"):
        config_to_hf(cfg)
    assert type(config_to_hf(cfg.replace(hf_model_type="qwen3"))).__name__ == "Qwen3Config"
    gemma = ModelConfig(family="gemma3", vocab_size=64, hidden_size=32, num_layers=1, num_heads=4)
    assert gemma.qk_norm
    with pytest.raises(CheckpointError, match="query/key norm off"):
        config_to_hf(gemma.replace(query_key_norm=False))
    assert type(config_to_hf(gemma.replace(query_key_norm=False, hf_model_type="gemma2"))).__name__ == "Gemma2Config"


def test_sharded_checkpoint(hf, tmp_path):
    """A checkpoint split over several safetensors files with an index loads like one file."""
    _, torch_model = hf("llama")
    torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    model, params = from_pretrained(str(tmp_path / "sharded"), dtype=jnp.float32)
    ids, mask = F.padded_batch(LEFT_LENGTHS, T, side="left", seed=3)
    ref_logits, _ = F.hf_forward(torch_model, ids, mask)
    logits, _ = forward_fn("llama_sharded", model)(params, jnp.asarray(ids), jnp.asarray(mask))
    assert_close_at(logits, ref_logits, mask, ATOL, "sharded llama")


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", FAMILIES)
def test_save_pretrained_round_trip(name, hf, jx, tmp_path):
    src, torch_model = hf(name)
    model, params = jx(name)
    out_dir = tmp_path / "export"
    save_pretrained(model, params, str(out_dir))
    assert os.path.exists(out_dir / "config.json") and os.path.exists(out_dir / "model.safetensors")
    with open(os.path.join(src, "config.json")) as f:
        src_type = json.load(f)["model_type"]
    with open(out_dir / "config.json") as f:
        assert json.load(f)["model_type"] == src_type

    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(out_dir), attn_implementation="eager", dtype=torch.float32, output_loading_info=True
    )
    reloaded.eval()
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert type(reloaded) is type(torch_model)

    for side, lengths in (("left", LEFT_LENGTHS), ("right", RIGHT_LENGTHS)):
        ids, mask = F.padded_batch(lengths, T, side=side, seed=4)
        ref, _ = F.hf_forward(torch_model, ids, mask)
        got, _ = F.hf_forward(reloaded, ids, mask)
        assert_close_at(got, ref, mask, 1e-5, f"{name} round trip ({side})")


# ----------------------------------------------------------------------------- KV cache

P_LEN, R = 8, 4
PROMPT_LENGTHS = [8, 5, 2]


def _cache_case(seed=5):
    prompt, pmask = F.padded_batch(PROMPT_LENGTHS, P_LEN, side="left", seed=seed)
    cont = np.random.default_rng(seed + 1).integers(0, F.VOCAB, size=(B, R), dtype=np.int32)
    full_ids = np.concatenate([prompt, cont], axis=1)
    full_mask = np.concatenate([pmask, np.ones((B, R), np.int32)], axis=1)
    return prompt, pmask, cont, full_ids, full_mask


@pytest.mark.parametrize("name", CACHE_FAMILIES)
def test_cached_decoding_matches_full_forward(name, jx):
    model, params = jx(name)
    prompt, pmask, cont, full_ids, full_mask = _cache_case()
    full_logits, _ = forward_fn(name + "_full", model)(params, jnp.asarray(full_ids), jnp.asarray(full_mask))
    full_logits = np.asarray(full_logits)

    step = cached_fn(name, model)
    cache = init_cache(model.config, batch_size=B, max_length=P_LEN + R, dtype=jnp.float32)
    logits, cache = step(params, jnp.asarray(prompt), jnp.asarray(pmask), cache)
    assert int(cache.index) == P_LEN
    assert_close_at(logits, full_logits[:, :P_LEN], pmask, 1e-5, f"{name} prefill")
    for i in range(R):
        logits, cache = step(params, jnp.asarray(cont[:, i : i + 1]), jnp.ones((B, 1), jnp.int32), cache)
        assert logits.shape == (B, 1, F.VOCAB)
        assert int(cache.index) == P_LEN + i + 1
        assert_close_at(logits[:, 0], full_logits[:, P_LEN + i], np.ones(B), 1e-5, f"{name} decode step {i}")


@pytest.mark.parametrize("name", ["llama", "mistral_swa", "gemma3"])
def test_chunked_prefill_matches_full_forward(name, jx):
    """Prefill in two chunks (the first chunk is all padding for one row), then decode."""
    model, params = jx(name)
    prompt, pmask, cont, full_ids, full_mask = _cache_case(seed=7)
    full_logits, _ = forward_fn(name + "_full", model)(params, jnp.asarray(full_ids), jnp.asarray(full_mask))
    full_logits = np.asarray(full_logits)

    step = cached_fn(name, model)
    cut = 5
    assert pmask[:, :cut].sum(1).min() == 0  # the short row has only padding in chunk 1
    cache = init_cache(model.config, batch_size=B, max_length=P_LEN + R, dtype=jnp.float32)
    logits1, cache = step(params, jnp.asarray(prompt[:, :cut]), jnp.asarray(pmask[:, :cut]), cache)
    assert int(cache.index) == cut
    assert_close_at(logits1, full_logits[:, :cut], pmask[:, :cut], 1e-5, f"{name} chunk 1")
    logits2, cache = step(params, jnp.asarray(prompt[:, cut:]), jnp.asarray(pmask[:, cut:]), cache)
    assert int(cache.index) == P_LEN
    assert_close_at(logits2, full_logits[:, cut:P_LEN], pmask[:, cut:], 1e-5, f"{name} chunk 2")
    for i in range(R):
        logits, cache = step(params, jnp.asarray(cont[:, i : i + 1]), jnp.ones((B, 1), jnp.int32), cache)
        assert_close_at(logits[:, 0], full_logits[:, P_LEN + i], np.ones(B), 1e-5, f"{name} decode step {i}")


# ----------------------------------------------------------------------------- bfloat16


@pytest.mark.parametrize("name", ["gpt2", "llama", "neox_parallel", "gemma3"])
def test_bfloat16(name, hf, jx):
    src, _ = hf(name)
    model32, params32 = jx(name)
    model16, params16 = from_pretrained(src, dtype=jnp.bfloat16)
    ids, mask = F.padded_batch(LEFT_LENGTHS, T, side="left", seed=8)
    ref, _ = forward_fn(name, model32)(params32, jnp.asarray(ids), jnp.asarray(mask))
    got, hidden = forward_fn(name + "_bf16", model16)(params16, jnp.asarray(ids), jnp.asarray(mask))
    assert got.dtype == jnp.float32
    assert hidden.shape == (B, T, F.HIDDEN)
    ref, got, m = np.asarray(ref), np.asarray(got), mask.astype(bool)
    assert np.all(np.isfinite(got[m]))
    scale = np.abs(ref[m]).max()
    err = np.abs(got - ref)[m].max()
    assert err <= 0.05 * scale + 0.02, (err, scale)
    assert err > 0, "bfloat16 logits are bit-identical to float32: the dtype was ignored"


# ----------------------------------------------------------------------------- bad checkpoints


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "model.pt"])
def test_pickle_checkpoint_is_refused(filename, hf, tmp_path):
    src, torch_model = hf("llama")
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(os.path.join(src, "config.json"), d / "config.json")
    torch.save(torch_model.state_dict(), d / filename)
    with pytest.raises(ValueError, match=r"(?i)safetensors") as exc:
        from_pretrained(str(d), dtype=jnp.float32)
    assert re.search(r"(?i)pickle|\.bin|\.pt\b", str(exc.value)), str(exc.value)


def test_unsupported_architecture_bert(tmp_path):
    cfg = transformers.BertConfig(
        vocab_size=F.VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    transformers.BertForMaskedLM(cfg).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"(?i)\bbert\b"):
        from_pretrained(str(tmp_path / "bert"), dtype=jnp.float32)


def test_unsupported_architecture_made_up(hf, tmp_path):
    d = _copy(hf("gpt2")[0], tmp_path / "made_up")
    F.edit_config(d, model_type="made_up_lm", architectures=["MadeUpForCausalLM"])
    with pytest.raises(ValueError, match="made_up_lm"):
        from_pretrained(d, dtype=jnp.float32)


def _edit_tensors(d, fn):
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


WRONG_SHAPE = {
    "llama": ("model.layers.0.self_attn.q_proj.weight", lambda x: np.zeros((x.shape[0], x.shape[1] // 2), x.dtype)),
    "gpt2": ("transformer.h.1.attn.c_attn.weight", lambda x: np.ascontiguousarray(x.T)),  # transposed Conv1D
    "neox_parallel": ("gpt_neox.layers.0.attention.query_key_value.bias", lambda x: x[:-4].copy()),
}


@pytest.mark.parametrize("name", list(WRONG_SHAPE))
def test_wrong_shape_names_the_tensor(name, hf, tmp_path):
    d = _copy(hf(name)[0], tmp_path / "bad")
    key, change = WRONG_SHAPE[name]

    def edit(t):
        t[key] = change(t[key])
        assert t[key].shape != load_file(os.path.join(hf(name)[0], "model.safetensors"))[key].shape

    _edit_tensors(d, edit)
    with pytest.raises(ValueError, match=re.escape(key)):
        from_pretrained(d, dtype=jnp.float32)


@pytest.mark.parametrize(
    "name,key", [("llama", "model.layers.1.mlp.up_proj.weight"), ("neox_sequential", "embed_out.weight")]
)
def test_missing_tensor_names_it(name, key, hf, tmp_path):
    d = _copy(hf(name)[0], tmp_path / "bad")
    _edit_tensors(d, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=re.escape(key)):
        from_pretrained(d, dtype=jnp.float32)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_unexpected_tensor_names_it(name, hf, tmp_path):
    d = _copy(hf(name)[0], tmp_path / "bad")
    prefix = "model" if name == "llama" else "transformer"
    key = f"{prefix}.layers.0.mlp.extra_proj.weight"
    _edit_tensors(d, lambda t: t.__setitem__(key, np.ones((4, 4), np.float32)))
    with pytest.raises(ValueError, match=re.escape(key)):
        from_pretrained(d, dtype=jnp.float32)
