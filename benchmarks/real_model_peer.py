"""The PyTorch / transformers / TRL side of ``benchmarks/real_model.py`` (run in the peer's Python).

    /tmp/peer-ppo/bin/python benchmarks/real_model_peer.py --entry sft --model-dir DIR --data-dir DATA [--dtype bfloat16]

(torch==2.13.0 + trl==1.12.0; see ../shared/bench/README.md.) One entry per process, so that the
process's peak RSS is that entry's; prints ONE JSON line on stdout, progress on stderr. The
model directory is the SmolLM2-135M-Instruct conversion rlhf_jax loads too; the data are the
JSONL files ``real_model.py`` wrote (``DATA/paths.json``). Entries (the same work as rlhf_jax's):

* ``sft``: TRL SFTTrainer with its defaults (conversational prompt/completion rows built from
  the demonstrations: loss on the completion), fp32, batch 8, rows in file order.
* ``rm``: TRL RewardTrainer with its defaults (8 pairs a step) on the rankings expanded to pairs.
* ``gen``: ``model.generate(do_sample=True)``, 16 left-padded chat prompts -> exactly 32 new tokens.
* ``ppo``: TRL PPOTrainer (trl.experimental.ppo), 16 episodes x 24 new tokens a step, the peer
  baseline's settings (``../shared/bench/trl_baseline.py``, ``bench_ppo_trl``), EOS never stops.
* ``ppo_ptx``: TRL has no PPO-ptx; the peer baseline's plain-torch PPO-ptx loop
  (``bench_ppo_torch(ptx=True)``) with the real model: 2 minibatches of 8, + 8 pretraining rows of
  P + R tokens per minibatch (coefficient 27.8).

``--dtype bfloat16``: each path's standard bf16 mixed precision, params (and optimizer state)
float32. The Trainers (SFT, reward, PPO) get TRL's ``bf16=True`` and the process the
``ACCELERATE_MIXED_PRECISION=bf16`` that ``accelerate launch --mixed_precision bf16`` sets (TRL
1.12's PPOTrainer builds ``Accelerator()`` without the config's precision, so ``bf16=True`` alone
leaves it fp32): accelerate wraps the prepared model's forward in ``torch.autocast(device,
torch.bfloat16)``. PPOTrainer's rollout calls the unwrapped policy / value / reward / reference
models, outside that autocast: fp32 (recorded as ``bf16_partial``). ``gen`` and the ``ppo_ptx``
loop run their forward passes under ``torch.autocast(device, dtype=torch.bfloat16)``, backward
outside it. Every entry counts the output dtypes of each model's first Linear
(``linear_out_dtypes``): what really ran in bf16.

``--device`` (default ``auto``: CUDA when torch sees a GPU, else the CPU): where every model and
input goes; on a GPU each timed region ends with ``torch.cuda.synchronize()`` and the entry
records the GPU's peak allocated memory (``device_peak_mb``) next to the process's peak RSS.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SFT_BATCH, GEN_BATCH, GEN_NEW = 8, 16, 32
PPO_EPISODES, PPO_MINIBATCH, PPO_NEW, PTX_COEF = 16, 8, 24, 27.8


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def stats(xs):
    xs = list(xs)
    return dict(median=statistics.median(xs), min=min(xs), max=max(xs), n=len(xs))


def rss_mb() -> dict:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0].lower() + "_mb"] = int(line.split()[1]) / 1024
    return out


DEVICE = torch.device("cpu")  # set by main from --device: every model and input of the plain-torch paths goes here


def sync():
    """Wait for the GPU's queued work, so that a host clock read after it times that work."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def amp(a):
    """The forward passes' autocast of a plain-torch path: bf16 with --dtype bfloat16, else nothing."""
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16) if a.dtype == "bfloat16" else contextlib.nullcontext()


def dtype_probe(**models) -> dict:
    """A forward hook on each model's first Linear counting its output dtypes: {name: Counter}."""
    seen = {}
    for name, model in models.items():
        seen[name] = collections.Counter()
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        first.register_forward_hook(
            lambda mod, args, out, c=seen[name]: c.update([str(out.dtype).removeprefix("torch.")])
        )
    return seen


