#!/usr/bin/env bash
# Sets up .venv and runs the CPU demo: a tiny Gemma 2 pre-trained on the shipped Korean sample.
# Re-running continues in the same workdir (a finished run just re-evaluates); pass a new workdir
# as $1 to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
workdir=${1:-runs/pretrain_tiny}
.venv/bin/python -m gemma2_jax.train --config=configs/pretrain_tiny.py --workdir="$workdir"
