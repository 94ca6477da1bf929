"""QLoRA (issue 14): int8 / NF4 frozen base under LoRA adapters (``models.quant``).

Quantization against a naive numpy reference, the quantized model against the same model on
the dequantized float base (forward bitwise, adapter gradients), a QLoRA SFT run that trains
and checkpoints the adapters only and merges them into the dequantized base, PPO whose KL
reference is the quantized base (bitwise the dequantized base's log-probs, KL 0 at the start),
and exact PPO resume with the quantized base rebuilt at each start. Tiny random models.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import checkpoint, ppo
from rlhf_jax.config import LoRAConfig, MeshConfig, ModelConfig, PPOConfig, PPOHyperparams
from rlhf_jax.drivers import run_ppo, run_sft
from rlhf_jax.models import CausalLM, lora, quant
from rlhf_jax.models.params import init_params
from rlhf_jax.optim import make_optimizer
from tests import stage_fixtures as F

CFG = ModelConfig(
    family="llama", vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64
)


def qlora(bits: int) -> LoRAConfig:
    return LoRAConfig(rank=4, alpha=8.0, base_bits=bits)


@pytest.fixture(scope="module", autouse=True)
def one_device_and_compilation_cache(tmp_path_factory):
    yield from F.one_device_and_compilation_cache(tmp_path_factory)


@jax.jit
def _perturbed(trainable: dict, scale: float = 0.05) -> dict:
    leaves, tree = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


# ---------------------------------------------------------------------------- quantization


def test_int8_and_nf4_match_a_naive_numpy_reference():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (2, 32, 4, 8)).astype(np.float32)  # a stacked q kernel [L, D, H, Dh]
    w[1, :, 0, 0] = 0.0  # an all-zero output channel
    # int8: absmax per (layer, output channel) over the input axis
    q, scale = quant.quantize_int8(jnp.asarray(w), (1,))
    ref_scale = np.abs(w).max(axis=1, keepdims=True) / np.float32(127)
    ref_q = np.clip(np.round(w / np.where(ref_scale > 0, ref_scale, 1)), -127, 127).astype(np.int8)
    np.testing.assert_allclose(np.asarray(scale), ref_scale, rtol=1e-6)  # XLA divides by 127 as * (1 / 127)
    diff = np.abs(np.asarray(q, np.int32) - ref_q)
    assert diff.max() <= 1 and np.mean(diff == 0) > 0.999  # a code may differ only on a rounding tie
    err = np.abs(np.asarray(quant.dequantize_int8(q, scale)) - w)
    assert np.all(err <= ref_scale / 2 * (1 + 1e-5) + 1e-12) and np.all(np.asarray(q)[1, :, 0, 0] == 0)

    # NF4: per layer, blocks of 64 of the flattened kernel, nearest level of |block| / absmax
    packed, absmax = quant.quantize_nf4(jnp.asarray(w), lead=1)
    assert packed.dtype == jnp.uint8 and packed.shape == (2, 512) and absmax.shape == (2, 16)
    blocks = w.reshape(2, -1, 64)
    ref_absmax = np.abs(blocks).max(-1)
    x = blocks / np.where(ref_absmax > 0, ref_absmax, 1)[..., None]
    ref_codes = np.abs(x[..., None] - quant.NF4).argmin(-1).reshape(2, -1)
    p = np.asarray(packed)
    codes = np.stack([p >> 4, p & 15], -1).reshape(2, -1)
    np.testing.assert_array_equal(np.asarray(absmax), ref_absmax)
    assert np.mean(codes == ref_codes) > 0.999  # only exact ties between two levels may differ
    deq = np.asarray(quant.dequantize_nf4(packed, absmax, w.shape[1:]))
    half_gap = np.max(np.diff(quant.NF4)) / 2
    assert np.all(np.abs(deq - w).reshape(2, -1, 64) <= ref_absmax[..., None] * half_gap * (1 + 1e-5))
    # sizes: 8 bits + a scale per output channel; 4 bits + a float32 per 64 values
    assert (
        q.nbytes + scale.nbytes == w.size + 4 * 2 * 32 and packed.nbytes + absmax.nbytes == w.size // 2 + w.size // 16
    )


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_base_is_the_dequantized_base_and_only_adapters_get_gradients(bits):
    """Forward bitwise equal to the same model on the dequantized float base; gradients (int8,
    the custom VJP is the same for NF4) for the adapters only; the merged export agrees."""
    lora_cfg = qlora(bits)
    plain, adapted = CausalLM(CFG), CausalLM(CFG.replace(lora=lora_cfg))
    base = jax.jit(init_params, static_argnums=0)(plain)
    trainable = _perturbed(lora.trainable_init(adapted, base))
    qbase, deq = quant.quantize_base(base, lora_cfg), quant.roundtrip_base(base, lora_cfg)
    leaves = qbase["layers"]["attn"]["o"]
    assert set(leaves) == ({"kernel_q", "kernel_scale"} if bits == 8 else {"kernel_nf4", "kernel_absmax"})
    assert qbase["embed"]["embedding"].dtype == jnp.float32 and "kernel" in qbase["lm_head"]  # stay float
    assert quant.nbytes(qbase) < quant.nbytes(base) / 2
    merged = jax.jit(lora.merge_adapters, static_argnums=1)(lora.join(base, trainable), lora_cfg)  # into deq base
    ids = jnp.array([[1, 5, 9, 3, 2, 7]])

    @jax.jit
    def outputs(trainable, qbase, deq, merged):
        def loss(t, b):
            logits = adapted.apply({"params": lora.join(b, t)}, ids).logits
            return jnp.sum(logits**2), logits

        def logits_and_grad(b):  # one pass for both (forward only for NF4: the custom VJP is the same)
            return jax.grad(loss, has_aux=True)(trainable, b)[::-1] if bits == 8 else (loss(trainable, b)[1], None)

        merged_logits = plain.apply({"params": merged}, ids).logits
        return *logits_and_grad(qbase), *logits_and_grad(deq), merged_logits

    out_q, g_q, out_deq, g_deq, out_merged = outputs(trainable, qbase, deq, merged)
    np.testing.assert_array_equal(out_q, out_deq)  # dequantized on the fly = the dequantized float base
    np.testing.assert_allclose(out_merged, out_q, rtol=1e-4, atol=2e-5)
    if bits == 8:
        assert jax.tree.structure(g_q) == jax.tree.structure(trainable)  # adapters only
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_q, g_deq)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="set rank > 0"):
        LoRAConfig(base_bits=8)
    with pytest.raises(ValueError, match="base_bits must be"):
        LoRAConfig(rank=4, base_bits=3)


def test_ppo_reference_is_the_quantized_base_bitwise():
    """The KL reference is the policy's quantized base: its log-probs equal the plain model's on
    the dequantized base bitwise, and with fresh adapters the policy's too (KL 0 at the start)."""
    lora_cfg = qlora(8)
    hp = PPOHyperparams(batch_size=4, minibatch_size=2, max_new_tokens=4, estimator="rloo", group_size=2)
    plain, policy, rm = CausalLM(CFG), CausalLM(CFG.replace(lora=lora_cfg)), CausalLM(CFG, head="scalar")
    init = jax.jit(init_params, static_argnums=0)
    sft_params, rm_params = init(plain), init(rm, jax.random.key(1))
    qbase, deq = quant.quantize_base(sft_params, lora_cfg), quant.roundtrip_base(sft_params, lora_cfg)
    opt = make_optimizer(PPOConfig.optim, 10)
    rollout = jax.jit(ppo.make_rollout(hp, policy, None, rm, eos_token_id=1, pad_token_id=0))
    prompts = jnp.array([[3, 4, 5], [0, 0, 11]])

    def run(trainable):
        state = ppo.init_ppo_state(trainable, None, opt, None, kl_coef=0.1, seed=0)
        return rollout(state, prompts, (prompts > 0).astype(jnp.int32), qbase, rm_params)

    fresh = run(lora.trainable_init(policy, sft_params))
    np.testing.assert_array_equal(np.asarray(fresh.old_logprobs), np.asarray(fresh.ref_logprobs))  # KL 0
    ro = run(_perturbed(lora.trainable_init(policy, sft_params)))

    @jax.jit
    def deq_logprobs(seq, mask):  # the plain model on the dequantized base, minibatch by minibatch
        split = lambda x: x.reshape(hp.minibatch_size, hp.num_minibatches, -1).swapaxes(0, 1)  # noqa: E731
        out = jax.lax.map(lambda xs: ppo.response_forward(plain, deq, *xs, 3).logprobs, (split(seq), split(mask)))
        return out.swapaxes(0, 1).reshape(hp.batch_size, -1)

    np.testing.assert_array_equal(np.asarray(ro.ref_logprobs), np.asarray(deq_logprobs(ro.sequences, ro.sequence_mask)))
    assert float(jnp.max(jnp.abs(ro.old_logprobs - ro.ref_logprobs))) > 1e-4


