"""Test-wide set-up, before jax initialises: 8 fake CPU devices, no network, and one persistent
compilation cache for the whole test session.

The cache: the suite compiles the same tiny programs again and again (every resume test runs a
stage two or three times; every CLI test starts a new process), and XLA's compile is most of
a tiny run's time. The cache directory is created once, by the first process that imports this
file (pytest, or xdist's controller), and inherited by the xdist workers and every child process
they start; a size limit turns on jax's file lock, so processes read and write it safely. It is
removed when that first process exits. A cached program is the same executable, so results are
bitwise those of a fresh compile. ``RLHF_JAX_TEST_JIT_CACHE=0`` turns it off.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if os.environ.get("RLHF_JAX_TEST_JIT_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="rlhf_jax_test_jit_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)  # bytes; a limit turns on the file lock
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
