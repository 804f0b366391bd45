"""One process of test_sharded_load's multi-process test (started by tests.multiprocess.launch).

  python -m tests.sharded_load_worker HF_DIR MODEL_CONFIG_JSON MESH_JSON [OTHERS_JSON]

Loads the HF checkpoint with `load_sharded` (float32) onto the mesh, measuring this process's RSS
(before, and its peak during the load), then checks every addressable shard against the file, read
again tensor by tensor. OTHERS_JSON is a list of [path, model config] of small checkpoints in other
formats, each loaded sharded and compared with `load_params`. Prints one JSON line of figures last.
"""

from __future__ import annotations

import json
import os
import sys
import time

from tests.multiprocess import worker_init


def rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
  """This process's peak RSS (VmHWM).

  Not getrusage's ru_maxrss: Linux carries it across exec, so a child of a big parent (pytest
  after other tests) starts with the parent's peak and the figure says nothing about the load.
  """
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak_rss():
  """Sets VmHWM to the current RSS (Linux >= 4.0), so that the peak read after is the load's."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass  # then VmHWM is the peak since exec: higher, never lower, than the load's


def _shardings(mesh: dict):
  from gemma2_jax.model.transformer import LOGICAL_AXES
  from gemma2_jax.parallel.sharding import DEFAULT_RULES, logical_to_sharding, make_mesh
  return logical_to_sharding(LOGICAL_AXES, make_mesh(mesh), DEFAULT_RULES)


def _leaves(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _leaves(v, (*prefix, k))
    else:
      yield (*prefix, k), v


def check_against_file(path, cfg, params) -> tuple[int, int]:
  """(shards checked, bytes of the distinct blocks this process holds).

  The expected leaves are rebuilt here from the raw tensors with the HF table's to_native only
  (checked against transformers in test_checkpoint), not with the loader's block code.
  """
  import numpy as np

  from gemma2_jax.checkpoint import hf
  from gemma2_jax.checkpoint.safetensors_io import SafetensorsReader

  reader = SafetensorsReader(path)
  arrays = dict(_leaves(params))
  checked = held = 0
  for leaf_path, arr in arrays.items():
    expected = np.zeros(arr.shape, np.float32)  # zero: the embedding's padding rows
    for entry in hf.entries(cfg):
      if entry.path != leaf_path:
        continue
      for key, index in entry.keys(cfg):
        value = entry.to_native(reader.get(key))
        if index:
          expected[index] = value
        else:
          expected[: value.shape[0]] = value
    seen = set()
    for shard in arr.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index],
                                    err_msg="/".join(leaf_path))
      checked += 1
      bounds = tuple(s.indices(n)[:2] for s, n in zip(shard.index, arr.shape, strict=True))
      if bounds not in seen:
        seen.add(bounds)
        held += shard.data.nbytes
    del expected
  return checked, held


def check_other(path, cfg, shardings) -> int:
  import jax
  import numpy as np

  from gemma2_jax.checkpoint import load_params, load_sharded

  _, host = load_params(path, "bfloat16", config=cfg)
  _, arrays = load_sharded(path, "bfloat16", shardings, config=cfg)
  checked = 0
  for got, want in zip(jax.tree.leaves(arrays), jax.tree.leaves(host), strict=True):
    for shard in got.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data, np.float32),
                                    np.asarray(want[shard.index], np.float32), err_msg=str(path))
      checked += 1
  return checked


def main(argv: list[str]) -> None:
  worker_init()
  import jax

  from gemma2_jax.checkpoint import load_sharded
  from gemma2_jax.model.config import ModelConfig

  path, cfg, mesh = argv[0], ModelConfig.from_dict(json.loads(argv[1])), json.loads(argv[2])
  shardings = _shardings(mesh)
  reset_peak_rss()
  baseline = rss_bytes()
  start = time.perf_counter()
  _, params = load_sharded(path, "float32", shardings, config=cfg)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  peak = peak_rss_bytes()
  checked, held = check_against_file(path, cfg, params)
  del params
  others = 0
  for other, other_cfg in json.loads(argv[3]) if len(argv) > 3 else []:
    others += check_other(other, ModelConfig.from_dict(other_cfg), shardings)
  print(json.dumps({"process": jax.process_index(), "baseline": baseline, "peak": peak,
                    "increase": peak - baseline, "seconds": seconds, "checked_shards": checked,
                    "held": held, "other_shards": others}), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
