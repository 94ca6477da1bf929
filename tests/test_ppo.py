"""Tests for rlhf_jax.ppo (rollout, objective, update, iteration) and rlhf_jax.drivers.ppo (the driver).

Most tests build the stage from the pure functions: a tiny random one-layer Llama-style
policy (RoPE, RMSNorm, SwiGLU, grouped-query attention; RoPE models are where a forward
fused into a backward pass rounds differently), a scalar-head reward model and value
network, ``init_ppo_state`` and ``jax.jit(make_iteration(...))`` on one device, with
left-padded prompts of mixed lengths and PAD (0) distinct from EOS (1). The resume test
runs ``run_ppo`` on the tiny offline world (``rlhf_jax.tasks.tiny``), the second leg in
a new process. Compiles dominate the run time (about 10 s each on a 2-core CPU), so each
configuration is compiled once and shared through module-scoped fixtures.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import data, losses, sharding
from rlhf_jax.config import MeshConfig, ModelConfig, OptimConfig, PPOConfig, PPOHyperparams
from rlhf_jax.drivers.ppo import build_networks, normalized_reward_params
from rlhf_jax.drivers.scoring import bind_sample_and_score
from rlhf_jax.models import CausalLM
from rlhf_jax.models.params import init_params as random_init
from rlhf_jax.optim import make_optimizer
from rlhf_jax.ppo import init_ppo_state, make_iteration, make_rollout, ppo_objective
from rlhf_jax.reward import score_sequences
from rlhf_jax.tasks import tiny
from tests import stage_fixtures as F

PAD, EOS = 0, 1
V = 16  # small vocabulary: a random policy emits EOS often enough to see both kinds of response
B, MB, P, R = 8, 4, 6, 6  # episodes, minibatch, prompt slots, new tokens
PROMPT_LENS = (6, 3, 1, 4, 5, 2, 6, 3)  # left-padded, mixed lengths
PTX_T = 10
MODEL = ModelConfig(
    family="llama",
    vocab_size=V,
    hidden_size=32,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=64,
    activation="silu",
    max_position_embeddings=64,
)


OPTIM = OptimConfig(learning_rate=3e-3, schedule="constant")  # constant lr, no warmup
MAX_STEPS = 10  # iterations the optimizers' schedules are built for


def ppo_config(**changes) -> PPOHyperparams:
    """2 minibatches x 2 epochs of 4 episodes."""
    kw = dict(batch_size=B, minibatch_size=MB, ppo_epochs=2, max_new_tokens=R, kl_coef=0.05, ema_decay=0.9)
    kw.update(changes)
    return PPOHyperparams(**kw)


def init_params(model: CausalLM, seed: int, boxed: bool = False):
    return random_init(model, jax.random.key(seed), boxed=boxed)


def make_prompts(extra_left: int = 0, seed: int = 0) -> dict:
    """[B, P + extra_left] left-padded prompts of PROMPT_LENS real tokens (never PAD or EOS)."""
    rng = np.random.default_rng(seed)
    width = P + extra_left
    ids = np.full((B, width), PAD, np.int32)
    mask = np.zeros((B, width), np.int32)
    for i, n in enumerate(PROMPT_LENS):
        ids[i, width - n :] = rng.integers(2, V, n)
        mask[i, width - n :] = 1
    return {"prompt_ids": ids, "prompt_mask": mask}


def make_ptx(cfg: PPOHyperparams, seed: int = 1) -> dict:
    """A pretraining batch [E * n_minibatches * rows, T] (right-padded texts of mixed lengths)."""
    rows = cfg.updates_per_iteration * cfg.rows_per_ptx_minibatch
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, V, (rows, PTX_T)).astype(np.int32)
    lens = rng.integers(4, PTX_T + 1, rows)
    mask = (np.arange(PTX_T)[None] < lens[:, None]).astype(np.int32)
    ids = np.where(mask > 0, ids, PAD)
    return {"ptx_input_ids": ids, "ptx_attention_mask": mask, "ptx_loss_mask": mask.copy()}


@functools.partial(jax.jit, static_argnums=0)
def _lm_loss(policy: CausalLM, params, ptx: dict) -> jax.Array:
    logits = policy.apply({"params": params}, ptx["ptx_input_ids"], attention_mask=ptx["ptx_attention_mask"]).logits
    loss, _ = losses.masked_lm_loss(
        logits[:, :-1], jnp.asarray(ptx["ptx_input_ids"][:, 1:]), jnp.asarray(ptx["ptx_loss_mask"][:, 1:])
    )
    return loss


def lm_loss(policy: CausalLM, params, batch: dict) -> float:
    """Masked next-token loss of ``params`` on the batch's pretraining rows."""
    return float(_lm_loss(policy, params, {k: v for k, v in batch.items() if k.startswith("ptx_")}))


