"""``rlhf-jax demo``: InstructGPT's pipeline and findings on the built-in world, on a CPU.

Stages (each an ordinary rlhf_jax run directory under ``--out``):
  1. the world writes its files (pretraining corpus, demonstrations, prompts by user);
  2. ``base``: a small LM pretrained on the corpus; ``base_big``: one >= 4x larger;
  3. ``sft``: supervised fine-tuning on demonstrations with 10% pretraining mix
     (the paper's PPO-init model); ``sft_big`` from ``base_big`` the same way;
  4. rankings: K = 4..9 samples per prompt from ``sft``, ranked by simulated labelers;
  5. ``rm``: the reward model from ``sft``, demonstrations bias set to mean 0;
  6. ``ppo_ptx`` (gamma 27.8), ``ppo`` (gamma 0) and ``ppo_nokl`` (beta 0, for the
     over-optimisation curve), each from ``sft`` against ``rm``;
  7. evaluation on held-out users' prompts with the gold preference, the held-out
     pretraining loss, and ``report.md`` with plots.

:func:`prepare` runs stages 1-5 alone and :func:`ppo_config` gives the demo's PPO run, for
other experiments from the same SFT model and RM (``experiments/compare_methods.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax import checkpoint, data, reward
from rlhf_jax.config import OptimConfig, PPOConfig, PPOHyperparams, RewardConfig, RunConfig, SFTConfig
from rlhf_jax.drivers import run_ppo, run_rm, run_sft
from rlhf_jax.tasks import evaluate, report, tiny
from rlhf_jax.tasks.world import World, WorldConfig
from rlhf_jax.tasks.world_lang import FAMILIES
from rlhf_jax.train_loop import read_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """The built-in InstructGPT study at small scale (``--quick``: the same pipeline, test-sized).

    Attributes:
      out: the directory of every run, the data and ``report.md``.
      seed: the world's and every run's seed.
      quick: shrink every stage to test size (see :meth:`scaled`).
      hidden_size, num_layers: the aligned model; the "big" SFT model has 2x width and
        2x depth (>= 4x the parameters).
      num_users, prompts_per_user: the world's simulated users (80/10/10 split by user id:
        train / validation / held-out evaluation users).
      families: the instruction families asked (``--quick``: the three a few hundred steps learn).
      demo_filler_rate: how often a labeler's demonstration wraps a correct answer in
        filler, a style the rankings dislike (``WorldConfig.demo_filler_rate``).
      pretrain_steps, sft_steps, rm_steps, ppo_steps: optimizer steps (PPO: iterations).
      big_step_fraction: the big model's pretraining and SFT steps, as a fraction of the
        small one's (1.0: the same data; ``--quick`` shortens it, the slowest stage).
      rm_learning_rate: the reward model's peak learning rate.
      ppo_learning_rate, ppo_ema_decay: PPO's constant learning rate and the decay of the
        EMA policy that is evaluated and exported (0.992 as in the paper; ``--quick``'s 12
        iterations need a shorter average).
      ranking_prompts: prompts of training users whose K = 4..9 SFT samples labelers rank.
      eval_prompts: held-out users' prompts for the win rates and RM accuracy.
      eval_temperature: sampling temperature of the evaluation responses (1.0: the policy's
        own distribution, as in rollouts and the labelers' comparisons; 0: greedy).
      max_new_tokens: response length limit everywhere.
    """

    out: str = "runs/demo"
    seed: int = 0
    quick: bool = False
    hidden_size: int = 64
    num_layers: int = 2
    num_users: int = 120
    prompts_per_user: int = 40
    families: tuple[str, ...] = FAMILIES
    demo_filler_rate: float = 0.3
    pretrain_steps: int = 400
    sft_steps: int = 600
    big_step_fraction: float = 1.0
    rm_steps: int = 120
    rm_learning_rate: float = 1e-3
    ppo_steps: int = 60
    ppo_learning_rate: float = 1e-4
    ppo_ema_decay: float = 0.992
    ranking_prompts: int = 2000
    eval_prompts: int = 480
    eval_temperature: float = 1.0
    max_new_tokens: int = 16

    def scaled(self) -> DemoConfig:
        if not self.quick:
            return self
        return dataclasses.replace(
            self,
            num_users=40,
            prompts_per_user=40,
            families=("repeat", "count", "sort"),
            demo_filler_rate=0.5,
            pretrain_steps=150,
            sft_steps=250,
            big_step_fraction=0.2,
            rm_steps=30,
            ppo_steps=12,
            ppo_learning_rate=3e-4,
            ppo_ema_decay=0.9,
            ranking_prompts=600,
            eval_prompts=160,
        )


def _run(**kw) -> RunConfig:
    return RunConfig(**{"log_every": 10, "eval_every": 50, "save_every": 1000, "keep_last": 1, **kw})


def sample_groups(
    policy, params, tok, texts: list[str], ks, seed: int, *, max_new_tokens: int
) -> tuple[list[list[str]], list[list[bool]], list[int]]:
    """K samples per prompt (``ks[i]`` for prompt i, temperature 1) as (response texts without
    EOS, whether each ended with EOS, the indices of the prompts kept: those with >= 2 texts)."""
    groups: list[list[str]] = [[] for _ in texts]
    ended: list[list[bool]] = [[] for _ in texts]
    for j in range(int(max(ks))):
        outs = evaluate.sample_responses(
            policy,
            params,
            tok,
            texts,
            key=jax.random.key(seed + j),
            max_prompt_len=32,
            max_new_tokens=max_new_tokens,
        )
        for g, e, k, o in zip(groups, ended, ks, outs):
            text, has_eos = evaluate.strip_eos(o, tok.eos_token)
            if len(g) < k and text:
                g.append(text)
                e.append(has_eos)
    keep = [i for i, g in enumerate(groups) if len(g) >= 2]
    return [groups[i] for i in keep], [ended[i] for i in keep], keep


@dataclass(frozen=True)
class Prepared:
    """What the demo's stages 1-5 leave: the world, its files and user split, SFT and RM.

    ``rng`` is the demo's generator after drawing the rankings' K (its evaluation goes on
    drawing from it); ``base_big`` / ``sft_big`` are None when prepared without them.
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


def _timed(timings: dict[str, float], name: str, fn):
    t0 = time.perf_counter()
    result = fn()
    timings[name] = time.perf_counter() - t0
    log.info("demo: %s done in %.1f s", name, timings[name])
    return result


def prepare(cfg: DemoConfig, *, big: bool = True, timings: dict[str, float] | None = None) -> Prepared:
    """Stages 1-5 of the demo (world, base, SFT, rankings, RM; with ``big`` also the 4x larger
    base and SFT) under ``cfg.out``, skipping finished runs when re-run. ``timings`` collects
    each stage's wall time. Other experiments on the built-in task start from here."""
    cfg = cfg.scaled()
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    timings = {} if timings is None else timings

    def stage(name: str, fn):
        return _timed(timings, name, fn)

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
        texts = [r["prompt"] for r in rank_src]
        groups, ended, keep = sample_groups(
            policy, policy_params, tok, texts, ks, 100, max_new_tokens=cfg.max_new_tokens
        )
        recs = world.rankings(
            [texts[i] for i in keep], groups, [rank_src[i]["user_id"] for i in keep], seed=cfg.seed, ended=ended
        )
        path = root / "data" / "rankings.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        return path

    rankings_path = stage("rankings", collect)
    rm_dir = stage(
        "rm",
        lambda: run_rm(
            RewardConfig(
                data=str(rankings_path),
                init=str(sft_dir),
                out=str(root / "rm"),
                demonstrations=str(files["demonstrations"]),
                max_steps=cfg.rm_steps,
                batch_size=32,
                max_prompt_len=32,
                max_response_len=cfg.max_new_tokens + 1,
                optim=OptimConfig(learning_rate=cfg.rm_learning_rate, warmup_steps=10),
                run=_run(seed=cfg.seed, eval_every=cfg.rm_steps),
            )
        ),
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
    )


def ppo_config(cfg: DemoConfig, prep: Prepared, out: Path, *, ptx: bool, kl_coef: float = 0.1, **hparams) -> PPOConfig:
    """The demo's PPO run from ``prep.sft`` against ``prep.rm`` (PPO-ptx with ``ptx``, gamma 27.8);
    ``hparams`` override :class:`PPOHyperparams` fields (e.g. ``estimator``, ``group_size``)."""
    cfg = cfg.scaled()
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
                "ema_decay": cfg.ppo_ema_decay,
                **hparams,
            }
        ),
        optim=OptimConfig(
            learning_rate=cfg.ppo_learning_rate, schedule="constant", warmup_steps=2, warmup_init_fraction=0.1
        ),
        run=_run(seed=cfg.seed, eval_every=max(1, cfg.ppo_steps // 6), log_every=1, split_fractions=(0.8, 0.1, 0.1)),
    )


def run_demo(cfg: DemoConfig) -> Path:
    """Run every stage (skipping finished ones when re-run); returns the report path."""
    cfg = cfg.scaled()
    root = Path(cfg.out)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    def stage(name: str, fn):
        return _timed(timings, name, fn)

    prep = prepare(cfg, timings=timings)
    world, tok, files, test_p, rng = prep.world, prep.tokenizer, prep.files, prep.test_prompts, prep.rng
    sft_dir, sft_big_dir, rm_dir = prep.sft, prep.sft_big, prep.rm
    policy, policy_params, _ = checkpoint.load_model(sft_dir)

    def ppo(name: str, *, ptx: bool, kl_coef: float = 0.1) -> Path:
        return run_ppo(
            ppo_config(cfg, prep, root / name, ptx=ptx, kl_coef=kl_coef),
            gold_fn=lambda ps, rs: [world.gold_score(p, r) for p, r in zip(ps, rs)],
        )

    ppo_ptx_dir = stage("ppo_ptx", lambda: ppo("ppo_ptx", ptx=True))
    ppo_dir = stage("ppo", lambda: ppo("ppo", ptx=False))
    nokl_dir = stage("ppo_nokl", lambda: ppo("ppo_nokl", ptx=False, kl_coef=0.0))

    # ---- evaluation on held-out users
    def evaluation():
        texts = [r["prompt"] for r in test_p][: cfg.eval_prompts]
        heldout_records, _ = data.load_records(files["pretrain_heldout"], "text")
        heldout = data.tokenize_text(heldout_records, tok, seq_len=64)
        results = {"models": {}}
        for name, run_dir in (("SFT", sft_dir), ("SFT big", sft_big_dir), ("PPO", ppo_dir), ("PPO-ptx", ppo_ptx_dir)):
            m, p, _ = checkpoint.load_model(run_dir, which="latest")
            outs = evaluate.sample_responses(
                m,
                p,
                tok,
                texts,
                key=jax.random.key(7),
                max_prompt_len=32,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.eval_temperature,
            )
            results["models"][name] = {
                "gold": float(np.mean([world.gold_score(t, o) for t, o in zip(texts, outs)])),
                "heldout_loss": evaluate.heldout_lm_loss(m, p, heldout),
                "params": m.config.num_params(),
                "samples": list(zip(texts[:5], outs[:5])),
                "responses": outs,
            }
        gold = world.gold_score
        r = results["models"]
        results["win_rates"] = {
            "PPO-ptx vs SFT": evaluate.win_rate(gold, texts, r["PPO-ptx"]["responses"], r["SFT"]["responses"]),
            "PPO vs SFT": evaluate.win_rate(gold, texts, r["PPO"]["responses"], r["SFT"]["responses"]),
            "PPO-ptx vs SFT big": evaluate.win_rate(gold, texts, r["PPO-ptx"]["responses"], r["SFT big"]["responses"]),
        }
        for v in r.values():
            del v["responses"]
        # RM accuracy on held-out users' comparisons, against two labelers' agreement on the same pools
        held = [r["prompt"] for r in test_p][: cfg.eval_prompts]
        groups, ended, keep = sample_groups(
            policy, policy_params, tok, held, rng.integers(4, 10, len(held)), 500, max_new_tokens=cfg.max_new_tokens
        )
        held = [held[i] for i in keep]
        recs = world.rankings(held, groups, [None] * len(held), seed=cfg.seed + 2, ended=ended)
        results["rm_accuracy"] = rm_pair_accuracy(recs)
        results["labeler_agreement"] = world.labeler_agreement(held, groups, seed=cfg.seed + 3)
        results["labeler_gold_accuracy"] = world.labeler_accuracy(held, groups, seed=cfg.seed + 3)
        return results

    def rm_pair_accuracy(recs: list[dict]) -> float:
        """Pair accuracy of the RM on ranking records, through the same tokenisation as training."""
        rm, rm_params, _ = checkpoint.load_model(rm_dir)
        for i, r in enumerate(recs):
            r["example_id"] = i
        ds = data.tokenize_rankings(recs, tok, max_prompt_len=32, max_response_len=cfg.max_new_tokens + 1)
        batch = {k: ds.arrays[k] for k in ("input_ids", "attention_mask", "ranks", "valid", "end_index")}
        metrics = jax.jit(reward.make_eval_step(rm))(rm_params, batch)
        return float(metrics["accuracy"])

    results = stage("evaluation", evaluation)
    rm_val = [m for m in read_metrics(rm_dir) if "val/accuracy" in m]
    results |= {
        "seed": cfg.seed,
        "quick": cfg.quick,
        "eval_temperature": cfg.eval_temperature,
        "rm_val_accuracy": rm_val[-1]["val/accuracy"] if rm_val else None,
        "timings_s": timings,
        "total_s": time.perf_counter() - t_start,
        "runs": {"ppo_ptx": str(ppo_ptx_dir), "ppo": str(ppo_dir), "ppo_nokl": str(nokl_dir)},
    }
    (root / "results.json").write_text(json.dumps(results, indent=2))
    return report.write_report(root, results)
