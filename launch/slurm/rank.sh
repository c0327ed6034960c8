#!/usr/bin/env bash
# One rank of a Slurm job (launch/slurm/job.sh starts it): the task itself in srun mode, or
# the program that the deepspeed launcher starts on each node in launcher mode.
# Usage: rank.sh STAGE --config CONFIG.yaml [key.sub=value ...] [--resume auto]
# Its output goes to CLLM4REC_RANK_LOG<rank>.log; rank 0's also to the job's log.
set -uo pipefail
if [ "${CLLM4REC_SLURM_MODE:-}" = srun ]; then
  # DeepSpeed reads only the torch.distributed variables, and srun sets only its own.
  export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  export MASTER_ADDR
fi
for name in RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT CLLM4REC_RANK_LOG; do
  if [ -z "${!name:-}" ]; then
    echo "launch/slurm/rank.sh: $name is not set: start it through launch/slurm/job.sh (sbatch launch/slurm/<stage>.sbatch)" >&2
    exit 2
  fi
done
# This shell stays to record the rank's outcome. The rank inherits the ignored signals until
# its trainer installs the handlers that save a checkpoint on them.
trap '' TERM USR1
log="$CLLM4REC_RANK_LOG$RANK.log"
if [ "$RANK" = 0 ]; then
  python -u -m trainer.cli "$@" 2>&1 | tee -a "$log"
  status=${PIPESTATUS[0]}
else
  python -u -m trainer.cli "$@" >> "$log" 2>&1
  status=$?
fi
# Every rank stops with 75 only after the preemption checkpoint is published (a collective save
# ends in a barrier), so whichever rank gets here first may say so; the others may be killed.
if [ "$status" = 75 ] && [ -n "${CLLM4REC_STATUS_FILE:-}" ]; then echo preempted > "$CLLM4REC_STATUS_FILE"; fi
exit "$status"
