"""KD vs CE on CPU: train a tiny teacher, distill a tiny student from it, train the same student with CE
alone, and compare eval loss at equal steps; then show what each model writes.

  .venv/bin/python scripts/distill_demo.py [--runs runs]

Each stage is a `python -m gemma2_jax.train` run in its own workdir under --runs (re-running resumes
or, for finished runs, just re-evaluates). Prints the eval loss / bits per byte of both students at
every eval step and the verdict, greedy Korean continuations of the same prompts from the teacher, the
KD student and the CE student (the KV-cache sampler, `gemma2_jax.generate`), and writes
`<runs>/loss_curves.png` (train and eval loss of the three runs).
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


# One line each: the corpus is read one document per line, so a newline would end the document.
PROMPTS = ["이 법은", "국회의원은", "대한민국은"]


def continuations(runs: dict[str, Path], max_new_tokens: int = 40):
  import logging

  from gemma2_jax import generate, load_model

  logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax notes on reading a workdir's params
  tokenizer = json.loads((runs["teacher"] / "config.json").read_text())["tokenizer"]
  texts = {name: generate(load_model(workdir), tokenizer, PROMPTS, max_new_tokens=max_new_tokens)
           for name, workdir in runs.items()}
  for i, prompt in enumerate(PROMPTS):
    print(f"\nprompt {i + 1}: {prompt!r}")
    for name in runs:
      print(f"  {name:>10}: {texts[name][i]!r}")


def plot(runs: dict[str, Path], path: Path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for name, workdir in runs.items():
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for ax, key in zip(axes, ("loss", "eval_loss"), strict=True):
      points = [(r["step"], r[key]) for r in rows if key in r]
      ax.plot(*zip(*points, strict=True), marker="o" if key == "eval_loss" else None, label=name)
  titles = ("train loss (each run's objective)", "eval loss (held-out bill, CE)")
  for ax, title in zip(axes, titles, strict=True):
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("nats / token")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


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
  models = {"teacher": teacher, "KD student": runs / "distill_tiny", "CE student": runs / "ce_tiny"}
  continuations(models)
  plot(models, runs / "loss_curves.png")
  print(f"\nloss curves (train and eval loss of the three runs): {runs / 'loss_curves.png'}")


if __name__ == "__main__":
  main()
