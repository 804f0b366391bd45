"""The README's table: every released config's jobs, compiled for TPU slices on this CPU host.

  pip install -e ".[tpu]"
  python scripts/aot_table.py [--topologies v5p,v5e] > table.md

Runs `python -m gemma2_jax.aot` (train, eval and, for distillation configs, teacher_logits steps; the
per-host plan) once per config and topology, each in its own process, and prints a markdown table of
per-chip peak memory (GiB of the chip's HBM) and the per-host figures. A part that does not fit stops
that row (aot exits at the first such part).
"""

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ["--config.teacher.preset=gemma2_27b"]
# config -> (v5p topology it is sized for (its docstring), extra overrides)
RELEASED = {
  "pretrain_2b": ("v5p:4x4x4", []),
  "pretrain_9b": ("v5p:4x4x4", []),
  "pretrain_27b": ("v5p:4x4x8", []),
  "continue_pretrain_ko_9b": ("v5p:4x4x2", []),
  "distill_2b": ("v5p:4x4x4", TEACHER),
  "distill_9b": ("v5p:4x4x8", TEACHER),
}
V5E = "v5e:16x16"  # the largest v5e slice: 256 chips of 16 GiB


def run(config: str, topology: str, extra: list[str]) -> dict:
  cmd = [sys.executable, "-m", "gemma2_jax.aot", f"--config=configs/{config}.py",
         f"--topology={topology}", *extra]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
  out = r.stdout
  row = {"rc": r.returncode}
  for part in ("train step", "eval step", "teacher_logits step"):
    m = re.search(rf"^{part} per chip: .*peak ([\d.]+) GiB", out, re.M)
    if m:
      row[part] = float(m.group(1))
    elif re.search(rf"{part} DOES NOT FIT", out):
      row[part] = "does not fit"
  for key, pattern in (("hosts", r"^hosts: (\d+) in (\d+) data groups"),
                       ("init_from", r"^init_from: each host reads at most ([\d.]+) GiB"),
                       ("teacher", r"^teacher: each host reads at most ([\d.]+) GiB"),
                       ("export", r"^export: .* at most ([\d.]+) GiB")):
    m = re.search(pattern, out, re.M)
    if m:
      row[key] = "/".join(m.groups())
  if "train step" not in row:
    err = (r.stderr.strip().splitlines() or ["?"])[-1]
    row["error"] = err[:120]
  return row


def _cell(row: dict, key: str) -> str:
  v = row.get(key, "-")
  return f"{v:.1f}" if isinstance(v, float) else str(v)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--topologies", default="v5p,v5e", help="v5p (each config's own), v5e, or both")
  args = parser.parse_args()
  kinds = args.topologies.split(",")
  print("| config | slice | train | eval | teacher_logits | hosts / data groups | init_from GiB/host "
        "| teacher GiB/host | export GiB (host 0) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for config, (v5p, extra) in RELEASED.items():
    for topology in [t for k, t in (("v5p", v5p), ("v5e", V5E)) if k in kinds]:
      row = run(config, topology, extra)
      cells = [_cell(row, k) for k in ("train step", "eval step", "teacher_logits step", "hosts",
                                         "init_from", "teacher", "export")]
      print(f"| {config} | {topology} | " + " | ".join(cells) + " |"
            + (f" {row['error']}" if "error" in row else ""), flush=True)


if __name__ == "__main__":
  main()
