#!/usr/bin/env bash
''':'
# Usage: launch/finetune.sh [--hostfile F --master_addr A ... | --no_ssh --node_rank R ...] CONFIG.yaml [key.sub=value ...]
#    or: deepspeed --no_python [runner options] launch/finetune.sh CONFIG.yaml [key.sub=value ...]
# Runs the finetune recipe under the deepspeed launcher: NPROC ranks on this machine, or on
# every node of a hostfile (launcher options and variables: launch/common.sh, docs/launching.md).
# Started by the deepspeed launcher itself, it is one rank and runs that rank.
# This file is also valid Python: `deepspeed launch/finetune.sh` without --no_python hands it to
# Python, which then says what to type instead of failing on a syntax error.
set -euo pipefail
source "$(dirname "$0")/common.sh"
launch finetune "$@"
exit $?
: <<'PYTHON'
'''
import sys

sys.exit("launch/finetune.sh is a shell script: under the deepspeed launcher add --no_python, as in "
         "deepspeed --no_python [runner options] launch/finetune.sh CONFIG.yaml [key.sub=value ...]; "
         "or run bash launch/finetune.sh CONFIG.yaml ..., which starts the launcher itself")
PYTHON
