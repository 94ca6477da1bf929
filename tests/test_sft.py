"""SFT end to end on the tiny offline world: the loss falls and a memorised answer is
reproduced; resume is exact across processes (params, optimizer state, RNG, data position);
restores onto another mesh; the same losses on every mesh and on one device; SIGTERM
saves and exits with EXIT_PREEMPTED; bad data fails clearly or is skipped and counted."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import signal
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import checkpoint, data, train_loop
from rlhf_jax.config import MeshConfig, RunConfig, SFTConfig
from rlhf_jax.drivers import run_sft
from rlhf_jax.optim import learning_rate_schedule
from rlhf_jax.sampling import generate
from rlhf_jax.tasks import tiny
from tests import stage_fixtures as F

N_STEPS, K_STEPS = 12, 5
DROPOUT = 0.1  # dropout on: every step draws from the state's RNG, so a wrong RNG restore shows


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return F.shared_world(tmp_path_factory, "tiny_world")


def _cfg(world, out, **run_changes) -> SFTConfig:
    run = F.run_config(mesh=F.MESH_1x8x1, **run_changes)
    return F.sft_config(world, out, max_steps=N_STEPS, dropout=DROPOUT, run=run)


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """The runs the resume and mesh tests compare, built once per session.

    * ``straight``: N steps in one go on the (1, 8, 1) mesh;
    * ``resumed``: the first K of the same N steps (``stop_at_step`` keeps the N-step
      schedule), then a NEW PROCESS (``python -m rlhf_jax.cli sft``) that resumes to N;
    * ``other_mesh``: a copy of the K-step run, resumed to N on the (2, 2, 2) mesh;
    * ``one_device``: the N steps in a process that has a single CPU device.
    The child processes run in the background while the in-process runs train.
    """

    def build(root):
        one_device = F.Background(
            ["sft", *F.cli_args(_cfg(world, root / "one_device"), mesh=MeshConfig())],
            root / "one_device.log",
            num_devices=1,
        )
        resume = None
        try:
            run_sft(_cfg(world, root / "resumed", stop_at_step=K_STEPS))
            _, meta, step = F.read_checkpoint(root / "resumed")
            shutil.copytree(root / "resumed", root / "other_mesh")
            resume = F.Background(["sft", *F.cli_args(_cfg(world, root / "resumed"))], root / "resumed.log")
            run_sft(_cfg(world, root / "straight"))
            run_sft(dataclasses.replace(_cfg(world, root / "other_mesh"), run=F.run_config(mesh=F.MESH_2x2x2)))
            return {
                "first_k": {"step": step, "meta": meta},
                "resume": resume.result(),
                "one_device": one_device.result(),
            }
        finally:
            one_device.close()
            if resume is not None:
                resume.close()

    root, built = F.build_once(tmp_path_factory, "sft_runs", build)
    return SimpleNamespace(root=root, **built)


# ----------------------------------------------------------------------------- exact resume


def test_stop_at_step_saves_there_with_the_data_position(runs):
    step, meta = runs.first_k["step"], runs.first_k["meta"]
    assert step == K_STEPS and int(F.read_checkpoint(runs.root / "resumed", K_STEPS)[0]["step"]) == K_STEPS
    # 64 demonstrations, batch 16: 4 steps per epoch, so K=5 steps end one batch into epoch 1
    assert meta["iterators"]["train"] == {"seed": 0, "epoch": 1, "position": 16}
    assert meta["stage"] == "sft" and meta["config"]["max_steps"] == N_STEPS
    assert meta["config"]["run"]["stop_at_step"] == K_STEPS


def test_schedule_spans_max_steps_not_the_stop():
    """Why stop_at_step exists: a shorter max_steps is a different (shorter) cosine schedule."""
    optim = dataclasses.replace(SFTConfig.optim, learning_rate=3e-3)
    short, full = learning_rate_schedule(optim, K_STEPS), learning_rate_schedule(optim, N_STEPS)
    assert float(short(K_STEPS - 1)) < float(full(K_STEPS - 1))
    with pytest.raises(ValueError, match="stop_at_step"):
        RunConfig(stop_at_step=0)


def test_exact_resume_in_a_new_process(runs):
    """N steps straight == K steps, then `python -m rlhf_jax.cli sft` resuming for N - K: bitwise."""
    rc, stderr = runs.resume
    assert rc == 0, stderr[-3000:]
    assert f"sft: resumed from step {K_STEPS}" in stderr

    want, want_meta, want_step = F.read_checkpoint(runs.root / "straight")
    got, got_meta, got_step = F.read_checkpoint(runs.root / "resumed")
    assert want_step == got_step == N_STEPS
    assert set(got) == {"step", "params", "opt_state", "rng"}
    F.assert_trees_equal(got["params"], want["params"])
    F.assert_trees_equal(got["opt_state"], want["opt_state"])  # Adam moments and the schedule's count
    F.assert_trees_equal(got["rng"], want["rng"])
    assert int(got["step"]) == int(want["step"]) == N_STEPS
    assert got_meta["iterators"] == want_meta["iterators"]
    # every step's loss (dropout masks included) is the same
    assert F.train_losses(runs.root / "resumed") == F.train_losses(runs.root / "straight")


def test_resume_onto_another_mesh(runs):
    """Saved on (1, 8, 1), resumed on (2, 2, 2): equal to float tolerance."""
    want, want_meta, _ = F.read_checkpoint(runs.root / "straight")
    got, got_meta, step = F.read_checkpoint(runs.root / "other_mesh")
    assert step == N_STEPS
    F.assert_trees_equal(got["params"], want["params"], atol=1e-5)
    F.assert_trees_equal(got["opt_state"], want["opt_state"], atol=1e-5)
    F.assert_trees_equal(got["rng"], want["rng"])
    assert got_meta["iterators"] == want_meta["iterators"]


# ----------------------------------------------------------------------------- meshes


@pytest.mark.parametrize("mesh", ["2x2x2", "8x1x1", "one_device"])
def test_same_losses_on_every_mesh(world, runs, tmp_path, mesh):
    """(1, 8, 1) vs (2, 2, 2) (steps K+1..N, after the resume) vs (8, 1, 1) on 8 fake devices,
    and a separate process with one device."""
    if mesh == "one_device":
        rc, stderr = runs.one_device
        assert rc == 0, stderr[-3000:]
        run_dir = runs.root / "one_device"
    elif mesh == "2x2x2":
        run_dir = runs.root / "other_mesh"
    else:
        run_dir = run_sft(dataclasses.replace(_cfg(world, tmp_path / "run"), run=F.run_config(mesh=F.MESH_8x1x1)))
    want, got = F.train_losses(runs.root / "straight"), F.train_losses(run_dir)
    assert sorted(got) == sorted(want) == list(range(1, N_STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- learning


def test_loss_falls_and_a_memorised_answer_is_reproduced(world, tmp_path):
    demos = [json.loads(line) for line in world.files["demonstrations"].read_text().splitlines()][:8]
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in demos))
    optim = dataclasses.replace(SFTConfig.optim, learning_rate=1e-2, final_lr_fraction=1.0)
    cfg = F.sft_config(
        world,
        tmp_path / "mem",
        data=str(path),
        batch_size=8,
        max_steps=20,
        optim=optim,
        run=F.run_config(split_fractions=(1.0, 0.0, 0.0)),
    )
    out = run_sft(cfg)

    losses = F.train_losses(out)
    assert losses[20] < 0.25 * losses[1], losses
    assert all(np.isfinite(list(losses.values())))

    model, params, tok = checkpoint.load_model(out)  # the run directory, as a user loads it
    assert model.head == "lm" and model.config.dropout == 0.0
    records, _ = data.load_records(str(path), "prompts")
    prompts = data.tokenize_prompts(records, tok, max_prompt_len=8)  # left-padded
    ids, mask = jnp.asarray(prompts.arrays["input_ids"]), jnp.asarray(prompts.arrays["attention_mask"])
    gen = generate(
        model,
        params,
        ids,
        mask,
        jax.random.key(0),
        max_new_tokens=8,
        temperature=0.0,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    tokens, mask = np.asarray(gen.tokens), np.asarray(gen.mask)
    for d, row, m in zip(demos, tokens, mask):
        want = tok(d["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert row[m == 1].tolist() == want, (d, tok.decode(row[m == 1]))


# ----------------------------------------------------------------------------- preemption


def test_sigterm_saves_at_a_step_boundary_and_resumes(world, tmp_path, caplog):
    out = tmp_path / "run"
    cfg = F.sft_config(world, out, max_steps=100_000, run=F.run_config(mesh=F.MESH_1x8x1))
    child = F.Background(["sft", *F.cli_args(cfg)], tmp_path / "stderr.txt")
    try:
        deadline = time.monotonic() + 180
        metrics = out / "metrics.jsonl"
        while not metrics.exists() or metrics.read_text().count("\n") < 3:  # 3 steps logged
            assert child.proc.poll() is None, child.log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        child.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc, stderr = child.result(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        child.close()
    assert rc == train_loop.EXIT_PREEMPTED == 143, stderr[-3000:]
    assert elapsed < 30
    assert "SIGTERM received" in stderr
    state, meta, saved = F.read_checkpoint(out)
    last_logged = max(F.train_losses(out))
    assert saved == last_logged == int(state["step"]) and saved < 100_000
    position = meta["iterators"]["train"]
    assert position["epoch"] * 64 + position["position"] == saved * 16  # 64 rows, batch 16: rows served so far

    caplog.set_level(logging.INFO, logger="rlhf_jax.train_loop")
    run_sft(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, stop_at_step=saved + 2)))
    assert f"sft: resumed from step {saved}" in caplog.text
    assert max(F.train_losses(out)) == saved + 2
    assert F.read_checkpoint(out)[2] == saved + 2


# ----------------------------------------------------------------------------- bad inputs

GOOD = {"prompt": "w2 w3", "response": "w3 w2", "user_id": "u0"}
BAD_ROWS = {
    "invalid_json": '{"prompt": "w2 w3", "response": ',
    "missing_field": json.dumps({"prompt": "w2 w3", "user_id": "u1"}),
    "wrong_type": json.dumps({"prompt": "w2 w3", "response": 5}),
    "empty_string": json.dumps({"prompt": "w2 w3", "response": "   "}),
}


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_bad_demonstration_row_names_file_line_and_reason(world, tmp_path, reason):
    path = F.write_good_then_bad(tmp_path / "demos.jsonl", GOOD, [BAD_ROWS[reason]])
    with pytest.raises(data.DataError, match=rf"demos.jsonl:61: {reason}") as e:
        run_sft(F.sft_config(world, tmp_path / "run", data=str(path)))
    assert e.value.line == 61 and e.value.reason == reason
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before training


def test_skip_mode_counts_every_bad_row(world, tmp_path, caplog):
    """on_error="skip": every bad row is counted by reason (the loading step run_sft uses)."""
    too_long = json.dumps({"prompt": "w2 w3", "response": " ".join(["w4"] * 30), "user_id": "u0"})
    path = F.write_good_then_bad(tmp_path / "demos.jsonl", GOOD, [*BAD_ROWS.values(), too_long])
    caplog.set_level(logging.WARNING)
    run = F.run_config(on_error="skip", max_skip_fraction=0.1, split_fractions=(1.0, 0.0, 0.0))
    tokenize = lambda recs: data.tokenize_demonstrations(recs, world.tok, seq_len=F.SFT_SEQ_LEN)  # noqa: E731
    train, val, test, _ = data.load_split_tokenize(str(path), "demonstrations", run, tokenize)
    assert "kept 61/65 rows (4 skipped: empty_string=1, invalid_json=1, missing_field=1, wrong_type=1)" in caplog.text
    # the over-length example is dropped at tokenisation (never truncated) and counted
    assert "kept 60/61 rows (1 skipped: too_long=1)" in caplog.text
    assert len(train) == 60 and val is None and test is None
    assert train.report.counts == {"too_long": 1}
    # the same file in strict mode stops at the first bad row
    with pytest.raises(data.DataError, match="demos.jsonl:61: invalid_json"):
        run_sft(F.sft_config(world, tmp_path / "strict", data=str(path)))


def test_skip_ceiling_counts_load_and_length_drops_together(world, tmp_path):
    """2 bad rows of 50 (4%) and 2 too long of the 48 left (4.2%) each pass a 5% ceiling; together 8% do not."""
    long = json.dumps({"prompt": "w2 w3", "response": " ".join(["w4"] * 30), "user_id": "u0"})
    path = F.write_good_then_bad(tmp_path / "demos.jsonl", GOOD, [BAD_ROWS["invalid_json"]] * 2 + [long] * 2, n_good=46)
    run = F.run_config(on_error="skip", max_skip_fraction=0.05, split_fractions=(1.0, 0.0, 0.0))
    tokenize = lambda recs: data.tokenize_demonstrations(recs, world.tok, seq_len=F.SFT_SEQ_LEN)  # noqa: E731
    with pytest.raises(data.DataError, match=r"demos.jsonl: skipped 4/50 rows \(8.0%\).*invalid_json=2, too_long=2"):
        data.load_split_tokenize(str(path), "demonstrations", run, tokenize)
    run = dataclasses.replace(run, max_skip_fraction=0.08)
    train, _, _, _ = data.load_split_tokenize(str(path), "demonstrations", run, tokenize)
    assert len(train) == 46


def test_skip_ceiling_and_over_length(world, tmp_path):
    path = F.write_good_then_bad(tmp_path / "demos.jsonl", GOOD, [*BAD_ROWS.values()], n_good=20)
    with pytest.raises(data.DataError, match=r"skipped 4/24 rows.*above the allowed 5.0%"):
        run_sft(F.sft_config(world, tmp_path / "a", data=str(path), run=F.run_config(on_error="skip")))
    # over-length examples are dropped (never truncated) and counted against the same ceiling
    long = json.dumps({"prompt": "w2 w3", "response": " ".join(["w4"] * 30), "user_id": "u0"})
    path = F.write_good_then_bad(tmp_path / "long.jsonl", GOOD, [long])
    with pytest.raises(data.DataError, match=r"too_long=1"):
        run_sft(F.sft_config(world, tmp_path / "b", data=str(path), run=F.run_config(max_skip_fraction=0.0)))
    all_long = tmp_path / "all_long.jsonl"
    all_long.write_text(long + "\n")
    with pytest.raises(data.DataError, match=r"too_long"):
        run_sft(F.sft_config(world, tmp_path / "c", data=str(all_long)))


def test_tokenizer_larger_than_embedding(world, tmp_path):
    small = tiny.make_model_dir(
        tmp_path / "small", vocab_size=len(world.tok) - 6, hidden_size=F.HIDDEN, tokenizer=world.tok
    )
    n = len(world.tok)
    with pytest.raises(ValueError, match=rf"tokenizer has {n} tokens but the model's vocab_size is {n - 6}"):
        run_sft(F.sft_config(world, tmp_path / "run", init=str(small)))


def test_chunked_lm_head_matches_full_logits():
    """``lm_objective`` with the LM head applied 3 positions at a time (recomputed in the
    backward pass) gives the loss, accuracy and gradients of the full [B, T, V] logits."""
    from rlhf_jax.config import ModelConfig
    from rlhf_jax.models import CausalLM
    from rlhf_jax.models.params import init_params
    from rlhf_jax.sft import lm_objective

    for tied in (True, False):
        cfg = ModelConfig(
            family="llama",
            vocab_size=40,
            hidden_size=16,
            num_layers=1,
            num_heads=2,
            intermediate_size=32,
            activation="silu",
            tie_word_embeddings=tied,
        )
        model = CausalLM(cfg)
        params = init_params(model, jax.random.key(1))
        rng = np.random.default_rng(0)
        ids = rng.integers(0, 40, (3, 11)).astype(np.int32)
        mask = (np.arange(11)[None] < np.array([[11], [7], [4]])).astype(np.int32)
        batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask}

        def run(chunk, model=model, batch=batch, params=params):
            fn = lambda p: lm_objective(model, p, batch, chunk=chunk)  # noqa: E731
            return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

        (full, m_full), g_full = run(None)
        (chunked, m_chunked), g_chunked = run(3)
        np.testing.assert_allclose(float(chunked), float(full), rtol=1e-6)
        assert float(m_chunked["accuracy"]) == float(m_full["accuracy"])
        assert bool(m_chunked["finite/logits"]) and float(m_chunked["num_tokens"]) == float(m_full["num_tokens"])
        for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_full)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
