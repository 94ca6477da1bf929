"""InstructGPT's three stages on TL;DR summarisation with GPT-2 124M.

Command (after `python experiments/prepare_data.py tldr data/tldr` and a local copy of
the `gpt2` checkpoint as safetensors in models/gpt2):

    python experiments/gpt2_124m_tldr.py sft   # then rm, then ppo
    python experiments/gpt2_124m_tldr.py all

Hardware: one GPU (H100/A100) or a TPU v4-8; the mesh uses every device (fsdp).
Time (estimate from FLOPs at ~40% MFU on one H100, not measured here): SFT 1 epoch of
~117k examples x ~400 tokens ~ 5 min; RM 1 epoch of ~93k pairs ~ 5 min; PPO 1k iterations
of 64 episodes x 53 new tokens ~ 1-2 h (generation-bound).
Expected (public reproductions of this setup, Huang et al. 2024): RM validation
accuracy ~ 0.60-0.65 at this size; PPO raises the RM score by several points while the
KL to SFT stays in the tens of nats; win rate vs SFT judged by a stronger model > 50%.
"""

from __future__ import annotations

from rlhf_jax.config import OptimConfig, PPOConfig, PPOHyperparams, RewardConfig, RunConfig, SFTConfig

DATA, MODEL, RUNS = "data/tldr", "models/gpt2", "runs/gpt2_tldr"
RUN = RunConfig(dtype="bfloat16", eval_every=500, save_every=500, keep_last=2, keep_best=1)

SFT = SFTConfig(
    data=f"{DATA}/demonstrations.jsonl",
    init=MODEL,
    out=f"{RUNS}/sft",
    epochs=1,
    batch_size=64,
    seq_len=512,
    dropout=0.0,
    ptx_data=f"{DATA}/text.jsonl",
    ptx_fraction=0.1,
    optim=OptimConfig(learning_rate=3e-5),
    run=RUN,
)
RM = RewardConfig(
    data=f"{DATA}/rankings.jsonl",
    init=f"{RUNS}/sft",
    out=f"{RUNS}/rm",
    demonstrations=f"{DATA}/demonstrations.jsonl",
    batch_size=64,
    max_prompt_len=448,
    max_response_len=64,
    optim=OptimConfig(learning_rate=9e-6),
    run=RUN,
)
PPO = PPOConfig(
    prompts=f"{DATA}/prompts.jsonl",
    policy=f"{RUNS}/sft",
    reward=f"{RUNS}/rm",
    out=f"{RUNS}/ppo",
    ptx_data=f"{DATA}/text.jsonl",
    max_steps=1000,
    max_prompt_len=448,
    ptx_seq_len=512,
    hparams=PPOHyperparams(batch_size=64, minibatch_size=16, max_new_tokens=53, kl_coef=0.05),
    run=RunConfig(dtype="bfloat16", eval_every=50, save_every=50),
)


if __name__ == "__main__":
    from stages import run_stages  # experiments/stages.py, beside this file

    run_stages(SFT, RM, PPO, __doc__)
