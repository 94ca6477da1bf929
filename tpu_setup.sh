#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice, install this project with jax[tpu] on every worker,
# and run a command on all workers at once (multi-host: every worker joins one JAX job).
#
#   ./tpu_setup.sh create  --name rlhf --zone us-central2-b --accelerator-type v4-32
#   ./tpu_setup.sh install --name rlhf --zone us-central2-b
#   ./tpu_setup.sh run     --name rlhf --zone us-central2-b -- rlhf-jax bench --presets gpt2-124m 1b \
#       --meshes 1,-1,1 --dtype bfloat16 --out bench_tpu
#   ./tpu_setup.sh up ...      # create + install
#   ./tpu_setup.sh status ...  # gcloud describe
#   ./tpu_setup.sh delete ...
#
# Every step is idempotent: "create" describes the TPU first and creates it only when it
# is missing; "install" re-copies the tracked files (git archive of HEAD plus uncommitted
# changes to tracked files) and re-runs `pip install -e '.[tpu]'` in the same virtualenv.
# "run" exports RLHF_JAX_DISTRIBUTED=1, so `rlhf-jax` calls jax.distributed.initialize()
# on every worker before anything else (coordinator and process ids come from the TPU
# environment). --dry-run prints every command (one per line, prefixed "+ ") instead of
# running it. Options may also come from the environment: TPU_NAME, TPU_ZONE,
# TPU_PROJECT, TPU_TYPE, TPU_VERSION, TPU_REMOTE_DIR.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
  cat <<'EOF'
Usage: tpu_setup.sh [--dry-run] COMMAND [options] [-- CMD ...]
Commands: create | install | up | run | status | delete
Options:
  --name NAME               TPU name (default: rlhf-jax)
  --zone ZONE               e.g. us-central2-b (v4), us-east5-b (v5p), us-east1-d (v6e)
  --project PROJECT         default: gcloud's configured project
  --accelerator-type TYPE   e.g. v4-8 (one host), v4-32 (4 hosts), v5litepod-16, v5p-32, v6e-8 (default: v4-8)
  --version RUNTIME         TPU software version (default: tpu-ubuntu2204-base)
  --spot                    create a Spot TPU
  --remote-dir DIR          project directory on the workers (default: rlhf_jax, under the login's home)
  --dry-run                 print the commands instead of running them
EOF
}

DRY_RUN=0
NAME="${TPU_NAME:-rlhf-jax}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
TYPE="${TPU_TYPE:-v4-8}"
VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
REMOTE_DIR="${TPU_REMOTE_DIR:-rlhf_jax}"
SPOT=0
COMMAND=""
REMOTE_CMD=()

while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --name) NAME="$2"; shift ;;
    --zone) ZONE="$2"; shift ;;
    --project) PROJECT="$2"; shift ;;
    --accelerator-type) TYPE="$2"; shift ;;
    --version) VERSION="$2"; shift ;;
    --remote-dir) REMOTE_DIR="$2"; shift ;;
    --spot) SPOT=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; REMOTE_CMD=("$@"); break ;;
    create | install | up | run | status | delete)
      if [[ -n "$COMMAND" ]]; then
        echo "tpu_setup.sh: one command at a time (got '$COMMAND' and '$1')" >&2
        exit 2
      fi
      COMMAND="$1" ;;
    *) echo "tpu_setup.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [[ -z "$COMMAND" ]]; then
  usage >&2
  exit 2
fi
if [[ -z "$ZONE" ]]; then
  echo "tpu_setup.sh: --zone (or TPU_ZONE) is required" >&2
  exit 2
fi
if ((!DRY_RUN)) && ! command -v gcloud >/dev/null 2>&1; then
  echo "tpu_setup.sh: gcloud not found (install the Google Cloud CLI, or use --dry-run)" >&2
  exit 127
fi

GCLOUD=(gcloud compute tpus tpu-vm)
LOCATION=(--zone "$ZONE")
if [[ -n "$PROJECT" ]]; then
  LOCATION+=(--project "$PROJECT")
