"""The held-out judgement of the demo's models: their samples on the held-out users' prompts
scored by the hidden gold preference, KL from SFT, held-out pretraining loss, reward models'
pair accuracy against the labelers (:class:`Judge`), and the alignment tax along PPO runs
(:func:`trajectory`). The gold preference is only ever read here and by PPO's validation
curve (:func:`gold_fn`), never by a reward model or a labeler."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax import checkpoint, data
from rlhf_jax.tasks import evaluate

EVAL_KEY = 7  # the key of every evaluation sample on held-out prompts (the demo's and compare_methods')


@dataclass
class Judge:
    """The held-out users' evaluation set and what every model is judged against."""

    cfg: Any  # DemoConfig, scaled
    prep: Any  # demo.Prepared
    texts: list[str]  # held-out users' prompts
    heldout: Any  # tokenised held-out pretraining text
    sft: tuple  # (model, params) of the SFT model: the KL reference
    sft_gold: np.ndarray | None = None  # per prompt, once the SFT model has been judged
    judged: dict = dataclasses.field(default_factory=dict)  # run dir -> model(run dir), computed once
    comparisons: dict = dataclasses.field(default_factory=dict)  # policy dir -> held-out ranking records

    @classmethod
    def build(cls, cfg, prep) -> Judge:
        records, _ = data.load_records(prep.files["pretrain_heldout"], "text")
        heldout = data.tokenize_text(records, prep.tokenizer, seq_len=64)
        model, params, _ = checkpoint.load_model(prep.sft)
        return cls(cfg, prep, [r["prompt"] for r in prep.test_prompts][: cfg.eval_prompts], heldout, (model, params))

    def sample(self, model, params, temperature: float) -> dict:
        return evaluate.sample_with_tokens(
            model,
            params,
            self.prep.tokenizer,
            self.texts,
            key=jax.random.key(EVAL_KEY),
            max_prompt_len=32,
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=temperature,
        )

    def kl(self, model, params, s: dict | None = None) -> float:
        """Mean k1 estimate of KL(policy || SFT) per response, on the policy's temperature-1 samples."""
        s = s or self.sample(model, params, 1.0)
        lp = evaluate.response_logps(model, params, s["seq"], s["mask"], s["P"])
        return float(np.mean(lp - evaluate.response_logps(*self.sft, s["seq"], s["mask"], s["P"])))

    def model(self, run_dir: Path, *, kl: bool = True) -> dict:
        """Gold score (per prompt and mean), held-out loss, KL from SFT (``kl``), win outcomes
        over SFT (once SFT is judged), a few samples; ``responses`` is removed by the caller."""
        if str(run_dir) in self.judged:
            return dict(self.judged[str(run_dir)])
        m, p, _ = checkpoint.load_model(run_dir, which="latest")
        t = self.cfg.eval_temperature
        s = self.sample(m, p, t)
        gold = np.asarray([self.prep.world.gold_score(x, o) for x, o in zip(self.texts, s["texts"])])
        out = {
            "gold": float(gold.mean()),
            "heldout_loss": evaluate.heldout_lm_loss(m, p, self.heldout),
            "params": m.config.num_params(),
            "samples": list(zip(self.texts[:5], s["texts"][:5])),
            "gold_scores": gold.tolist(),
            "responses": s["texts"],
        }
        if kl:
            out["kl"] = self.kl(m, p, s if t == 1.0 else None)
        if self.sft_gold is not None:
            out["win_vs_sft"] = evaluate.win_outcomes(gold, self.sft_gold).tolist()
            self.judged[str(run_dir)] = out
        return dict(out)

    def policy_comparisons(self, policy_dir: Path) -> list[dict]:
        """Held-out users' ranking records of ``policy_dir``'s samples (K = 4..9), cached."""
        key = str(policy_dir)
        if key not in self.comparisons:
            m, p, _ = checkpoint.load_model(policy_dir, which="latest")
            rng = np.random.default_rng([self.cfg.seed, 17, len(self.comparisons)])
            recs = [{"prompt": t, "user_id": None} for t in self.texts]
            self.comparisons[key] = evaluate.ranked_samples(
                self.prep.world,
                m,
                p,
                self.prep.tokenizer,
                recs,
                rng.integers(4, 10, len(recs)),
                sample_seed=900 + 10 * len(self.comparisons),
                label_seed=self.cfg.seed + 5 + len(self.comparisons),
                max_new_tokens=self.cfg.max_new_tokens,
            )
        return self.comparisons[key]

    def rm_accuracy(self, rm_dir: Path, records: list[dict]) -> dict:
        rm, params, _ = checkpoint.load_model(rm_dir)
        lengths = {"max_prompt_len": 32, "max_response_len": self.cfg.max_new_tokens + 1}
        return evaluate.rm_group_accuracy(rm, params, records, self.prep.tokenizer, **lengths)

    def agreement(self, records: list[dict]) -> float:
        """Two independent labelers' pair agreement on the same groups (the RM's ceiling)."""
        return self.prep.world.labeler_agreement(
            [r["prompt"] for r in records], [r["responses"] for r in records], seed=self.cfg.seed + 3
        )


def trajectory(judge: Judge, run_dirs: list[Path]) -> list[dict]:
    """Held-out pretraining loss and KL from SFT of every kept checkpoint of one PPO run, or of
    the runs of consecutive rounds continuing it (their EMA policies, ``"round"`` the run's
    index), SFT itself first (round 0, step 0): the alignment tax along the runs."""
    sft_model, sft_params = judge.sft
    sft_loss = evaluate.heldout_lm_loss(sft_model, sft_params, judge.heldout)
    points = [{"round": 0, "step": 0, "kl": 0.0, "heldout_loss": sft_loss}]
    for r, run_dir in enumerate(run_dirs):
        model, _, _ = checkpoint.load_model(run_dir, which="latest")
        for step, params in evaluate.checkpoint_params(run_dir):
            points.append(
                {
                    "round": r,
                    "step": step,
                    "kl": judge.kl(model, params),
                    "heldout_loss": evaluate.heldout_lm_loss(model, params, judge.heldout),
                }
            )
    return points


def gold_fn(world):
    """PPO's validation gold score (``run_ppo(gold_fn=...)``): the hidden preference per sample."""
    return lambda prompts, responses: [world.gold_score(p, r) for p, r in zip(prompts, responses)]