def response_eos_index(tokens: np.ndarray, mask: np.ndarray) -> list[int | None]:
    """Naive: the position of the first EOS among each row's real response tokens, or None."""
    out = []
    for row, m in zip(tokens, mask):
        hits = [t for t in range(len(row)) if m[t] and row[t] == EOS]
        out.append(hits[0] if hits else None)
    return out


@pytest.fixture(scope="module")
def nets() -> SimpleNamespace:
    """Policy (LM head), reward model and value network (scalar heads), and their params."""
    policy, rm = CausalLM(MODEL), CausalLM(MODEL, head="scalar")
    return SimpleNamespace(
        policy=policy,
        rm=rm,
        policy_params=init_params(policy, 0),
        other_params=init_params(policy, 3),  # a reference policy that differs from the policy
        value_params=init_params(rm, 1),
        rm_params=init_params(rm, 2),
    )


class PPOSetup:
    """One PPO configuration: its optimizers, initial state and the jitted iteration (compiled once)."""

    def __init__(
        self,
        cfg: PPOHyperparams,
        nets: SimpleNamespace,
        *,
        rm=None,
        rm_params=None,
        optim=OPTIM,
        policy=None,
        value=None,
    ) -> None:
        self.cfg, self.nets = cfg, nets
        self.rm = nets.rm if rm is None else rm
        self.rm_params = nets.rm_params if rm_params is None else rm_params
        steps = MAX_STEPS * cfg.updates_per_iteration
        self.policy_opt = make_optimizer(optim, steps)
        self.value_opt = make_optimizer(optim, steps)
        self.state0 = init_ppo_state(
            nets.policy_params, nets.value_params, self.policy_opt, self.value_opt, kl_coef=cfg.kl_coef, seed=0
        )
        self.fn = make_iteration(
            cfg,
            policy or nets.policy,
            value or nets.rm,
            self.rm,
            self.policy_opt,
            self.value_opt,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
        self.step = jax.jit(self.fn)

    def run(self, batch: dict, n: int, state=None, ref_params=None):
        """n iterations on the same batch; returns (state, [metrics as floats])."""
        state = self.state0 if state is None else state
        ref = self.nets.policy_params if ref_params is None else ref_params
        history = []
        for _ in range(n):
            state, metrics = self.step(state, batch, ref, self.rm_params)
            history.append({k: float(v) for k, v in metrics.items()})
        return state, history


@pytest.fixture(scope="module")
def stages(nets):
    """Lazily built, shared PPOSetup objects by name (each compiles its iteration once)."""
    made: dict[str, PPOSetup] = {}
    recipes = {  # (hyperparameters, optimizer)
        "plain": lambda: (ppo_config(), OPTIM),
        "ptx0": lambda: (ppo_config(ptx_coef=0.0), OPTIM),
        "ptx": lambda: (ppo_config(ptx_coef=27.8), OPTIM),
        "frozen": lambda: (ppo_config(), OptimConfig(learning_rate=0.0, schedule="constant")),
    }

    def get(name: str) -> PPOSetup:
        if name not in made:
            cfg, optim = recipes[name]()
            made[name] = PPOSetup(cfg, nets, optim=optim)
        return made[name]

    return get


@pytest.fixture(scope="module")
def rollout_fn(nets):
    """The jitted rollout of the plain configuration (value network separate)."""
    cfg = ppo_config()
    return jax.jit(make_rollout(cfg, nets.policy, nets.rm, nets.rm, eos_token_id=EOS, pad_token_id=PAD))


def find_mixed_rollout(rollout_fn, nets, state, batch, ref_params):
    """The first iteration (rollout key) whose batch has responses with and without EOS."""
    for it in range(8):
        st = state.replace(iteration=jnp.asarray(it, jnp.int32))
        ro = rollout_fn(st, batch["prompt_ids"], batch["prompt_mask"], ref_params, nets.rm_params)
        has = np.asarray(ro.has_eos)
        if has.any() and not has.all():
            return st, ro
    pytest.fail("no rollout with both EOS and no-EOS responses in 8 tries")


# ----------------------------------------------------------------------------- ratio and KL


def test_ratio_exactly_one_and_kl_zero_with_frozen_update(stages):
    """With lr 0 every minibatch of every epoch sees the rollout's params, so each ratio must be
    bitwise 1 (rollout old log-probs == the update's training forward) and, with ref == policy,
    the KL and the KL part of the reward exactly 0, for left-padded prompts of mixed lengths."""
    stage = stages("frozen")
    batch = make_prompts()
    state, (m,) = stage.run(batch, 1)
    assert m["ppo/ratio_max_dev"] == 0.0
    assert m["ppo/ratio_mean"] == 1.0
    assert m["ppo/approx_kl"] == 0.0 and m["ppo/clipfrac"] == 0.0
    assert m["objective/kl"] == 0.0
    assert m["objective/non_score_reward"] == 0.0
    assert m["objective/rlhf_reward"] == pytest.approx(m["objective/scores"], abs=1e-6)
    F.assert_trees_equal(state.policy.params, stage.state0.policy.params)  # lr 0 really froze it
    assert int(state.iteration) == 1


def test_first_minibatch_ratio_is_exactly_one(nets, stages, rollout_fn):
    """The first minibatch of the first epoch, as the update forms it (same permutation, same
    shapes), through ppo_objective under value_and_grad: ratio bitwise 1, KL to ref bitwise 0."""
    cfg = ppo_config()
    state = stages("plain").state0
    batch = make_prompts()
    ro = rollout_fn(state, batch["prompt_ids"], batch["prompt_mask"], nets.policy_params, nets.rm_params)
    np.testing.assert_array_equal(np.asarray(ro.ref_logprobs), np.asarray(ro.old_logprobs))
    assert np.all(np.asarray(ro.kl) == 0.0)

    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.iteration + (1 << 30))  # as make_update
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), cfg.batch_size))[: cfg.minibatch_size]
    fields = ("sequences", "sequence_mask", "response_mask", "old_logprobs", "values", "advantages", "returns")
    mb = {k: getattr(ro, k)[perm] for k in fields}

    def joint(pp, vp):
        pol, (val, metrics) = ppo_objective(cfg, nets.policy, nets.rm, pp, vp, mb, None, P)
        return pol + val, metrics

    (_, metrics), grads = jax.jit(jax.value_and_grad(joint, argnums=(0, 1), has_aux=True))(
        nets.policy_params, nets.value_params
    )
    assert float(metrics["ppo/ratio_max_dev"]) == 0.0
    assert float(metrics["ppo/approx_kl"]) == 0.0
    assert np.isfinite(float(optax.tree.norm(grads)))


