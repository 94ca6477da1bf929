"""Reward model: learns the tiny world's preference (held-out pair accuracy), K-way batching
(one forward pass over the B*K responses; loss = mean over each prompt's C(K,2) pairs), the
score read at the EOS and never at a pad, the demonstration bias, exact resume in a new
process, and bad ranking data."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import checkpoint, data, losses, ops, train_loop
from rlhf_jax.drivers import run_rm
from rlhf_jax.reward import ranking_rewards, reward_objective, score_sequences
from rlhf_jax.tasks import tiny
from tests import stage_fixtures as F

N_STEPS, K_STEPS = 20, 7
SEQ = F.RM_PROMPT_LEN + F.RM_RESPONSE_LEN


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return F.shared_world(tmp_path_factory, "tiny_world")


def _cfg(world, out, **run_changes):
    """20 steps on 6 of the 8 users (48 groups of K=4), validated on the other 2 every 10 steps."""
    run = F.run_config(split_fractions=(0.75, 0.25, 0.0), eval_every=10, mesh=F.MESH_1x8x1, **run_changes)
    return F.rm_config(world, out, max_steps=N_STEPS, demonstrations=str(world.files["demonstrations"]), run=run)


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """``straight``: N steps in one go; ``resumed``: K steps, then a new process
    (``python -m rlhf_jax.cli rm``, in the background while ``straight`` trains) resumes to N.
    Built once per session."""

    def build(root):
        # (no demonstrations in the first part: the bias is set by whichever run finishes the training)
        run_rm(dataclasses.replace(_cfg(world, root / "resumed", stop_at_step=K_STEPS), demonstrations=None))
        state, meta, step = F.read_checkpoint(root / "resumed")
        resume = F.Background(["rm", *F.cli_args(_cfg(world, root / "resumed"))], root / "resumed.log")
        try:
            run_rm(_cfg(world, root / "straight"))
            return {
                "first_k": {"step": step, "state_step": int(state["step"]), "meta": meta},
                "resume": resume.result(),
            }
        finally:
            resume.close()

    root, built = F.build_once(tmp_path_factory, "rm_runs", build)
    return SimpleNamespace(root=root, straight=root / "straight", **built)


@pytest.fixture(scope="module")
def rm(world):
    """The random base model with a fresh scalar head (as a reward model starts)."""
    model, params, tok = checkpoint.load_model(world.base, head="scalar")
    return SimpleNamespace(model=model, params=params, tok=tok)


# ----------------------------------------------------------------------------- learning


@functools.partial(jax.jit, static_argnums=0)
def _ranking_metrics(model, params, batch):
    return losses.k_way_ranking_loss(ranking_rewards(model, params, batch), batch["ranks"], batch["valid"])[1]


def _accuracy(model, params, tok, rankings_path) -> tuple[float, float]:
    records, _ = data.load_records(str(rankings_path), "rankings")
    ds = data.tokenize_rankings(records, tok, max_prompt_len=F.RM_PROMPT_LEN, max_response_len=F.RM_RESPONSE_LEN)
    keep = ("input_ids", "attention_mask", "ranks", "valid", "end_index")
    m = _ranking_metrics(model, params, {k: v for k, v in ds.arrays.items() if k in keep})
    return float(m["accuracy"]), float(m["num_pairs"])


def test_learns_the_preference_on_held_out_data(world, runs, tmp_path):
    metrics = train_loop.read_metrics(runs.straight)
    train = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert len(train) == N_STEPS and train[-1] < 0.3 * train[0]
    val = [m for m in metrics if "val/accuracy" in m]
    assert [m["step"] for m in val] == [10, 20]  # validation users never trained on
    assert val[-1]["val/accuracy"] >= 0.9 and val[-1]["val/num_pairs"] == 16 * 6
    # a fresh draw of the world (other prompts, other responses), through the loaded run directory
    held = tiny.write_data(tmp_path / "held_out", seed=1)
    model, params, tok = checkpoint.load_model(runs.straight)
    assert model.head == "scalar"
    accuracy, pairs = _accuracy(model, params, tok, held["rankings"])
    assert pairs == 64 * 6 and accuracy >= 0.9
    # the untrained reward model is at chance level on the same data
    base, base_params, _ = checkpoint.load_model(world.base, head="scalar")
    assert _accuracy(base, base_params, tok, held["rankings"])[0] < 0.75


def test_ensemble_accuracy_orders_by_the_members_mean_score(world, runs, rm):
    """``evaluate.rm_group_accuracy`` with a tuple of params: each group's pairs ordered by the
    members' mean score, checked against a numpy loop over the pairs; one member is the RM alone."""
    from rlhf_jax.tasks import evaluate

    trained = checkpoint.load_model(runs.straight)[1]
    records, _ = data.load_records(str(world.files["rankings"]), "rankings")
    records = records[:24]
    lengths = {"max_prompt_len": F.RM_PROMPT_LEN, "max_response_len": F.RM_RESPONSE_LEN}
    single = evaluate.rm_group_accuracy(rm.model, trained, records, rm.tok, **lengths)
    assert evaluate.rm_group_accuracy(rm.model, (trained,), records, rm.tok, **lengths) == single

    ds = data.tokenize_rankings([{**r, "example_id": i} for i, r in enumerate(records)], rm.tok, **lengths)
    batch = {k: ds.arrays[k] for k in ("input_ids", "attention_mask", "ranks", "valid", "end_index")}
    # the untrained RM's scores scaled to the trained one's spread: the mean orders unlike either alone
    spread = [np.std(np.asarray(ranking_rewards(rm.model, p, batch))) for p in (trained, rm.params)]
    untrained = jax.tree_util.tree_map_with_path(
        lambda path, x: x * (spread[0] / spread[1]) if "score" in jax.tree_util.keystr(path) else x, rm.params
    )
    members = (trained, untrained)
    got = evaluate.rm_group_accuracy(rm.model, members, records, rm.tok, **lengths)
    scores = np.mean([np.asarray(ranking_rewards(rm.model, p, batch)) for p in members], axis=0)  # [G, K]
    want_acc, want_pairs = [], []
    for g in range(scores.shape[0]):
        real = [i for i in range(scores.shape[1]) if batch["valid"][g, i]]
        pairs = [(i, j) for i in real for j in real if batch["ranks"][g, i] < batch["ranks"][g, j]]
        if pairs:
            want_acc.append(np.mean([scores[g, i] > scores[g, j] for i, j in pairs]))
            want_pairs.append(len(pairs))
    np.testing.assert_allclose(got["group_accuracy"], want_acc)
    assert got["group_pairs"] == want_pairs
    assert got["accuracy"] == pytest.approx(np.dot(want_acc, want_pairs) / sum(want_pairs))
    alone = evaluate.rm_group_accuracy(rm.model, untrained, records, rm.tok, **lengths)["accuracy"]
    assert len({got["accuracy"], single["accuracy"], alone}) == 3, (got["accuracy"], single["accuracy"], alone)


