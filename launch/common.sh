# Shared by the launch scripts: environment and the deepspeed launcher call.
# Environment knobs (one node): NPROC (ranks on this node; default: GPUs, or 2 on a CPU-only
# machine), MASTER_PORT (default: a free port), OMP_NUM_THREADS (default: cores / NPROC).
# Several nodes (see docs/launching.md, "Multi-node"):
#   HOSTFILE     DeepSpeed hostfile, one "hostname slots=N" line per node
#   NNODES       nodes to use (default: every host of HOSTFILE)
#   LAUNCHER     pdsh (default: ssh from this node to every host), no_ssh (run this script on
#                every node yourself, each with its NODE_RANK), openmpi (mpirun over HOSTFILE)
#   NODE_RANK    this node's index in HOSTFILE (no_ssh only)
#   MASTER_ADDR  address of the first node, reachable from all (required)
#   MASTER_PORT  a port free on the first node (required with no_ssh: every node must agree)
#   CLLM4REC_EXPORT  extra variable names to pass to every node

# The deepspeed launcher and the ranks it starts must find this environment's python, ninja
# and cllm4rec first, also when started from sbatch/pdsh with a different PATH.
if [ -n "${VIRTUAL_ENV:-}" ]; then export PATH="$VIRTUAL_ENV/bin:$PATH"; fi

if [ -z "${DS_ACCELERATOR:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR=cpu
fi
if [ -z "${NPROC:-}" ]; then
  if [ "${DS_ACCELERATOR:-}" = cpu ]; then NPROC=2; else NPROC=$(nvidia-smi -L | wc -l); fi
fi
MASTER_PORT_GIVEN=${MASTER_PORT:-}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
if [ -z "${MASTER_PORT:-}" ]; then
  MASTER_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning}

# Exit status of a run stopped by SIGTERM/SIGUSR1 after saving a checkpoint: rerun with --resume auto.
EXIT_PREEMPTED=75

# A host line of a DeepSpeed hostfile: "hostname slots=N".
HOST_LINE='^[^#[:space:]]+[[:space:]]+slots=[0-9]+'

# The deepspeed runner's arguments for this node: one node, or a hostfile-driven multi-node job.
runner_args() {
  if [ -z "${HOSTFILE:-}" ]; then
    if [ "${NNODES:-1}" != 1 ]; then echo "NNODES=$NNODES needs HOSTFILE (one 'hostname slots=N' line per node)" >&2; return 2; fi
    RUNNER_ARGS=(--num_gpus "$NPROC" --master_addr 127.0.0.1 --master_port "$MASTER_PORT")
    return 0
  fi
  if [ ! -f "$HOSTFILE" ]; then echo "HOSTFILE=$HOSTFILE: file not found" >&2; return 2; fi
  local hosts
  hosts=$(grep -cE "$HOST_LINE" "$HOSTFILE" || true)
  NNODES=${NNODES:-$hosts}
  if [ "$hosts" -lt "$NNODES" ]; then echo "HOSTFILE=$HOSTFILE lists $hosts host(s) ('hostname slots=N' lines), NNODES=$NNODES" >&2; return 2; fi
  if [ -z "${MASTER_ADDR:-}" ]; then echo "a multi-node launch needs MASTER_ADDR: the first node's address, reachable from every node" >&2; return 2; fi
  case "${LAUNCHER:-pdsh}" in
    pdsh)    RUNNER_ARGS=(--hostfile "$HOSTFILE" --launcher pdsh --num_nodes "$NNODES" --num_gpus "$NPROC") ;;
    no_ssh)
      if [ -z "${NODE_RANK:-}" ]; then echo "LAUNCHER=no_ssh needs NODE_RANK (0..$((NNODES - 1))) on every node" >&2; return 2; fi
      if [ -z "${MASTER_PORT_GIVEN:-}" ]; then echo "LAUNCHER=no_ssh needs MASTER_PORT, the same on every node" >&2; return 2; fi
      RUNNER_ARGS=(--hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --num_nodes "$NNODES" --num_gpus "$NPROC") ;;
    openmpi) RUNNER_ARGS=(--hostfile "$HOSTFILE" --launcher openmpi) ;;  # mpirun takes every slot of HOSTFILE
    *) echo "LAUNCHER=$LAUNCHER: use pdsh, no_ssh or openmpi" >&2; return 2 ;;
  esac
  RUNNER_ARGS+=(--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
  write_deepspeed_env
}

