"""`load_sharded`: every format straight onto a device mesh, equal to `load_params`, no device_put;
and two real processes each reading only their half of an HF checkpoint (peak RSS measured)."""

from __future__ import annotations

import json
import shutil
import sys

import jax
import numpy as np
import pytest

from gemma2_jax.checkpoint import kaggle, load_params, load_sharded, orbax_io, save_params
from gemma2_jax.checkpoint.manager import CheckpointConfig, TrainCheckpointer
from gemma2_jax.model.config import tiny
from gemma2_jax.model.transformer import LOGICAL_AXES, param_shapes
from gemma2_jax.parallel.sharding import DEFAULT_RULES, logical_to_sharding, make_mesh
from tests import multiprocess
from tests.gcs import gcs_emulator  # noqa: F401  (the `gcs` fixture)

# 128 embedding rows of which 120 are real: an HF export stores 120, so loading it pads 8 zero rows,
# and with vocab split over tensor=2 the padding lands inside the second block.
CFG = tiny(vocab_size=128, num_real_tokens=120)
FORMATS = ["hf", "native", "kaggle", "kaggle_2DF", "kaggle_120rows", "workdir"]


def _random_params(cfg, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s, np.float32), param_shapes(cfg),
                      is_leaf=lambda x: isinstance(x, tuple))


class _NoData:
  """The data-iterator side of a training checkpoint, which a weights read never looks at."""

  def get_state(self):
    return {}


def _write_workdir(path, cfg, params):
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps({"train": {}, "model": cfg.to_dict()}))
  ckpt = TrainCheckpointer(path, CheckpointConfig(async_save=False))
  for step, p in [(1, jax.tree.map(np.zeros_like, params)), (2, params)]:  # the newest must win
    state = {"step": np.int32(step), "params": p, "opt_state": {"mu": jax.tree.map(np.ones_like, p)}}
    ckpt.save(step, state, _NoData(), {})
  ckpt.close()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("ckpts")
  params = _random_params(CFG, 0)
  paths = {fmt: save_params(params, CFG, root / fmt, fmt) for fmt in ("hf", "native", "kaggle")}
  paths["kaggle_2DF"] = root / "kaggle_2DF"  # the released 2B's transposed gating layout
  orbax_io.save(paths["kaggle_2DF"], kaggle.to_raw_tree(params, CFG, np.float32, gating_transposed=True))
  paths["kaggle_120rows"] = root / "kaggle_120rows"  # only the real rows: Orbax pads the rest
  raw = kaggle.to_raw_tree(params, CFG, np.float32)
  emb = raw["transformer/embedder"]
  emb["input_embedding"] = np.ascontiguousarray(emb["input_embedding"][:CFG.num_real_tokens])
  orbax_io.save(paths["kaggle_120rows"], raw)
  paths["workdir"] = root / "workdir"
  _write_workdir(paths["workdir"], CFG, params)
  return params, paths


@pytest.fixture(scope="module")
def shardings():
  assert len(jax.devices()) == 8
  return logical_to_sharding(LOGICAL_AXES, make_mesh({"fsdp": 4, "tensor": 2}), DEFAULT_RULES)


def _bits(x):
  x = np.asarray(x)
  return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_equals_load_params_on_the_requested_shardings(checkpoints, shardings, fmt, dtype):
  params, paths = checkpoints
  cfg_host, host = load_params(paths[fmt], dtype, config=CFG)
  cfg, arrays = load_sharded(paths[fmt], dtype, shardings, config=CFG)
  assert cfg == cfg_host and cfg.param_dtype == dtype
  assert jax.tree.structure(arrays) == jax.tree.structure(host)
  flat_want = jax.tree_util.tree_flatten_with_path(shardings)[0]
  for (kp, want), got, ref in zip(flat_want, jax.tree.leaves(arrays), jax.tree.leaves(host),
                                  strict=True):
    name = jax.tree_util.keystr(kp)
    assert isinstance(got, jax.Array) and got.sharding == want, name
    assert got.dtype == np.dtype(dtype) and got.shape == ref.shape, name
    np.testing.assert_array_equal(_bits(got), _bits(ref), err_msg=name)
    for shard in got.addressable_shards:
      np.testing.assert_array_equal(_bits(shard.data), _bits(ref[shard.index]), err_msg=name)
  # Independent of load_params: the values written, the HF padding rows zero.
  emb = np.asarray(arrays["embedder"]["input_embedding"], np.float32)
  want = params["embedder"]["input_embedding"].astype(dtype).astype(np.float32)
  real = CFG.num_real_tokens if fmt in ("hf", "kaggle_120rows") else CFG.vocab_size
  np.testing.assert_array_equal(emb[:real], want[:real])
  assert not emb[real:].any()
  gating = np.asarray(arrays["layers"]["mlp"]["gating_einsum"], np.float32)
  np.testing.assert_array_equal(
    gating, params["layers"]["mlp"]["gating_einsum"].astype(dtype).astype(np.float32))


