"""The README's table: every released config's jobs, compiled for TPU slices on this CPU host.

  pip install -e ".[tpu]"
  python scripts/aot_table.py [--topologies v5p,v5e] > table.md

Runs `python -m gemma2_jax.aot` (train, eval and, for distillation configs, teacher_logits steps; the
per-host plan) once per config and topology, each in its own process, and prints a markdown table of
per-chip peak memory (GiB of the chip's HBM), the per-host figures and the train step's compile time.
v5p runs each config on the slice it is sized for; v5e (16 GiB chips) with the changes listed in V5E.
A part that does not fit stops that row (aot exits at the first such part); --log_dir keeps every
run's full report (FLOPs per chip included).

  python scripts/aot_table.py --sampler > sampler_table.md
  python scripts/aot_table.py --smoke   # one tiny row: checks that the table still builds

prints the sampler's table instead: `python -m gemma2_jax.aot --sample` for each of SAMPLER (the 27B
teacher writing SFT responses, the 9B), per-chip peak GiB of prefill and decode, params and KV cache.
"""

import argparse
import ast
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
# v5e chips hold 16 GiB: each config on a v5e slice with the fewest changes that make it divide and fit:
# one sequence per batch shard per micro-batch, and full remat (dot-saving remat keeps the matmul
# outputs of a whole 8k sequence: 16 GiB at 2B already).
V5E = {
  "pretrain_2b": ("v5e:16x16", ["--config.train.grad_accum_steps=2", "--config.model.remat=full"]),
  "pretrain_9b": ("v5e:16x16", ["--config.train.grad_accum_steps=4", "--config.model.remat=full"]),
  "pretrain_27b": ("v5e:16x16", ["--config.model.remat=full"]),
  "continue_pretrain_ko_9b": ("v5e:8x8", ["--config.train.grad_accum_steps=4",
                                          "--config.model.remat=full"]),
  "distill_2b": ("v5e:16x16", ["--config.train.grad_accum_steps=2", "--config.model.remat=full"]),
  "distill_9b": ("v5e:16x16", ["--config.train.grad_accum_steps=2", "--config.model.remat=full"]),
}

# Further v5p rows: the 27B-teacher distillation on 8 chips (64 micro-batches of one sequence per chip).
V5P_EXTRA = [("distill_9b", "v5p:2x2x2", TEACHER + ["--config.train.grad_accum_steps=64"])]

# --smoke: the quickstart's tiny config on one v5p host (its table row, in seconds).
SMOKE = ("pretrain_tiny", "v5p:2x2x1", [])

# The sampler (`python -m gemma2_jax.sample`, e.g. the teacher writing SFT responses with --chat):
# (preset, topology, batch_size, prompt_len, max_new_tokens). v5p:2x2x1 is one host, as sample runs.
SAMPLER = [
  ("gemma2_27b", "v5p:2x2x1", 64, 2048, 1024),
  ("gemma2_27b", "v5p:2x2x1", 128, 2048, 1024),
  ("gemma2_27b", "v5p:2x2x2", 64, 2048, 1024),
  ("gemma2_9b", "v5p:2x2x1", 64, 2048, 1024),
]


def run_sampler(preset: str, topology: str, batch: int, prompt_len: int, new_tokens: int,
                log_dir: Path | None = None) -> tuple[list[str], str]:
  cmd = [sys.executable, "-m", "gemma2_jax.aot", "--sample", f"--preset={preset}",
         f"--topology={topology}", f"--batch_size={batch}", f"--prompt_len={prompt_len}",
         f"--max_new_tokens={new_tokens}"]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
  out = r.stdout
  if log_dir is not None:
    (log_dir / f"sample.{preset}.{topology.replace(':', '_')}.b{batch}.txt").write_text(
      out + r.stderr[-4000:])
  cells = []
  for pattern in (r"^sampler .* mesh (\{.*?\}),", r"^params per chip ([\d.]+) GiB",
                  r"^params .* KV cache [\d.]+ GiB in all, ([\d.]+) GiB per chip"):
    m = re.search(pattern, out, re.M)
    cells.append(m.group(1) if m else "-")
  if cells[0] != "-":  # {'tensor': 4} -> tensor=4
    cells[0] = ",".join(f"{k}={v}" for k, v in ast.literal_eval(cells[0]).items())
  for part in ("prefill", "decode"):
    m = re.search(rf"^{part} per chip: .*peak ([\d.]+) GiB.*compiled in (\d+) s", out, re.M)
    cells.append(f"{float(m.group(1)):.1f} ({m.group(2)} s)" if m else
                 "does not fit" if "DOES NOT FIT" in out else "-")
  err = "" if r.returncode == 0 else " " + ((r.stderr.strip().splitlines() or ["?"])[-1])[:120]
  return cells, err