def precision(a, probe: dict, where: str) -> dict:
    """What the entry ran in: the configured precision and the probe's counts (bf16_partial: some pass ran fp32)."""
    out = {"precision": where if a.dtype == "bfloat16" else "fp32",
           "linear_out_dtypes": {k: dict(v) for k, v in probe.items()}}  # fmt: skip
    out["bf16_partial"] = a.dtype == "bfloat16" and any(c.get("float32") for c in probe.values())
    return out


def gpu_memory() -> dict:
    """Peak GPU memory of this process: what torch's allocator handed out, and what it reserved (MiB)."""
    if DEVICE.type != "cuda":
        return {}
    return {"device_peak_mb": torch.cuda.max_memory_allocated() / 2**20,
            "device_reserved_peak_mb": torch.cuda.max_memory_reserved() / 2**20,
            "device_kind": torch.cuda.get_device_name()}  # fmt: skip


def param_dtypes(*models) -> list[str]:
    return sorted({str(p.dtype).removeprefix("torch.") for m in models for p in m.parameters()})


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def load_lm(model_dir, cls_name="AutoModelForCausalLM", **kw):
    import transformers

    cls = getattr(transformers, cls_name)
    return cls.from_pretrained(model_dir, dtype=torch.float32, **kw).to(DEVICE)


def tokenizer(model_dir, side="right"):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, padding_side=side)


