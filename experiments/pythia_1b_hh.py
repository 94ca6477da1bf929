"""InstructGPT's three stages on Anthropic HH dialogues with Pythia-1B (GPT-NeoX family).

Command (after `python experiments/prepare_data.py hh data/hh` and a local safetensors copy
of EleutherAI/pythia-1b in models/pythia-1b, whose tokenizer gets a chat template added):

    python experiments/pythia_1b_hh.py all

Hardware: 8 GPUs or a TPU v4-16 slice (fsdp over all devices, bf16 compute, remat on);
see "Scaling out" in the README for launching on every host of a pod.
Time (estimate from FLOPs at ~40% MFU, not measured here): SFT 2 epochs ~ 1 h on 8 x H100;
RM 1 epoch ~ 30 min; PPO-ptx 500 iterations of 256 episodes ~ 4-6 h.
Expected: RM validation accuracy ~ 0.63-0.68 on HH (comparable to published 1B RMs);
PPO raises the RM score; with ptx_data set (PPO-ptx), the held-out pretraining loss stays
within a few percent of SFT's.
"""

from __future__ import annotations

from rlhf_jax.config import MeshConfig, OptimConfig, PPOConfig, PPOHyperparams, RewardConfig, RunConfig, SFTConfig

DATA, MODEL, RUNS = "data/hh", "models/pythia-1b", "runs/pythia1b_hh"
RUN = RunConfig(
    dtype="bfloat16", remat=True, mesh=MeshConfig(data=1, fsdp=-1, tensor=1), eval_every=500, save_every=500
)

SFT = SFTConfig(
    data=f"{DATA}/demonstrations.jsonl",
    init=MODEL,
    out=f"{RUNS}/sft",
    epochs=2,
    batch_size=64,
    seq_len=1024,
    dropout=0.0,
    optim=OptimConfig(learning_rate=1e-5),
    run=RUN,
)
RM = RewardConfig(
    data=f"{DATA}/rankings.jsonl",
    init=f"{RUNS}/sft",
    out=f"{RUNS}/rm",
    demonstrations=f"{DATA}/demonstrations.jsonl",
    batch_size=64,
    max_prompt_len=768,
    max_response_len=256,
    optim=OptimConfig(learning_rate=9e-6),
    run=RUN,
)
PPO = PPOConfig(
    prompts=f"{DATA}/prompts.jsonl",
    policy=f"{RUNS}/sft",
    reward=f"{RUNS}/rm",
    out=f"{RUNS}/ppo",
    ptx_data=None,  # PPO-ptx: point at pretraining text, e.g. a Pile shard as {"text"} JSONL
    max_steps=500,
    max_prompt_len=768,
    hparams=PPOHyperparams(batch_size=256, minibatch_size=64, max_new_tokens=128, kl_coef=0.02),
    run=RunConfig(dtype="bfloat16", remat=True, eval_every=25, save_every=25),
)


if __name__ == "__main__":
    from stages import run_stages  # experiments/stages.py, beside this file

    run_stages(SFT, RM, PPO, __doc__)
