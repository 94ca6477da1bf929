"""``rlhf-jax``: one subcommand per stage; every config field is a command-line override (tyro).

    rlhf-jax sft --data demos.jsonl --init HF_OR_RUN_DIR --out runs/sft --max-steps 1000
    rlhf-jax rm  --data rankings.jsonl --init runs/sft --out runs/rm --demonstrations demos.jsonl
    rlhf-jax dpo --data rankings.jsonl --init runs/sft --out runs/dpo --beta 0.1 --k-way pl
    rlhf-jax sample --policy runs/sft --reward runs/rm --prompts prompts.jsonl --out best.jsonl --best-of 8
    rlhf-jax export --run runs/sft --out hf_dir      # LoRA runs: merged; --export-adapters: PEFT adapters
    rlhf-jax demo                      # the whole pipeline on the built-in task, with a report
    rlhf-jax smoke                     # a tiny end-to-end check on CPU (about a minute)
    rlhf-jax bench --presets gpt2-124m --meshes 1,-1,1 --dtype bfloat16   # speed, memory, MFU

``rlhf-jax <command> --help`` lists every option with its default.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
import typing
from pathlib import Path
from typing import Annotated, Union

import jax
import jax.numpy as jnp
import tyro

from rlhf_jax import checkpoint
from rlhf_jax.bench import BenchArgs, run_bench
from rlhf_jax.config import DPOConfig, PPOConfig, PPOHyperparams, RewardConfig, RunConfig, SFTConfig
from rlhf_jax.drivers import run_dpo, run_ppo, run_rm, run_sample, run_sft
from rlhf_jax.models import lora, save_pretrained
from rlhf_jax.pipeline import PipelineConfig, run_pipeline
from rlhf_jax.sampling import generate
from rlhf_jax.tasks import tiny
from rlhf_jax.tasks.demo_config import DemoConfig
from rlhf_jax.tasks.demo_rounds import run_demo
from rlhf_jax.train_loop import read_metrics


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportArgs:
    """Write a run's model as a Hugging Face directory (config.json + safetensors + tokenizer)."""

    run: str  # the run directory
    out: str  # the Hugging Face directory to write
    which: str = "best"  # "best" (by validation metric) or "latest"
    # a LoRA run: write only its adapters in PEFT's format (adapter_config.json + adapter_model.safetensors)
    # instead of the merged full weights
    export_adapters: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineArgs:
    """SFT -> RM -> PPO(-ptx), then --rounds - 1 rounds of new comparisons on the current policy,
    a new RM on all comparisons so far and a new policy (InstructGPT's iterated RLHF)."""

    out: str  # pipeline directory (one run directory per stage and round)
    init: str  # the pretrained model (HF directory or run directory)
    demonstrations: str  # local JSONL files
    rankings: str
    prompts: str
    ptx_data: str | None = None  # pretraining text: PPO-ptx when given
    rounds: int = 1
    labeler: str = "world"  # "world": the built-in task's simulated labelers; "file": you rank round_<r>/to_rank.jsonl
    samples_per_prompt: int = 4
    comparison_prompts: int = 256
    sft_steps: int | None = None  # None: one epoch
    rm_steps: int | None = None
    ppo_steps: int = 100
    max_prompt_len: int = 64
    max_response_len: int = 64
    seed: int = 0

    def config(self) -> PipelineConfig:
        run = RunConfig(seed=self.seed)
        return PipelineConfig(
            out=self.out,
            rounds=self.rounds,
            labeler=self.labeler,
            samples_per_prompt=self.samples_per_prompt,
            comparison_prompts=self.comparison_prompts,
            sft=SFTConfig(
                data=self.demonstrations,
                init=self.init,
                out="",
                max_steps=self.sft_steps,
                seq_len=self.max_prompt_len + self.max_response_len,
                run=run,
            ),
            rm=RewardConfig(
                data=self.rankings,
                init="",
                out="",
                max_steps=self.rm_steps,
                demonstrations=self.demonstrations,
                max_prompt_len=self.max_prompt_len,
                max_response_len=self.max_response_len,
                run=run,
            ),
            ppo=PPOConfig(
                prompts=self.prompts,
                policy="",
                reward="",
                out="",
                ptx_data=self.ptx_data,
                max_steps=self.ppo_steps,
                max_prompt_len=self.max_prompt_len,
                hparams=PPOHyperparams(max_new_tokens=self.max_response_len),
            ),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleArgs:
    """Best-of-n: sample --best-of responses per prompt, keep the one the reward model scores highest,
    write demonstration JSONL {"prompt", "response", "score", "scores"} (SFT data: rejection sampling)."""

    policy: str  # a run directory or HF directory with an LM head
    reward: str  # a reward-model run directory
    prompts: str  # a prompts file ({"prompt"} or {"messages"} rows)
    out: str  # the JSONL file to write
    best_of: int = 4  # n samples per prompt
    temperature: float = 1.0
    max_new_tokens: int = 64
    max_prompt_len: int = 64  # longer prompts are left out and counted
    batch_size: int = 16  # prompts per generation batch (batch_size * best_of sequences)
    seed: int = 0
    require_eos: bool = True  # only responses that ended with EOS are candidates
    on_error: typing.Literal["raise", "skip"] = "raise"  # malformed prompt rows
    progress: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmokeArgs:
    """Tiny end-to-end check: random model, generated data, a few SFT, RM and PPO-ptx steps, sampling."""

    out: str | None = None  # run directory (default: a temporary directory)
    steps: int = 30
    seed: int = 0


def _export(args: ExportArgs) -> None:
    if args.export_adapters:
        model_cfg, lora_cfg, trainable, base = checkpoint.load_adapters(args.run, which=args.which)
        path = lora.save_peft_adapters(trainable, model_cfg, lora_cfg, args.out, base_model=base)
        print(f"exported the adapters of {args.run} (base {base}) -> {path}")
        return
    model, params, tokenizer = checkpoint.load_model(args.run, which=args.which)  # LoRA runs come merged
    path = save_pretrained(model, params, args.out, tokenizer=tokenizer)
    print(f"exported {args.run} -> {path}")


def _smoke(args: SmokeArgs) -> None:
    root = Path(args.out or tempfile.mkdtemp(prefix="rlhf_jax_smoke_"))
    tok = tiny.make_tokenizer(root / "tokenizer")
    base = tiny.make_model_dir(root / "base", vocab_size=len(tok), tokenizer=tok, seed=args.seed)
    files = tiny.write_data(root / "data", seed=args.seed)
    run = RunConfig(seed=args.seed, eval_every=max(1, args.steps // 3), save_every=args.steps, log_every=5)
    sft_dir = run_sft(
        SFTConfig(
            data=str(files["demonstrations"]),
            init=str(base),
            out=str(root / "sft"),
            max_steps=args.steps,
            batch_size=16,
            seq_len=24,
            run=run,
            optim=dataclasses.replace(SFTConfig.optim, learning_rate=3e-3),
        )
    )
    rm_dir = run_rm(
        RewardConfig(
            data=str(files["rankings"]),
            init=str(sft_dir),
            out=str(root / "rm"),
            demonstrations=str(files["demonstrations"]),
            max_steps=args.steps,
            batch_size=8,
            max_prompt_len=8,
            max_response_len=8,
            run=run,
            optim=dataclasses.replace(RewardConfig.optim, learning_rate=1e-3),
        )
    )
    ppo_dir = run_ppo(
        PPOConfig(
            prompts=str(files["prompts"]),
            policy=str(sft_dir),
            reward=str(rm_dir),
            out=str(root / "ppo"),
            ptx_data=str(files["text"]),
            max_steps=max(2, args.steps // 5),
            max_prompt_len=8,
            ptx_seq_len=24,
            run=dataclasses.replace(run, eval_every=3, save_every=3),
            hparams=PPOHyperparams(batch_size=16, minibatch_size=8, max_new_tokens=8),
        )
    )
    model, params, tok = checkpoint.load_model(sft_dir)
    enc = tok(["w5 w6 w7", "w9 w3"], padding=True, return_tensors="np", padding_side="left")
    out = generate(
        model,
        params,
        jnp.asarray(enc["input_ids"]),
        jnp.asarray(enc["attention_mask"]),
        jax.random.key(args.seed),
        max_new_tokens=8,
        temperature=0.0,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    sft_metrics = [m for m in read_metrics(sft_dir) if "train/loss" in m]
    rm_metrics = [m for m in read_metrics(rm_dir) if "val/accuracy" in m]
    print(f"SFT loss {sft_metrics[0]['train/loss']:.3f} -> {sft_metrics[-1]['train/loss']:.3f}")
    if rm_metrics:
        print(f"RM validation pair accuracy {rm_metrics[-1]['val/accuracy']:.3f}")
    for prompt, row, m in zip(["w5 w6 w7", "w9 w3"], out.tokens.tolist(), out.mask.tolist()):
        print(f"  {prompt!r} -> {tok.decode([t for t, k in zip(row, m) if k])!r}")
    ppo_metrics = [m for m in read_metrics(ppo_dir) if "objective/scores" in m]
    print(
        f"PPO-ptx RM score {ppo_metrics[0]['objective/scores']:.3f} -> {ppo_metrics[-1]['objective/scores']:.3f}, "
        f"KL {ppo_metrics[-1]['objective/kl']:.3f}"
    )
    print(f"run directories under {root}")


COMMANDS = {
    "demo": (
        DemoConfig,
        "The whole InstructGPT pipeline on the built-in task, on CPU, with a report (--quick: test-sized).",
    ),
    "sft": (SFTConfig, "Supervised fine-tuning on demonstrations (or --mode pretrain on text)."),
    "rm": (RewardConfig, "Reward model on K-way rankings (all C(K,2) pairs of a prompt in one batch element)."),
    "dpo": (DPOConfig, "Direct preference optimisation on rankings against the frozen --init as the reference."),
    "sample": (SampleArgs, SampleArgs.__doc__),
    "ppo": (PPOConfig, "PPO / PPO-ptx against the reward model with a per-token KL penalty (--ptx-data for PPO-ptx)."),
    "pipeline": (PipelineArgs, PipelineArgs.__doc__),
    "export": (ExportArgs, ExportArgs.__doc__),
    "smoke": (SmokeArgs, SmokeArgs.__doc__),
    "bench": (
        BenchArgs,
        BenchArgs.__doc__ + " --check-meshes: compile and run every mesh shape that fits (CPU: fake devices).",
    ),
}

# Run configs whose algorithm hyperparameters (a nested ``hparams`` dataclass: what the pure
# functions take) are set with flat flags, ``--clip-eps`` rather than ``--hparams.clip-eps``.
FLAT_HPARAMS = (PPOConfig, RewardConfig, DPOConfig)


def _flat_hparams(cls: type) -> type:
    """A subclass of ``cls`` whose ``hparams`` field tyro parses without the ``hparams.`` prefix."""
    hparams = next(f for f in dataclasses.fields(cls) if f.name == "hparams")
    namespace = {
        "__annotations__": {"hparams": Annotated[typing.get_type_hints(cls)["hparams"], tyro.conf.OmitArgPrefixes]},
        "hparams": dataclasses.field(default=hparams.default),
        "__doc__": cls.__doc__,
        "__module__": cls.__module__,
    }
    return dataclasses.dataclass(frozen=True, kw_only=True)(type(cls.__name__, (cls,), namespace))


def _as_base(args: object) -> object:
    """The parsed config as its own class again (the CLI subclass only changes how flags are spelt)."""
    for cls in FLAT_HPARAMS:
        if isinstance(args, cls) and type(args) is not cls:
            return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
    return args


def _multihost_requested() -> bool:
    """A multi-process launch: tpu_setup.sh sets RLHF_JAX_DISTRIBUTED=1 on every worker of a pod;
    a coordinator address or a SLURM / Open MPI job of several tasks says the same."""
    env = os.environ
    if env.get("RLHF_JAX_DISTRIBUTED", "") not in ("", "0"):
        return True
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    return int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


COMPILE_CACHE_BYTES = 2 << 30  # the persistent compilation cache's size; jax evicts the least recently used


def use_compile_cache() -> Path | None:
    """Opt in (``RLHF_JAX_COMPILE_CACHE=1``) to keeping compiled programs on disk between runs.

    jax's persistent compilation cache: a resumed run or the same command run again loads each
    step's executable instead of compiling it (programs that took at least jax's
    ``jax_persistent_cache_min_compile_time_secs``, 1 s, to compile), in ``<cache>/jax_compile``
    under ``$RLHF_JAX_CACHE`` or ``~/.cache/rlhf_jax``, at most 2 GiB (least recently used
    first out). Off by default: with jax 0.10 on CPU, a PPO iteration with GRPO, two reward
    models and a rule reward aborted (SIGABRT) when its executable came from the cache
    (tests/test_ppo_estimators.py's resume test, reproducible). A cache that jax is already
    told of (``JAX_COMPILATION_CACHE_DIR``) is used as it is. Returns the directory in use,
    None when off.
    """
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    if os.environ.get("RLHF_JAX_COMPILE_CACHE", "0") != "1":
        return None
    from rlhf_jax.models.gguf import default_cache_dir

    path = default_cache_dir() / "jax_compile"
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_BYTES)
    return path


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # force: importing orbax (through the drivers) already installed a root handler at WARNING
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("absl", "orbax", "jax"):  # Orbax logs every save and restore at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    subcommands = [
        Annotated[_flat_hparams(cls) if cls in FLAT_HPARAMS else cls, tyro.conf.subcommand(name=name, description=desc)]
        for name, (cls, desc) in COMMANDS.items()
    ]
    args = _as_base(tyro.cli(Union[tuple(subcommands)], args=argv, description=__doc__))  # type: ignore[arg-type]  # noqa: UP007
    if _multihost_requested():  # before any other jax call: every host joins the one global mesh
        # called directly (not sharding.initialize_distributed, which tolerates a missing cluster):
        # a launch that asked for several hosts must fail loudly, not train alone on each host
        jax.distributed.initialize()
    if not isinstance(args, BenchArgs):  # the benchmark reports compile times: it always compiles
        use_compile_cache()
    if isinstance(args, DemoConfig):
        print(f"report: {run_demo(args)}")
    elif isinstance(args, SFTConfig):
        print(run_sft(args))
    elif isinstance(args, RewardConfig):
        print(run_rm(args))
    elif isinstance(args, PPOConfig):
        print(run_ppo(args))
    elif isinstance(args, DPOConfig):
        print(run_dpo(args))
    elif isinstance(args, SampleArgs):
        print(run_sample(**dataclasses.asdict(args)))
    elif isinstance(args, PipelineArgs):
        print(run_pipeline(args.config()))
    elif isinstance(args, ExportArgs):
        _export(args)
    elif isinstance(args, SmokeArgs):
        _smoke(args)
    elif isinstance(args, BenchArgs):
        run_bench(args)


if __name__ == "__main__":
    main(sys.argv[1:])