# ----------------------------------------------------------------------------- Trainer plumbing
def step_timer():
    """A TrainerCallback recording the wall time at train begin and after every optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t = []

        def on_train_begin(self, args, state, control, **kw):
            sync()
            self.t.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.t.append(time.perf_counter())

    return StepTimer()


def in_order(trainer_cls):
    """``trainer_cls`` taking the rows in file order (rlhf_jax's batches are the same rows)."""

    class InOrder(trainer_cls):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    InOrder.__name__ = trainer_cls.__name__
    return InOrder


def count_tokens(trainer, counts: list):
    """Wrap the trainer's collator: record (real tokens, padded tokens) of every batch."""
    collate = trainer.data_collator

    def wrapped(features):
        batch = collate(features)
        ids = batch.get("input_ids")
        if ids is None:  # a reward batch: chosen and rejected are concatenated inside the trainer
            ids = batch["chosen_input_ids"] if "chosen_input_ids" in batch else None
        mask = batch.get("attention_mask")
        if mask is not None:
            counts.append((int(mask.sum()), int(mask.numel())))
        elif ids is not None:
            counts.append((int(ids.numel()), int(ids.numel())))
        return batch

    trainer.data_collator = wrapped


def trainer_args(outdir, steps, dtype):
    """What the comparison needs, nothing else: fp32 or bf16 (mixed) on --device, a fixed step count, no logging / saving."""
    return dict(output_dir=outdir, max_steps=steps, use_cpu=DEVICE.type == "cpu", bf16=dtype == "bfloat16", fp16=False, report_to="none",
                save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                dataloader_pin_memory=False, seed=0)  # fmt: skip


def timed_train(trainer, timer, warmup) -> dict:
    with contextlib.redirect_stdout(sys.stderr):  # stdout = the JSON line only
        out = trainer.train()
    d = [b - a for a, b in zip(timer.t[:-1], timer.t[1:])]
    return {"times": d[warmup:], "first_step_s": d[0], "train_loss": getattr(out, "training_loss", None)}


# ----------------------------------------------------------------------------- entries
def bench_sft(a, paths):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    steps = a.warmup + a.repeats
    rows = read_jsonl(paths["demos"])[: SFT_BATCH * steps]
    ds = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    t0 = time.perf_counter()
    model, tok = load_lm(a.model_dir), tokenizer(a.model_dir)
    load_s, loaded = time.perf_counter() - t0, rss_mb()
    timer, counts, probe = step_timer(), [], dtype_probe(model=model)
    with tempfile.TemporaryDirectory() as d:
        cfg = SFTConfig(**trainer_args(d, steps, a.dtype), per_device_train_batch_size=SFT_BATCH)
        tr = in_order(SFTTrainer)(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[timer])
        count_tokens(tr, counts)
        r = timed_train(tr, timer, a.warmup)
    real, padded = sum(c[0] for c in counts[a.warmup :]), sum(c[1] for c in counts[a.warmup :])
    defaults = {k: getattr(cfg, k) for k in ("learning_rate", "lr_scheduler_type", "weight_decay", "adam_beta2",
                                             "max_grad_norm", "max_length", "packing", "padding_free",
                                             "gradient_checkpointing", "completion_only_loss", "assistant_only_loss",
                                             "optim") if hasattr(cfg, k)}  # fmt: skip
    return {"impl": "TRL SFTTrainer (defaults)", "step_s": stats(r["times"]), "tokens_per_s": real / sum(r["times"]),
            "padded_tokens_per_s": padded / sum(r["times"]), "real_tokens_per_step": real / len(r["times"]),
            "padded_tokens_per_step": padded / len(r["times"]), "first_step_s": r["first_step_s"],
            "model_load_s": load_s, "rss_after_load_mb": loaded["vmrss_mb"], "config": defaults,
            "train_loss": r["train_loss"], "bf16_config": cfg.bf16, "param_dtypes": param_dtypes(model),
            **precision(a, probe, "bf16 autocast (TRL bf16=True: accelerate on the model's forward)")}  # fmt: skip


def bench_rm(a, paths):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    pairs = []
    for g in read_jsonl(paths["rankings"]):  # each ranking -> its C(K,2) ordered pairs
        resp, ranks = g["responses"], g["ranks"]
        for i in range(len(resp)):
            for j in range(i + 1, len(resp)):
                if ranks[i] != ranks[j]:
                    win, lose = (i, j) if ranks[i] < ranks[j] else (j, i)
                    pairs.append({"prompt": g["messages"], "chosen": [{"role": "assistant", "content": resp[win]}],
                                  "rejected": [{"role": "assistant", "content": resp[lose]}]})  # fmt: skip
    steps = a.warmup + a.repeats
    t0 = time.perf_counter()
    model = load_lm(a.model_dir, "AutoModelForSequenceClassification", num_labels=1)
    tok = tokenizer(a.model_dir)
    load_s, loaded = time.perf_counter() - t0, rss_mb()
    timer, counts, probe = step_timer(), [], dtype_probe(model=model)
    with tempfile.TemporaryDirectory() as d:
        cfg = RewardConfig(**trainer_args(d, steps, a.dtype))
        bs = cfg.per_device_train_batch_size
        ds = Dataset.from_list(pairs[: bs * steps])
        tr = in_order(RewardTrainer)(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[timer])
        count_tokens(tr, counts)
        r = timed_train(tr, timer, a.warmup)
    n = len(r["times"])
    defaults = {k: getattr(cfg, k) for k in ("learning_rate", "lr_scheduler_type", "max_length",
                                             "gradient_checkpointing", "center_rewards_coefficient",
                                             "per_device_train_batch_size") if hasattr(cfg, k)}  # fmt: skip
    return {"impl": f"TRL RewardTrainer (defaults: {bs} pairs a step)", "step_s": stats(r["times"]),
            "comparisons_per_step": bs, "comparisons_per_s": bs * n / sum(r["times"]), "sequences_per_step": 2 * bs,
            "real_tokens_per_step": sum(c[0] for c in counts[a.warmup :]) / max(n, 1),
            "first_step_s": r["first_step_s"], "model_load_s": load_s, "rss_after_load_mb": loaded["vmrss_mb"],
            "config": defaults, "train_loss": r["train_loss"], "bf16_config": cfg.bf16,
            "param_dtypes": param_dtypes(model),
            **precision(a, probe, "bf16 autocast (TRL bf16=True: accelerate on the model's forward)")}  # fmt: skip


def chat_prompts(tok, paths, n):
    rows = read_jsonl(paths["prompts"])[:n]
    texts = [tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True) for r in rows]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def left_pad(seqs, pad):
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s) :] = torch.tensor(s)
        mask[i, n - len(s) :] = 1
    return ids, mask