# ---------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return F.shared_world(tmp_path_factory, "tiny_world")  # GPT-2 family: tied, so its HF dir serves as a RM


def _run_cfg(**changes):
    kw = dict(save_every=1, keep_last=3, keep_best=0, split_fractions=(1.0, 0.0, 0.0), mesh=MeshConfig())
    return F.run_config(**(kw | changes))


def test_qlora_sft_trains_adapters_only_and_merges_into_the_dequantized_base(world, tmp_path):
    lora_cfg = qlora(8)
    out = run_sft(F.sft_config(world, tmp_path / "sft", max_steps=2, batch_size=8, run=_run_cfg(), lora=lora_cfg))
    state, _, _ = F.read_checkpoint(out)
    paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)}
    weights = [p for p in paths if "params" in p]
    assert weights and all("lora_a" in p or "lora_b" in p for p in weights), sorted(paths)[:20]
    assert np.any(np.asarray(state["params"]["layers"]["attn"]["q"]["lora_b"]) != 0)  # the adapters trained
    info = checkpoint.read_model_info(out)
    assert info["lora"]["base_bits"] == 8
    model, merged, _ = checkpoint.load_model(out)  # merged into the dequantized base
    _, base, _ = checkpoint.load_model(world.base)
    plain_lora = dataclasses.replace(lora_cfg, base_bits=None)
    expect = lora.merge_adapters(lora.join(quant.roundtrip_base(base, lora_cfg), state["params"]), plain_lora)
    jax.tree.map(np.testing.assert_array_equal, merged, expect)


