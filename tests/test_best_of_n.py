"""Best-of-n sampling (``rlhf-jax sample``): with a fixed toy reward model the kept response
is the best-scoring candidate of the n, its score is what the RM gives it when scored again
as a demonstration, and the output loads back as SFT data."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from rlhf_jax import checkpoint, cli, data
from rlhf_jax.drivers import run_sample
from rlhf_jax.drivers.sample import pick_best
from rlhf_jax.reward import score_sequences
from tests import stage_fixtures as F

MAX_PROMPT_LEN = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return F.shared_world(tmp_path_factory, "tiny_world")


@pytest.fixture(scope="module")
def prompts(world, tmp_path_factory):
    """12 of the world's prompts, a dialogue prompt, and one prompt too long to fit."""
    rows = [json.loads(line) for line in world.files["prompts"].read_text().splitlines()[:12]]
    rows.append({"messages": [{"role": "user", "content": "w4 w5 w6"}], "user_id": "u9"})
    rows.append({"prompt": " ".join(["w3"] * 20), "user_id": "u1"})
    path = tmp_path_factory.mktemp("bon") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def _best_of_eligible(row) -> float:
    return max(s for s, e in zip(row["scores"], row["eligible"]) if e)


def test_keeps_the_best_scoring_sample_and_loads_as_sft_data(world, prompts, tmp_path):
    path, rows = prompts
    # the toy RM: the base model with its deterministically initialised scalar head
    out = run_sample(
        str(world.base),
        str(world.base),
        str(path),
        str(tmp_path / "best.jsonl"),
        best_of=4,
        max_new_tokens=6,
        max_prompt_len=MAX_PROMPT_LEN,
        batch_size=8,
        require_eos=False,
        progress=False,
    )
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert not (tmp_path / "best.jsonl.tmp").exists()
    # the long prompt is left out (and a prompt whose 4 samples all hold a special token would be)
    assert 10 <= len(written) <= 13
    by_prompt = {r.get("prompt") or r["messages"][0]["content"]: r for r in written}
    assert " ".join(["w3"] * 20) not in by_prompt
    for row in written:
        assert len(row["scores"]) == len(row["eligible"]) == 4
        assert (row["response"] if "prompt" in row else row["messages"][-1]["content"]).strip()
        assert row["score"] == _best_of_eligible(row)  # the best candidate of the n
    full = [r for r in written if all(r["eligible"])]
    assert full and all(r["score"] == max(r["scores"]) for r in full)
    assert len({round(s, 6) for r in written for s in r["scores"]}) > len(written)  # n different samples
    dialogue = by_prompt.get("w4 w5 w6")
    if dialogue is not None:
        assert dialogue["messages"][-1]["role"] == "assistant" and dialogue["user_id"] == "u9"
    src = {r["prompt"]: r["user_id"] for r in rows if "prompt" in r}
    assert all(r["user_id"] == src[r["prompt"]] for r in written if "prompt" in r)

    # demonstration format: SFT data as it stands
    records, report = data.load_records(str(out), "demonstrations")
    assert len(records) == len(written) and not report.skipped
    demos = data.tokenize_demonstrations(records, world.tok, seq_len=MAX_PROMPT_LEN + 8)
    assert len(demos) == len(written)


def test_require_eos_through_the_cli_and_scores_match_a_rescoring(world, prompts, tmp_path, capsys):
    path, _ = prompts
    out = tmp_path / "best.jsonl"
    cli.main(
        [
            "sample",
            "--policy",
            str(world.base),
            "--reward",
            str(world.base),
            "--prompts",
            str(path),
            "--out",
            str(out),
            "--best-of",
            "8",
            "--max-new-tokens",
            "8",
            "--max-prompt-len",
            str(MAX_PROMPT_LEN),
            "--batch-size",
            "4",
            "--no-progress",
        ]
    )
    assert capsys.readouterr().out.strip() == str(out)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written, "no prompt had a sample that ended with EOS"
    for row in written:
        assert len(row["scores"]) == 8 and row["score"] == _best_of_eligible(row)
    # every kept response ended with EOS: prompt + response + EOS is exactly the demonstration
    # tokenisation, and the RM scores it as it scored the sample
    records, _ = data.load_records(str(out), "demonstrations")
    demos = data.tokenize_demonstrations(records, world.tok, seq_len=MAX_PROMPT_LEN + 8)
    assert len(demos) == len(written)
    rm, rm_params, _ = checkpoint.load_model(world.base, head="scalar")
    scores = jax.jit(lambda p, i, m: score_sequences(rm, p, i, m))(
        rm_params, demos.arrays["input_ids"], demos.arrays["attention_mask"]
    )
    np.testing.assert_allclose(np.asarray(scores), [r["score"] for r in written], atol=1e-4, rtol=0)


def test_pick_best():
    scores = np.array([[0.1, 0.9, 0.5], [1.0, 2.0, 3.0], [-1.0, -2.0, -0.5]])
    eligible = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 1]], bool)
    assert pick_best(scores, eligible).tolist() == [2, -1, 2]


def test_bad_arguments(world, prompts, tmp_path):
    path, _ = prompts
    with pytest.raises(ValueError, match="temperature"):
        run_sample(str(world.base), str(world.base), str(path), str(tmp_path / "x.jsonl"), temperature=0.0)