def bench_gen(a, paths):
    t0 = time.perf_counter()
    model, tok = load_lm(a.model_dir).eval(), tokenizer(a.model_dir, "left")
    load_s, loaded = time.perf_counter() - t0, rss_mb()
    ids, mask = (x.to(DEVICE) for x in left_pad(chat_prompts(tok, paths, GEN_BATCH), tok.pad_token_id))
    times, first, probe = [], None, dtype_probe(model=model)
    torch.manual_seed(0)
    with torch.no_grad(), amp(a):
        for i in range(a.warmup + a.repeats):
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=GEN_NEW, min_new_tokens=GEN_NEW,
                                 pad_token_id=tok.pad_token_id, eos_token_id=None, use_cache=True)  # fmt: skip
            sync()
            dt = time.perf_counter() - t0
            assert out.shape == (GEN_BATCH, ids.shape[1] + GEN_NEW), out.shape
            first = dt if first is None else first
            if i >= a.warmup:
                times.append(dt)
    s = stats(times)
    return {"impl": "transformers generate(do_sample, KV cache)", "call_s": s,
            "new_tokens_per_s": GEN_BATCH * GEN_NEW / s["median"], "prompt_len": int(ids.shape[1]),
            "real_prompt_tokens": int(mask.sum()), "first_step_s": first, "model_load_s": load_s,
            "rss_after_load_mb": loaded["vmrss_mb"],
            "sample": tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)[:120],
            "param_dtypes": param_dtypes(model),
            **precision(a, probe, "bf16 autocast around generate")}  # fmt: skip


def bench_ppo_trl(a, paths):
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    iters = a.warmup + a.repeats
    t0 = time.perf_counter()
    tok = tokenizer(a.model_dir, "left")
    policy = load_lm(a.model_dir)
    ref = copy.deepcopy(policy)
    value = load_lm(a.model_dir, "AutoModelForSequenceClassification", num_labels=1)
    reward = load_lm(a.model_dir, "AutoModelForSequenceClassification", num_labels=1)
    for m in (policy, ref):  # fixed work: EOS never stops a response (rlhf_jax: eos_token_id=-1)
        m.generation_config.eos_token_id = None
    load_s, loaded = time.perf_counter() - t0, rss_mb()
    probe = dtype_probe(policy=policy, ref=ref, value=value, reward=reward)
    prompts = chat_prompts(tok, paths, PPO_EPISODES)
    ds = Dataset.from_dict({"input_ids": prompts * iters})
    ev = Dataset.from_dict({"input_ids": prompts})
    timer = step_timer()
    with tempfile.TemporaryDirectory() as d:
        args = trainer_args(d, None, a.dtype)
        args.pop("max_steps")
        args |= {"logging_strategy": "steps", "logging_steps": 10**6}
        cfg = PPOConfig(**args, per_device_train_batch_size=PPO_MINIBATCH, gradient_accumulation_steps=2,
                        num_mini_batches=1, num_ppo_epochs=1, total_episodes=PPO_EPISODES * iters,
                        response_length=PPO_NEW, local_rollout_forward_batch_size=PPO_EPISODES,
                        num_sample_generations=0, stop_token=None, missing_eos_penalty=None, learning_rate=1e-5,
                        per_device_eval_batch_size=PPO_EPISODES)  # fmt: skip
        tr = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                        value_model=value, train_dataset=ds, eval_dataset=ev, callbacks=[timer])  # fmt: skip
        r = timed_train(tr, timer, a.warmup)
        mixed = tr.accelerator.mixed_precision
    s = stats(r["times"])
    where = f"TRL bf16=True (accelerator mixed_precision={mixed}): autocast on the update passes only, rollout fp32"
    prec = precision(a, probe, where)
    if a.dtype == "bfloat16" and mixed != "bf16":
        prec |= {"bf16_partial": True, "precision": f"NOT bf16: accelerator mixed_precision={mixed}"}
    return {"impl": "TRL 1.12 PPOTrainer", "iter_s": s, "episodes_per_s": PPO_EPISODES / s["median"],
            "prompt_len_max": max(map(len, prompts)), "new": PPO_NEW, "first_step_s": r["first_step_s"],
            "model_load_s": load_s, "rss_after_load_mb": loaded["vmrss_mb"],
            "config": "per_device_train_batch_size=8, gradient_accumulation_steps=2, num_mini_batches=1, "
                      f"num_ppo_epochs=1, temperature 0.7 (default), lr 1e-5, {a.dtype}",
            "bf16_config": cfg.bf16, "accelerator_mixed_precision": mixed,
            "param_dtypes": param_dtypes(policy, value), **prec}  # fmt: skip


