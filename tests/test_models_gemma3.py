"""Gemma 3 (``gemma3_text``) beyond the shared parity tests of test_models.py.

test_models.py runs the ``gemma3`` fixture through every generic check (config import,
logits left/right-padded with sequences longer than the sliding window, KV cache,
chunked prefill, bf16, export round trip). Here: greedy generation against
transformers' ``generate``, transformers-4 style config.json spellings, and the
settings that are refused (with the field named) on import and on export.
"""

from __future__ import annotations

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from rlhf_jax.config import ModelConfig
from rlhf_jax.models import CausalLM, CheckpointError, config_from_hf, from_pretrained, save_pretrained
from rlhf_jax.sampling import generate
from tests import hf_fixtures as F

PAD, B, P_LEN, R = 0, 3, 9, 10


@pytest.fixture(scope="module")
def strong(tmp_path_factory):
    """A Gemma 3 with large random weights and an untied head (varied greedy output: a tied tiny
    model repeats its last token), and a realistic final cap."""
    cls, kw = F.SPECS["gemma3"]
    torch.manual_seed(7)
    config = getattr(transformers, cls)(**{**kw, "final_logit_softcapping": 30.0, "tie_word_embeddings": False})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    F.perturb_(model, scale=0.2, vector_scale=0.1)
    d = F.save(model, tmp_path_factory.mktemp("gemma3") / "strong")
    return d, model.eval()


@torch.no_grad()
def _hf_greedy(torch_model, ids, mask):
    gen = transformers.GenerationConfig(do_sample=False, max_new_tokens=R, eos_token_id=None, pad_token_id=PAD)
    out = torch_model.generate(
        torch.as_tensor(ids, dtype=torch.long),
        attention_mask=torch.as_tensor(mask, dtype=torch.long),
        generation_config=gen,
    )
    return out[:, ids.shape[1] :].numpy().astype(np.int32)


def test_greedy_generation_matches_transformers(strong):
    """Prompts longer than the sliding window (4), left- and right-padded: the same greedy
    tokens as transformers' generate on the left-padded prompts."""
    d, torch_model = strong
    model, params = from_pretrained(d, dtype=jnp.float32)
    assert model.config.layer_windows == (4, 0) and model.config.final_logit_softcap == 30.0
    lengths = [9, 6, 5]
    left_ids, left_mask = F.padded_batch(lengths, P_LEN, side="left", seed=21, pad_id=PAD)
    right_ids, right_mask = F.padded_batch(lengths, P_LEN, side="right", seed=21, pad_id=PAD)
    ref = _hf_greedy(torch_model, left_ids, left_mask)
    assert len({tuple(r) for r in ref}) == B and all(len(set(r)) > 2 for r in ref), ref  # varied output
    for ids, mask in ((left_ids, left_mask), (right_ids, right_mask)):
        out = generate(
            model,
            params,
            jnp.asarray(ids),
            jnp.asarray(mask),
            jax.random.key(0),
            max_new_tokens=R,
            temperature=0.0,
            pad_token_id=PAD,
        )
        np.testing.assert_array_equal(np.asarray(out.tokens), ref)
        assert np.all(np.asarray(out.mask) == 1)


def _v4_config() -> dict:
    """The tiny fixture's config as transformers 4.x wrote Gemma 3 configs (hub checkpoints)."""
    cfg = F.make_config("gemma3").to_dict()
    cfg.pop("rope_parameters")
    cfg.pop("layer_types")
    cfg.update(
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        sliding_window_pattern=2,
        attn_logit_softcapping=None,
    )
    return cfg


def test_transformers4_config_spelling():
    """rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern (no layer_types)."""
    with pytest.warns(UserWarning, match="attn_logit_softcapping"):  # stored, never applied by transformers
        v5 = config_from_hf(F.make_config("gemma3").to_dict())
    v4 = config_from_hf(_v4_config())
    assert v4 == v5
    assert v4.layer_kinds == ("sliding_attention", "full_attention")
    assert v4.layer_rope == ((10_000.0, 1.0), (1_000_000.0, 4.0))
    # the real models' 5:1 pattern from sliding_window_pattern=6
    six = config_from_hf({**_v4_config(), "num_hidden_layers": 8, "sliding_window_pattern": 6})
    assert six.layer_windows == (4, 4, 4, 4, 4, 0, 4, 4)


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(rope_scaling={"rope_type": "yarn", "factor": 8.0}), "rope_type"),
        (dict(rope_scaling={"rope_type": "linear", "factor": -2.0}), "factor"),
        (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
        (dict(layer_types=["sliding_attention", "chunked_attention"]), "layer_types"),
        (dict(layer_types=["sliding_attention"]), "layer_types"),
    ],
)
def test_unsupported_settings_are_refused(change, field):
    with pytest.raises(CheckpointError, match=field):
        config_from_hf({**_v4_config(), **change})


def test_local_rope_scaling_is_refused():
    cfg = F.make_config("gemma3").to_dict()
    cfg["rope_parameters"]["sliding_attention"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    with pytest.raises(CheckpointError, match="sliding_attention rope_type"):
        config_from_hf(cfg)


def test_export_refuses_what_transformers_would_drop(tmp_path):
    cfg = ModelConfig(
        family="gemma3",
        vocab_size=32,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
        sliding_window=4,
        layer_types=("sliding_attention", "full_attention"),
        attn_logit_softcap=50.0,
    )
    model = CausalLM(cfg)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))["params"]
    with pytest.raises(CheckpointError, match="attn_logit_softcap"):
        save_pretrained(model, params, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_hub_layout_loads(strong, tmp_path):
    """A transformers-4 config.json next to the same weights gives the same logits."""
    d, torch_model = strong
    dst = tmp_path / "v4"
    shutil.copytree(d, dst)
    cfg = _v4_config()
    cfg.update(final_logit_softcapping=30.0, tie_word_embeddings=False)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    model, params = from_pretrained(dst, dtype=jnp.float32)
    ids, mask = F.padded_batch([12, 7, 3], 12, side="left", seed=5)
    ref, _ = F.hf_forward(torch_model, ids, mask)
    got = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    m = mask.astype(bool)
    assert np.abs(got - ref)[m].max() <= 1e-4 * max(1.0, np.abs(ref[m]).max())
