#!/usr/bin/env bash
# Usage: launch/pretrain.sh [--hostfile F --master_addr A ... | --no_ssh --node_rank R ...] CONFIG.yaml [key.sub=value ...]
# Runs the pretrain recipe under the deepspeed launcher: NPROC ranks on this machine, or on
# every node of a hostfile (launcher options and variables: launch/common.sh, README "Multi-node").
set -euo pipefail
source "$(dirname "$0")/common.sh"
launch pretrain "$@"