def test_packed_rows_take_the_steps_of_one_response_a_row(world, runs, tmp_path):
    """``--run.pad-to pack`` (the default, ``runs.straight``: the real responses several to a
    row, sharded over 8 devices) and ``bucket`` (every slot its own row) take the same steps:
    the train losses of 6 steps agree to float rounding."""
    out = tmp_path / "bucket"
    run_rm(dataclasses.replace(_cfg(world, out, pad_to="bucket", stop_at_step=6), demonstrations=None))
    packed, bucket = F.train_losses(runs.straight), F.train_losses(out)
    assert sorted(bucket) == list(range(1, 7))
    for step, loss in bucket.items():
        np.testing.assert_allclose(loss, packed[step], rtol=1e-4, err_msg=f"step {step}")


def test_demonstrations_score_mean_zero(world, runs):
    info = checkpoint.read_model_info(runs.straight)
    bias = info["reward_bias"]
    assert bias != 0.0
    model, params, tok = checkpoint.load_model(runs.straight)
    records, _ = data.load_records(str(world.files["demonstrations"]), "demonstrations")
    demos = data.tokenize_demonstrations(records, tok, seq_len=SEQ)
    assert len(demos) == 64
    score = jax.jit(lambda p, i, m: score_sequences(model, p, i, m))
    scores = np.asarray(score(params, demos.arrays["input_ids"], demos.arrays["attention_mask"]))
    assert abs(scores.mean()) < 1e-4 and scores.std() > 1e-2
    # the bias is only added when loading: the checkpoint holds the trained head unchanged
    with checkpoint.Checkpointer(runs.straight / "checkpoints", best_metric="val/accuracy", best_mode="max") as ckpt:
        best = ckpt.best_step()
    assert best in (10, 20)
    raw, _, _ = F.read_checkpoint(runs.straight, best)
    np.testing.assert_allclose(np.asarray(params["score"]["bias"]), raw["params"]["score"]["bias"] + bias, rtol=1e-6)


