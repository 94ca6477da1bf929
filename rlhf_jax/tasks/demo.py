"""``rlhf-jax demo``: InstructGPT's pipeline and findings on the built-in world, on a CPU.

Stages (each an ordinary rlhf_jax run directory under ``--out``):
  1. the world writes its files (pretraining corpus, demonstrations, prompts by user);
  2. ``base``: a small LM pretrained on the corpus; ``base_big``: one >= 4x larger;
  3. ``sft``: supervised fine-tuning on demonstrations with 10% pretraining mix
     (the paper's PPO-init model); ``sft_big`` from ``base_big`` the same way;
  4. rankings: K = 4..9 samples per prompt from ``sft``, ranked by simulated labelers;
  5. ``rm``: the reward model from ``sft_big`` (``--rm-init``; InstructGPT's one 6B RM served
     every policy size), demonstrations bias set to mean 0;
  6. ``ppo_ptx`` (gamma ``ptx_coef``, 1), ``ppo`` (gamma 0) and ``ppo_nokl`` (beta 0, for the
     over-optimisation curve), each from ``sft`` against ``rm``, the value network
     initialised from ``rm``;
  7. evaluation on held-out users' prompts with the gold preference, the held-out
     pretraining loss, and ``report.md`` with plots;
  8. ``--rounds N``: N - 1 further rounds of iterated RLHF (new rankings of the last PPO-ptx
     policy's samples, an RM on all comparisons so far, PPO-ptx continued against it);
  9. ``--seeds 0,1,2``: all of it once per seed, one report with bootstrap intervals
     (``--full``: three seeds, six rounds, plain PPO iterated alongside).

This module holds stages 1-5 (:func:`prepare`, also the start of other experiments from the
same SFT model and RM, ``experiments/compare_methods.py``) and the demo's run configs
(:func:`rm_config`, :func:`ppo_config`); the configuration is :mod:`rlhf_jax.tasks.demo_config`,
stages 6-9 are :mod:`rlhf_jax.tasks.demo_rounds` (``run_demo``) and the held-out judgement
:mod:`rlhf_jax.tasks.judge`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_jax import checkpoint, data
from rlhf_jax.config import OptimConfig, PPOConfig, PPOHyperparams, RewardConfig, RunConfig, SFTConfig
from rlhf_jax.drivers import run_rm, run_sft
from rlhf_jax.tasks import evaluate, tiny
from rlhf_jax.tasks.demo_config import DemoConfig
from rlhf_jax.tasks.world import World, WorldConfig

log = logging.getLogger(__name__)


def _run(**kw) -> RunConfig:
    # remat: the RunConfig default ("dots"). Measured 2026-11-30, the demo's PPO-ptx stage (12 iterations,
    # four interleaved pairs on a loaded 2-core machine): median 0.32-0.60 s/iteration with "dots"
    # against 0.43-1.04 s with "none"; the slower PPO stages blamed on "dots" were load, not remat
    return RunConfig(**{"log_every": 10, "eval_every": 50, "save_every": 1000, "keep_last": 1, **kw})


@dataclass(frozen=True)
class Prepared:
    """What the demo's stages 1-5 leave: the world, its files and user split, SFT and RM.

    ``rng`` is the demo's generator after drawing the rankings' K (its evaluation goes on
    drawing from it); ``base_big`` / ``sft_big`` are None when prepared without them;
    ``rm_init`` is the model every reward model starts from (``sft`` or ``sft_big``,
    ``DemoConfig.rm_init``).
    """

    world: World
    tokenizer: Any
    files: dict[str, Path]
    train_prompts: list[dict]
    val_prompts: list[dict]
    test_prompts: list[dict]
    base: Path
    sft: Path
    rankings: Path
    rm: Path
    rng: np.random.Generator
    base_big: Path | None = None
    sft_big: Path | None = None
    rm_init: Path | None = None

    def __post_init__(self) -> None:
        if self.rm_init is None:
            object.__setattr__(self, "rm_init", self.sft)


def timed(timings: dict[str, float], name: str, fn):
    t0 = time.perf_counter()
    result = fn()
    timings[name] = time.perf_counter() - t0
    log.info("demo: %s done in %.1f s", name, timings[name])
    return result


def prepare(cfg: DemoConfig, *, big: bool = True, timings: dict[str, float] | None = None) -> Prepared:
    """Stages 1-5 of the demo (world, base, SFT, rankings, RM; with ``big`` also the 4x larger
    base and SFT) under ``cfg.out``, skipping finished runs when re-run. ``timings`` collects
    each stage's wall time. Other experiments on the built-in task start from here.

    The RM starts from ``cfg.rm_init``; when that is ``"sft_big"`` the big base and SFT models
    are trained whatever ``big`` says (``big=False`` callers get the demo's own RM, so a
    finished demo directory and a fresh ``prepare`` agree)."""
    cfg = cfg.scaled()
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    timings = {} if timings is None else timings

    def stage(name: str, fn):
        return timed(timings, name, fn)

    world = World(
        WorldConfig(
            seed=cfg.seed,
            num_users=cfg.num_users,
            prompts_per_user=cfg.prompts_per_user,
            families=cfg.families,
            demo_filler_rate=cfg.demo_filler_rate,
        )
    )
    tok = world.build_tokenizer(root / "tokenizer")
    files = stage("world", lambda: world.write_files(root / "data"))
    vocab = len(tok)

    def base(name: str, width: int, depth: int, steps: int) -> Path:
        init = tiny.make_model_dir(
            root / f"{name}_init",
            vocab_size=vocab,
            family="llama",
            hidden_size=width,
            num_layers=depth,
            num_heads=4,
            seed=cfg.seed,
            tokenizer=tok,
        )
        return run_sft(
            SFTConfig(
                data=str(files["pretrain"]),
                init=str(init),
                out=str(root / name),
                mode="pretrain",
                max_steps=steps,
                batch_size=32,
                seq_len=64,
                optim=OptimConfig(learning_rate=3e-3, warmup_steps=20),
                run=_run(seed=cfg.seed),
            )
        )

    def sft(name: str, init: Path, steps: int) -> Path:
        return run_sft(
            SFTConfig(
                data=str(files["demonstrations"]),
                init=str(init),
                out=str(root / name),
                max_steps=steps,
                batch_size=32,
                seq_len=48,
                ptx_data=str(files["pretrain"]),
                ptx_fraction=0.1,
                optim=OptimConfig(learning_rate=1e-3),
                run=_run(seed=cfg.seed),
            )
        )

    # users are split once: train/val users' data trains every model; test users are held out
    prompt_records, _ = data.load_records(files["prompts"], "prompts")
    train_p, val_p, test_p = data.split_by_user(prompt_records, fractions=(0.8, 0.1, 0.1), seed=cfg.seed)
    test_users = {r["user_id"] for r in test_p}
    demo_rows = [json.loads(line) for line in files["demonstrations"].read_text().splitlines()]
    files["demonstrations"] = root / "data" / "demonstrations_train.jsonl"
    files["demonstrations"].write_text(
        "".join(json.dumps(r) + "\n" for r in demo_rows if r["user_id"] not in test_users)
    )

    def scaled_steps(steps: int) -> int:
        return max(1, round(cfg.big_step_fraction * steps))

    base_dir = stage("pretrain", lambda: base("base", cfg.hidden_size, cfg.num_layers, cfg.pretrain_steps))
    big = big or cfg.rm_init == "sft_big"
    big_dir = sft_big_dir = None
    if big:
        big_dir = stage(
            "pretrain_big",
            lambda: base("base_big", 2 * cfg.hidden_size, 2 * cfg.num_layers, scaled_steps(cfg.pretrain_steps)),
        )
    sft_dir = stage("sft", lambda: sft("sft", base_dir, cfg.sft_steps))
    if big:
        sft_big_dir = stage("sft_big", lambda: sft("sft_big", big_dir, scaled_steps(cfg.sft_steps)))

    # ---- rankings of the SFT model's own samples (K = 4..9), by simulated labelers
    policy, policy_params, _ = checkpoint.load_model(sft_dir)
    rng = np.random.default_rng(cfg.seed)
    rank_src = [r for r in train_p + val_p][: cfg.ranking_prompts]
    ks = rng.integers(4, 10, len(rank_src))

    def collect():
        recs = evaluate.ranked_samples(
            world,
            policy,
            policy_params,
            tok,
            rank_src,
            ks,
            sample_seed=100,
            label_seed=cfg.seed,
            max_new_tokens=cfg.max_new_tokens,
        )
        path = root / "data" / "rankings.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        return path

    rankings_path = stage("rankings", collect)
    rm_init = sft_big_dir if cfg.rm_init == "sft_big" else sft_dir
    rm_dir = stage(
        "rm",
        lambda: run_rm(rm_config(cfg, rankings_path, rm_init, files["demonstrations"], root / "rm", cfg.rm_steps)),
    )
    return Prepared(
        world=world,
        tokenizer=tok,
        files=files,
        train_prompts=train_p,
        val_prompts=val_p,
        test_prompts=test_p,
        base=base_dir,
        sft=sft_dir,
        rankings=rankings_path,
        rm=rm_dir,
        rng=rng,
        base_big=big_dir,
        sft_big=sft_big_dir,
        rm_init=rm_init,
    )


def rm_config(cfg: DemoConfig, rankings: Path, init: Path, demonstrations: Path, out: Path, steps: int) -> RewardConfig:
    """The demo's reward model: from ``init`` (``Prepared.rm_init``) on ``rankings``, the
    demonstrations' mean score set to 0."""
    return RewardConfig(
        data=str(rankings),
        init=str(init),
        out=str(out),
        demonstrations=str(demonstrations),
        max_steps=steps,
        batch_size=32,
        max_prompt_len=32,
        max_response_len=cfg.max_new_tokens + 1,
        optim=OptimConfig(learning_rate=cfg.rm_learning_rate, warmup_steps=10),
        run=_run(seed=cfg.seed, eval_every=steps),
    )