def test_hf_config_from_the_checkpoint(checkpoints, shardings):
  """Without `config`, an HF checkpoint's own (120-row) vocab is loaded, sharded over tensor=2."""
  _, paths = checkpoints
  cfg, arrays = load_sharded(str(paths["hf"]), "float32", shardings)
  assert cfg.vocab_size == 120
  _, host = load_params(paths["hf"])
  emb = arrays["embedder"]["input_embedding"]
  assert emb.shape == (120, CFG.d_model) and emb.sharding == shardings["embedder"]["input_embedding"]
  np.testing.assert_array_equal(emb, host["embedder"]["input_embedding"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_device_put_on_the_load_path(checkpoints, shardings, fmt, monkeypatch):
  """A host array put onto a multi-device sharding is what breaks on a pod (the cross-host equality
  check); putting one block onto its single device (what Orbax does per shard) is fine."""
  real = jax.device_put

  def guarded(x, device=None, *args, **kwargs):
    targets = [getattr(t, "sharding", t) for t in jax.tree.leaves(  # unwraps a Format
      device, is_leaf=lambda d: isinstance(d, (jax.sharding.Sharding, jax.Device)))]
    if any(isinstance(t, jax.sharding.Sharding) and len(t.device_set) > 1 for t in targets):
      raise AssertionError(f"jax.device_put onto {device} on the load path")
    return real(x, device, *args, **kwargs)

  monkeypatch.setattr(jax, "device_put", guarded)
  with pytest.raises(AssertionError, match="on the load path"):  # the guard itself works
    jax.device_put(np.zeros(8), shardings["embedder"]["input_embedding"])
  _, arrays = load_sharded(checkpoints[1][fmt], "bfloat16", shardings, config=CFG)
  assert arrays["layers"]["attn"]["q_einsum"].sharding == shardings["layers"]["attn"]["q_einsum"]


def test_wrong_shardings_tree_is_refused(checkpoints, shardings):
  bad = {k: v for k, v in shardings.items() if k != "final_norm"}
  with pytest.raises(ValueError, match="final_norm/scale is missing"):
    load_sharded(checkpoints[1]["hf"], "float32", bad, config=CFG)


@pytest.mark.parametrize("fmt", ["hf", "native", "kaggle", "workdir"])
def test_shape_mismatch_is_one_checkpoint_error(checkpoints, shardings, fmt):
  from gemma2_jax.checkpoint import CheckpointError
  other = CFG.replace(ffn_dim=CFG.ffn_dim * 2)
  with pytest.raises(CheckpointError, match="shape"):
    load_sharded(checkpoints[1][fmt], "float32", shardings, config=other)


def test_remote_hf_path_reads_whole_tensors(checkpoints, shardings, monkeypatch):
  """A gs:// file cannot be memory-mapped: the reader falls back to one whole tensor at a time."""
  from gemma2_jax.checkpoint import safetensors_io
  calls = []

  def remote(path):
    calls.append(path)
    return False

  monkeypatch.setattr(safetensors_io, "is_local", remote)
  monkeypatch.setattr(np, "memmap", None)  # any memory map would now fail
  _, arrays = load_sharded(checkpoints[1]["hf"], "float32", shardings, config=CFG)
  _, host = load_params(checkpoints[1]["hf"], config=CFG)
  assert calls
  for got, ref in zip(jax.tree.leaves(arrays), jax.tree.leaves(host), strict=True):
    np.testing.assert_array_equal(got, ref)


# --- two real processes, each reading half of an HF checkpoint ------------------------------------

def _num_leaves(cfg) -> int:
  return len(jax.tree.leaves(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)))


def _hf_specs(cfg):
  """(name, shape, dtype) of every tensor of an fp32 HF checkpoint for `cfg` (its data generator,
  which would read the params passed, is not used)."""
  from gemma2_jax.checkpoint import hf
  from gemma2_jax.checkpoint.mapping import export_tensors
  return export_tensors(cfg, hf.entries(cfg), {}, np.float32, vocab_rows=cfg.num_real_tokens)[0]


def write_hf_checkpoint(path, cfg) -> int:
  """A random fp32 HF checkpoint written tensor by tensor; returns its size in bytes."""
  from gemma2_jax.checkpoint import hf
  from gemma2_jax.checkpoint.safetensors_io import write_sharded

  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps(hf.config_to_hf(cfg, "float32")))
  specs = _hf_specs(cfg)
  produce = (np.random.default_rng(i).standard_normal(shape, np.float32)
             for i, (_, shape, _) in enumerate(specs))
  write_sharded(path, specs, produce, max_shard_bytes=2**29)  # several files, as released
  return sum(int(np.prod(shape)) * 4 for _, shape, _ in specs)


