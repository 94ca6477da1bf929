"""``rlhf-jax ppo``: load the SFT policy and the reward model, build the PPO stage, train.

The policy and the KL reference both start from ``--policy``; the value network starts
from the (first) reward model (its own copy of the params, as in InstructGPT; with
``--lora.rank`` adapters on the RM's params, shared with the reward), or is a head
on the policy backbone with ``value_head="shared"``; critic-free estimators (grpo, dr_grpo,
rloo, reinforce_pp) build none. The score is the weighted sum of every ``--reward`` model
and ``--rule-reward`` function (``rewards.RewardSum``). The run directory's model.json points
at the EMA params, which are what evaluation and export use.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import checkpoint, data, ppo, rl, sharding, train_loop
from rlhf_jax.config import PPOConfig
from rlhf_jax.drivers.common import boxed_trainable, load_stage_model, lora_record, shaped, with_lora
from rlhf_jax.drivers.scoring import bind_sample_and_score, decode_rows
from rlhf_jax.models import CausalLM, lora, quant
from rlhf_jax.models.params import init_params
from rlhf_jax.optim import make_optimizer
from rlhf_jax.reward import score_sequences
from rlhf_jax.rewards import RewardSum, load_rule
from rlhf_jax.shared_jit import shared_jit

log = logging.getLogger(__name__)

PROMPT_BUCKETS = (("prompt_ids", "prompt_mask"), "prompt_mask", True)  # left-padded prompts
PTX_BUCKETS = (("ptx_input_ids", "ptx_attention_mask", "ptx_loss_mask"), "ptx_attention_mask", False)


def build_networks(cfg: PPOConfig) -> dict[str, Any]:
    """Policy, reference, value network (None when critic-free), the rewards, and the tokenizer.

    ``reward`` (a ``RewardSum``) and ``reward_params`` (one tree per reward model) hold every
    reward; ``rm`` / ``rm_params`` are the first reward model, which initialises the value network.
    ``cfg.reference``: the KL reference's run directory when it is not ``cfg.policy`` (iterated
    RLHF: the policy continues from the previous round's latest PPO policy, the reference stays SFT).
    """
    run, reference = cfg.run, cfg.reference
    which = "best" if reference is None else "latest"
    policy, policy_params, tok = load_stage_model(cfg.policy, "lm", run, which=which)
    rms, rm_params = [], []
    for path in cfg.reward:
        rm, params, rm_tok = checkpoint.load_model(path, head="scalar", dtype=run.dtype)
        if tok.get_vocab() != rm_tok.get_vocab():
            raise ValueError(f"--policy {cfg.policy} and --reward {path} use different tokenizers")
        rms.append(CausalLM(rm.config.replace(dropout=0.0), head="scalar"))
        rm_params.append(params)
    rules = [load_rule(spec) for spec in cfg.rule_reward]
    names = [Path(path).name or "rm" for path in cfg.reward] + [spec.partition(":")[2] for spec in cfg.rule_reward]
    reward = RewardSum(models=tuple(rms), rules=tuple(rules), weights=cfg.weights, names=tuple(names))
    ref_params = policy_params  # with LoRA also the policy's frozen base: one copy
    if reference is not None:
        ref, ref_params, ref_tok = load_stage_model(reference, "lm", run)
        if ref.config != policy.config or tok.get_vocab() != ref_tok.get_vocab():
            raise ValueError(f"--policy {cfg.policy} and --reference {reference} differ in model or tokenizer")
    ref_params = quant.quantize_base(ref_params, cfg.lora)  # QLoRA: the reference is the quantized base
    policy = with_lora(policy, cfg.lora)
    value_model, value_params = None, None
    if not cfg.hparams.uses_critic:
        pass  # critic-free: no value network at all
    elif cfg.value_head == "shared":
        policy = policy.clone(head="lm+scalar")
        policy_params = {**policy_params, "score": init_params(policy)["score"]}
    else:
        value_cfg = rms[0].config.replace(remat=run.remat, attention=run.attention)
        value_model = with_lora(CausalLM(value_cfg, head="scalar"), cfg.lora)
        if cfg.lora.enabled:  # adapters + a copy of the RM's score head; the base is the RM's own params
            value_params = lora.trainable_init(value_model, rm_params[0], run.seed + 1)
        else:
            value_params = jax.tree.map(jnp.copy, rm_params[0])
    if cfg.lora.enabled:  # the policy trains adapters (and a shared value head) only
        policy_params = lora.trainable_init(policy, policy_params, run.seed)
    return dict(
        policy=policy,
        policy_params=policy_params,
        ref_params=ref_params,
        value=value_model,
        value_params=value_params,
        rm=rms[0],
        rm_params=rm_params[0],
        reward=reward,
        reward_params=tuple(rm_params),
        tokenizer=tok,
    )


def normalized_reward_params(cfg: PPOConfig, nets: dict, prompts: Any) -> tuple:
    """Each reward model's params rescaled so that its scores on the reference policy's samples
    have mean 0 and std 1 (Ziegler et al.), as a tuple in ``nets["reward_params"]`` order.

    One batch of the first training prompts is sampled (temperature as in training, a fixed
    key: a resumed run computes the same numbers), scored by every reward model, and each
    one's ``rl.reward_gain_bias`` ``gain * r + bias`` is folded into its score head, so nothing
    downstream changes. Rule rewards are left as they are.
    """
    hp, tok, reward = cfg.hparams, nets["tokenizer"], nets["reward"]
    n = min(hp.batch_size, len(prompts))
    ids, mask = jnp.asarray(prompts.arrays["input_ids"][:n]), jnp.asarray(prompts.arrays["attention_mask"][:n])
    sample = jax.jit(
        bind_sample_and_score(
            ppo.reference_model(nets["policy"]), reward.models[0], hp.max_new_tokens, hp.temperature, tok
        )
    )
    ref = {k: v for k, v in nets["ref_params"].items() if k != "score"}
    gen, first = sample(ref, nets["reward_params"][0], ids, mask, jax.random.key(cfg.run.seed + 3))
    seq, seq_mask = jnp.concatenate([ids, gen.tokens], axis=1), jnp.concatenate([mask.astype(jnp.int32), gen.mask], 1)
    out = []
    for i, (name, model, params) in enumerate(zip(reward.names, reward.models, nets["reward_params"])):
        scores = first if i == 0 else jax.jit(score_sequences, static_argnums=0)(model, params, seq, seq_mask)
        gain, bias = rl.reward_gain_bias(scores)
        log.info(
            "reward normalisation of %s on %d reference samples: mean %.4f std %.4f -> gain %.4f bias %.4f",
            name,
            n,
            float(jnp.mean(scores)),
            float(jnp.std(scores)),
            float(gain),
            float(bias),
        )
        score = params["score"]
        out.append({**params, "score": {"kernel": score["kernel"] * gain, "bias": score["bias"] * gain + bias}})
    return tuple(out)


def make_evaluate(
    cfg: PPOConfig, nets: dict, val: Any, frozen: tuple, out: Path, gold_fn: Callable | None
) -> Callable[[Any], dict]:
    """Greedy samples of the EMA policy on validation prompts: score, length, gold score, a few samples.

    ``frozen``: the iteration's (reference params, reward params); with LoRA the EMA adapters
    are joined with the reference params, the policy's base.

    ``val/rm_score`` is the weighted sum of the rewards (no EOS penalty); with several rewards,
    each one's mean is ``val/scores/<name>``.
    """
    tok, reward = nets["tokenizer"], nets["reward"]
    ref_params, reward_params = frozen
    n = min(cfg.eval_prompts, len(val))
    val_ids, val_mask = jnp.asarray(val.arrays["input_ids"][:n]), jnp.asarray(val.arrays["attention_mask"][:n])
    sample = shared_jit(
        bind_sample_and_score(nets["policy"].clone(head="lm"), reward.models[0], cfg.hparams.max_new_tokens, 0.0, tok)
    )
    p = val_ids.shape[1]

    @shared_jit
    def components(params, ids, mask, gen_tokens, gen_mask):
        seq, seq_mask = (
            jnp.concatenate([ids, gen_tokens], axis=1),
            jnp.concatenate([mask.astype(jnp.int32), gen_mask], 1),
        )
        return reward.components(params, seq, seq_mask, p)

    samples_path = out / "samples.jsonl"

    def evaluate(st) -> dict:
        ema = ppo.network_params(nets["policy"], {k: v for k, v in st.ema_params.items() if k != "score"}, ref_params)
        gen, scores = sample(ema, reward_params[0], val_ids, val_mask, jax.random.key(0))
        parts = {}
        if len(reward.names) > 1:
            parts = {
                k: np.asarray(v) for k, v in components(reward_params, val_ids, val_mask, gen.tokens, gen.mask).items()
            }
            scores = reward.total(parts)
        scores = np.asarray(scores)
        prompts = decode_rows(tok, val_ids, val_mask)
        responses = decode_rows(tok, gen.tokens, gen.mask, skip_special_tokens=False)
        metrics = {
            "val/rm_score": float(scores.mean()),
            "val/response_length": float(np.asarray(gen.mask).sum(1).mean()),
        }
        metrics |= {f"val/scores/{k}": float(v.mean()) for k, v in parts.items()}
        if gold_fn is not None:
            metrics["val/gold_score"] = float(np.mean(gold_fn(prompts, responses)))
        with samples_path.open("a") as f:
            for p_, r, s in list(zip(prompts, responses, scores))[:4]:
                f.write(
                    json.dumps({"iteration": int(st.iteration), "prompt": p_, "response": r, "rm_score": float(s)})
                    + "\n"
                )
        return metrics

    return evaluate


def run_ppo(cfg: PPOConfig, *, gold_fn=None) -> Path:
    """Train PPO / PPO-ptx; returns the run directory.

    ``gold_fn(prompts: list[str], responses: list[str]) -> list[float]`` (optional, the
    built-in task's hidden preference) adds ``val/gold_score`` to each evaluation.
    """
    run, hp = cfg.run, cfg.hparams
    data_shards, fsdp_shards, _ = run.mesh.shape(jax.device_count())
    if hp.num_prompts % (data_shards * fsdp_shards):  # the prompt batch is split over data x fsdp
        raise ValueError(
            f"{hp.num_prompts} prompts per iteration (batch_size {hp.batch_size} / group_size "
            f"{hp.group_size}) cannot be split over the {data_shards * fsdp_shards} data x fsdp devices; "
            "make it a multiple"
        )
    out = Path(cfg.out)
    nets = build_networks(cfg)
    policy, value_model, tok = nets["policy"], nets["value"], nets["tokenizer"]

    tokenize = lambda recs: data.tokenize_prompts(recs, tok, max_prompt_len=cfg.max_prompt_len)  # noqa: E731
    train, val, _, _ = data.load_split_tokenize(cfg.prompts, "prompts", run, tokenize)
    if cfg.normalize_reward:
        nets["reward_params"] = normalized_reward_params(cfg, nets, train)
    # batch_size counts episodes: each of batch_size / group_size prompts is sampled group_size times
    prompt_it = data.BatchIterator(
        train.arrays,
        batch_size=hp.num_prompts,
        seed=run.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    iterators = {"prompts": prompt_it}
    ptx_it = None
    if cfg.uses_ptx:
        ptx, _, _, _ = data.load_split_tokenize(
            cfg.ptx_data, "text", run, lambda r: data.tokenize_text(r, tok, seq_len=cfg.ptx_seq_len), split=False
        )
        rows = hp.updates_per_iteration * hp.rows_per_ptx_minibatch
        ptx_it = data.BatchIterator(ptx.arrays, batch_size=rows, seed=run.seed + 1)
        iterators["ptx"] = ptx_it

    # the warmup is counted in iterations; the optimizer counts minibatch updates
    optim = dataclasses.replace(cfg.optim, warmup_steps=cfg.optim.warmup_steps * hp.updates_per_iteration)
    total_updates = cfg.max_steps * hp.updates_per_iteration
    policy_opt = make_optimizer(optim, total_updates)
    value_opt = make_optimizer(optim, total_updates) if value_model is not None else None

    mesh = sharding.make_mesh(run.mesh)

    def init_state(policy_params, value_params):
        return ppo.init_ppo_state(policy_params, value_params, policy_opt, value_opt, kl_coef=hp.kl_coef, seed=run.seed)

    def boxed_state():  # with LoRA: the trainable trees only
        boxed_value = None if value_model is None else boxed_trainable(value_model)
        return init_state(boxed_trainable(policy), boxed_value)

    state, shardings = sharding.shard_state(
        lambda pv: init_state(*pv), boxed_state, (nets["policy_params"], nets["value_params"]), mesh
    )
    ref_sh = sharding.param_shardings(lambda: init_params(ppo.reference_model(policy), boxed=True), mesh)
    ref_sh = quant.quantize_shardings(ref_sh, cfg.lora)
    reward_params = tuple(
        jax.device_put(params, sharding.param_shardings(lambda m=m: init_params(m, boxed=True), mesh))
        for m, params in zip(nets["reward"].models, nets["reward_params"])
    )
    frozen = (jax.device_put(nets["ref_params"], ref_sh), reward_params)

    iteration = ppo.make_iteration(
        hp,
        policy,
        value_model,
        nets["reward"],
        policy_opt,
        value_opt,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )

    def next_batch() -> dict:
        b = next(prompt_it)
        batch = {"prompt_ids": b["input_ids"], "prompt_mask": b["attention_mask"]}
        if ptx_it is not None:
            p = next(ptx_it)
            batch |= {
                "ptx_input_ids": p["input_ids"],
                "ptx_attention_mask": p["attention_mask"],
                "ptx_loss_mask": p["loss_mask"],
            }
        return batch

    evaluate = None if val is None else make_evaluate(cfg, nets, val, frozen, out, gold_fn)
    checkpoint.write_model_info(
        out,
        ppo.reference_model(policy),
        tok,
        params_path=("ema_params",),
        extra=lora_record(cfg.lora, cfg.policy, "lm", "best"),
    )
    stage = train_loop.Stage(
        name="ppo",
        state=state,
        state_shardings=shardings,
        train_step=iteration,
        next_batch=shaped(run, next_batch, PROMPT_BUCKETS, PTX_BUCKETS),
        iterators=iterators,
        total_steps=cfg.max_steps,
        frozen=frozen,
        evaluate=evaluate,
        best_metric="val/gold_score" if gold_fn is not None else ("val/rm_score" if evaluate else None),
        best_mode="max",
        tokens_per_batch=hp.batch_size * hp.max_new_tokens,
        memory_flags="--minibatch-size, --batch-size, --max-new-tokens, --max-prompt-len, --ptx-rows, "
        "--ptx-seq-len, --run.remat",
    )
    train_loop.run(stage, run, mesh, out, config_json=dataclasses.asdict(cfg))
    return out
