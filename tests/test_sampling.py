"""rlhf_jax.sampling.generate: greedy parity with transformers, logprobs, EOS, filters.

Models are tiny random HF checkpoints from ``tests/hf_fixtures.py`` imported with
``from_pretrained``; the references are transformers' ``generate`` (greedy) and fresh
forward passes (logprobs), and the exact softmax (sampling frequencies).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from rlhf_jax.models import from_pretrained
from rlhf_jax.sampling import GenerationOutput, generate
from tests import hf_fixtures as F

B, P_LEN, R = 3, 8, 10
PROMPT_LENGTHS = [8, 5, 3]  # left-padded prompts, one without padding
PAD = 0


@pytest.fixture(scope="session")
def hf_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_models_sampling")


_LOADED: dict = {}


@pytest.fixture(scope="session")
def load(hf_root):
    """name -> (directory, torch model, model, params).

    'peaky': GPT-2 with a sharp output distribution; 'gpt2_strong': GPT-2 with large
    weights (varied greedy output); otherwise a family of ``hf_fixtures``.
    """

    def get(name):
        if name not in _LOADED:
            if name == "peaky":
                d, tm = F.build_peaky(hf_root, 8.0)
            elif name == "gpt2_strong":
                d, tm = F.build_strong("gpt2", hf_root)
            else:
                d, tm = F.build(name, hf_root)
            model, params = from_pretrained(d, dtype=jnp.float32)
            _LOADED[name] = (d, tm, model, params)
        return _LOADED[name]

    return get


_JIT: dict = {}


def logits_fn(model):
    if id(model) not in _JIT:

        @jax.jit
        def f(params, ids, mask):
            return model.apply({"params": params}, ids, attention_mask=mask).logits

        _JIT[id(model)] = f
    return _JIT[id(model)]


def prompts(side="left", seed=11, lengths=PROMPT_LENGTHS):
    ids, mask = F.padded_batch(lengths, P_LEN, side=side, seed=seed, pad_id=PAD)
    return ids, mask


def run(model, params, ids, mask, key=0, **kw):
    kw.setdefault("max_new_tokens", R)
    kw.setdefault("pad_token_id", PAD)
    out = generate(model, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(key), **kw)
    assert isinstance(out, GenerationOutput)
    n = kw["max_new_tokens"]
    tokens, rmask, logprobs = np.asarray(out.tokens), np.asarray(out.mask), np.asarray(out.logprobs)
    assert tokens.shape == (ids.shape[0], n) and tokens.dtype == np.int32
    assert rmask.shape == (ids.shape[0], n)
    assert logprobs.shape == (ids.shape[0], n) and logprobs.dtype == np.float32
    return tokens, rmask.astype(np.int32), logprobs


def check_eos_structure(tokens, rmask, logprobs, eos, pad):
    """mask is 1 up to and including the first EOS and 0 after; tokens after it are pad."""
    for b in range(tokens.shape[0]):
        hits = np.flatnonzero(tokens[b] == eos) if eos is not None else np.array([], int)
        stop = hits[0] + 1 if hits.size else tokens.shape[1]
        assert np.all(rmask[b, :stop] == 1), (b, rmask[b])
        assert np.all(rmask[b, stop:] == 0), (b, rmask[b])
        assert np.all(tokens[b, stop:] == pad), (b, tokens[b])
        assert np.all(logprobs[b, stop:] == 0.0), (b, logprobs[b])
        assert np.all(np.isfinite(logprobs[b, :stop])) and np.all(logprobs[b, :stop] <= 1e-6)


# ----------------------------------------------------------------------------- greedy vs HF


@torch.no_grad()
def hf_greedy(torch_model, ids, mask, eos, max_new_tokens=R):
    gen_cfg = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=PAD
    )
    out = torch_model.generate(
        torch.as_tensor(ids, dtype=torch.long),
        attention_mask=torch.as_tensor(mask, dtype=torch.long),
        generation_config=gen_cfg,
    )
    return out[:, ids.shape[1] :].numpy().astype(np.int32)


def pick_eos(free_run):
    """A token that some row emits at step >= 2 while another row never emits it."""
    best = None
    for tok in np.unique(free_run):
        first = [np.flatnonzero(row == tok)[0] if (row == tok).any() else None for row in free_run]
        hit = [f for f in first if f is not None]
        if len(hit) == len(first) or min(hit) < 2 or min(hit) > free_run.shape[1] - 3:
            continue
        score = (len(set(hit)), -abs(min(hit) - 3))  # rows stopping at different steps, ~step 3
        if best is None or score > best[0]:
            best = (score, int(tok))
    assert best is not None, f"no usable EOS in the free-running greedy output:\n{free_run}"
    return best[1]


@pytest.mark.parametrize("name", ["gpt2_strong", "llama"])
def test_greedy_matches_transformers(name, load):
    _, torch_model, model, params = load(name)
    ids, mask = prompts()

    # without EOS: every step is generated, all R of them, and equals HF
    free_hf = hf_greedy(torch_model, ids, mask, eos=None)
    assert free_hf.shape == (B, R)
    tokens, rmask, logprobs = run(model, params, ids, mask, temperature=0.0, eos_token_id=None)
    np.testing.assert_array_equal(tokens, free_hf)
    assert np.all(rmask == 1)

    # with an EOS that occurs mid-way in some rows only: rows stop independently
    eos = pick_eos(free_hf)
    ref = hf_greedy(torch_model, ids, mask, eos=eos)
    tokens, rmask, logprobs = run(model, params, ids, mask, temperature=0.0, eos_token_id=eos)
    n = ref.shape[1]
    np.testing.assert_array_equal(tokens[:, :n], ref)
    assert np.all(tokens[:, n:] == PAD)  # HF stops when all rows are done; we keep fixed shapes
    check_eos_structure(tokens, rmask, logprobs, eos, PAD)
    stopped = (tokens == eos).any(1)
    assert stopped.any() and not stopped.all(), "the EOS should stop some rows but not all"

    # greedy logprobs are under softmax(logits) (no temperature)
    full_ids = np.concatenate([ids, tokens], 1)
    full_mask = np.concatenate([mask, rmask], 1)
    logits = np.asarray(logits_fn(model)(params, jnp.asarray(full_ids), jnp.asarray(full_mask)))
    ref_lp = _gather_logprobs(logits, tokens, 1.0)
    np.testing.assert_allclose(logprobs * rmask, ref_lp * rmask, atol=1e-5)
    assert np.all(tokens[rmask == 1] == logits[:, P_LEN - 1 : -1].argmax(-1)[rmask == 1])


@pytest.mark.parametrize("name", ["llama", "mistral_swa"])
def test_right_padded_prompts_equal_left_padded(name, load):
    """Same prompts, padded on the other side: same greedy tokens (for a sliding-window
    model too: the window counts tokens, not padding slots)."""
    _, _, model, params = load(name)
    left_ids, left_mask = prompts("left", seed=12)
    right_ids, right_mask = prompts("right", seed=12)
    for b in range(B):  # same prompts, only the padding side differs
        np.testing.assert_array_equal(left_ids[b][left_mask[b] == 1], right_ids[b][right_mask[b] == 1])
    lt, lm, llp = run(model, params, left_ids, left_mask, temperature=0.0, eos_token_id=None)
    rt, rm, rlp = run(model, params, right_ids, right_mask, temperature=0.0, eos_token_id=None)
    np.testing.assert_array_equal(rt, lt)
    np.testing.assert_array_equal(rm, lm)
    np.testing.assert_allclose(rlp, llp, atol=1e-5)


# ----------------------------------------------------------------------------- logprobs


def _gather_logprobs(logits, tokens, temperature):
    """log softmax(logits / T) at the response tokens; logits over prompt + response."""
    resp_logits = logits[:, P_LEN - 1 : -1] / temperature  # position t predicts token t + 1
    logp = jax.nn.log_softmax(jnp.asarray(resp_logits), axis=-1)
    return np.take_along_axis(np.asarray(logp), tokens[..., None].astype(np.int64), -1)[..., 0]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("name", ["llama", "peaky"])
def test_logprobs_equal_fresh_forward(name, temperature, load):
    _, _, model, params = load(name)
    ids, mask = prompts(seed=13)
    # the peaky model's favourite token as EOS, so that some rows stop early
    eos = 17 if name == "llama" else int(np.asarray(logits_fn(model)(params, ids, mask))[0, -1].argmax())
    tokens, rmask, logprobs = run(model, params, ids, mask, key=3, temperature=temperature, eos_token_id=eos)
    check_eos_structure(tokens, rmask, logprobs, eos, PAD)
    full_ids = np.concatenate([ids, tokens], 1)
    full_mask = np.concatenate([mask, rmask], 1)
    logits = np.asarray(logits_fn(model)(params, jnp.asarray(full_ids), jnp.asarray(full_mask)))
    ref = _gather_logprobs(logits, tokens, temperature)
    np.testing.assert_allclose(logprobs * rmask, ref * rmask, atol=1e-5)
    if name == "peaky":
        assert (rmask == 0).any(), "expected some rows to stop at the EOS"


# ----------------------------------------------------------------------------- randomness


def test_sampling_is_reproducible(load):
    _, _, model, params = load("llama")
    ids, mask = prompts(seed=14)
    a = run(model, params, ids, mask, key=5, temperature=1.0, eos_token_id=None)
    b = run(model, params, ids, mask, key=5, temperature=1.0, eos_token_id=None)
    c = run(model, params, ids, mask, key=6, temperature=1.0, eos_token_id=None)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0]), "a different key gave the same samples"
    # rows of one batch are not copies of each other either
    assert len({tuple(r) for r in a[0]}) == B


N_SAMPLES = 2048


@pytest.fixture(scope="module")
def one_step(load):
    """The peaky model, one prompt repeated N_SAMPLES times, and p = softmax(HF logits)."""
    _, torch_model, model, params = load("peaky")
    ids, mask = F.padded_batch([6], P_LEN, side="left", seed=0, pad_id=PAD)
    logits, _ = F.hf_forward(torch_model, ids, mask)
    p = torch.softmax(torch.tensor(logits[0, -1], dtype=torch.float64), -1).numpy()
    reps = lambda x: np.repeat(x, N_SAMPLES, axis=0)
    return model, params, reps(ids), reps(mask), p


def _check_frequencies(tokens, q):
    """Per-token frequencies within 5 standard errors (+1e-3) of q; q is the target law."""
    n = tokens.size
    f = np.bincount(tokens.ravel(), minlength=q.size) / n
    bound = 5 * np.sqrt(q * (1 - q) / n) + 1e-3
    bad = np.flatnonzero(np.abs(f - q) > bound)
    assert bad.size == 0, {int(i): (float(f[i]), float(q[i])) for i in bad}


def _run_one_step(one_step, key, **kw):
    model, params, ids, mask, p = one_step
    tokens, rmask, logprobs = run(model, params, ids, mask, key=key, max_new_tokens=1, eos_token_id=None, **kw)
    assert np.all(rmask == 1)
    # logprobs are under the unfiltered softmax(logits / T), whatever the filters
    t = kw.get("temperature", 1.0)
    logq = np.log(p) / t
    logq = logq - np.log(np.exp(logq - logq.max()).sum()) - logq.max()
    np.testing.assert_allclose(logprobs[:, 0], logq[tokens[:, 0]], atol=1e-4)
    return tokens[:, 0], p


def test_sampling_frequencies_match_softmax(one_step):
    tokens, p = _run_one_step(one_step, key=7, temperature=1.0, top_k=0, top_p=1.0)
    assert p.max() < 0.5 and len(np.unique(tokens)) > 10  # a real test of the law, not argmax
    _check_frequencies(tokens, p)


def test_top_k_sampling(one_step):
    tokens, p = _run_one_step(one_step, key=8, temperature=1.0, top_k=5, top_p=1.0)
    top5 = np.argsort(p)[::-1][:5]
    assert set(np.unique(tokens)) <= set(top5.tolist()), "sampled a token outside the top 5"
    q = np.zeros_like(p)
    q[top5] = p[top5] / p[top5].sum()
    _check_frequencies(tokens, q)


def test_top_p_sampling(one_step):
    tokens, p = _run_one_step(one_step, key=9, temperature=1.0, top_k=0, top_p=0.5)
    order = np.argsort(p)[::-1]
    cum = np.cumsum(p[order])
    # nucleus: the smallest set of most likely tokens with mass >= top_p
    n_keep = int(np.searchsorted(cum, 0.5) + 1)
    assert np.abs(cum - 0.5).min() > 1e-3, "ambiguous nucleus boundary: pick another prompt"
    nucleus = order[:n_keep]
    assert 2 < n_keep < 20
    assert set(np.unique(tokens)) <= set(nucleus.tolist()), "sampled a token outside the nucleus"
    q = np.zeros_like(p)
    q[nucleus] = p[nucleus] / p[nucleus].sum()
    _check_frequencies(tokens, q)


# ----------------------------------------------------------------------------- EOS


def test_eos_none_runs_all_steps_and_eos_stops_rows(load):
    _, _, model, params = load("peaky")
    ids, mask = prompts(seed=15)
    tokens, rmask, logprobs = run(model, params, ids, mask, key=10, temperature=1.0, eos_token_id=None)
    assert np.all(rmask == 1) and np.all(logprobs < 0)
    # the most frequent token of that run as EOS: with the same key the rows stop there
    vals, counts = np.unique(tokens, return_counts=True)
    eos = int(vals[counts.argmax()])
    assert eos != PAD
    t2, m2, lp2 = run(model, params, ids, mask, key=10, temperature=1.0, eos_token_id=eos)
    check_eos_structure(t2, m2, lp2, eos, PAD)
    assert (m2 == 0).any()