# ----------------------------------------------------------------------------- exact resume


def test_exact_resume_in_a_new_process(runs):
    step, meta = runs.first_k["step"], runs.first_k["meta"]
    assert step == runs.first_k["state_step"] == K_STEPS
    assert meta["stage"] == "rm" and meta["iterators"]["train"] == {"seed": 0, "epoch": 1, "position": 8}
    rc, stderr = runs.resume
    assert rc == 0, stderr[-3000:]
    assert f"rm: resumed from step {K_STEPS}" in stderr

    want, want_meta, _ = F.read_checkpoint(runs.straight, N_STEPS)
    got, got_meta, _ = F.read_checkpoint(runs.root / "resumed", N_STEPS)
    F.assert_trees_equal(got, want)  # params, optimizer state, RNG, step: bitwise
    assert got_meta["iterators"] == want_meta["iterators"]
    assert F.train_losses(runs.root / "resumed") == F.train_losses(runs.straight)

    def val(run_dir):
        return [(m["step"], m["val/accuracy"]) for m in train_loop.read_metrics(run_dir) if "val/accuracy" in m]

    assert val(runs.root / "resumed") == val(runs.straight)
    # the demonstration bias the resumed process computed is the same number
    assert (
        checkpoint.read_model_info(runs.root / "resumed")["reward_bias"]
        == checkpoint.read_model_info(runs.straight)["reward_bias"]
    )


# ----------------------------------------------------------------------------- K-way batching


def _groups(tok):
    """Three prompts: K=4 with a tie, K=3 (one padded slot), K=2 (a chosen/rejected pair)."""
    records = [
        {"prompt": "w2 w3", "responses": ["w1 w1 w4", "w5 w1", "w6", "w7 w8 w9"], "ranks": [0, 1, 1, 2]},
        {"prompt": "w10 w11 w12", "responses": ["w13", "w1 w14", "w15 w16"], "ranks": [2, 0, 1]},
        {"prompt": "w17", "responses": ["w1 w18", "w19 w20 w21 w22"], "ranks": [0, 1]},
    ]
    ds = data.tokenize_rankings(records, tok, max_prompt_len=F.RM_PROMPT_LEN, max_response_len=F.RM_RESPONSE_LEN)
    assert len(ds) == 3 and ds.arrays["input_ids"].shape == (3, 4, SEQ)
    return {k: jnp.asarray(v) for k, v in ds.arrays.items() if k not in ("example_id", "prompt_len")}


