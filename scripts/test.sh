#!/usr/bin/env bash
# Installs the project with its test extras into .venv, then runs ruff and the default (non-slow) tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
.venv/bin/ruff check gemma2_jax tests scripts configs
.venv/bin/python -m pytest -q "$@"