# ----------------------------------------------------------------------------- ptx


def test_ptx_coef_zero_is_bitwise_plain_ppo(stages):
    """gamma = 0 with a pretraining batch == no pretraining data: the same states (params, both
    optimizer states, EMA, KL coefficient) and metrics, bit for bit, over two iterations."""
    batch = make_prompts()
    plain_state, plain_hist = stages("plain").run(batch, 2)
    ptx0 = stages("ptx0")
    ptx_state, ptx_hist = ptx0.run(batch | make_ptx(ptx0.cfg), 2)
    F.assert_trees_equal(ptx_state, plain_state)
    assert "loss/ptx" not in ptx_hist[0]
    assert ptx_hist == plain_hist


def test_ptx_lowers_pretraining_loss(stages, nets):
    """Same seed, same prompts, same pretraining rows: with gamma > 0 the LM loss on those rows
    ends lower than with gamma = 0 (and lower than it started)."""
    ptx0, ptx = stages("ptx0"), stages("ptx")
    batch = make_prompts() | make_ptx(ptx.cfg)
    before = lm_loss(nets.policy, nets.policy_params, batch)
    s0, _ = ptx0.run(batch, 4)
    s1, hist = ptx.run(batch, 4)
    without, with_ptx = lm_loss(nets.policy, s0.policy.params, batch), lm_loss(nets.policy, s1.policy.params, batch)
    assert with_ptx < without - 0.05, (before, without, with_ptx)
    assert with_ptx < before - 0.05, (before, without, with_ptx)
    assert all(np.isfinite(h["loss/ptx"]) for h in hist)
    assert hist[-1]["loss/ptx"] < hist[0]["loss/ptx"]


