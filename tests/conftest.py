"""Test-session settings shared by every test module: how xdist spreads the files over workers."""

from __future__ import annotations

from pathlib import Path

# Worker seconds of the slowest test files (module fixtures included), summed from a
# `pytest -n 2 --durations=0` run (2026-11-30, loaded machine: 8,667 worker-seconds in all,
# about 2.5x a quiet run; only the ratios matter). Files are handed out longest first
# (longest-processing-time-first scheduling), so a long file does not start last while the
# other worker idles; files not listed count as short and keep their collection order after
# these. Only the order depends on this table: a stale figure costs wall time, never a test.
FILE_SECONDS = {
    "test_demo.py": 891,
    "test_ppo_estimators.py": 586,
    "test_ppo.py": 580,  # 1039 less the PPO resume test folded into test_kill.py
    "test_models_scan.py": 566,
    "test_reward.py": 507,
    "test_kill.py": 498,
    "test_pipeline.py": 406,
    "test_hostile_data.py": 368,
    "test_nonfinite.py": 354,
    "test_dpo.py": 350,
    "test_sft.py": 336,
    "test_real_model.py": 305,
    "test_models.py": 296,
    "test_qlora.py": 229,
    "test_sampling.py": 211,
    "test_lora.py": 172,
    "test_sharding.py": 166,
    "test_attention_kernels.py": 159,
    "test_losses.py": 129,
    "test_bench.py": 122,
    "test_checkpoint.py": 116,
    "test_unsafe_artefacts.py": 112,
    "test_rewards.py": 112,
    "test_buckets.py": 110,
    "test_resume.py": 101,
}


def file_seconds(path: str | Path) -> float:
    return FILE_SECONDS.get(Path(path).name, 0.0)


def pytest_collection_modifyitems(session, config, items):
    """Longest files first (a stable sort: tests keep their order within a file)."""
    items.sort(key=lambda item: -file_seconds(item.path))


def pytest_xdist_make_scheduler(config, log):
    """Under ``-n N`` without a ``--dist`` choice, one file's tests go to one worker (``loadfile``):
    a module-scoped fixture (a trained tiny run) is then built once, not once per worker. The
    files are queued in collection order (longest first, above), not xdist's default order of
    most tests first, which put the few-test, long files (the demo, kill and resume tests) last.

    Any explicit ``--dist`` other than ``load`` bypasses this hook. ``--dist loadgroup`` does not
    group here: pytest-xdist 3.8 tags a grouped test by setting ``item._nodeid``, which pytest 9.2's
    ``Node.nodeid`` no longer reads, so loadgroup hands out single tests like ``load``. (CI at
    bf9c89e: both workers spent 484 s in the quick demo's fixture, one building it, one waiting.)"""
    if config.getoption("dist") == "load":
        from xdist.scheduler import LoadFileScheduling

        config.option.loadscopereorder = False
        return LoadFileScheduling(config, log)
    return None
