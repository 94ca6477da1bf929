"""Kill -9 during training and saving (issue 8, item 1), and SIGTERM for PPO (item 3).

A child process trains tiny SFT and PPO-ptx runs with a save every step (and so a deletion
of an old checkpoint every step); the test SIGKILLs it again and again: while a save is in
flight, while an old checkpoint is being deleted, and at random moments (see
``tests/kill_harness.py``, which also drives ``experiments/kill_loop.py --kills 200``).
After every kill every listed checkpoint restores and is finite and no temporary directory
is listed; the run resumes from the latest checkpoint; the finished run is bitwise equal to
an uninterrupted one (final state, data positions, every step's losses). One PPO
interruption is a SIGTERM instead: saved, exit status EXIT_PREEMPTED, within 30 s.
"""

from __future__ import annotations

import pytest

from tests import kill_harness as K

KILLS = {"sft": 5, "ppo": 5}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill_world")
    K.make_world(root)
    return root


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_kill_9_at_random_moments_then_resume_bitwise(world, tmp_path, stage):
    env = K.child_env(tmp_path / "jax_cache")  # the reference run fills it: the killed legs compile nothing
    reference = K.start_child(stage, world, tmp_path / "reference", slow=0.0, env=env, log=tmp_path / "reference.log")
    try:
        assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    stats = K.kill_cycle(
        stage, world, tmp_path / "killed", kills=KILLS[stage], seed=0, env=env, sigterm_at=2 if stage == "ppo" else None
    )
    assert stats.kills == KILLS[stage] and stats.corrupt_restores == 0
    assert stats.kills_during_save >= 1 and stats.kills_during_delete >= 1, stats
    assert stats.resumes == KILLS[stage] + stats.sigterms
    assert stats.sigterms == (1 if stage == "ppo" else 0)
    K.assert_same_run(tmp_path / "killed", tmp_path / "reference")
    if stage == "ppo":  # what PPO-ptx carries across a restart besides the networks
        from tests import stage_fixtures as F

        state, meta, _ = F.read_checkpoint(tmp_path / "killed")
        assert set(state) >= {"policy", "value", "ema_params", "kl_coef", "iteration", "rng"}
        assert float(state["kl_coef"]) != pytest.approx(0.02)  # the adaptive controller moved it
        assert set(meta["iterators"]) == {"prompts", "ptx"}
    print(f"{stage}: {stats}")


def test_the_check_after_a_kill_catches_a_half_deleted_listed_checkpoint(tmp_path):
    """What a kill during orbax's own in-place deletion would leave (the reason retention renames
    into .deleted/ first): a listed checkpoint with half of its files gone. The check fails."""
    import jax.numpy as jnp

    from rlhf_jax.checkpoint import Checkpointer

    with Checkpointer(tmp_path / "checkpoints", keep_last=3) as ckpt:
        for s in (1, 2):
            ckpt.save(s, {"w": jnp.full((64, 8), float(s)), "b": jnp.zeros(8)}, {"iterators": {}})
        ckpt.wait()
    stats = K.KillStats()
    assert K.check_run_dir(tmp_path, stats) == 2 and stats.checkpoints_restored == 2
    files = sorted(p for p in (tmp_path / "checkpoints" / "1").rglob("*") if p.is_file())
    for p in files[: len(files) // 2]:
        p.unlink()
    with pytest.raises(AssertionError, match="listed checkpoint 1 does not restore after a kill"):
        K.check_run_dir(tmp_path, stats)
    assert stats.corrupt_restores == 1
