"""LoRA on a frozen base (issue 14, part 1): adapters in ``models.layers.Linear``, the
base / trainable split, SFT and RM runs that train and checkpoint the adapters only, PPO
whose reference is the policy's base (bitwise) and whose value network adapts the reward
model's weights, exact resume, and both exports (merged weights for transformers, PEFT
adapters for ``peft``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import checkpoint, ppo
from rlhf_jax.config import LoRAConfig, MeshConfig, ModelConfig, PPOConfig, PPOHyperparams
from rlhf_jax.drivers import run_ppo, run_rm, run_sft
from rlhf_jax.models import CausalLM, lora
from rlhf_jax.models.params import init_params
from rlhf_jax.optim import make_optimizer
from rlhf_jax.tasks import tiny
from tests import stage_fixtures as F

LORA = LoRAConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
CFG = ModelConfig(
    family="llama", vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64
)


@pytest.fixture(scope="module", autouse=True)
def one_device_and_compilation_cache(tmp_path_factory):
    yield from F.one_device_and_compilation_cache(tmp_path_factory)


def _perturbed(trainable: dict, scale: float = 0.05) -> dict:
    """Adapters with a non-zero B (a fresh adapter is an exact no-op)."""
    leaves, tree = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def test_adapters_start_as_a_no_op_split_join_and_merge():
    plain, adapted = CausalLM(CFG), CausalLM(CFG.replace(lora=LORA))
    base = jax.jit(init_params, static_argnums=0)(plain)
    trainable = lora.trainable_init(adapted, base)
    attn = trainable["layers"]["attn"]
    assert attn["q"]["lora_a"].shape == (2, 32, 4) and attn["q"]["lora_b"].shape == (
        2,
        4,
        4,
        8,
    )  # [L, D, r], [L, r, H, Dh]
    assert attn["o"]["lora_a"].shape == (2, 4, 8, 4) and attn["o"]["lora_b"].shape == (2, 4, 32)
    ids = jnp.array([[1, 5, 9, 3, 2]])
    adapted_logits = jax.jit(lambda p: adapted.apply({"params": p}, ids).logits)
    plain_logits = jax.jit(lambda p: plain.apply({"params": p}, ids).logits)
    fresh = adapted_logits(lora.join(base, trainable))
    np.testing.assert_array_equal(fresh, plain_logits(base))  # B = 0: bitwise the base
    full = lora.join(base, _perturbed(trainable))
    back_base, back_trainable = lora.split(full)
    jax.tree.map(np.testing.assert_array_equal, back_base, base)
    assert set(jax.tree.leaves(jax.tree.map(lambda _: 1, back_trainable))) == {1}
    adapted_out, merged_out = adapted_logits(full), plain_logits(lora.merge_adapters(full, LORA))
    assert float(jnp.max(jnp.abs(adapted_out - fresh))) > 1e-3  # the adapters do something
    np.testing.assert_allclose(merged_out, adapted_out, atol=2e-5, rtol=1e-5)
    boxed = jax.eval_shape(lambda: lora.split(init_params(adapted, boxed=True))[1])["layers"]["attn"]["q"]
    assert boxed["lora_a"].names == ("layers", "embed", None) and boxed["lora_b"].names == (
        "layers",
        None,
        "heads",
        "kv",
    )


def test_a_separate_kl_reference_with_lora_is_refused():
    """With LoRA the KL reference is the policy's own frozen base; another one is a config error."""
    with pytest.raises(ValueError, match="PPOConfig.reference"):
        PPOConfig(prompts="p", policy="ppo", reference="sft", reward="rm", out="o", lora=LoRAConfig(rank=4))