def _ppo_cfg(world, out: Path, **run_changes) -> PPOConfig:
    return PPOConfig(
        prompts=str(world.files["prompts"]),
        policy=str(world.base),
        reward=str(world.base),
        out=str(out),
        max_steps=2,
        max_prompt_len=8,
        run=_run_cfg(**run_changes),
        hparams=PPOHyperparams(
            batch_size=16, minibatch_size=8, max_new_tokens=4, estimator="rloo", group_size=2, adaptive_kl=True
        ),
        optim=dataclasses.replace(PPOConfig.optim, learning_rate=3e-3, warmup_steps=1),
        lora=qlora(4),
    )


def test_qlora_ppo_resume_is_exact(world, tmp_path):
    straight = run_ppo(_ppo_cfg(world, tmp_path / "straight"))
    resumed = tmp_path / "resumed"
    run_ppo(_ppo_cfg(world, resumed, stop_at_step=1))
    run_ppo(_ppo_cfg(world, resumed))
    a, meta_a, step_a = F.read_checkpoint(straight)
    b, meta_b, step_b = F.read_checkpoint(resumed)
    assert step_a == step_b == 2
    F.assert_trees_equal(a, b)
    assert meta_a["iterators"] == meta_b["iterators"] and F.train_losses(straight) == F.train_losses(resumed)
    paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(a)}
    assert not [p for p in paths if "kernel_q" in p or "kernel_nf4" in p or ("kernel" in p and "score" not in p)]
