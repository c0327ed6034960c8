#!/usr/bin/env bash
# Usage: launch/pretrain.sh CONFIG.yaml [key.sub=value ...]
# Runs the pretrain recipe on NPROC ranks of this machine under the deepspeed launcher.
set -euo pipefail
source "$(dirname "$0")/common.sh"
if [ $# -lt 1 ]; then echo "usage: $0 CONFIG.yaml [key.sub=value ...]" >&2; exit 2; fi
launch pretrain "$@"
