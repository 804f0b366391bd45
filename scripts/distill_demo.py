"""KD vs CE on CPU: train a tiny teacher, distill a tiny student from it, train the same student with CE
alone, and compare eval loss at equal steps.

  .venv/bin/python scripts/distill_demo.py [--runs runs]

Each stage is a `python -m gemma2_jax.train` run in its own workdir under --runs (re-running resumes
or, for finished runs, just re-evaluates). Prints the eval loss / bits per byte of both students at
every eval step and the verdict.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(config: str, workdir: Path, *overrides: str):
  cmd = [sys.executable, "-m", "gemma2_jax.train", f"--config={config}", f"--workdir={workdir}",
         *overrides]
  print("$", " ".join(cmd[1:]), flush=True)
  subprocess.run(cmd, cwd=ROOT, check=True)


def evals(workdir: Path) -> dict[int, dict]:
  rows = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if "eval_loss" in row:
      rows[row["step"]] = row
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--runs", default="runs", help="parent directory of the three workdirs")
  a = p.parse_args()
  runs = (ROOT / a.runs).resolve()
  teacher = runs / "pretrain_tiny"
  train("configs/pretrain_tiny.py", teacher)
  teacher_ckpt = f"--config.teacher.checkpoint={teacher / 'hf_step200'}"
  train("configs/distill_tiny.py", runs / "distill_tiny", teacher_ckpt)
  train("configs/distill_tiny.py", runs / "ce_tiny", teacher_ckpt, "--config.distill.alpha=0.0")
  kd, ce = evals(runs / "distill_tiny"), evals(runs / "ce_tiny")
  print("\nstep  eval_loss KD  eval_loss CE  bpb KD  bpb CE")
  for step in sorted(set(kd) & set(ce)):
    print(f"{step:4d}  {kd[step]['eval_loss']:12.4f}  {ce[step]['eval_loss']:12.4f}  "
          f"{kd[step]['eval_bits_per_byte']:6.3f}  {ce[step]['eval_bits_per_byte']:6.3f}")
  last = max(set(kd) & set(ce))
  gain = ce[last]["eval_loss"] - kd[last]["eval_loss"]
  verdict = "learns faster" if gain > 0 else "does NOT learn faster"
  print(f"distilled student {verdict} than CE alone: eval loss {kd[last]['eval_loss']:.4f} vs "
        f"{ce[last]['eval_loss']:.4f} at step {last} ({gain:+.4f} nats)")


if __name__ == "__main__":
  main()
