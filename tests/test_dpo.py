"""DPO: summed response log-probs against a naive loop over tokens, the objective for K = 2
equal to ``losses.dpo_loss`` on those log-probs, Plackett-Luce vs all pairs for K > 2 (and
per-prompt pair averaging against a naive loop), the reference log-probs cached and reused,
learning on the tiny world, exact resume in a new process through the CLI, and the config."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import checkpoint, cli, data, dpo, losses, sharding, train_loop
from rlhf_jax.config import DPOConfig, DPOHyperparams, OptimConfig
from rlhf_jax.drivers import run_dpo
from rlhf_jax.drivers.dpo import REF_FILE, cached_reference_logps
from tests import stage_fixtures as F

N_STEPS, K_STEPS = 16, 6
LOSS_KEYS = ("input_ids", "attention_mask", "ranks", "valid", "prompt_len")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return F.shared_world(tmp_path_factory, "tiny_world")


@pytest.fixture(scope="module")
def lm(world):
    """The base model (reference) and a perturbed copy (policy): log-ratios that are not 0."""
    model, params, tok = checkpoint.load_model(world.base, head="lm")
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return SimpleNamespace(model=model, ref=params, policy=jax.tree.unflatten(tree, noisy), tok=tok)


def _tokenize(records, tok, **kw):
    ds = data.tokenize_rankings(records, tok, max_prompt_len=F.RM_PROMPT_LEN, max_response_len=F.RM_RESPONSE_LEN, **kw)
    return {k: jnp.asarray(v) for k, v in ds.arrays.items() if k in LOSS_KEYS}


def _groups(tok):
    """Three prompts: K=4 with a tie, K=3 (one padded slot, best response not in slot 0), K=2."""
    records = [
        {"prompt": "w2 w3", "responses": ["w1 w1 w4", "w5 w1", "w6", "w7 w8 w9"], "ranks": [0, 1, 1, 2]},
        {"prompt": "w10 w11 w12", "responses": ["w13", "w1 w14", "w15 w16"], "ranks": [2, 0, 1]},
        {"prompt": "w17", "responses": ["w1 w18", "w19 w20 w21 w22"], "ranks": [0, 1]},
    ]
    return _tokenize(records, tok)


@functools.partial(jax.jit, static_argnums=0)
def _logps(model, params, batch):
    return dpo.sequence_logps(model, params, batch)


# ----------------------------------------------------------------------------- log-probs


def test_sequence_logps_against_a_loop_over_tokens(lm):
    batch = _groups(lm.tok)
    got = np.asarray(_logps(lm.model, lm.policy, batch))  # [3, 4]
    ids, mask, valid, plen = (np.asarray(batch[k]) for k in ("input_ids", "attention_mask", "valid", "prompt_len"))
    forward = jax.jit(lambda ids: jax.nn.log_softmax(lm.model.apply({"params": lm.policy}, ids).logits, axis=-1))
    for b, k in itertools.product(range(ids.shape[0]), range(ids.shape[1])):
        if not valid[b, k]:
            assert got[b, k] == 0.0  # a padded slot contributes nothing
            continue
        seq = ids[b, k, : mask[b, k].sum()]  # prompt + response + EOS, no padding
        assert seq[-1] == lm.tok.eos_token_id and 1 <= plen[b] < len(seq) - 1
        logp = np.asarray(forward(seq[None]))[0]  # [n, V]: position t predicts token t + 1
        want = sum(float(logp[t - 1, seq[t]]) for t in range(plen[b], len(seq)))  # response tokens + EOS only
        np.testing.assert_allclose(got[b, k], want, rtol=1e-5, atol=1e-5)
    # the pad ids and the amount of padding do not matter
    noise = np.random.default_rng(0).integers(0, len(lm.tok), ids.shape).astype(ids.dtype)
    other = dict(batch, input_ids=jnp.asarray(np.where(mask == 1, ids, noise)))
    np.testing.assert_allclose(np.asarray(_logps(lm.model, lm.policy, other)), got, atol=1e-5)
    wider = {k: jnp.pad(v, ((0, 0), (0, 0), (0, 5))) if v.ndim == 3 else v for k, v in batch.items()}
    np.testing.assert_allclose(np.asarray(_logps(lm.model, lm.policy, wider)), got, atol=1e-5)


# ----------------------------------------------------------------------------- the objective


@pytest.fixture(scope="module")
def pairs(world, lm, tmp_path_factory):
    """{"prompt", "chosen", "rejected"} rows through the loader (K = 2), with the chosen one
    put in slot 1 of one group, and the hand-gathered per-pair log-probs."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [
        {"prompt": "w2 w3", "chosen": "w1 w1", "rejected": "w4 w5 w6"},
        {"prompt": "w7", "chosen": "w8 w1", "rejected": "w9"},
        {"prompt": "w10 w11 w12", "responses": ["w13 w14", "w1 w15"], "ranks": [1, 0]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, _ = data.load_records(str(path), "rankings")
    batch = _tokenize(records, lm.tok)
    assert batch["input_ids"].shape[:2] == (3, 2)
    pol, ref = np.asarray(_logps(lm.model, lm.policy, batch)), np.asarray(_logps(lm.model, lm.ref, batch))
    c = np.asarray(batch["ranks"]).argmin(axis=1)  # the chosen slot of each pair
    assert c.tolist() == [0, 0, 1]
    r = np.arange(3)
    hand = [jnp.asarray(x) for x in (pol[r, c], pol[r, 1 - c], ref[r, c], ref[r, 1 - c])]
    return SimpleNamespace(batch=batch, ref_logps=jnp.asarray(ref), hand=hand)


@pytest.mark.parametrize(
    "hp",
    [
        DPOHyperparams(beta=0.5),
        DPOHyperparams(beta=0.5, k_way="pairs"),
        DPOHyperparams(beta=0.5, k_way="pairs", label_smoothing=0.2),
        DPOHyperparams(beta=0.5, k_way="pairs", loss_type="ipo"),
        DPOHyperparams(beta=0.5, k_way="pairs", loss_type="hinge"),
    ],
    ids=str,
)
def test_k2_objective_is_dpo_loss_on_the_log_probs(lm, pairs, hp):
    loss, m = jax.jit(lambda p, b, r: dpo.dpo_objective(lm.model, p, b, r, hp))(lm.policy, pairs.batch, pairs.ref_logps)
    want, want_m = losses.dpo_loss(
        *pairs.hand, beta=hp.beta, loss_type=hp.loss_type, label_smoothing=hp.label_smoothing
    )
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    for name, value in want_m.items():
        np.testing.assert_allclose(float(m[name]), float(value), rtol=1e-5, atol=1e-6, err_msg=name)
    assert float(m["num_pairs"]) == float(m["num_prompts"]) == 3 and bool(m["finite/logits"])
    assert abs(float(want_m["rewards/margins"])) > 1e-3  # a policy that is not the reference


def test_pl_and_pairs_differ_for_k_above_two_and_agree_where_they_must(lm):
    batch = _groups(lm.tok)
    logps, ref = _logps(lm.model, lm.policy, batch), _logps(lm.model, lm.ref, batch)
    pl = dpo.ranking_dpo_loss(logps, ref, batch["ranks"], batch["valid"], DPOHyperparams(beta=1.0))
    pw = dpo.ranking_dpo_loss(logps, ref, batch["ranks"], batch["valid"], DPOHyperparams(beta=1.0, k_way="pairs"))
    # the same ordered pairs are judged: accuracy, margins and counts agree (pairs: 6 - 1 tie, 3, 1)
    for name in ("rewards/accuracies", "rewards/margins", "num_pairs", "num_prompts"):
        np.testing.assert_allclose(float(pl[1][name]), float(pw[1][name]), rtol=1e-6, err_msg=name)
    assert float(pw[1]["num_pairs"]) == 9
    assert abs(float(pl[0]) - float(pw[0])) > 1e-2  # the Plackett-Luce likelihood is not the pair mean

    # pairs: each prompt's mean over its ordered pairs (ties excluded), then the mean over prompts
    s = np.asarray(logps) - np.asarray(ref)
    ranks, valid = np.asarray(batch["ranks"]), np.asarray(batch["valid"])
    per_prompt = []
    for b in range(3):
        terms = [
            float(-jax.nn.log_sigmoid(s[b, i] - s[b, j]))
            for i, j in itertools.permutations(range(4), 2)
            if valid[b, i] and valid[b, j] and ranks[b, i] < ranks[b, j]
        ]
        per_prompt.append(np.mean(terms))
    np.testing.assert_allclose(float(pw[0]), np.mean(per_prompt), rtol=1e-5)

    # K = 2 only: the two modes are the same loss
    two = {k: v[2:] for k, v in batch.items()}
    a = dpo.ranking_dpo_loss(logps[2:], ref[2:], two["ranks"], two["valid"], DPOHyperparams(beta=1.0))
    b = dpo.ranking_dpo_loss(logps[2:], ref[2:], two["ranks"], two["valid"], DPOHyperparams(beta=1.0, k_way="pairs"))
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        np.testing.assert_allclose(float(a[1][name]), float(b[1][name]), rtol=1e-5, err_msg=name)


def test_step_with_cached_reference_equals_step_with_reference_params(lm):
    """``ref_logps`` in the batch (what the driver serves) or a reference forward pass: the same step."""
    import optax

    from rlhf_jax.optim import init_train_state

    batch = _groups(lm.tok)
    opt = optax.adam(1e-3)
    step = jax.jit(dpo.make_train_step(lm.model, opt, DPOHyperparams(k_way="pairs")))
    state = init_train_state(lm.policy, opt, 0)
    cached, m1 = step(state, {**batch, "ref_logps": _logps(lm.model, lm.ref, batch)})
    direct, m2 = step(state, batch, lm.ref)
    F.assert_trees_equal(jax.device_get(cached.params), jax.device_get(direct.params), atol=1e-6)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    assert int(cached.step) == 1 and float(m1["nonfinite/skipped"]) == 0.0
    with pytest.raises(ValueError, match="ref_logps"):
        dpo.make_train_step(lm.model, opt)(state, batch)


# ----------------------------------------------------------------------------- the reference cache


def test_reference_logps_cached_and_reused(world, lm, tmp_path, caplog):
    records, _ = data.load_records(str(world.files["rankings"]), "rankings")
    ds = data.tokenize_rankings(
        records[:16], lm.tok, max_prompt_len=F.RM_PROMPT_LEN, max_response_len=F.RM_RESPONSE_LEN
    )
    cfg = _cfg(world, tmp_path / "run")
    mesh = sharding.make_mesh(cfg.run.mesh)
    path = tmp_path / "run" / REF_FILE
    path.parent.mkdir()
    np.savez(path, train=np.zeros((16, 3), np.float32), train_example_id=ds.arrays["example_id"])  # wrong K
    caplog.set_level(logging.INFO)
    got = cached_reference_logps(cfg, lm.model, lm.ref, {"train": ds, "val": None}, mesh)["train"]
    assert "does not match the data; recomputing" in caplog.text
    want = np.asarray(_logps(lm.model, lm.ref, {k: jnp.asarray(v) for k, v in ds.arrays.items() if k in LOSS_KEYS}))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got.shape == (16, 4) and np.all(got[ds.arrays["valid"]] < 0)
    caplog.clear()
    again = cached_reference_logps(cfg, lm.model, lm.policy, {"train": ds}, mesh)["train"]  # other params: not used
    assert "reused" in caplog.text
    np.testing.assert_array_equal(again, got)


# ----------------------------------------------------------------------------- training runs


def _cfg(world, out, **run_changes) -> DPOConfig:
    """16 steps on 6 of the 8 users (48 groups of K=4), validated on the other 2 every 8 steps."""
    run = F.run_config(split_fractions=(0.75, 0.25, 0.0), eval_every=8, mesh=F.MESH_1x8x1, **run_changes)
    return DPOConfig(
        data=str(world.files["rankings"]),
        init=str(world.base),
        out=str(out),
        max_steps=N_STEPS,
        batch_size=8,
        max_prompt_len=F.RM_PROMPT_LEN,
        max_response_len=F.RM_RESPONSE_LEN,
        run=run,
        hparams=DPOHyperparams(beta=0.1),
        optim=OptimConfig(learning_rate=1e-3, schedule="constant"),
    )


def _cli_args(cfg: DPOConfig) -> list[str]:
    run = cfg.run
    return [
        "dpo",
        "--data",
        cfg.data,
        "--init",
        cfg.init,
        "--out",
        cfg.out,
        "--max-steps",
        str(cfg.max_steps),
        "--batch-size",
        str(cfg.batch_size),
        "--max-prompt-len",
        str(cfg.max_prompt_len),
        "--max-response-len",
        str(cfg.max_response_len),
        "--beta",
        repr(cfg.hparams.beta),
        "--k-way",
        cfg.hparams.k_way,
        "--loss-type",
        cfg.hparams.loss_type,
        "--optim.learning-rate",
        repr(cfg.optim.learning_rate),
        "--optim.schedule",
        cfg.optim.schedule,
        "--optim.warmup-steps",
        str(cfg.optim.warmup_steps),
        "--run.seed",
        str(run.seed),
        "--run.log-every",
        str(run.log_every),
        "--run.eval-every",
        str(run.eval_every),
        "--run.save-every",
        str(run.save_every),
        "--run.mesh.data",
        str(run.mesh.data),
        "--run.mesh.fsdp",
        str(run.mesh.fsdp),
        "--run.mesh.tensor",
        str(run.mesh.tensor),
        "--run.split-fractions",
        *map(str, run.split_fractions),
        "--run.no-progress",
    ]


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """``straight``: N steps in one go; ``resumed``: K steps, then ``rlhf-jax dpo`` in a new process
    (in the background while ``straight`` trains) resumes to N. Built once per session."""

    def build(root):
        run_dpo(_cfg(world, root / "resumed", stop_at_step=K_STEPS))
        state, meta, step = F.read_checkpoint(root / "resumed")
        ref_file = lambda: (lambda st: [st.st_ino, st.st_mtime_ns])((root / "resumed" / REF_FILE).stat())  # noqa: E731
        first_ref = ref_file()
        resume = F.Background(_cli_args(_cfg(world, root / "resumed")), root / "resumed.log")
        try:
            run_dpo(_cfg(world, root / "straight"))
            rc_stderr = resume.result()
            return {
                "first_k": {"step": step, "state_step": int(state["step"]), "meta": meta},
                "resume": rc_stderr,
                "ref_file": [first_ref, ref_file()],
            }
        finally:
            resume.close()

    root, built = F.build_once(tmp_path_factory, "dpo_runs", build)
    return SimpleNamespace(root=root, straight=root / "straight", **built)


def test_learns_the_preference_on_held_out_users(runs):
    metrics = train_loop.read_metrics(runs.straight)
    train = [m for m in metrics if "train/loss" in m]
    assert len(train) == N_STEPS
    # step 1: the policy is the reference, so the cached reference log-probs are its own: rewards exactly 0
    # and the Plackett-Luce loss of 4 responses with equal scores, log 4!
    assert train[0]["rewards/margins"] == 0.0 and train[0]["rewards/accuracies"] == 0.0
    np.testing.assert_allclose(train[0]["train/loss"], np.log(24.0), rtol=1e-6)
    assert np.mean([m["train/loss"] for m in train[-3:]]) < train[0]["train/loss"] - 0.2
    val = [m for m in metrics if "val/rewards/accuracies" in m]
    assert [m["step"] for m in val] == [8, 16]  # validation users never trained on
    assert val[-1]["val/rewards/accuracies"] >= 0.9 and val[-1]["val/rewards/margins"] > 0
    assert val[-1]["val/num_pairs"] == 16 * 6 and val[-1]["val/loss"] < np.log(24.0)
    # the run directory loads as a language model (``rlhf-jax export`` works as for SFT)
    model, _, _ = checkpoint.load_model(runs.straight)
    assert model.head == "lm"
    cached = np.load(runs.straight / REF_FILE)
    assert cached["train"].shape == (48, 4) and cached["val"].shape == (16, 4)


def test_exact_resume_in_a_new_process(runs):
    step, meta = runs.first_k["step"], runs.first_k["meta"]
    assert step == runs.first_k["state_step"] == K_STEPS and meta["stage"] == "dpo"
    rc, stderr = runs.resume
    assert rc == 0, stderr[-3000:]
    first, after = runs.ref_file
    assert first == after  # the first part's ref_logps.npz was reused, not rewritten by a new pass
    # the new process resumed at step K: every train step is logged once across the two processes
    steps = [m["step"] for m in train_loop.read_metrics(runs.root / "resumed") if "train/loss" in m]
    assert steps == list(range(1, N_STEPS + 1))

    want, want_meta, _ = F.read_checkpoint(runs.straight, N_STEPS)
    got, got_meta, _ = F.read_checkpoint(runs.root / "resumed", N_STEPS)
    F.assert_trees_equal(got, want)  # params, optimizer state, RNG, step: bitwise
    assert got_meta["iterators"] == want_meta["iterators"]
    assert F.train_losses(runs.root / "resumed") == F.train_losses(runs.straight)

    def val(run_dir):
        return [
            (m["step"], m["val/rewards/accuracies"], m["val/loss"])
            for m in train_loop.read_metrics(run_dir)
            if "val/loss" in m
        ]

    assert val(runs.root / "resumed") == val(runs.straight)


# ----------------------------------------------------------------------------- config and CLI


def test_hyperparameters_are_validated():
    DPOHyperparams(loss_type="ipo", k_way="pairs")
    DPOHyperparams(label_smoothing=0.1, k_way="pairs")
    with pytest.raises(ValueError, match="k_way='pairs'"):
        DPOHyperparams(loss_type="ipo")  # IPO is defined on pairs
    with pytest.raises(ValueError, match="beta"):
        DPOHyperparams(beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOHyperparams(loss_type="hinge", k_way="pairs", label_smoothing=0.1)
    with pytest.raises(ValueError, match="k_way"):
        DPOHyperparams(k_way="triples")
    with pytest.raises(ValueError, match="max_k"):
        DPOConfig(data="x", init="y", out="z", max_k=1)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["dpo", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--data",
        "--init",
        "--out",
        "--beta",
        "--loss-type",
        "--label-smoothing",
        "--k-way",
        "--optim.learning-rate",
    ):
        assert flag in text, flag
    assert "hparams." not in text  # flat flags, as for ppo and rm
    args = cli._as_base(
        cli.tyro.cli(
            cli._flat_hparams(DPOConfig),
            args=["--data", "d", "--init", "i", "--out", "o", "--beta", "0.3", "--k-way", "pairs"],
        )
    )
    assert type(args) is DPOConfig and args.hparams == DPOHyperparams(beta=0.3, k_way="pairs")
    assert dataclasses.replace(args).optim.learning_rate == 1e-6
