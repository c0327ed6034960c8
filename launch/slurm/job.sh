#!/usr/bin/env bash
# Usage (inside an sbatch allocation; launch/slurm/*.sbatch call it from the repository root):
#   launch/slurm/job.sh pretrain|finetune|evaluate CONFIG.yaml [key.sub=value ...]
# Runs one stage on every rank of the allocation. A preempted run (exit 75, a checkpoint saved)
# requeues the job; every later start of the job passes --resume auto. A failed run is requeued
# at most CLLM4REC_SLURM_RETRIES times.
# Environment knobs:
#   CLLM4REC_SLURM_MODE     srun: every task of the allocation is one rank (srun starts them);
#                           launcher: one task per node runs the deepspeed launcher with NPROC
#                           ranks. Default: launcher when the job has one task per node, else srun.
#   NPROC                   launcher mode: ranks per node (default: the node's allocated GPUs;
#                           on a CPU-only node 2)
#   CLLM4REC_SLURM_RETRIES  requeues after failures before giving up (default 2)
#   MASTER_PORT             default: a port free on the first node
set -uo pipefail

say() { echo "$(date '+%F %T') launch/slurm [job ${SLURM_JOB_ID:-?} $STAGE]: $*"; }

STAGE=${1:-}
case "$STAGE" in
  pretrain|finetune|evaluate) ;;
  *) echo "usage: launch/slurm/job.sh pretrain|finetune|evaluate CONFIG.yaml [key.sub=value ...]" >&2; exit 2 ;;
esac
if [ $# -lt 2 ]; then echo "usage: launch/slurm/job.sh $STAGE CONFIG.yaml [key.sub=value ...]" >&2; exit 2; fi
CONFIG=$2
shift 2
if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "launch/slurm/job.sh: SLURM_JOB_ID is not set: submit launch/slurm/$STAGE.sbatch with sbatch (or launch/slurm/submit.sh); outside Slurm use launch/$STAGE.sh" >&2
  exit 2
fi
if [ ! -f "$CONFIG" ]; then say "config file '$CONFIG' not found (relative paths start at $PWD)" >&2; exit 2; fi
HERE=$(cd "$(dirname "$0")" && pwd)

# Logs go beside the job's own output file, wherever --output put it.
LOG_DIR=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p' | head -n1)
LOG_DIR=$(dirname "${LOG_DIR:-runs/slurm/job.out}")
mkdir -p "$LOG_DIR"
LOG_BASE="$LOG_DIR/${SLURM_JOB_NAME:-cllm4rec-$STAGE}-$SLURM_JOB_ID"
FAILURES_FILE="$LOG_BASE.failures"

NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
TASKS=${SLURM_NTASKS:-$NODES}
MODE=${CLLM4REC_SLURM_MODE:-}
if [ -z "$MODE" ]; then
  if [ "$TASKS" = "$NODES" ]; then MODE=launcher; else MODE=srun; fi
fi
case "$MODE" in
  srun|launcher) ;;
  *) say "CLLM4REC_SLURM_MODE=$MODE: use srun (one task per rank) or launcher (one task per node)" >&2; exit 2 ;;
esac
if [ "$MODE" = launcher ] && [ "$TASKS" != "$NODES" ]; then
  say "CLLM4REC_SLURM_MODE=launcher needs one task per node, this job has $TASKS tasks on $NODES node(s): submit with --ntasks-per-node=1" >&2
  exit 2
