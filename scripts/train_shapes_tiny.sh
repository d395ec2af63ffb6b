#!/usr/bin/env bash
# The longer CPU run: configs/shapes_tiny.py from scratch on the synthetic shapes dataset
# (~25 min on 2 cores), COCO bbox/segm AP on the held-out split every 250 steps and at the end.
#
#   scripts/train_shapes_tiny.sh [WORKDIR] [--config.field=value ...]
#
# Prints the AP curve at the end; TensorBoard scalars are in WORKDIR/tb. Running it again
# on the same WORKDIR resumes from the latest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
workdir=${1:-runs/shapes_tiny}
[ $# -gt 0 ] && shift
py=${PYTHON:-.venv/bin/python}
mkdir -p "$workdir"
start=$(date +%s)
"$py" -m mrcnn_jax.cli train --config configs/shapes_tiny.py --workdir "$workdir" "$@" 2>&1 \
  | grep --line-buffered -v -e '^WARNING: All log messages' -e 'oneDNN custom operations' \
  | tee -a "$workdir/train.log"
echo
echo "held-out AP curve ($(( $(date +%s) - start )) s wall):"
grep -E '^eval at step' "$workdir/train.log" || echo "(no evaluation ran)"
