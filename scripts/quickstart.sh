#!/usr/bin/env bash
# Sets up .venv and runs the CPU demo on the shipped Korean sample: pre-trains a tiny Gemma 2 teacher,
# distills a tiny student from it, trains the same student with CE alone, and prints the comparison,
# greedy Korean continuations from the three models, and where the loss-curve plot is.
# Re-running continues in the same workdirs (finished runs just re-evaluate); pass another parent
# directory as $1 to start over. The post-training demo (scripts/post_train_demo.py: SFT of the
# teacher on Korean instructions, off- and on-policy distillation) starts from these runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh demo
.venv/bin/python scripts/distill_demo.py --runs "${1:-runs}"
echo
echo "next, post-training (a few minutes): .venv/bin/python scripts/post_train_demo.py --runs ${1:-runs}"
