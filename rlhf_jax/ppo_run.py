"""``rlhf-jax ppo``: load the SFT policy and the reward model, build the PPO stage, train.

The policy and the KL reference both start from ``--policy``; the value network starts
from the reward model (its own copy of the params, as in InstructGPT), or is a head on
the policy backbone with ``value_head="shared"``. The run directory's model.json points
at the EMA params, which are what evaluation and export use.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import PPOConfig
from rlhf_jax.models import CausalLM

log = logging.getLogger(__name__)


def _boxed_params(model: CausalLM) -> Any:
    return model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]


def run_ppo(cfg: PPOConfig, *, gold_fn=None) -> Path:
    """Train PPO / PPO-ptx; returns the run directory.

    ``gold_fn(prompts: list[str], responses: list[str]) -> list[float]`` (optional, the
    built-in task's hidden preference) adds ``val/gold_score`` to each evaluation.
    """
    from rlhf_jax import checkpoint, data, sharding, train_loop
    from rlhf_jax.optim import make_optimizer
    from rlhf_jax.ppo import init_ppo_state, make_iteration, score_responses
    from rlhf_jax.sampling import generate

    run = cfg.run
    out = Path(cfg.out)
    policy, policy_params, tok = checkpoint.load_model(cfg.policy, head="lm", dtype=run.dtype)
    rm, rm_params, rm_tok = checkpoint.load_model(cfg.reward, head="scalar", dtype=run.dtype)
    if tok.get_vocab() != rm_tok.get_vocab():
        raise ValueError(f"--policy {cfg.policy} and --reward {cfg.reward} use different tokenizers")
    data.check_vocab(tok, policy.config.vocab_size)
    policy = CausalLM(policy.config.replace(dropout=0.0, remat=run.remat), head="lm")
    rm = CausalLM(rm.config.replace(dropout=0.0), head="scalar")
    ref_params = policy_params
    value_model, value_params = None, None
    if cfg.value_head == "shared":
        policy = policy.clone(head="lm+scalar")
        fresh = jax.tree.map(np.asarray, _boxed_params(policy))
        from flax import linen as nn

        policy_params = {**policy_params, "score": nn.unbox(fresh)["score"]}
    else:
        value_model = CausalLM(rm.config.replace(remat=run.remat), head="scalar")
        value_params = jax.tree.map(jnp.copy, rm_params)

    tokenize = lambda recs: data.tokenize_prompts(recs, tok, max_prompt_len=cfg.max_prompt_len)  # noqa: E731
    train, val, _, _ = train_loop.load_split_tokenize(cfg.prompts, "prompts", run, tokenize)
    prompt_it = data.BatchIterator(train.arrays, batch_size=cfg.batch_size, seed=run.seed,
                                   process_index=jax.process_index(), process_count=jax.process_count())  # fmt: skip
    iterators = {"prompts": prompt_it}
    ptx_it = None
    if cfg.gamma_ptx > 0:
        ptx, _, _, _ = train_loop.load_split_tokenize(
            cfg.ptx_data, "text", run, lambda r: data.tokenize_text(r, tok, seq_len=cfg.ptx_seq_len), split=False
        )
        rows = cfg.ppo_epochs * cfg.num_minibatches * cfg.rows_per_ptx_minibatch
        ptx_it = data.BatchIterator(ptx.arrays, batch_size=rows, seed=run.seed + 1)
        iterators["ptx"] = ptx_it

    steps_per_iter = cfg.ppo_epochs * cfg.num_minibatches
    optim = dataclasses.replace(cfg.optim, warmup_steps=cfg.optim.warmup_steps * steps_per_iter)  # iterations -> steps
    total_updates = cfg.max_steps * steps_per_iter
    policy_opt = make_optimizer(optim, total_updates)
    value_opt = make_optimizer(optim, total_updates) if value_model is not None else None

    mesh = sharding.make_mesh(run.mesh)

    def boxed_state():
        vp = None if value_model is None else _boxed_params(value_model)
        return init_ppo_state(_boxed_params(policy), vp, policy_opt, value_opt, kl_coef=cfg.kl_coef, seed=run.seed)

    state, shardings = train_loop.shard_state(
        lambda pv: init_ppo_state(pv[0], pv[1], policy_opt, value_opt, kl_coef=cfg.kl_coef, seed=run.seed),
        boxed_state,
        (policy_params, value_params),
        mesh,
    )
    ref_sh = sharding.param_shardings(lambda: _boxed_params(policy.clone(head="lm")), mesh)
    rm_sh = sharding.param_shardings(lambda: _boxed_params(rm), mesh)
    frozen = (jax.device_put(ref_params, ref_sh), jax.device_put(rm_params, rm_sh))

    iteration = make_iteration(cfg, policy, value_model, rm, policy_opt, value_opt,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip

    def next_batch() -> dict:
        b = next(prompt_it)
        batch = {"prompt_ids": b["input_ids"], "prompt_mask": b["attention_mask"]}
        if ptx_it is not None:
            p = next(ptx_it)
            batch |= {"ptx_input_ids": p["input_ids"], "ptx_attention_mask": p["attention_mask"],
                      "ptx_loss_mask": p["loss_mask"]}  # fmt: skip
        return batch

    evaluate = None
    if val is not None:
        n = min(cfg.eval_prompts, len(val))
        val_ids, val_mask = jnp.asarray(val.arrays["input_ids"][:n]), jnp.asarray(val.arrays["attention_mask"][:n])
        lm_policy = policy.clone(head="lm")
        rm_score = jax.jit(lambda p, s, m: score_responses(rm, p, s, m))
        samples_path = out / "samples.jsonl"

        def evaluate(st) -> dict:
            ema = {k: v for k, v in st.ema_params.items() if k != "score"}
            gen = generate(lm_policy, ema, val_ids, val_mask, jax.random.key(0), max_new_tokens=cfg.max_new_tokens,
                           temperature=0.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
            seq = jnp.concatenate([val_ids, gen.tokens], axis=1)
            seq_mask = jnp.concatenate([val_mask, gen.mask], axis=1)
            scores = np.asarray(rm_score(frozen[1], seq, seq_mask))
            prompts = [tok.decode(r[m > 0]) for r, m in zip(np.asarray(val_ids), np.asarray(val_mask))]
            responses = [tok.decode(r[m > 0], skip_special_tokens=False)
                         for r, m in zip(np.asarray(gen.tokens), np.asarray(gen.mask))]  # fmt: skip
            metrics = {"val/rm_score": float(scores.mean()),
                       "val/response_length": float(np.asarray(gen.mask).sum(1).mean())}  # fmt: skip
            if gold_fn is not None:
                metrics["val/gold_score"] = float(np.mean(gold_fn(prompts, responses)))
            with samples_path.open("a") as f:
                for p, r, s in list(zip(prompts, responses, scores))[:4]:
                    f.write(json.dumps({"iteration": int(st.iteration), "prompt": p, "response": r,
                                        "rm_score": float(s)}) + "\n")  # fmt: skip
            return metrics

    checkpoint.write_model_info(out, policy.clone(head="lm"), tok, params_path=("ema_params",))
    stage = train_loop.Stage(
        name="ppo",
        state=state,
        state_shardings=shardings,
        train_step=iteration,
        next_batch=next_batch,
        iterators=iterators,
        total_steps=cfg.max_steps,
        frozen=frozen,
        evaluate=evaluate,
        best_metric="val/gold_score" if gold_fn is not None else ("val/rm_score" if evaluate else None),
        best_mode="max",
        tokens_per_batch=cfg.batch_size * cfg.max_new_tokens,
    )
    train_loop.run(stage, run, mesh, out, config_json=dataclasses.asdict(cfg))
    return out
