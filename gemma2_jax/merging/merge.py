"""A merge from a mergekit-style YAML to a new checkpoint directory, tensor by tensor.

Each output tensor is planned first (every parameter resolved and checked, every model opened and
compared), then computed and written a block of rows at a time, so a bad config fails before anything
is read and memory stays at a few blocks per model. Everything is written under a temporary sibling of
`output` and moved into place at the end: a merge that fails leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from etils import epath

from gemma2_jax import paths
from gemma2_jax.checkpoint.convert import convert
from gemma2_jax.merging import kernels
from gemma2_jax.merging.config import MergeConfig, MergeError, layer_position, load_config, resolve
from gemma2_jax.merging.sources import check_same_model, hf_specs, open_source, split_lora
from gemma2_jax.merging.writer import HFWriter

# What mergekit copies from the tokenizer's donor model.
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "generation_config.json", "chat_template.jinja",
                   "chat_template.json")
OUTPUTS = ("hf", "native")


def parse_etas(text: str) -> list[float]:
  """`--liti 0.3,0.5,1`: distinct finite numbers."""
  etas = []
  for part in str(text).split(","):
    try:
      eta = float(part)
    except ValueError:
      raise MergeError(f"--liti {text}: {part!r} is not a number") from None
    if not math.isfinite(eta):
      raise MergeError(f"--liti {text}: {part!r} is not finite")
    if eta in etas:
      raise MergeError(f"--liti {text}: eta {eta:g} is given twice")
    etas.append(eta)
  return etas


def liti_name(eta: float) -> str:
  return f"eta_{eta:g}"


def merge(config: MergeConfig | str | os.PathLike, output: str | os.PathLike, *, to: str = "hf",
          liti: list[float] | None = None, seed: int = 0, max_shard_bytes: int = 5 * 10**9,
          chunk_elements: int = kernels.CHUNK_ELEMENTS, progress=None) -> list[Path]:
  """Merges the models of `config` (a MergeConfig or a YAML path) into the new directory `output`.

  `to`: "hf" (streamed) or "native" (the merged HF tensors converted like `convert`, which holds the
  model in memory once). `liti`: WARP's LITI, (1 - eta) theta_base + eta theta_merged: one checkpoint
  per eta, `output/eta_<eta>`. `seed`: DARE's random masks. `progress`: a tqdm-like bar (reset to the
  number of tensors). Returns the checkpoint directories written.
  """
  cfg = config if isinstance(config, MergeConfig) else load_config(config)
  if to not in OUTPUTS:
    raise MergeError(f"unknown output format {to!r}; one of {', '.join(OUTPUTS)}")
  if paths.is_remote(output):
    raise MergeError(f"--output {output}: write the merge to a local directory (then copy it)")
  output = Path(output)
  if output.exists() and (not output.is_dir() or any(output.iterdir())):
    raise MergeError(f"output path {output} already exists and is not empty; choose a new directory "
                     "(existing checkpoints are never overwritten)")
  etas = list(liti or [])
  if etas and cfg.base is None:
    raise MergeError("--liti interpolates from the base_model (theta_init) to the merge: the config "
                     "needs a base_model")
  donor = _tokenizer_donor(cfg)
  sources = [open_source(e.path) for e in cfg.inputs]
  reference = cfg.base if cfg.base is not None else 0
  check_same_model(sources, reference)
  out_cfg = sources[reference].cfg
  for s in sources:
    s.dtype = np.dtype(cfg.dtype) if cfg.dtype else None
  stored = {s.stored for s in sources}
  out_dtype = np.dtype(cfg.out_dtype or cfg.dtype or (stored.pop() if len(stored) == 1 else "float32"))
  specs = hf_specs(out_cfg)
  plan = []
  for name, shape in specs:
    shared, per = resolve(cfg, name, layer_position(name, out_cfg.num_layers))
    _check(cfg, shared, per, name)
    plan.append((name, shape, shared, per))

  kernel = kernels.kernel(cfg.method)
  base = cfg.base if cfg.method.base != "ignored" else None
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
  names = [liti_name(eta) for eta in etas] or [""]
  hf_dirs = [tmp / ("hf" if to == "native" else "out") / n for n in names]
  writers = []
  try:
    for d in hf_dirs:
      writers.append(HFWriter(d, out_cfg, specs, out_dtype, max_shard_bytes))
    if progress is not None:
      progress.reset(total=len(plan))
    for index, (name, shape, shared, per) in enumerate(plan):
      group = kernels.Group(name, shape, lambda i, r0, r1, name=name: sources[i].read(name, r0, r1),
                            len(sources), base, index, chunk_elements)
      for r, block in zip(group.ranges, kernel(group, shared, per, seed), strict=True):
        if etas:
          init = group.rows(cfg.base, r)
          for w, eta in zip(writers, etas, strict=True):
            w.write(name, kernels.liti(init, block, eta))
        else:
          writers[0].write(name, block)
        del block
      del group
      if progress is not None:
        progress.update(1)
    for w in writers:
      w.close()
    outs = [tmp / "out" / n for n in names]
    if to == "native":
      for src, dst in zip(hf_dirs, outs, strict=True):
        convert(src, dst, "native", dtype=out_dtype.name, config=out_cfg)
        shutil.rmtree(src)
    for out, eta in zip(outs, etas or [None], strict=True):
      _copy_tokenizer(donor, out)
      note = f"# python -m gemma2_jax.merge, seed {seed}" + (f", LITI eta={eta:g}" if eta is not None else "")
      (out / "merge.yaml").write_text(note + "\n" + cfg.text)
    if output.exists():
      output.rmdir()
    os.replace(tmp / "out", output)
  finally:
    for w in writers:
      w.abort()
    shutil.rmtree(tmp, ignore_errors=True)
  return [output / n for n in names] if etas else [output]


def _check(cfg: MergeConfig, shared: dict, per: list[dict], name: str):
  """What mergekit would compute as inf / nan, refused before anything is written."""
  if cfg.method.name == "linear" and shared["normalize"]:
    total = np.float32(0)
    for p in per:
      total += np.float32(p["weight"])
    if total == 0:
      raise MergeError(f"{cfg.source}: merge_method linear with normalize: the weights of tensor {name} "
                       "sum to 0")


def _tokenizer_donor(cfg: MergeConfig) -> epath.Path | None:
  """Whose tokenizer files the merge carries: tokenizer_source (base or a path), else the base model's,
  else the first model's (mergekit's choice)."""
  tok = cfg.tokenizer_source
  if tok is None or tok == "base":
    return paths.as_path(split_lora(cfg.inputs[cfg.base if cfg.base is not None else 0].path)[0])
  donor = paths.as_path(tok)
  if not donor.is_dir():
    raise MergeError(f"{cfg.source}: tokenizer_source {tok} is not a directory")
  return donor


def _copy_tokenizer(donor: epath.Path | None, out: Path):
  if donor is None:
    return
  for name in TOKENIZER_FILES:
    src = donor / name
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
      if src.is_file():
        (out / name).write_bytes(src.read_bytes())
