"""The README's commands run as written from a fresh clone after its setup: every `python -m
gemma2_jax.<command>` and `scripts/<name>.py` it shows starts (`--help`) in a plain environment, from
the repository root, with nothing on PYTHONPATH; every script it names exists. (Each script's real run
at tiny sizes is tests/test_scripts.py.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The README as one line: inline commands wrap across lines.
README = " ".join((ROOT / "README.md").read_text().split())
MODULES = sorted(set(re.findall(r"python -m (gemma2_jax\.[a-z_]+)", README)))
SCRIPTS = sorted(set(re.findall(r"\bscripts/([a-z_]+\.(?:py|sh))\b", README)))


def plain_env() -> dict:
  """A user's shell after the setup: no PYTHONPATH, no test-only XLA flags."""
  drop = ("PYTHONPATH", "XLA_FLAGS")
  return dict({k: v for k, v in os.environ.items() if k not in drop}, JAX_PLATFORMS="cpu")


def help_run(argv: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, env=plain_env(),
                        capture_output=True, text=True, timeout=300)


def test_readme_commands_need_no_environment_tweaks():
  assert MODULES and SCRIPTS
  assert "PYTHONPATH" not in README, "README commands must run as written, without PYTHONPATH"
  missing = [name for name in SCRIPTS if not (ROOT / "scripts" / name).is_file()]
  assert not missing, f"README names scripts that do not exist: {missing}"


def test_readme_commands_start():
  argvs = [["-m", m] for m in MODULES]
  argvs += [[f"scripts/{name}"] for name in SCRIPTS if name.endswith(".py")]
  with ThreadPoolExecutor(max_workers=2) as pool:
    runs = list(zip(argvs, pool.map(help_run, argvs), strict=True))
  failed = [f"python {' '.join(argv)} --help: exit {r.returncode}\n{r.stderr[-1500:]}"
            for argv, r in runs if r.returncode != 0 or "usage" not in r.stdout.lower()]
  assert not failed, "\n".join(failed)
