"""``rlhf-jax bench`` on the tiny preset: every stage compiles and runs on several 8-device meshes,
and the outputs (JSON, markdown table, plot) hold finite, positive figures. Not a timing test."""

from __future__ import annotations

import json
import math

import pytest

from rlhf_jax import bench, cli, mfu
from rlhf_jax.config import ModelConfig


def test_bench_tiny_on_several_meshes(tmp_path):
    out = tmp_path / "bench"
    common = ["--presets", "tiny", "--seq-len", "16", "--batch-size", "8", "--warmup", "1", "--repeats", "1"]
    cli.main(["bench", *common, "--meshes", "2,2,2", "4,1,2", "--stages", "sft", "rm", "--out", str(out)])
    ppo_args = ["--meshes", "1,4,2", "--stages", "ppo", "--no-ppo-ptx", "--peak-tflops", "0.1"]
    cli.main(["bench", *common, *ppo_args, "--out", str(out / "ppo")])
    result = json.loads((out / "results.json").read_text())
    ppo = json.loads((out / "ppo" / "results.json").read_text())
    assert [tuple(r["mesh"]) for r in result["rows"]] == [(2, 2, 2), (4, 1, 2)]
    assert result["num_devices"] == 8 and result["peak_flops"] > 0
    for row in result["rows"] + ppo["rows"]:
        assert row["peak_memory_bytes"] > 0
        for stage, seconds in (("sft", "step_s"), ("rm", "step_s"), ("ppo", "iter_s")):
            if stage not in row:
                continue
            r = row[stage]
            for value in (r[seconds]["median"], r["tokens_per_s"], r["flops_per_s"], r["mfu"]):
                assert math.isfinite(value) and value > 0, (stage, row["mesh"], r)
    for row in result["rows"]:
        assert row["rm"]["comparisons"] == 4 * 6  # 4 prompts x C(4, 2)
        assert math.isfinite(row["sft"]["loss"]) and "ppo" not in row
    assert ppo["rows"][0]["ppo"]["episodes_per_s"] > 0 and not ppo["rows"][0]["ppo"]["ptx"]
    assert ppo["peak_flops"] == 0.1e12 and ppo["rows"][0]["mesh"] == [1, 4, 2]
    with pytest.raises(ValueError, match="must divide"):
        cli.main(["bench", *common, "--meshes", "8,1,1", "--out", str(out / "bad")])
    table = (out / "results.md").read_text()
    assert table.count("| tiny |") == 4 and "comparisons/s" in table
    assert "episodes/s" in (out / "ppo" / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sft_flops_match_the_config_formula():
    cfg = bench.PRESETS["small"]
    per_token = cfg.flops_per_token(128)  # 6 N + 6 L H Dh T, the PaLM-style count with causal attention
    assert mfu.train_flops(cfg, sequences=8, seq_len=128) == pytest.approx(8 * 128 * per_token, rel=1e-12)
    # the RM's scalar head drops the 2 D V unembedding of every position, forward and backward
    scalar = mfu.train_flops(cfg, sequences=8, seq_len=128, lm_head=False)
    assert mfu.train_flops(cfg, sequences=8, seq_len=128) - scalar == pytest.approx(
        3 * 8 * 128 * 2 * cfg.hidden_size * (cfg.vocab_size - 1)
    )


def test_presets_and_peaks():
    assert bench.PRESETS["gpt2-124m"].num_params() == pytest.approx(124.4e6, rel=0.01)
    assert bench.PRESETS["gpt2-355m"].num_params() == pytest.approx(355e6, rel=0.01)
    assert 1.0e9 < bench.PRESETS["1b"].num_params() < 1.2e9

    class Device:
        def __init__(self, kind):
            self.device_kind = kind

    assert mfu.device_peak_flops(Device("TPU v5 lite")) == 197e12
    assert mfu.device_peak_flops(Device("TPU v5")) == 459e12
    assert mfu.device_peak_flops(Device("NVIDIA H100 80GB HBM3")) == 989e12
    assert mfu.device_peak_flops(Device("cpu")) is None
    tiny = ModelConfig(family="gpt2", vocab_size=64, hidden_size=32, num_layers=1, num_heads=2)
    assert (1, 1, 2) not in bench.meshes_that_fit(2, tiny.replace(num_heads=1), 2)
    assert (2, 1, 1) in bench.meshes_that_fit(2, tiny, 2)