# pdsh and mpirun start the ranks of other nodes with a bare environment: DeepSpeed passes on
# what ./.deepspeed_env lists. Lines for other variables already in the file are kept.
write_deepspeed_env() {
  local names="PATH PYTHONPATH DS_ACCELERATOR OMP_NUM_THREADS PYTHONWARNINGS TOKENIZERS_PARALLELISM MALLOC_MMAP_THRESHOLD_ MALLOC_MMAP_MAX_ MALLOC_TRIM_THRESHOLD_ GLIBC_TUNABLES HF_HOME HF_HUB_OFFLINE MASTER_ADDR MASTER_PORT CLLM4REC_STATUS_FILE ${CLLM4REC_EXPORT:-}"
  local tmp name
  tmp=$(mktemp)
  if [ -f .deepspeed_env ]; then
    grep -vE "^($(echo $names | tr ' ' '|'))=" .deepspeed_env > "$tmp" || true
  fi
  for name in $names; do
    if [ -n "${!name:-}" ]; then echo "$name=${!name}" >> "$tmp"; fi
  done
  mv "$tmp" .deepspeed_env
}

# run_rank STAGE [--local_rank=N] CONFIG [key.sub=value ...]
# One rank that a launcher started (`deepspeed --no_python [runner options] launch/STAGE.sh CONFIG
# ...`: RANK and LOCAL_RANK are set): run the recipe in this process. Preemption ends it with
# status 75 itself.
run_rank() {
  local stage=$1
  shift
  local args=() arg
  for arg in "$@"; do
    case "$arg" in
      --local_rank=*) ;;  # the launcher's; the process group reads LOCAL_RANK
      *) args+=("$arg") ;;
    esac
  done
  if [ ${#args[@]} -lt 1 ]; then echo "usage: deepspeed --no_python [runner options] launch/$stage.sh CONFIG.yaml [key.sub=value ...]" >&2; exit 2; fi
  if [ ! -f "${args[0]}" ]; then echo "launch/$stage.sh: config file '${args[0]}' not found" >&2; exit 2; fi
  exec python -m trainer.cli "$stage" --config "${args[@]}"
}

# launch STAGE [--hostfile F] [--num_nodes N] [--node_rank R] [--master_addr A] [--master_port P]
#              [--launcher pdsh|openmpi] [--no_ssh] CONFIG [key.sub=value ...] [--resume auto]
# The options before CONFIG are the deepspeed runner's, and set the variables above.
# Preemption: a SIGTERM or SIGUSR1 sent to this process group (what Slurm and `kill -TERM -PGID`
# do), or to the ranks of any node, makes every rank finish the step, save a checkpoint and
# stop with status 75; this script then says so and exits 75. On one node, and with no_ssh or
# openmpi, this script and the deepspeed runner ignore both signals so that they stay to report
# the outcome (the runner would otherwise die at once, and the launcher die of SIGUSR1); pdsh:
# see run_pdsh_job.
launch() {
  local stage=$1
  shift
  if [ -n "${RANK:-}" ] && [ -n "${LOCAL_RANK:-}" ]; then run_rank "$stage" "$@"; return; fi
  while [ $# -gt 0 ]; do
    case "$1" in
      --hostfile) HOSTFILE=$2; shift 2 ;;
      --num_nodes) NNODES=$2; shift 2 ;;
      --node_rank) NODE_RANK=$2; shift 2 ;;
      --master_addr) MASTER_ADDR=$2; shift 2 ;;
      --master_port) MASTER_PORT=$2; MASTER_PORT_GIVEN=$2; shift 2 ;;
      --launcher) LAUNCHER=$2; shift 2 ;;
      --no_ssh) LAUNCHER=no_ssh; shift ;;
      --*) echo "launch/$stage.sh: unknown option $1 (options before CONFIG: --hostfile --num_nodes --node_rank --master_addr --master_port --launcher --no_ssh)" >&2; exit 2 ;;
      *) break ;;
    esac
  done
  if [ $# -lt 1 ]; then echo "usage: launch/$stage.sh [launcher options] CONFIG.yaml [key.sub=value ...]" >&2; exit 2; fi
  local config=$1
  shift
  if [ ! -f "$config" ]; then echo "launch/$stage.sh: config file '$config' not found" >&2; exit 2; fi
  CLLM4REC_STATUS_FILE=$(mktemp)
  export CLLM4REC_STATUS_FILE
  local status=0
  runner_args || exit 2
  if over_pdsh; then
    run_pdsh_job "$stage" "$config" "$@" || status=$?
  else
    trap '' TERM USR1  # this script and the runner it starts stay to report the outcome
    deepspeed "${RUNNER_ARGS[@]}" --module trainer.cli "$stage" --config "$config" "$@" || status=$?
  fi
  if [ "$status" != 0 ] && { [ "$status" = "$EXIT_PREEMPTED" ] || grep -q preempted "$CLLM4REC_STATUS_FILE" || remote_status_says_preempted; }; then
    echo "launch/$stage.sh: preempted; a checkpoint was saved: rerun with --resume auto" >&2
    status=$EXIT_PREEMPTED
  fi
  rm -f "$CLLM4REC_STATUS_FILE"
  return "$status"
}