def sampler_table(log_dir: Path | None):
  print("| model | slice | mesh | rows | prompt + new tokens | params GiB/chip | KV cache GiB/chip "
        "| prefill (compile s) | decode (compile s) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for preset, topology, batch, prompt_len, new_tokens in SAMPLER:
    cells, err = run_sampler(preset, topology, batch, prompt_len, new_tokens, log_dir)
    print(f"| {preset} | {topology} | {cells[0]} | {batch} | {prompt_len} + {new_tokens} | "
          + " | ".join(cells[1:]) + " |" + err, flush=True)


def run(config: str, topology: str, extra: list[str], log_dir: Path | None = None) -> dict:
  cmd = [sys.executable, "-m", "gemma2_jax.aot", f"--config=configs/{config}.py",
         f"--topology={topology}", *extra]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
  out = r.stdout
  if log_dir is not None:  # the full report (FLOPs, compile times) of each run
    (log_dir / f"{config}.{topology.replace(':', '_')}.txt").write_text(out + r.stderr[-4000:])
  row = {"rc": r.returncode}
  for part in ("train step", "eval step", "teacher_logits step"):
    m = re.search(rf"^{part} per chip: .*peak ([\d.]+) GiB", out, re.M)
    if m:
      row[part] = float(m.group(1))
    elif re.search(rf"{part} DOES NOT FIT", out):
      row[part] = "does not fit"
  m = re.search(r"^train step per chip: .*compiled in (\d+) s", out, re.M)
  if m:
    row["compile s"] = m.group(1)
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
  parser.add_argument("--configs", default=",".join(RELEASED), help="comma-separated subset")
  parser.add_argument("--log_dir", type=Path, default=None, help="keep each run's output here")
  parser.add_argument("--sampler", action="store_true", help="the sampler's table (SAMPLER) instead")
  parser.add_argument("--smoke", action="store_true",
                      help=f"only {SMOKE[0]} on {SMOKE[1]}: a quick check that the table still builds "
                           "(tests/test_scripts.py)")
  args = parser.parse_args()
  if args.log_dir:
    args.log_dir.mkdir(parents=True, exist_ok=True)
  if args.sampler:
    return sampler_table(args.log_dir)
  kinds = args.topologies.split(",")
  print("| config | slice | changes | train | eval | teacher_logits | hosts / data groups "
        "| init_from GiB/host | teacher GiB/host | export GiB (host 0) | train compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  configs = args.configs.split(",")
  jobs = []
  for config in configs:
    v5p, extra = RELEASED[config]
    jobs += [(config, v5p, extra)] if "v5p" in kinds else []
    jobs += [(config, V5E[config][0], extra + V5E[config][1])] if "v5e" in kinds else []
  jobs += [job for job in V5P_EXTRA if "v5p" in kinds and job[0] in configs]
  if args.smoke:
    jobs = [SMOKE]
  for config, topology, overrides in jobs:
    row = run(config, topology, overrides, args.log_dir)
    changes = " ".join(o.removeprefix("--config.") for o in overrides if o not in TEACHER) or "-"
    cells = [_cell(row, k) for k in ("train step", "eval step", "teacher_logits step", "hosts",
                                       "init_from", "teacher", "export", "compile s")]
    print(f"| {config} | {topology} | {changes} | " + " | ".join(cells) + " |"
          + (f" {row['error']}" if "error" in row else ""), flush=True)


if __name__ == "__main__":
  main()
