"""gs:// HF checkpoints are read by byte ranges: `load_sharded` fetches, per process, only the stored
rows its devices' blocks touch (one ranged GET per tensor), through a counting proxy in front of the
GCS emulator. Two real processes (fsdp=2, or tensor=2) each read their own rows of the tensors split
along their stored rows; a tensor split along its columns (row-major files: columns are not one byte
range) or replicated is read by rows split over the processes and exchanged on device, so between
them the processes read the checkpoint once."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from tests import multiprocess
from tests.gcs import CountingProxy, gcs_emulator  # noqa: F401  (the `gcs` fixture)

# Small but every tensor kind present; 8 stored vocab rows fewer than the model's (HF padding).
CFG_KW = dict(vocab_size=256, num_real_tokens=248, num_layers=2, d_model=128, num_heads=4,
              num_kv_heads=2, head_dim=32, ffn_dim=192, query_pre_attn_scalar=32)


def _cfg():
  from gemma2_jax.model.config import tiny
  return tiny(**CFG_KW)


def _hf_specs(cfg):
  """(name, shape, dtype) of every tensor of an fp32 HF checkpoint for `cfg`."""
  from gemma2_jax.checkpoint import hf
  from gemma2_jax.checkpoint.mapping import export_tensors
  return export_tensors(cfg, hf.entries(cfg), {}, np.float32, vocab_rows=cfg.num_real_tokens)[0]


def _write_hf_checkpoint(path, cfg):
  """A random fp32 HF checkpoint in several files (as released)."""
  from gemma2_jax.checkpoint import hf
  from gemma2_jax.checkpoint.safetensors_io import write_sharded

  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps(hf.config_to_hf(cfg, "float32")))
  specs = _hf_specs(cfg)
  produce = (np.random.default_rng(i).standard_normal(shape, np.float32)
             for i, (_, shape, _) in enumerate(specs))
  write_sharded(path, specs, produce, max_shard_bytes=2**18)


def _upload_dir(gcs, local, prefix: str) -> str:
  for f in sorted(local.rglob("*")):
    if f.is_file():
      gcs.upload(f"{prefix}/{f.relative_to(local)}", f.read_bytes())
  return gcs.path(prefix)


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory, gcs):
  """A random fp32 HF checkpoint for CFG (several files), local and uploaded: (local, gs://, layout)
  where layout is {object name: {tensor: (shape, data start in the file)}}."""

  local = tmp_path_factory.mktemp("ranges") / "hf"
  _write_hf_checkpoint(local, _cfg())
  layout = {}
  for f in sorted(local.glob("*.safetensors")):
    raw = f.read_bytes()  # the header parsed here, not by the reader under test
    n = int.from_bytes(raw[:8], "little")
    header, start = json.loads(raw[8:8 + n]), 8 + n
    header.pop("__metadata__", None)
    layout[f"ranges/hf/{f.name}"] = {k: (tuple(v["shape"]), start + v["data_offsets"][0])
                                     for k, v in header.items()}
  return local, _upload_dir(gcs, local, "ranges/hf"), layout


# --- one process --------------------------------------------------------------------------------------


def test_remote_tensor_reads_only_the_rows_asked_for(hf_ckpt, gcs, monkeypatch):
  from gemma2_jax.checkpoint.safetensors_io import RemoteTensor, SafetensorsReader
  local, remote, layout = hf_ckpt
  proxy = CountingProxy(gcs.url)
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
  try:
    reader, want = SafetensorsReader(remote), SafetensorsReader(local)
    del proxy.log[:]
    name = "model.layers.0.mlp.down_proj.weight"  # (d_model, ffn) fp32
    view = reader.view(name)
    assert isinstance(view, RemoteTensor) and view.shape == want.shape(name)
    assert not proxy.media_reads(whole=(".json",))  # opening reads nothing
    np.testing.assert_array_equal(view[3:7], want.get(name)[3:7])
    np.testing.assert_array_equal(view[5, 2:4], want.get(name)[5, 2:4])
    window = view.window([(10, 12), (11, 20), (40, 41)])
    np.testing.assert_array_equal(window[10:20], want.get(name)[10:20])
    np.testing.assert_array_equal(window[40], want.get(name)[40])
    (obj, _), = {(n, 0) for n, _, _ in proxy.media_reads(whole=(".json",))}
    start = layout[obj][name][1]
    row = view.row_bytes
    assert [(a - start, b - start) for _, a, b in proxy.media_reads(whole=(".json",))] == [
      (3 * row, 7 * row), (5 * row, 6 * row), (10 * row, 20 * row), (40 * row, 41 * row)]
  finally:
    proxy.close()


def test_stored_rows_of_each_hf_tensor():
  """The rows `fill` reads for a block, found from the table's to_native alone."""
  from gemma2_jax.checkpoint import hf
  from gemma2_jax.checkpoint.mapping import plan
  from gemma2_jax.checkpoint.sharded import stored_rows

  cfg = _cfg()
  shapes = {k: s for k, s, _ in _hf_specs(cfg)}
  slots = {s.key: s for s in plan(cfg, hf.entries(cfg), shapes.__getitem__)}
  D, N, H, F = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.ffn_dim
  every = slice(None)
  cases = [  # (tensor, native block, stored rows)
    ("model.layers.0.self_attn.q_proj.weight", (slice(1, 3), every, every), (H, 3 * H)),
    ("model.layers.0.self_attn.q_proj.weight", (every, slice(0, D // 2), every), (0, N * H)),
    ("model.layers.1.self_attn.k_proj.weight", (slice(1, 2), every, every), (H, 2 * H)),
    ("model.layers.0.self_attn.o_proj.weight", (every, every, slice(D // 2, D)), (D // 2, D)),
    ("model.layers.0.self_attn.o_proj.weight", (slice(0, 1), every, every), (0, D)),
    ("model.layers.0.mlp.down_proj.weight", (every, slice(0, D // 4)), (0, D // 4)),
    ("model.layers.0.mlp.up_proj.weight", (slice(F // 2, F), every), (F // 2, F)),
    ("model.layers.0.mlp.gate_proj.weight", (every, slice(0, 8)), (0, F)),
    ("model.norm.weight", (slice(0, D // 2),), (0, D // 2)),
    ("model.embed_tokens.weight", (slice(128, 256), every), (128, 248)),  # padded: 248 stored
    ("model.embed_tokens.weight", (slice(0, 128), slice(0, 64)), (0, 128)),
  ]
  for key, block, rows in cases:
    assert stored_rows(slots[key], shapes[key], block) == rows, key


# --- two processes ------------------------------------------------------------------------------------


def _needed_rows(cfg, mesh: dict, name: str, shape: tuple, pid: int) -> tuple[int, int]:
  """The stored rows process `pid` of two reads, written out from HF's layouts and DEFAULT_RULES
  (not from the loader). Tensors split along their stored rows (tensor=2: the output axis of the
  embedding and of q/k/v/gate/up, split by the padded vocab or the heads / ffn) are read by the
  process that holds them; every other tensor (split along its columns, or replicated) is read once
  between the two processes, half each, and exchanged on device."""
  rows = shape[0]
  if "tensor" in mesh and name.endswith(("embed_tokens.weight", "q_proj.weight", "k_proj.weight",
                                         "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
    half = (cfg.vocab_size if "embed_tokens" in name else rows) // 2
  else:
    half = rows // 2
  return pid * half, min(rows, (pid + 1) * half)


@pytest.mark.parametrize("mesh", [{"fsdp": 2}, pytest.param({"tensor": 2}, marks=pytest.mark.slow)])
def test_two_processes_read_only_their_rows(hf_ckpt, gcs, mesh):
  local, remote, layout = hf_ckpt
  cfg = _cfg()
  proxies = [CountingProxy(gcs.url), CountingProxy(gcs.url)]
  try:
    cmd = [sys.executable, "-m", "tests.test_gcs_ranges", remote, str(local),
           json.dumps(cfg.to_dict()), json.dumps(mesh), json.dumps([p.url for p in proxies])]
    results = multiprocess.run(cmd, num_processes=2, cli=False, timeout=300, extra_env=gcs.env)
    reads = [p.media_reads(whole=(".json",)) for p in proxies]
  finally:
    for p in proxies:
      p.close()
  reports = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
  assert sorted(r["process"] for r in reports) == [0, 1]
  total = sum(int(np.prod(shape)) * 4 for tensors in layout.values() for shape, _ in tensors.values())
  for r in reports:
    pid = r["process"]
    assert r["checked"] > 0
    data = [(o, a, b) for o, a, b in reads[pid]
            if b > min(start for _, start in layout[o].values())]  # not the header reads
    want, fetched = [], sorted(data)
    for obj, tensors in layout.items():
      for name, (shape, start) in tensors.items():
        lo, hi = _needed_rows(cfg, mesh, name, shape, pid)
        row = int(np.prod(shape[1:])) * 4
        want.append((obj, start + lo * row, start + hi * row))
    want = sorted(w for w in want if w[2] > w[1])
    assert fetched == want  # one ranged GET per tensor, exactly its rows
    nbytes = sum(b - a for _, a, b in fetched)
    print(f"\nmesh {mesh}: process {pid} read {nbytes:,} of {total:,} bytes ({nbytes / total:.2f})")
    assert nbytes <= 0.55 * total  # about half: nothing is read by both processes


def _worker(argv):
  remote, local, cfg_json, mesh_json, proxies_json = argv
  pid = int(os.environ["MP_PROCESS_ID"])
  os.environ["STORAGE_EMULATOR_HOST"] = json.loads(proxies_json)[pid]  # this process's own proxy
  from tests.multiprocess import worker_init
  worker_init()
  import fsspec.config
  fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"

  from gemma2_jax.checkpoint import load_params, load_sharded
  from gemma2_jax.model.config import ModelConfig
  from tests.sharded_load_worker import _shardings

  cfg = ModelConfig(**json.loads(cfg_json))
  _, params = load_sharded(remote, "float32", _shardings(json.loads(mesh_json)), config=cfg)
  _, want = load_params(local, "float32", config=cfg)
  import jax
  checked = 0
  for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
    for shard in got.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), ref[shard.index])
      checked += 1
  print(json.dumps({"process": jax.process_index(), "checked": checked}), flush=True)


if __name__ == "__main__":
  _worker(sys.argv[1:])