fi
if [ "$MODE" = launcher ] && [ -z "${NPROC:-}" ] && [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then NPROC=$SLURM_GPUS_ON_NODE; fi

OMP_GIVEN=${OMP_NUM_THREADS:-}
# PATH with this environment's bin/ first, DS_ACCELERATOR, NPROC default, MASTER_PORT, EXIT_PREEMPTED.
source "$HERE/../common.sh"
if ! command -v deepspeed >/dev/null 2>&1; then
  say "no deepspeed on PATH ($PATH): activate the project's environment (. .venv/bin/activate) before sbatch; the job inherits it" >&2
  exit 2
fi
# The tasks' CPUs, not the node's, are what the ranks share.
if [ -z "$OMP_GIVEN" ] && [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  if [ "$MODE" = srun ]; then per_rank=$SLURM_CPUS_PER_TASK; else per_rank=$(( SLURM_CPUS_PER_TASK / NPROC )); fi
  export OMP_NUM_THREADS=$(( per_rank > 0 ? per_rank : 1 ))
fi
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export MASTER_ADDR MASTER_PORT NPROC
export CLLM4REC_SLURM_MODE=$MODE CLLM4REC_RANK_LOG="$LOG_BASE-rank"
# Any rank that stops after a preemption save writes here; on a shared file system, as run.dir is.
export CLLM4REC_STATUS_FILE="$LOG_BASE.status"
rm -f "$CLLM4REC_STATUS_FILE"
unset RANK WORLD_SIZE LOCAL_RANK

RESTARTS=${SLURM_RESTART_COUNT:-0}
RESUME=()
if [ "$RESTARTS" -gt 0 ] && [ "$STAGE" != evaluate ]; then RESUME=(--resume auto); fi
if [ "$MODE" = srun ]; then RANKS=$TASKS; else RANKS=$(( NODES * NPROC )); fi
say "start $((RESTARTS + 1)) on $(hostname -s): $RANKS rank(s) on $NODES node(s), mode $MODE, master $MASTER_ADDR:$MASTER_PORT${RESUME:+, resuming with --resume auto}"
say "rank logs: $LOG_BASE-rank<r>.log"

# Slurm ends the job (scancel, time limit, its own requeue or preemption) with SIGTERM to every
# process, this shell included: the ranks save, and Slurm decides whether the job comes back.
ENDING=
trap 'ENDING=1' TERM
# A SIGUSR1 sent to this shell only (--signal=B:USR1, scancel --batch) is passed on to the ranks;
# srun forwards it to its tasks.
FORWARD=
trap 'FORWARD=1' USR1

# Some Slurm versions (22.05 among them) do not pass sbatch's --cpus-per-task on to srun's steps.
# A node's launcher task without one would get a single CPU for all of that node's ranks.
CPT=()
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  CPT=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
elif [ "$MODE" = launcher ] && [ -n "${SLURM_CPUS_ON_NODE:-}" ]; then
  CPT=(--cpus-per-task="$SLURM_CPUS_ON_NODE")
fi
if [ "$MODE" = srun ]; then
  srun --kill-on-bad-exit=1 "${CPT[@]}" bash "$HERE/rank.sh" "$STAGE" --config "$CONFIG" "$@" "${RESUME[@]}" &
else
  srun --kill-on-bad-exit=1 --ntasks="$NODES" --ntasks-per-node=1 "${CPT[@]}" \
    bash "$HERE/node.sh" "$STAGE" --config "$CONFIG" "$@" "${RESUME[@]}" &
fi
SRUN=$!
while kill -0 "$SRUN" 2>/dev/null; do
  wait "$SRUN"  # returns early when a trapped signal arrives
  if [ -n "$FORWARD" ]; then FORWARD=; kill -USR1 "$SRUN" 2>/dev/null; fi
done
wait "$SRUN"
status=$?

requeue() {
  local out
  if out=$(scontrol requeue "$SLURM_JOB_ID" 2>&1); then
    say "requeued job $SLURM_JOB_ID: $1"
    return 0
  fi
  say "could not requeue job $SLURM_JOB_ID (scontrol requeue: $out); submit it again with --resume auto to continue" >&2
  return 1
}

if grep -q preempted "$CLLM4REC_STATUS_FILE" 2>/dev/null; then
  rm -f "$CLLM4REC_STATUS_FILE"
  if [ -n "$ENDING" ]; then
    say "preempted: a checkpoint was saved; Slurm is ending this job, it resumes with --resume auto if Slurm requeues it"
  else
    say "preempted: a checkpoint was saved"
    requeue "its next start resumes with --resume auto"
  fi
  exit "$EXIT_PREEMPTED"
fi
rm -f "$CLLM4REC_STATUS_FILE"
if [ "$status" = 0 ]; then
  rm -f "$FAILURES_FILE"
  say "finished"
  exit 0
fi

say "failed with exit status $status; rank logs: $LOG_BASE-rank*.log" >&2
# Rank 0's output is above already; the other ranks' last lines name their errors.
for log in "$LOG_BASE"-rank*.log; do
  case "$log" in *-rank0.log) continue ;; esac
  if [ -f "$log" ]; then tail -n 3 "$log" | sed "s|^|  $(basename "$log"): |" >&2; fi
done
if [ -n "$ENDING" ]; then
  say "Slurm is ending this job: not requeueing it from here" >&2
  exit "$status"
fi
RETRIES=${CLLM4REC_SLURM_RETRIES:-2}
failures=$(( $(cat "$FAILURES_FILE" 2>/dev/null || echo 0) + 1 ))
echo "$failures" > "$FAILURES_FILE"
if [ "$failures" -le "$RETRIES" ]; then
  requeue "retry $failures of $RETRIES after a failure; it resumes with --resume auto"
  exit "$status"
fi
say "giving up: the stage failed $failures time(s), and CLLM4REC_SLURM_RETRIES=$RETRIES allows $RETRIES retry(ies); fix the error above and submit again (with --resume auto to keep the progress)" >&2
exit "$status"
