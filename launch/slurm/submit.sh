#!/usr/bin/env bash
# Usage: launch/slurm/submit.sh [--stages pretrain,finetune,evaluate] [sbatch options ...] -- CONFIG.yaml [key.sub=value ...]
# Submits the stages as Slurm batch jobs, each starting only after the previous one succeeded
# (--dependency=afterok); a requeued job keeps its id, so the chain waits through preemptions.
# The sbatch options (resources, partition, --time, --output, --dependency for the first job)
# apply to every stage. Prints "STAGE JOBID" per job. docs/launching.md, "Slurm", has the details.
set -euo pipefail
cd "$(dirname "$0")/../.."

usage() {
  echo "usage: launch/slurm/submit.sh [--stages pretrain,finetune,evaluate] [sbatch options ...] -- CONFIG.yaml [key.sub=value ...]" >&2
  exit 2
}
STAGES=pretrain,finetune,evaluate
SBATCH_OPTS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --stages) [ $# -ge 2 ] || usage; STAGES=$2; shift 2 ;;
    --stages=*) STAGES=${1#--stages=}; shift ;;
    --) shift; break ;;
    *) SBATCH_OPTS+=("$1"); shift ;;
  esac
done
if [ $# -lt 1 ]; then usage; fi
if [ ! -f "$1" ]; then echo "launch/slurm/submit.sh: config file '$1' not found (relative paths start at the repository root, $PWD)" >&2; exit 2; fi
IFS=, read -r -a STAGE_LIST <<< "$STAGES"
for stage in "${STAGE_LIST[@]}"; do
  case "$stage" in
    pretrain|finetune|evaluate) ;;
    *) echo "launch/slurm/submit.sh: --stages $STAGES: '$stage' is not one of pretrain, finetune, evaluate" >&2; exit 2 ;;
  esac
done
if ! command -v sbatch >/dev/null 2>&1; then echo "launch/slurm/submit.sh: sbatch not found: run this on a Slurm login node" >&2; exit 2; fi
if ! command -v deepspeed >/dev/null 2>&1; then
  echo "launch/slurm/submit.sh: no deepspeed on PATH: activate the project's environment first (. .venv/bin/activate); the jobs inherit it" >&2
  exit 2
fi
# Slurm cannot start a job whose --output folder is missing (and then writes no log at all).
mkdir -p runs/slurm
for i in "${!SBATCH_OPTS[@]}"; do
  out=
  case "${SBATCH_OPTS[$i]}" in
    --output=*) out=${SBATCH_OPTS[$i]#--output=} ;;
    -o|--output) out=${SBATCH_OPTS[$((i + 1))]:-} ;;
    -o?*) out=${SBATCH_OPTS[$i]#-o} ;;
  esac
  if [ -n "$out" ]; then mkdir -p "$(dirname "$out")"; fi
done

previous=
for stage in "${STAGE_LIST[@]}"; do
  after=()
  if [ -n "$previous" ]; then after=(--dependency="afterok:$previous" --kill-on-invalid-dep=yes); fi
  id=$(sbatch --parsable "${SBATCH_OPTS[@]}" "${after[@]}" "launch/slurm/$stage.sbatch" "$@")
  previous=${id%%;*}
  echo "$stage $previous"
done