class _CountingModel:
    """Delegates to a model and records the input shape of every ``apply``."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def apply(self, variables, input_ids, **kwargs):
        self.calls.append(tuple(input_ids.shape))
        return self.model.apply(variables, input_ids, **kwargs)


@pytest.fixture(scope="module")
def kway(rm):
    """The compiled reward objective on ``_groups``, traced through a model that counts its calls."""
    batch = _groups(rm.tok)
    spy = _CountingModel(rm.model)
    loss, metrics = jax.jit(lambda p, b: reward_objective(spy, p, b))(rm.params, batch)
    return SimpleNamespace(batch=batch, calls=list(spy.calls), loss=float(loss), metrics=jax.device_get(metrics))


def test_k_responses_scored_in_one_forward_pass(kway):
    # the whole objective (rewards, all pairs, loss) calls the network ONCE, on the B*K sequences
    assert kway.calls == [(3 * 4, SEQ)]
    # pairs: C(4,2) - 1 tie = 5, C(3,2) = 3, C(2,2) = 1
    assert kway.metrics["num_pairs"] == 9 and kway.metrics["num_prompts_with_pairs"] == 3


def test_loss_is_the_mean_over_each_prompts_pairs(rm, kway):
    """Against a naive reference: each response scored in a forward pass of its own, a Python loop over pairs."""
    ids, mask, valid, ranks = (np.asarray(kway.batch[k]) for k in ("input_ids", "attention_mask", "valid", "ranks"))
    score_one = jax.jit(lambda i, m: score_sequences(rm.model, rm.params, i, m)[0])  # [1, L] -> scalar
    per_prompt, correct, n_pairs = [], 0, 0
    for b in range(ids.shape[0]):
        scores = {k: float(score_one(ids[b, k][None], mask[b, k][None])) for k in range(ids.shape[1]) if valid[b, k]}
        terms = []
        for i, j in itertools.combinations(sorted(scores), 2):
            if ranks[b, i] == ranks[b, j]:
                continue  # a tie carries no order
            w, lo = (i, j) if ranks[b, i] < ranks[b, j] else (j, i)
            terms.append(-math.log(1.0 / (1.0 + math.exp(-(scores[w] - scores[lo])))))
            correct += scores[w] > scores[lo]
        n_pairs += len(terms)
        per_prompt.append(sum(terms) / len(terms))  # this prompt's C(K,2) pairs (ties excluded)
    naive = sum(per_prompt) / len(per_prompt)  # then the mean over prompts

    np.testing.assert_allclose(kway.loss, naive, rtol=1e-5, atol=1e-6)
    assert kway.metrics["num_pairs"] == n_pairs == 9
    np.testing.assert_allclose(kway.metrics["accuracy"], correct / n_pairs, atol=1e-6)
    assert 0.1 < naive < 5.0  # a random head: a non-trivial loss


# ----------------------------------------------------------------------------- score at the EOS


def test_score_is_read_at_the_eos_not_at_a_pad(world, rm):
    records, _ = data.load_records(str(world.files["demonstrations"]), "demonstrations")
    ds = data.tokenize_demonstrations(records[:8], rm.tok, seq_len=SEQ)
    ids, mask = np.asarray(ds.arrays["input_ids"]), np.asarray(ds.arrays["attention_mask"])
    assert (mask.sum(1) < SEQ).all()  # every row has padding after its EOS
    score = jax.jit(lambda i, m: score_sequences(rm.model, rm.params, i, m))
    base = np.asarray(score(jnp.asarray(ids), jnp.asarray(mask)))

    last = np.asarray(ops.last_token_index(jnp.asarray(mask)))
    assert (ids[np.arange(len(ids)), last] == rm.tok.eos_token_id).all()  # the last real token is the EOS
    forward = jax.jit(lambda i, m: rm.model.apply({"params": rm.params}, i, attention_mask=m).values)  # [B, T]
    values = np.asarray(forward(ids, mask))
    np.testing.assert_allclose(base, values[np.arange(len(ids)), last], atol=1e-6, rtol=0)
    assert np.abs(values[:, -1] - base).max() > 1e-3  # reading the final (pad) slot would give other numbers

    # other ids in the pad slots
    noise = np.random.default_rng(0).integers(0, len(rm.tok), ids.shape).astype(ids.dtype)
    other_pads = np.where(mask == 1, ids, noise)
    np.testing.assert_allclose(np.asarray(score(jnp.asarray(other_pads), jnp.asarray(mask))), base, atol=1e-6, rtol=0)
    # more padding
    more = np.concatenate([ids, np.full((len(ids), 8), rm.tok.pad_token_id, ids.dtype)], axis=1)
    more_mask = np.concatenate([mask, np.zeros((len(ids), 8), mask.dtype)], axis=1)
    np.testing.assert_allclose(np.asarray(score(jnp.asarray(more), jnp.asarray(more_mask))), base, atol=1e-5, rtol=0)
    # left padding instead of right padding
    left = np.stack([np.roll(r, SEQ - int(m.sum())) for r, m in zip(ids, mask)])
    left_mask = np.stack([np.roll(m, SEQ - int(m.sum())) for m in mask])
    np.testing.assert_allclose(np.asarray(score(jnp.asarray(left), jnp.asarray(left_mask))), base, atol=1e-5, rtol=0)


def test_ranking_rewards_ignore_pad_ids(rm):
    batch = _groups(rm.tok)
    rewards = jax.jit(lambda b: ranking_rewards(rm.model, rm.params, b))
    base = np.asarray(rewards(batch))
    ids, mask, end, valid = (np.asarray(batch[k]) for k in ("input_ids", "attention_mask", "end_index", "valid"))
    b, k = np.nonzero(valid)
    assert (ids[b, k, end[b, k]] == rm.tok.eos_token_id).all()  # end_index is each response's EOS
    noise = np.random.default_rng(1).integers(0, len(rm.tok), ids.shape).astype(ids.dtype)
    changed = dict(batch, input_ids=jnp.asarray(np.where(mask == 1, ids, noise)))
    got = np.asarray(rewards(changed))
    np.testing.assert_allclose(got[valid], base[valid], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- bad inputs

GOOD = {"prompt": "w2 w3", "responses": ["w1 w3", "w4"], "ranks": [0, 1]}
BAD_ROWS = {
    "invalid_json": '{"prompt": "w2 w3", "responses": ["w3"',
    "missing_field": json.dumps({"prompt": "w2 w3", "responses": ["w3", "w4"]}),
    "wrong_type": json.dumps({"prompt": "w2 w3", "responses": ["w3", "w4"], "ranks": "01"}),
    "empty_string": json.dumps({"prompt": "w2 w3", "responses": ["w3", " "], "ranks": [0, 1]}),
    "too_few_responses": json.dumps({"prompt": "w2 w3", "responses": ["w3"], "ranks": [0]}),
    "ties_only": json.dumps({"prompt": "w2 w3", "responses": ["w3", "w4", "w5"], "ranks": [1, 1, 1]}),
    "duplicate_responses_only": json.dumps({"prompt": "w2 w3", "chosen": "w3 w4", "rejected": "w3 w4"}),
}


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_bad_ranking_row_names_file_line_and_reason(world, tmp_path, reason):
    path = F.write_good_then_bad(tmp_path / "rankings.jsonl", GOOD, [BAD_ROWS[reason]])
    with pytest.raises(data.DataError, match=rf"rankings.jsonl:61: {reason}") as e:
        run_rm(F.rm_config(world, tmp_path / "run", data=str(path)))
    assert e.value.line == 61 and e.value.reason == reason


def test_skip_mode_counts_every_bad_group(world, tmp_path, caplog):
    """on_error="skip" (the loading step run_rm uses): load-time and tokenisation-time drops, by reason."""
    after_tokens = json.dumps({"prompt": "w2", "chosen": "w3  w4", "rejected": "w3 w4"})  # equal once tokenised
    long_response = json.dumps({"prompt": "w2", "responses": [" ".join(["w3"] * 20), "w4"], "ranks": [0, 1]})
    long_prompt = json.dumps({"prompt": " ".join(["w2"] * 20), "responses": ["w3", "w4"], "ranks": [0, 1]})
    path = F.write_good_then_bad(
        tmp_path / "rankings.jsonl", GOOD, [*BAD_ROWS.values(), after_tokens, long_response, long_prompt]
    )
    caplog.set_level(logging.WARNING)
    run = F.run_config(on_error="skip", max_skip_fraction=0.2, split_fractions=(1.0, 0.0, 0.0))
    tokenize = lambda recs: data.tokenize_rankings(  # noqa: E731
        recs, world.tok, max_prompt_len=F.RM_PROMPT_LEN, max_response_len=F.RM_RESPONSE_LEN
    )
    train, _, _, _ = data.load_split_tokenize(str(path), "rankings", run, tokenize)
    assert (
        "kept 63/70 rows (7 skipped: duplicate_responses_only=1, empty_string=1, invalid_json=1, "
        "missing_field=1, ties_only=1, too_few_responses=1, wrong_type=1)"
    ) in caplog.text
    assert train.report.counts == {
        "duplicate_responses_only": 1,  # chosen == rejected after tokenisation: dropped, not a ln 2 pair
        "response_too_long": 1,  # a note: the response was dropped ...
        "too_few_responses_after_length": 1,  # ... and with it the group, which had no other pair
        "prompt_too_long": 1,
    }
    assert len(train) == 60 and train.report.kept == 60


def test_all_groups_dropped_is_an_error(world, tmp_path):
    path = tmp_path / "rankings.jsonl"
    path.write_text(json.dumps({"prompt": " ".join(["w2"] * 20), "responses": ["w3", "w4"], "ranks": [0, 1]}) + "\n")
    with pytest.raises(data.DataError, match="prompt_too_long"):
        run_rm(F.rm_config(world, tmp_path / "run", data=str(path)))


def test_tokenizer_larger_than_embedding(world, tmp_path):
    small = tiny.make_model_dir(
        tmp_path / "small", vocab_size=len(world.tok) - 6, hidden_size=F.HIDDEN, tokenizer=world.tok
    )
    n = len(world.tok)
    with pytest.raises(ValueError, match=rf"tokenizer has {n} tokens but the model's vocab_size is {n - 6}"):
        run_rm(F.rm_config(world, tmp_path / "run", init=str(small)))


def test_config_rejects_k_below_two(world, tmp_path):
    with pytest.raises(ValueError, match="max_k"):
        dataclasses.replace(F.rm_config(world, tmp_path / "run"), max_k=1)


# ----------------------------------------------------------------------------- SFT selection by RM score


def test_sft_selects_the_checkpoint_the_reward_model_scores_best(world, runs, tmp_path):
    """InstructGPT selects the final SFT checkpoint by RM score on validation prompts, not by loss."""
    from rlhf_jax.drivers import run_sft

    run = F.run_config(
        split_fractions=(0.75, 0.25, 0.0), eval_every=3, save_every=3, keep_last=1, keep_best=1, mesh=F.MESH_1x8x1
    )
    out = run_sft(
        F.sft_config(
            world, tmp_path / "sft", max_steps=9, run=run, select_by_reward=str(runs.straight), select_prompts=8
        )
    )
    evals = {m["step"]: m["val/rm_score"] for m in train_loop.read_metrics(out) if "val/rm_score" in m}
    assert sorted(evals) == [3, 6, 9] and all(np.isfinite(v) for v in evals.values())
    best = max(evals, key=evals.get)
    steps = checkpoint.Checkpointer(out / "checkpoints").all_steps()
    assert best in steps and 9 in steps  # best-by-RM kept beside the latest
    _, params_best, _ = checkpoint.load_model(out, which="best")
    state, _, _ = F.read_checkpoint(out, best)
    F.assert_trees_equal(jax.tree.map(np.asarray, params_best), state["params"])