# ----------------------------------------------------------------------------- scores and rewards


def test_score_sequences_reads_the_eos_position(nets):
    """Prompt (left-padded) + response with EOS at various places, PAD after it: the score is the
    RM value at the EOS index, whatever sits in the masked slots, and not the value at a pad."""
    rng = np.random.default_rng(5)
    t = P + R
    seq = np.full((B, t), PAD, np.int32)
    mask = np.zeros((B, t), np.int32)
    eos_at = []
    for i, n in enumerate(PROMPT_LENS):
        seq[i, P - n : P] = rng.integers(2, V, n)
        mask[i, P - n : P] = 1
        k = i % R  # response length before EOS: 0 .. R-1
        seq[i, P : P + k] = rng.integers(2, V, k)
        seq[i, P + k] = EOS
        mask[i, P : P + k + 1] = 1
        eos_at.append(P + k)
    score = jax.jit(functools.partial(score_sequences, nets.rm))
    got = np.asarray(score(nets.rm_params, seq, mask))
    values = np.asarray(nets.rm.apply({"params": nets.rm_params}, seq, attention_mask=mask).values)
    want = np.array([values[i, e] for i, e in enumerate(eos_at)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    last = values[:, -1]  # a pad slot for every row whose EOS is not last
    pad_rows = [i for i, e in enumerate(eos_at) if e != t - 1]
    assert not np.allclose(got[pad_rows], last[pad_rows], atol=1e-4)

    junk = np.where(mask > 0, seq, rng.integers(2, V, seq.shape)).astype(np.int32)  # garbage in masked slots
    np.testing.assert_allclose(np.asarray(score(nets.rm_params, junk, mask)), got, rtol=0, atol=1e-5)


def test_rollout_reads_score_at_eos_and_penalises_no_eos(nets, stages, rollout_fn):
    """In a sampled batch with both kinds of response: a response with EOS scores the RM value at
    its EOS (mask ends there, PAD after it); one without EOS gets exactly ``no_eos_penalty``."""
    state = stages("plain").state0
    _, ro = find_mixed_rollout(rollout_fn, nets, state, make_prompts(), nets.policy_params)
    cfg = ppo_config()
    tokens = np.asarray(ro.sequences)[:, P:]
    resp_mask = np.asarray(ro.response_mask)
    eos = response_eos_index(tokens, resp_mask)
    np.testing.assert_array_equal(np.asarray(ro.has_eos), [e is not None for e in eos])
    seq_mask = np.asarray(ro.sequence_mask)
    rm_values = np.asarray(nets.rm.apply({"params": nets.rm_params}, ro.sequences, attention_mask=seq_mask).values)
    scores = np.asarray(ro.scores)
    for i, e in enumerate(eos):
        if e is None:
            assert scores[i] == cfg.no_eos_penalty
            assert resp_mask[i].all()  # ran to the length limit
        else:
            assert resp_mask[i, : e + 1].all() and not resp_mask[i, e + 1 :].any()  # mask ends with the EOS
            assert (tokens[i, e + 1 :] == PAD).all()
            np.testing.assert_allclose(scores[i], rm_values[i, P + e], rtol=0, atol=1e-5)


def naive_rewards(scores, logp, ref_logp, mask, kl_coef):
    rewards = np.zeros(logp.shape)
    for b in range(logp.shape[0]):
        last = None
        for t in range(logp.shape[1]):
            if mask[b, t]:
                rewards[b, t] = -kl_coef * (float(logp[b, t]) - float(ref_logp[b, t]))
                last = t
        if last is not None:
            rewards[b, last] += float(scores[b])
    return rewards


def test_per_token_rewards_match_naive_loop(nets, stages, rollout_fn):
    """Reference != policy: r_t = -beta * (logp_t - ref_logp_t) on response tokens, plus the
    score at the last response token (the EOS, or the last token of an over-long response)."""
    state = stages("plain").state0
    _, ro = find_mixed_rollout(rollout_fn, nets, state, make_prompts(), nets.other_params)
    logp, ref = np.asarray(ro.old_logprobs), np.asarray(ro.ref_logprobs)
    mask = np.asarray(ro.response_mask)
    assert np.abs((logp - ref) * mask).max() > 1e-3  # the KL term is really exercised
    want = naive_rewards(np.asarray(ro.scores), logp, ref, mask, float(state.kl_coef))
    np.testing.assert_allclose(np.asarray(ro.rewards), want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ro.kl), (logp - ref) * mask, rtol=0, atol=1e-6)


def test_rollout_does_not_depend_on_left_padding(nets, stages, rollout_fn):
    """The same prompts with 3 extra left-padding columns: same samples, same scores and the same
    per-token rewards, log-probs and values at every real response position."""
    state = stages("plain").state0
    a, b = make_prompts(), make_prompts(extra_left=3)
    np.testing.assert_array_equal(b["prompt_ids"][:, 3:], a["prompt_ids"])
    ro_a = rollout_fn(state, a["prompt_ids"], a["prompt_mask"], nets.other_params, nets.rm_params)
    ro_b = rollout_fn(state, b["prompt_ids"], b["prompt_mask"], nets.other_params, nets.rm_params)
    np.testing.assert_array_equal(np.asarray(ro_b.sequences)[:, P + 3 :], np.asarray(ro_a.sequences)[:, P:])
    np.testing.assert_array_equal(np.asarray(ro_b.response_mask), np.asarray(ro_a.response_mask))
    np.testing.assert_array_equal(np.asarray(ro_b.has_eos), np.asarray(ro_a.has_eos))
    for name in ("scores", "rewards", "old_logprobs", "ref_logprobs", "values", "kl"):
        np.testing.assert_allclose(
            np.asarray(getattr(ro_b, name)), np.asarray(getattr(ro_a, name)), rtol=0, atol=1e-5, err_msg=name
        )


# ----------------------------------------------------------------------------- learning


TARGET = 7  # the token the fixed reward counts


class CountRM(nn.Module):
    """A fixed reward 'model': value[b, t] = scale x how many TARGET tokens the real tokens up to t
    hold, so the score read at a response's last token counts its TARGETs (prompts hold none)."""

    scale: float = 1.0

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        hits = (input_ids == TARGET) & (attention_mask > 0)
        return SimpleNamespace(values=self.scale * jnp.cumsum(hits, axis=1).astype(jnp.float32))


def test_ppo_raises_a_learnable_reward_with_bounded_kl_and_adaptive_coef(nets):
    """A fixed reward (0.25 per TARGET token): PPO raises it within a few dozen iterations; the
    adaptive controller (horizon 20 episodes, so it acts fast) raises beta while KL is above
    target and lowers it while below, which pulls KL back down near the target."""
    cfg = ppo_config(no_eos_penalty=None, adaptive_kl=True, kl_target=1.0, kl_horizon=20, kl_coef=0.1)
    stage = PPOSetup(cfg, nets, rm=CountRM(scale=0.25), rm_params={})
    batch = make_prompts()
    batch["prompt_ids"] = np.where(batch["prompt_ids"] == TARGET, TARGET + 1, batch["prompt_ids"]).astype(np.int32)
    _, hist = stage.run(batch, 40)
    scores = np.array([h["objective/scores"] for h in hist])
    kl = np.array([h["objective/kl"] for h in hist])
    coef = np.array([h["kl_coef"] for h in hist])
    smooth = np.convolve(scores, np.ones(5) / 5, mode="valid")
    assert smooth.max() > scores[:5].mean() + 0.4, scores  # learned: 1.6+ more TARGETs per response
    assert scores[-10:].mean() > scores[:5].mean(), scores  # still above the start under the KL brake
    # bounded: below R * log(V) ~ 16.6, the KL of a deterministic policy from a uniform one ...
    assert np.all(np.isfinite(kl)) and kl.max() < 16.0, kl
    # ... and, once beta has grown, brought back down near the target
    assert kl[-10:].mean() < min(2 * cfg.kl_target, 0.5 * kl.max()), kl
    # Ziegler's controller: beta rises while KL is above target and falls while below
    direction = np.sign(np.diff(coef))
    np.testing.assert_array_equal(direction, np.sign(kl[:-1] - cfg.kl_target))
    assert (direction < 0).any() and (direction > 0).any(), (kl, coef)
    assert coef.max() > cfg.kl_coef  # beta grew once the policy drifted


# ----------------------------------------------------------------------------- variants


def test_shared_value_head_runs(nets):
    cfg = ppo_config()
    policy = nets.policy.clone(head="lm+scalar")
    params = {**nets.policy_params, "score": init_params(policy, 4)["score"]}
    opt = make_optimizer(OPTIM, 10)
    state = init_ppo_state(params, None, opt, None, kl_coef=cfg.kl_coef, seed=0)
    step = jax.jit(make_iteration(cfg, policy, None, nets.rm, opt, None, eos_token_id=EOS, pad_token_id=PAD))
    batch = make_prompts()
    for _ in range(2):
        state, metrics = step(state, batch, nets.policy_params, nets.rm_params)
    for name in ("loss/policy", "loss/value", "objective/kl", "ppo/grad_norm"):
        assert np.isfinite(float(metrics[name])), name
    assert state.value is None
    assert not np.allclose(np.asarray(state.policy.params["score"]["kernel"]), np.asarray(params["score"]["kernel"]))


def test_mesh_2x2x2_matches_one_device(nets, stages):
    """The plain iteration jitted with the (data, fsdp, tensor) = (2, 2, 2) shardings of
    train_loop/sharding gives the single-device losses to 1e-5 over two iterations."""
    stage = stages("plain")
    batch = make_prompts()
    _, single = stage.run(batch, 2)

    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    cfg = stage.cfg

    def boxed_state():
        return init_ppo_state(
            init_params(nets.policy, 0, boxed=True),
            init_params(nets.rm, 0, boxed=True),
            stage.policy_opt,
            stage.value_opt,
            kl_coef=cfg.kl_coef,
            seed=0,
        )

    init = lambda pv: init_ppo_state(
        pv[0],
        pv[1],
        stage.policy_opt,
        stage.value_opt,  # noqa: E731
        kl_coef=cfg.kl_coef,
        seed=0,
    )
    state, state_sh = sharding.shard_state(init, boxed_state, (nets.policy_params, nets.value_params), mesh)
    ref_sh = sharding.param_shardings(lambda: init_params(nets.policy, 0, boxed=True), mesh)
    rm_sh = sharding.param_shardings(lambda: init_params(nets.rm, 0, boxed=True), mesh)
    ref, rm_params = jax.device_put(nets.policy_params, ref_sh), jax.device_put(nets.rm_params, rm_sh)
    batch_sh = {k: sharding.batch_sharding(mesh, 2) for k in batch}
    step = jax.jit(
        stage.fn, in_shardings=(state_sh, batch_sh, ref_sh, rm_sh), out_shardings=(state_sh, sharding.replicated(mesh))
    )
    sharded = []
    with sharding.use_mesh(mesh):
        for _ in range(2):
            state, metrics = step(state, sharding.shard_batch(batch, mesh), ref, rm_params)
            sharded.append({k: float(v) for k, v in metrics.items()})
    kernel = state.policy.params["layers"]["mlp"]["up"]["kernel"]  # [layers, embed, mlp] over (-, fsdp, tensor)
    assert not kernel.sharding.is_fully_replicated and len(kernel.sharding.device_set) == 8
    for i, (one, many) in enumerate(zip(single, sharded)):
        for name in ("loss/policy", "loss/value", "objective/kl", "objective/scores", "ppo/ratio_max_dev"):
            np.testing.assert_allclose(many[name], one[name], rtol=0, atol=1e-5, err_msg=f"iteration {i}: {name}")


# ----------------------------------------------------------------------------- run_ppo: exact resume


def _world(root: Path) -> SimpleNamespace:
    tok = tiny.make_tokenizer(root / "tokenizer", num_words=24)
    base = tiny.make_model_dir(root / "base", vocab_size=len(tok), tokenizer=tok, hidden_size=32, num_layers=1)
    files = tiny.write_data(root / "data", num_words=24, n=32)
    return SimpleNamespace(tok=tok, base=base, files=files)


def _resume_config(world: SimpleNamespace, out: Path, **run_changes) -> PPOConfig:
    # The reward is the base HF directory: load_model gives it a fresh (seeded) score head.
    # A data-parallel mesh over the 8 fake devices: it compiles fastest (the (2, 2, 2) mesh is
    # checked against one device above).
    run = F.run_config(split_fractions=(1.0, 0.0, 0.0), mesh=MeshConfig(data=8, fsdp=1, tensor=1), **run_changes)
    hparams = PPOHyperparams(
        batch_size=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=5, adaptive_kl=True, kl_target=0.01, kl_horizon=50
    )
    return PPOConfig(
        prompts=str(world.files["prompts"]),
        policy=str(world.base),
        reward=str(world.base),
        out=str(out),
        ptx_data=str(world.files["text"]),
        max_steps=4,
        max_prompt_len=8,
        ptx_seq_len=12,
        run=run,
        hparams=hparams,
        optim=dataclasses.replace(PPOConfig.optim, learning_rate=3e-3, warmup_steps=2),
    )


def _cli_args(cfg: PPOConfig) -> list[str]:
    run, hp = cfg.run, cfg.hparams
    args = [
        "ppo",
        "--prompts",
        cfg.prompts,
        "--policy",
        cfg.policy,
        "--reward",
        *cfg.reward,
        "--out",
        cfg.out,
        "--ptx-data",
        cfg.ptx_data,
        "--max-steps",
        str(cfg.max_steps),
        "--batch-size",
        str(hp.batch_size),
        "--minibatch-size",
        str(hp.minibatch_size),
        "--ppo-epochs",
        str(hp.ppo_epochs),
        "--max-prompt-len",
        str(cfg.max_prompt_len),
        "--max-new-tokens",
        str(hp.max_new_tokens),
        "--ptx-seq-len",
        str(cfg.ptx_seq_len),
        "--adaptive-kl",
        "--kl-target",
        repr(hp.kl_target),
        "--kl-horizon",
        str(hp.kl_horizon),
        "--optim.learning-rate",
        repr(cfg.optim.learning_rate),
        "--optim.warmup-steps",
        str(cfg.optim.warmup_steps),
        "--run.seed",
        str(run.seed),
        "--run.log-every",
        str(run.log_every),
        "--run.eval-every",
        str(run.eval_every),
        "--run.save-every",
        str(run.save_every),
        "--run.split-fractions",
        *map(str, run.split_fractions),
        "--run.no-progress",
        "--run.mesh.data",
        str(run.mesh.data),
        "--run.mesh.fsdp",
        str(run.mesh.fsdp),
        "--run.mesh.tensor",
        str(run.mesh.tensor),
    ]
    return args


def test_the_cli_flags_parse_to_the_same_config(tmp_path, monkeypatch):
    """``rlhf-jax ppo`` with flat hyperparameter flags builds exactly the PPOConfig the Python
    API takes (the bitwise resume itself, through fresh processes, is tests/test_kill.py's)."""
    from rlhf_jax import cli

    cfg = _resume_config(_world(tmp_path), tmp_path / "run")
    seen = []
    monkeypatch.setattr(cli, "run_ppo", seen.append)
    cli.main(_cli_args(cfg))
    assert seen == [cfg]


def test_normalize_reward_folds_gain_and_bias_into_the_score_head(tmp_path):
    """``--normalize-reward`` (Ziegler et al.): the reference policy's samples on the first
    training prompts, scored by the rescaled RM, have mean 0 and std 1."""
    world = _world(tmp_path)
    cfg = dataclasses.replace(_resume_config(world, tmp_path / "run"), normalize_reward=True)
    nets = build_networks(cfg)
    tok = nets["tokenizer"]
    train, _, _, _ = data.load_split_tokenize(
        cfg.prompts, "prompts", cfg.run, lambda r: data.tokenize_prompts(r, tok, max_prompt_len=cfg.max_prompt_len)
    )
    (params,) = normalized_reward_params(cfg, nets, train)  # one tuple entry per reward model
    hp = cfg.hparams
    ids, mask = train.arrays["input_ids"][: hp.batch_size], train.arrays["attention_mask"][: hp.batch_size]
    sample = jax.jit(bind_sample_and_score(nets["policy"], nets["rm"], hp.max_new_tokens, hp.temperature, tok))
    _, before = sample(nets["ref_params"], nets["rm_params"], ids, mask, jax.random.key(cfg.run.seed + 3))
    _, after = sample(nets["ref_params"], params, ids, mask, jax.random.key(cfg.run.seed + 3))
    assert float(jnp.std(before)) > 0 and abs(float(jnp.std(before)) - 1.0) > 1e-2  # there was something to fix
    assert abs(float(jnp.mean(after))) < 1e-5 and abs(float(jnp.std(after)) - 1.0) < 1e-4
    np.testing.assert_allclose(np.corrcoef(np.asarray(before), np.asarray(after))[0, 1], 1.0, atol=1e-5)


def test_chunked_lm_head_keeps_the_first_ratio_exactly_one(nets, stages, monkeypatch):
    """With the LM head forced into 2-position chunks (as a 49k vocabulary is chunked), the
    rollout's log-probs and the update's still come from one function: ratio bitwise 1 with
    lr 0, and the same losses as the full-logits head to float tolerance."""
    from rlhf_jax.models import lm_head

    batch = make_prompts()
    _, (full,) = stages("frozen").run(batch, 1)
    monkeypatch.setattr(lm_head, "CHUNK_BYTES", 2 * MB * V * 4)  # [MB, 2, V] float32 per chunk
    assert lm_head.auto_chunk(MB, R, V) == 2
    chunked_stage = PPOSetup(ppo_config(), nets, optim=OptimConfig(learning_rate=0.0, schedule="constant"))
    _, (chunked,) = chunked_stage.run(batch, 1)
    assert chunked["ppo/ratio_max_dev"] == 0.0 and chunked["objective/kl"] == 0.0
    for name in ("loss/policy", "loss/value", "objective/entropy", "objective/scores"):
        np.testing.assert_allclose(chunked[name], full[name], rtol=1e-5, atol=1e-6, err_msg=name)