def test_ppo_reference_logprobs_are_the_sft_model_bitwise():
    """With LoRA the KL reference is the policy's frozen base: its log-probs equal those of the
    un-adapted SFT model bitwise, while the adapted policy's differ."""
    hp = PPOHyperparams(batch_size=4, minibatch_size=2, max_new_tokens=4)
    sft_model = CausalLM(CFG)
    policy = CausalLM(CFG.replace(lora=LORA))
    rm = CausalLM(CFG, head="scalar")
    value = CausalLM(CFG.replace(lora=LORA), head="scalar")
    init = jax.jit(init_params, static_argnums=0)
    sft_params, rm_params = init(sft_model), init(rm, jax.random.key(1))
    policy_trainable = _perturbed(lora.trainable_init(policy, sft_params))
    value_trainable = lora.trainable_init(value, rm_params)
    opt = make_optimizer(PPOConfig.optim, 10)
    state = ppo.init_ppo_state(policy_trainable, value_trainable, opt, opt, kl_coef=0.1, seed=0)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    assert not [p for p in paths if ("kernel" in p and "score" not in p) or "embedding" in p]  # no base copy
    rollout = jax.jit(ppo.make_rollout(hp, policy, value, rm, eos_token_id=1, pad_token_id=0))
    prompts = jnp.array([[3, 4, 5], [0, 6, 7], [8, 9, 10], [0, 0, 11]])
    ro = rollout(state, prompts, (prompts > 0).astype(jnp.int32), sft_params, rm_params)

    @jax.jit
    def sft_logprobs(seq, mask):  # the un-adapted SFT model, minibatch by minibatch as the rollout scores
        split = lambda x: x.reshape(hp.minibatch_size, hp.num_minibatches, -1).swapaxes(0, 1)  # noqa: E731
        out = jax.lax.map(
            lambda xs: ppo.response_forward(sft_model, sft_params, *xs, 3).logprobs, (split(seq), split(mask))
        )
        return out.swapaxes(0, 1).reshape(hp.batch_size, -1)

    np.testing.assert_array_equal(np.asarray(ro.ref_logprobs), np.asarray(sft_logprobs(ro.sequences, ro.sequence_mask)))
    assert float(jnp.max(jnp.abs(ro.old_logprobs - ro.ref_logprobs))) > 1e-4


# ---------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_world")
    tok = tiny.make_tokenizer(root / "tokenizer", num_words=24)
    base = tiny.make_model_dir(root / "base", vocab_size=len(tok), tokenizer=tok, family="llama", hidden_size=32)
    files = tiny.write_data(root / "data", num_words=24, n=20)
    return SimpleNamespace(root=root, tok=tok, base=base, files=files)


def _run_cfg(**changes):
    kw = dict(save_every=1, keep_last=3, keep_best=0, split_fractions=(1.0, 0.0, 0.0), mesh=MeshConfig())
    return F.run_config(**(kw | changes))


def _ppo_cfg(world, out: Path, policy: Path, reward: Path, **run_changes) -> PPOConfig:
    return PPOConfig(
        prompts=str(world.files["prompts"]),
        policy=str(policy),
        reward=str(reward),
        out=str(out),
        ptx_data=str(world.files["text"]),
        max_steps=2,
        max_prompt_len=8,
        ptx_seq_len=12,
        run=_run_cfg(**run_changes),
        hparams=PPOHyperparams(batch_size=8, minibatch_size=4, max_new_tokens=5, adaptive_kl=True, kl_target=0.01),
        optim=dataclasses.replace(PPOConfig.optim, learning_rate=3e-3, warmup_steps=1),
        lora=LORA,
    )


@pytest.fixture(scope="module")
def sft_run(world, tmp_path_factory):
    """LoRA SFT on the HF base: only the adapters train."""
    out = tmp_path_factory.mktemp("lora_sft") / "sft"
    return run_sft(F.sft_config(world, out, max_steps=2, batch_size=8, run=_run_cfg(), lora=LORA))