def _positions(mask):
    return (mask.cumsum(1) - mask).clamp(min=0)


def _values(model, ids, mask):
    """Per-position scalar of a *ForSequenceClassification model (its trunk + score head): [B, T]."""
    h = getattr(model, model.base_model_prefix)(input_ids=ids, attention_mask=mask,
                                                position_ids=_positions(mask)).last_hidden_state  # fmt: skip
    return model.score(h).squeeze(-1).float()  # fp32 for the GAE (bf16 under autocast)


def _logprobs(logits, ids):
    return torch.gather(F.log_softmax(logits.float(), -1), -1, ids.unsqueeze(-1)).squeeze(-1)


def ptx_rows(tok, paths, n, length):
    """``n`` rows of ``length`` tokens from the packed stream of the text rows (each text + EOS)."""
    stream = []
    for r in read_jsonl(paths["text"]):
        stream += tok(r["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(stream) >= n * length:
            break
    return torch.tensor(stream[: n * length]).view(n, length)


def bench_ppo_ptx_torch(a, paths, B=PPO_EPISODES, R=PPO_NEW, n_mb=2, kl_coef=0.05, gamma=1.0, lam=0.95, clip=0.2,
                        clip_v=0.2, vf_coef=0.1, temp=0.7):  # fmt: skip
    """The peer baseline's plain-torch PPO-ptx iteration (``trl_baseline.bench_ppo_torch(ptx=True)``) on the real model."""
    t0 = time.perf_counter()
    tok = tokenizer(a.model_dir, "left")
    policy = load_lm(a.model_dir)
    ref = copy.deepcopy(policy).eval()
    value = load_lm(a.model_dir, "AutoModelForSequenceClassification", num_labels=1)
    reward = load_lm(a.model_dir, "AutoModelForSequenceClassification", num_labels=1).eval()
    for m in (ref, reward):
        m.requires_grad_(False)
    load_s, loaded = time.perf_counter() - t0, rss_mb()
    probe = dtype_probe(policy=policy, ref=ref, value=value, reward=reward)
    opt = torch.optim.AdamW(list(policy.parameters()) + list(value.parameters()), lr=1e-5)
    prompts, pmask = (x.to(DEVICE) for x in left_pad(chat_prompts(tok, paths, B), tok.pad_token_id))
    P, mb = prompts.shape[1], B // n_mb
    ptx = ptx_rows(tok, paths, n_mb * mb, P + R).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    tot, roll, upd = [], [], []
    for it in range(a.warmup + a.repeats):
        t0 = time.perf_counter()
        policy.eval()
        with torch.no_grad(), amp(a):  # rollout + scoring
            out = policy.generate(input_ids=prompts, attention_mask=pmask, do_sample=True, max_new_tokens=R,
                                  min_new_tokens=R, top_k=0, top_p=1.0, temperature=temp, use_cache=True,
                                  pad_token_id=tok.pad_token_id, eos_token_id=None, return_dict_in_generate=True,
                                  output_scores=True)  # fmt: skip
            seq = out.sequences
            mask = torch.cat([pmask, torch.ones(B, R, dtype=pmask.dtype, device=DEVICE)], 1)
            resp = seq[:, P:]
            old_lp = _logprobs(torch.stack(out.scores, 1), resp)
            ref_logits = ref(input_ids=seq, attention_mask=mask, position_ids=_positions(mask)).logits
            ref_lp = _logprobs(ref_logits[:, P - 1 : -1] / temp, resp)
            old_v = _values(value, seq, mask)[:, P - 1 : -1]
            score = _values(reward, seq, mask)[:, -1]
            rew = -kl_coef * (old_lp - ref_lp)
            rew[:, -1] += score
            adv_rev, last = [], torch.zeros(B, device=DEVICE)
            for t in reversed(range(R)):  # GAE
                nv = old_v[:, t + 1] if t < R - 1 else torch.zeros(B, device=DEVICE)
                last = rew[:, t] + gamma * nv - old_v[:, t] + gamma * lam * last
                adv_rev.append(last)
            adv = torch.stack(adv_rev[::-1], 1)
            ret = adv + old_v
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        sync()
        t1 = time.perf_counter()
        policy.train()
        value.train()
        perm = torch.randperm(B, generator=g).to(DEVICE)
        for k in range(n_mb):
            idx = perm[k * mb : (k + 1) * mb]
            s_mb, m_mb = seq[idx], mask[idx]
            with amp(a):  # the forward passes and the loss; backward outside the autocast
                logits = policy(input_ids=s_mb, attention_mask=m_mb, position_ids=_positions(m_mb)).logits
                ratio = torch.exp(_logprobs(logits[:, P - 1 : -1] / temp, resp[idx]) - old_lp[idx])
                adv_mb = adv[idx]
                pg = torch.max(-adv_mb * ratio, -adv_mb * ratio.clamp(1 - clip, 1 + clip)).mean()
                v = _values(value, s_mb, m_mb)[:, P - 1 : -1]
                vc = old_v[idx] + (v - old_v[idx]).clamp(-clip_v, clip_v)
                vf = 0.5 * torch.max((v - ret[idx]) ** 2, (vc - ret[idx]) ** 2).mean()
                x = ptx[k * mb : (k + 1) * mb]
                ptx_loss = policy(input_ids=x, labels=x).loss.float()
                loss = pg + vf_coef * vf + PTX_COEF * ptx_loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        t2 = time.perf_counter()
        if it == 0:
            first = t2 - t0
        if it >= a.warmup:
            tot.append(t2 - t0)
            roll.append(t1 - t0)
            upd.append(t2 - t1)
    s = stats(tot)
    return {"impl": "plain torch PPO-ptx (peer baseline's loop; TRL has no PPO-ptx)", "iter_s": s,
            "rollout_s": stats(roll), "update_s": stats(upd), "episodes_per_s": B / s["median"], "prompt_len": P,
            "new": R, "ptx_rows": [n_mb * mb, P + R], "first_step_s": first, "model_load_s": load_s,
            "rss_after_load_mb": loaded["vmrss_mb"], "last_loss": float(loss), "last_ptx_loss": float(ptx_loss),
            "param_dtypes": param_dtypes(policy, value),
            **precision(a, probe, "bf16 autocast on every forward pass (rollout, scoring, update)")}  # fmt: skip


ENTRIES = {"sft": bench_sft, "rm": bench_rm, "gen": bench_gen, "ppo": bench_ppo_trl, "ppo_ptx": bench_ppo_ptx_torch}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entry", required=True, choices=sorted(ENTRIES))
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when torch sees a GPU"
    )
    a = ap.parse_args()
    global DEVICE
    DEVICE = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu")
    # as `accelerate launch --mixed_precision bf16|no` sets it, before any Accelerator exists
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if a.dtype == "bfloat16" else "no"
    import transformers
    import trl

    paths = json.loads(Path(a.data_dir, "paths.json").read_text())
    log(f"[{time.strftime('%H:%M:%S')}] peer {a.entry} ({a.dtype}): torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, trl {trl.__version__}")  # fmt: skip
    result = ENTRIES[a.entry](a, paths)
    result |= rss_mb() | gpu_memory() | {"torch_device": str(DEVICE), "torch": torch.__version__, "transformers": transformers.__version__,
                          "trl": trl.__version__, "torch_threads": torch.get_num_threads(), "dtype": a.dtype}  # fmt: skip
    print(json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()