over_pdsh() { [ -n "${HOSTFILE:-}" ] && [ "${LAUNCHER:-pdsh}" = pdsh ]; }

# The hosts of a pdsh launch, comma-separated: the first NNODES of HOSTFILE.
pdsh_hosts() {
  grep -E "$HOST_LINE" "$HOSTFILE" | head -n "$NNODES" | awk '{print $1}' | paste -sd, -
}

# run_pdsh_job STAGE CONFIG [args]: the deepspeed runner over pdsh, in a session of its own.
# Signalled, that runner stops the job with `pkill -f "python -u -m deepspeed.launcher.launch"`
# on every node, which also ends every other DeepSpeed job started from the same python there.
# So the signal goes to this script alone, which stops the launchers of this job only (the ones
# with its --master_port); they give their ranks SIGTERM (save, stop; SIGKILL after 30 s) and the
# runner returns once every node's ranks are done.
run_pdsh_job() {
  local stage=$1 config=$2
  shift 2
  trap 'stop_nodes' TERM USR1
  setsid -w deepspeed "${RUNNER_ARGS[@]}" --module trainer.cli "$stage" --config "$config" "$@" &
  local runner=$! code=0
  while true; do
    code=0
    wait "$runner" || code=$?
    if [ "$code" -le 128 ] || ! kill -0 "$runner" 2>/dev/null; then break; fi  # else a trap interrupted the wait
  done
  trap - TERM USR1
  return "$code"
}

stop_nodes() {
  echo "launch: signalled; stopping the ranks of every node of this job (they save a checkpoint first)" >&2
  # Anchored: pdsh and ssh carry the same words in their command lines. A node whose launcher has
  # already ended is fine (`; true`); a node that cannot be reached is reported.
  PDSH_RCMD_TYPE=ssh pdsh -S -w "$(pdsh_hosts)" \
    "pkill -TERM -f '^[^ ]*python[^ ]* -u -m deepspeed[.]launcher[.]launch .*--master_port=$MASTER_PORT'; true" \
    >/dev/null || echo "launch: could not reach every node to stop it (see pdsh above); stop the ranks there with kill -TERM" >&2
}

# Rank 0 writes the status file on its own node, the first host; read it there when that is not
# this machine.
remote_status_says_preempted() {
  over_pdsh || return 1
  local first
  first=$(pdsh_hosts | cut -d, -f1)
  PDSH_RCMD_TYPE=ssh pdsh -N -w "$first" "cat '$CLLM4REC_STATUS_FILE' 2>/dev/null; rm -f '$CLLM4REC_STATUS_FILE'" 2>/dev/null | grep -q preempted
}
