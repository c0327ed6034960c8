#!/usr/bin/env bash
# The task that launch/slurm/job.sh starts on each node in launcher mode: the deepspeed launcher
# with NPROC ranks on this node, no ssh (Slurm already runs one of these on every node).
# Usage: node.sh STAGE --config CONFIG.yaml [key.sub=value ...] [--resume auto]
set -uo pipefail
for name in NPROC MASTER_ADDR MASTER_PORT SLURM_NODEID SLURM_JOB_NODELIST; do
  if [ -z "${!name:-}" ]; then
    echo "launch/slurm/node.sh: $name is not set: start it through launch/slurm/job.sh (sbatch launch/slurm/<stage>.sbatch)" >&2
    exit 2
  fi
done
# The launcher stays to report; the ranks get the signals from Slurm directly.
trap '' TERM USR1
hostfile=$(mktemp)
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$NPROC/" > "$hostfile"
status=0
deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$SLURM_NODEID" --num_nodes "$(wc -l < "$hostfile")" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --no_python --no_local_rank \
  "$(dirname "$0")/rank.sh" "$@" || status=$?
rm -f "$hostfile"
exit "$status"
