"""Test-wide set-up: 8 fake CPU devices and no network, before jax initialises.

The tests' tiny models spend most of their time in XLA's compiler, so the test session (and
the child processes that inherit its environment) compiles with LLVM's optimisation level 0:
the same programs, less time spent optimising machine code that runs for milliseconds
(6 tests of test_models_scan.py: 97-123 s -> 56 s on 2 cores). Library runs keep XLA's default,
and so do the children started with ``tests.stage_fixtures.subprocess_env(n)``, whose XLA_FLAGS
hold only the device count: the quick demo (tests/test_demo.py; its sampling loops run twice as
long at level 0) and the kill harness. Whole suite in a fresh clone on 2 cores: 2,353 s before,
1,634 s with level 0.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