fi

# quote ARG: ARG as a POSIX shell word (single-quoted unless it is plain)
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# show CMD...: the command line, every word quoted for a shell
show() {
  local line="+" word
  for word in "$@"; do
    line+=" $(quote "$word")"
  done
  printf '%s\n' "$line"
}

# run CMD...: print it (dry run) or echo it to stderr and run it
run() {
  if ((DRY_RUN)); then
    show "$@"
  else
    show "$@" >&2
    "$@"
  fi
}

tpu_exists() {
  if ((DRY_RUN)); then
    run "${GCLOUD[@]}" describe "$NAME" "${LOCATION[@]}" --format='value(state)'
    echo "# dry run: assuming the TPU does not exist yet"
    return 1
  fi
  "${GCLOUD[@]}" describe "$NAME" "${LOCATION[@]}" --format='value(state)' >/dev/null 2>&1
}

create() {
  if tpu_exists; then
    echo "TPU $NAME already exists in $ZONE: not creating it again" >&2
    return 0
  fi
  local args=(create "$NAME" "${LOCATION[@]}" --accelerator-type "$TYPE" --version "$VERSION")
  if ((SPOT)); then
    args+=(--spot)
  fi
  run "${GCLOUD[@]}" "${args[@]}"
}

# on every worker: $1 is a shell command line (already quoted for the remote shell)
on_all_workers() {
  run "${GCLOUD[@]}" ssh "$NAME" "${LOCATION[@]}" --worker=all --command "$1"
}

install() {
  local root tarball pack
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  if ((DRY_RUN)); then
    tarball="${TMPDIR:-/tmp}/tmp.XXXXXXXXXX/rlhf_jax_src.tar.gz"
  else
    tarball="$(mktemp -d)/rlhf_jax_src.tar.gz"
  fi
  # the working tree's files that git tracks or would track (not ignored: no runs, venvs, caches)
  pack="+ git -C $(quote "$root") ls-files -z --cached --others --exclude-standard"
  pack+=" | tar -C $(quote "$root") --null --ignore-failed-read -T - -czf $(quote "$tarball")"
  if ((DRY_RUN)); then
    echo "$pack"
  else
    echo "$pack" >&2
    git -C "$root" ls-files -z --cached --others --exclude-standard \
      | tar -C "$root" --null --ignore-failed-read -T - -czf "$tarball"
  fi
  run "${GCLOUD[@]}" scp "$tarball" "$NAME:rlhf_jax_src.tar.gz" "${LOCATION[@]}" --worker=all
  local dir
  dir="$(quote "$REMOTE_DIR")"
  on_all_workers "set -e; mkdir -p $dir && tar -xzf rlhf_jax_src.tar.gz -C $dir \
&& (test -x .venv-rlhf/bin/python || python3 -m venv .venv-rlhf) && . .venv-rlhf/bin/activate \
&& pip install -q --upgrade pip && cd $dir && pip install -q -e '.[tpu]' \
&& python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
}

run_command() {
  if ((${#REMOTE_CMD[@]} == 0)); then
    echo "tpu_setup.sh run: give the command after --, e.g. -- rlhf-jax bench --presets gpt2-124m" >&2
    exit 2
  fi
  local quoted="" dir word
  for word in "${REMOTE_CMD[@]}"; do
    quoted+=" $(quote "$word")"
  done
  dir="$(quote "$REMOTE_DIR")"
  on_all_workers "set -e; . .venv-rlhf/bin/activate && cd $dir && export RLHF_JAX_DISTRIBUTED=1 &&$quoted"
}

case "$COMMAND" in
  create) create ;;
  install) install ;;
  up) create; install ;;
  run) run_command ;;
  status) run "${GCLOUD[@]}" describe "$NAME" "${LOCATION[@]}" ;;
  delete) run "${GCLOUD[@]}" delete "$NAME" "${LOCATION[@]}" --quiet ;;
esac