def ppo_config(cfg: DemoConfig, prep: Prepared, out: Path, *, ptx: bool, kl_coef: float = 0.1, **hparams) -> PPOConfig:
    """The demo's PPO run from ``prep.sft`` against ``prep.rm`` (PPO-ptx with ``ptx``, gamma ``cfg.ptx_coef``);
    ``hparams`` override :class:`PPOHyperparams` fields (e.g. ``estimator``, ``group_size``)."""
    cfg = cfg.scaled()
    every = max(1, cfg.ppo_steps // 6)
    return PPOConfig(
        prompts=str(prep.files["prompts"]),
        policy=str(prep.sft),
        reward=str(prep.rm),
        out=str(out),
        ptx_data=str(prep.files["pretrain"]) if ptx else None,
        max_steps=cfg.ppo_steps,
        max_prompt_len=32,
        ptx_seq_len=64,
        eval_prompts=64,
        hparams=PPOHyperparams(
            **{
                "batch_size": 64,
                "minibatch_size": 16,
                "ppo_epochs": 1,
                "max_new_tokens": cfg.max_new_tokens,
                "kl_coef": kl_coef,
                "ptx_rows": 8,
                "ptx_coef": cfg.ptx_coef,
                "ema_decay": cfg.ppo_ema_decay,
                **hparams,
            }
        ),
        optim=OptimConfig(
            learning_rate=cfg.ppo_learning_rate, schedule="constant", warmup_steps=2, warmup_init_fraction=0.1
        ),
        # a checkpoint at every evaluation: the alignment tax along the run (demo_rounds.trajectory)
        run=_run(
            seed=cfg.seed,
            eval_every=every,
            save_every=every,
            keep_last=cfg.ppo_steps // every + 1,
            log_every=1,
            split_fractions=(0.8, 0.1, 0.1),
        ),
    )
