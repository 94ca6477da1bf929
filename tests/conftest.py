"""Test-session settings shared by every test module."""

from __future__ import annotations


def pytest_xdist_make_scheduler(config, log):
    """Under ``-n N`` without a ``--dist`` choice, one file's tests go to one worker (``loadfile``):
    a module-scoped fixture (a trained tiny run) is then built once, not once per worker."""
    if config.getoption("dist") == "load":
        from xdist.scheduler import LoadFileScheduling

        return LoadFileScheduling(config, log)
    return None