@pytest.fixture(scope="module")
def rm_run(world, sft_run, tmp_path_factory):
    """A LoRA reward model on the (merged) LoRA SFT run: adapters + the new score head train."""
    out = tmp_path_factory.mktemp("lora_rm") / "rm"
    run_rm(F.rm_config(world, out, init=sft_run, max_steps=2, batch_size=8, run=_run_cfg(), lora=LORA))
    return out


def _state_paths(run_dir: Path) -> set[str]:
    state, _, _ = F.read_checkpoint(run_dir)
    return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)}


def test_rm_lora_checkpoint_holds_adapters_and_head_only(rm_run):
    paths = _state_paths(rm_run)
    weights = [p for p in paths if "params" in p]
    assert weights and all("lora_a" in p or "lora_b" in p or "score" in p for p in weights), sorted(paths)[:20]
    info = checkpoint.read_model_info(rm_run)
    assert info["lora"]["rank"] == 4 and info["lora"]["base"]["head"] == "scalar"
    model, params, _ = checkpoint.load_model(rm_run)  # merged: a plain scalar-head model
    assert model.config.lora is None and "lora_a" not in str(jax.tree_util.tree_structure(params))


def test_ppo_lora_resume_is_exact_and_checkpoints_hold_only_what_changes(world, sft_run, rm_run, tmp_path):
    straight = run_ppo(_ppo_cfg(world, tmp_path / "straight", sft_run, rm_run))
    resumed = tmp_path / "resumed"
    run_ppo(_ppo_cfg(world, resumed, sft_run, rm_run, stop_at_step=1))
    run_ppo(_ppo_cfg(world, resumed, sft_run, rm_run))
    a, meta_a, step_a = F.read_checkpoint(straight)
    b, meta_b, step_b = F.read_checkpoint(resumed)
    assert step_a == step_b == 2
    F.assert_trees_equal(a, b)
    assert meta_a["iterators"] == meta_b["iterators"]
    assert F.train_losses(straight) == F.train_losses(resumed)
    paths = _state_paths(straight)
    params = [p for p in paths if "kl_coef" not in p and "iteration" not in p and "rng" not in p and "step" not in p]
    assert all("lora_a" in p or "lora_b" in p or "score" in p or "count" in p for p in params), sorted(paths)
    assert any("ema_params" in p and "lora_b" in p for p in paths) and any("kl_coef" in p for p in paths)
    ema_b = np.asarray(a["ema_params"]["layers"]["attn"]["q"]["lora_b"])
    assert np.any(ema_b != 0)  # the adapters trained


def test_sft_lora_exports_merged_for_transformers_and_adapters_for_peft(world, sft_run, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    from rlhf_jax import cli

    sft = sft_run
    paths = _state_paths(sft)
    assert all("lora_a" in p or "lora_b" in p for p in paths if "params" in p), sorted(paths)[:20]
    merged_dir, adapters_dir = tmp_path / "merged", tmp_path / "adapters"
    cli.main(["export", "--run", str(sft), "--out", str(merged_dir)])
    cli.main(["export", "--run", str(sft), "--out", str(adapters_dir), "--export-adapters"])
    names = set(json.loads((adapters_dir / "adapter_config.json").read_text())["target_modules"])
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    model, params, _ = checkpoint.load_model(sft)
    ids = np.array([[2, 5, 9, 3, 7, 4]])
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)).logits)
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, attn_implementation="eager").eval()
        np.testing.assert_allclose(merged(torch.tensor(ids)).logits.numpy(), ours, atol=1e-4, rtol=1e-4)
        base = transformers.AutoModelForCausalLM.from_pretrained(world.base, attn_implementation="eager")
        peft_model = peft.PeftModel.from_pretrained(base, str(adapters_dir)).eval()
        peft_logits = peft_model(torch.tensor(ids)).logits.numpy()
        with peft_model.disable_adapter():
            base_logits = peft_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(peft_logits, ours, atol=1e-4, rtol=1e-4)
    assert float(np.max(np.abs(base_logits - ours))) > 1e-3  # the adapters changed the model