# Wide and shallow, yet no tensor dominates: the largest (the embedding) is 5% of BIG's 1.19 GiB and
# a matmul weight 2.6%, so each process's share (1/2) is what its RSS must show.
BIG = tiny(vocab_size=8192, num_real_tokens=8000, num_layers=8, d_model=2048, num_heads=8,
           num_kv_heads=4, head_dim=256, ffn_dim=4096, query_pre_attn_scalar=256)
SMALL = BIG.replace(num_layers=4, d_model=1024, head_dim=128, ffn_dim=3072, vocab_size=4096,
                    num_real_tokens=4000)  # 0.2 GiB


@pytest.mark.parametrize("size,mesh,devices", [
  ("big", {"fsdp": 2}, 1),
  ("small", {"fsdp": 2, "tensor": 2}, 2),
  pytest.param("big", {"fsdp": 2, "tensor": 2}, 2, marks=pytest.mark.slow),
])
def test_two_processes_each_read_their_half(checkpoints, tmp_path, size, mesh, devices):
  """Each process holds half the weights and its RSS grows by about that much (<= 0.65x), and every
  shard equals the file. The small case also restores the tiny Orbax-format checkpoints (native,
  Kaggle, workdir) across the two processes."""
  cfg = BIG if size == "big" else SMALL
  others = [] if size == "big" else [checkpoints[1][f] for f in ("native", "kaggle", "kaggle_2DF",
                                                                  "workdir")]
  ckpt = tmp_path / "hf"
  try:
    nbytes = write_hf_checkpoint(ckpt, cfg)
    cmd = [sys.executable, "-m", "tests.sharded_load_worker", str(ckpt), json.dumps(cfg.to_dict()),
           json.dumps(mesh), json.dumps([[str(p), CFG.to_dict()] for p in others])]
    results = multiprocess.run(cmd, num_processes=2, devices=devices, cli=False, timeout=300)
  finally:
    shutil.rmtree(ckpt, ignore_errors=True)  # up to 1.2 GB; pytest keeps old tmp dirs
  reports = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
  gib = 2**30
  print(f"\ncheckpoint {nbytes / gib:.3f} GiB ({nbytes:,} bytes), mesh {mesh}, {devices} device(s) "
        "per process")
  for r in reports:
    print(f"  process {r['process']}: baseline RSS {r['baseline'] / gib:.3f} GiB, peak "
          f"{r['peak'] / gib:.3f} GiB, increase {r['increase'] / gib:.3f} GiB = "
          f"{r['increase'] / nbytes:.3f}x the checkpoint; holds {r['held'] / nbytes:.3f}x; "
          f"load {r['seconds']:.2f} s")
  assert sorted(r["process"] for r in reports) == [0, 1]
  for r in reports:
    assert r["checked_shards"] == _num_leaves(cfg) * devices
    assert r["other_shards"] == len(others) * _num_leaves(CFG) * devices
    assert r["held"] == pytest.approx(nbytes / 2, rel=0.01)  # half of every leaf (norms are tiny)
    assert r["increase"] <= 0.65 * nbytes, r


def test_synthetic_checkpoint_is_the_whole_model():
  """Its size is the model's, minus the padding rows an HF checkpoint does not store."""
  stored = sum(int(np.prod(shape)) for _, shape, _ in _hf_specs(SMALL))
  assert stored == SMALL.num_params() - (SMALL.vocab_size - SMALL.num_real_tokens) * SMALL.d_model


def test_bucket_paths_stay_bucket_paths(checkpoints, shardings, gcs):
  """gs:// checkpoints (a GCS emulator): HF tensors are read whole (no memory map of a bucket), the
  Orbax formats restore from the bucket, and the path never becomes a local `gs:` directory."""
  params, paths = checkpoints
  for fmt in ("hf", "native", "kaggle", "workdir"):
    for f in sorted(paths[fmt].rglob("*")):
      if f.is_file():
        gcs.upload(f"sharded/{fmt}/{f.relative_to(paths[fmt])}", f.read_bytes())
    _, got = load_sharded(gcs.path("sharded", fmt), "float32", shardings, config=CFG)
    _, want = load_params(paths[fmt], config=CFG)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_array_equal(g, w, err_msg=fmt)
