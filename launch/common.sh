# Shared by the launch scripts: environment and the deepspeed launcher call.
# Environment knobs: NPROC (ranks on this node; default: GPUs, or 2 on a CPU-only machine),
# MASTER_PORT (default: a free port), OMP_NUM_THREADS (default: cores / NPROC).

# The deepspeed launcher and the ranks it starts must find this environment's python, ninja
# and cllm4rec first, also when started from sbatch/pdsh with a different PATH.
if [ -n "${VIRTUAL_ENV:-}" ]; then export PATH="$VIRTUAL_ENV/bin:$PATH"; fi

if [ -z "${DS_ACCELERATOR:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR=cpu
fi
if [ -z "${NPROC:-}" ]; then
  if [ "${DS_ACCELERATOR:-}" = cpu ]; then NPROC=2; else NPROC=$(nvidia-smi -L | wc -l); fi
fi
if [ -z "${MASTER_PORT:-}" ]; then
  MASTER_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning}

# Exit status of a run stopped by SIGTERM/SIGUSR1 after saving a checkpoint: rerun with --resume auto.
EXIT_PREEMPTED=75

# launch STAGE CONFIG [key.sub=value ...] [--resume auto]
# Preemption: a SIGTERM or SIGUSR1 sent to this process group (what Slurm and `kill -TERM -PGID`
# do) reaches the ranks, which finish the step, save a checkpoint and
# stop. This shell and the deepspeed runner ignore both signals so that they stay to report
# the outcome; the runner would otherwise die at once and the launcher die of SIGUSR1.
launch() {
  local stage=$1 config=$2
  shift 2
  if [ ! -f "$config" ]; then echo "launch/$stage.sh: config file '$config' not found" >&2; exit 2; fi
  CLLM4REC_STATUS_FILE=$(mktemp)
  export CLLM4REC_STATUS_FILE
  trap '' TERM USR1
  local status=0
  deepspeed --num_gpus "$NPROC" --master_addr 127.0.0.1 --master_port "$MASTER_PORT" \
    --module trainer.cli "$stage" --config "$config" "$@" || status=$?
  if grep -q preempted "$CLLM4REC_STATUS_FILE"; then
    echo "launch/$stage.sh: preempted; a checkpoint was saved: rerun with --resume auto" >&2
    status=$EXIT_PREEMPTED
  fi
  rm -f "$CLLM4REC_STATUS_FILE"
  return "$status"
}
