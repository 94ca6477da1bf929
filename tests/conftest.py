"""One persistent XLA compilation cache for the whole test session.

Most of the suite's time is XLA compiling tiny programs, and many of them are the same
program: the tiny world's SFT / RM / PPO steps are compiled by several modules, by both
pytest-xdist workers, and again by every ``rlhf-jax`` child process a test starts (resumes
in a new process, the kill harness, the command-line pipeline). The cache directory lives
beside the workers' temporary directories (shared by the workers of one session, removed
with pytest's old temporary directories), and its settings go into the environment too, so
the child processes read and fill the same cache.

A cache entry is keyed by the compiled program (HLO, compile options, devices, backend
and jax/XLA versions): a hit returns the executable the miss would have compiled, so no test
sees different numbers. Entry reads and writes take the cache's file lock (a size limit turns
it on), so a worker never reads an entry another process is still writing.
"""

from __future__ import annotations

import os

import pytest

SETTINGS = {
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
    "jax_compilation_cache_max_size": 8 << 30,  # never reached; enables the cache's file lock
}


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    import jax
    from jax._src import compilation_cache as cc

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of this session
    settings = {"jax_compilation_cache_dir": str(base / "jax_compilation_cache"), **SETTINGS}
    old_env = {n.upper(): os.environ.get(n.upper()) for n in settings}
    old = {n: getattr(jax.config, n) for n in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)  # for the child processes the tests start
    cc.reset_cache()
    yield
    for name, value in old.items():
        jax.config.update(name, value)
    for name, value in old_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    cc.reset_cache()


def pytest_xdist_make_scheduler(config, log):
    """Under ``-n N`` without a ``--dist`` choice, one file's tests go to one worker (``loadfile``):
    a module-scoped fixture (a trained tiny run) is then built once, not once per worker."""
    if config.getoption("dist") == "load":
        from xdist.scheduler import LoadFileScheduling

        return LoadFileScheduling(config, log)
    return None
