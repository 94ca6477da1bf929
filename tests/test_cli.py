"""The ``rlhf-jax`` command line: help texts, a run driven through ``main``, and ``export``
to a directory that transformers loads with the same logits."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax import checkpoint, cli
from tests import stage_fixtures as F


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code in (0, None)
    return capsys.readouterr().out


def test_console_script_help():
    script = shutil.which("rlhf-jax") or str(Path(sys.executable).parent / "rlhf-jax")
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120, env=F.subprocess_env())
    assert proc.returncode == 0, proc.stderr
    for command in ("sft", "rm", "export", "smoke"):
        assert command in proc.stdout


def test_subcommand_help(capsys):
    text = _help(capsys, "sft")
    for flag in (
        "--data",
        "--init",
        "--out",
        "--max-steps",
        "--batch-size",
        "--run.stop-at-step",
        "--run.mesh.fsdp",
        "--optim.learning-rate",
    ):
        assert flag in text, flag
    text = _help(capsys, "rm")
    for flag in ("--data", "--init", "--out", "--max-steps", "--demonstrations", "--max-k"):
        assert flag in text, flag
    text = _help(capsys, "export")
    assert "--run" in text and "--out" in text


def test_missing_required_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sft", "--data", "x.jsonl"])
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "--init" in err and "--out" in err


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    world = F.shared_world(tmp_path_factory, "tiny_world")
    cfg = F.sft_config(world, tmp_path_factory.mktemp("cli") / "sft", max_steps=3)
    cli.main(["sft", *F.cli_args(cfg)])
    return world, Path(cfg.out)


def test_sft_through_main(sft_run):
    _, run = sft_run
    assert sorted(F.train_losses(run)) == [1, 2, 3]
    assert checkpoint.read_model_info(run)["head"] == "lm"
    assert (run / "tokenizer" / "tokenizer.json").is_file()


def test_export_loads_in_transformers_with_equal_logits(sft_run, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    world, run = sft_run
    out = tmp_path / "hf"
    cli.main(["export", "--run", str(run), "--out", str(out)])
    assert f"exported {run} -> {out}" in capsys.readouterr().out

    hf = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert (tok.pad_token_id, tok.eos_token_id) == (world.tok.pad_token_id, world.tok.eos_token_id)
    assert hf.config.eos_token_id == tok.eos_token_id and hf.config.vocab_size == len(tok)

    model, params, _ = checkpoint.load_model(run)
    enc = tok(["w5 w6 w7 w8 <eos>", "w9 w3", "w40 w41 w42"], padding=True, return_tensors="np")  # right-padded
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    ours = np.asarray(model.apply({"params": params}, ids, attention_mask=mask).logits)
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits.numpy()
    real = mask.astype(bool)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-5, rtol=0)
    # the trained weights were exported, not the random initial ones
    base = AutoModelForCausalLM.from_pretrained(str(world.base), attn_implementation="eager").eval()
    with torch.no_grad():
        initial = base(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits
    initial = initial.numpy()
    assert np.abs(initial[real] - theirs[real]).max() > 1e-2


def test_checkpoint_without_pad_token_gets_one_and_room_for_it(tmp_path):
    """GPT-2-style tokenizers have no pad (or pad == EOS): a distinct pad is added and the
    embedding grows by one row, so stages can run; everything else about the model is kept."""
    import jax.numpy as jnp
    import numpy as np

    from rlhf_jax.checkpoint import load_model
    from rlhf_jax.models import from_pretrained
    from rlhf_jax.tasks import tiny

    tok = tiny.make_tokenizer(tmp_path / "tok")
    tok.pad_token = tok.eos_token  # the GPT-2 convention that hides the real EOS
    model_dir = tiny.make_model_dir(tmp_path / "m", vocab_size=len(tok), hidden_size=32, tokenizer=tok)
    with pytest.warns(UserWarning, match="pad token"):
        model, params, loaded = load_model(model_dir)
    assert loaded.pad_token_id != loaded.eos_token_id
    assert model.config.vocab_size == len(loaded) == len(tok) + 1
    _, original = from_pretrained(model_dir)
    ids = jnp.asarray([[5, 6, 7]])
    old = np.asarray(
        model.clone(config=model.config.replace(vocab_size=len(tok))).apply({"params": original}, ids).logits
    )
    new = np.asarray(model.apply({"params": params}, ids).logits)
    np.testing.assert_allclose(new[..., : len(tok)], old, atol=1e-6)  # old tokens' logits unchanged


def test_compile_cache_is_opt_in_under_the_rlhf_jax_cache(tmp_path):
    """``RLHF_JAX_COMPILE_CACHE=1`` keeps compiled programs in ``$RLHF_JAX_CACHE/jax_compile``
    (size-limited); unset, there is none; a directory jax was already given wins."""
    script = (
        "import jax; from rlhf_jax import cli; d = cli.use_compile_cache(); "
        "print(d, jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size)"
    )

    def run(**env_changes):
        env = {k: v for k, v in F.subprocess_env(1).items() if not k.startswith(("JAX_COMPILATION", "JAX_PERSISTENT"))}
        env.pop("RLHF_JAX_COMPILE_CACHE", None)
        proc = subprocess.run(
            [sys.executable, "-c", script], env={**env, **env_changes}, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.split()

    want = str(tmp_path / "jax_compile")
    assert run(RLHF_JAX_CACHE=str(tmp_path)) == ["None", "None", "-1"]
    assert run(RLHF_JAX_CACHE=str(tmp_path), RLHF_JAX_COMPILE_CACHE="1") == [want, want, str(cli.COMPILE_CACHE_BYTES)]
    mine = str(tmp_path / "mine")
    assert run(RLHF_JAX_CACHE=str(tmp_path), JAX_COMPILATION_CACHE_DIR=mine)[:2] == [mine, mine]
