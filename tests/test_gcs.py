"""gs:// workdirs and data through a local GCS emulator (tests/gcs.py): checkpoints, metrics, JSON
outputs and every input format land in / come from the bucket, and nothing is written locally."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma2_jax.checkpoint.manager import CheckpointConfig, TrainCheckpointer
from gemma2_jax.data import (
  DataConfig,
  SourceConfig,
  make_eval_iterator,
  make_train_iterator,
)
from gemma2_jax.data.offline import TopKWriter, make_offline_iterator
from gemma2_jax.training.metrics import MetricsWriter, write_json
from tests.gcs import gcs_emulator  # noqa: F401  (the `gcs` fixture)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
TOK = DATA / "ko_sp1024.model"
KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask", "target_bytes")


@pytest.fixture
def cwd(tmp_path, monkeypatch):
  """An empty current directory: a gs:// path mistaken for a local one would land here."""
  d = tmp_path / "cwd"
  d.mkdir()
  monkeypatch.chdir(d)
  yield d
  assert sorted(os.listdir(d)) == [], "something was written locally instead of to the bucket"


def _events(data: bytes) -> list[tuple[str, int, float]]:
  """(tag, step, value) of the scalars in a TensorBoard event file (TFRecord framing)."""
  from tensorboardX.proto.event_pb2 import Event

  out, i = [], 0
  while i < len(data):
    n = int.from_bytes(data[i:i + 8], "little")
    event = Event.FromString(data[i + 12:i + 12 + n])
    out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    i += 12 + n + 4
  return out


def _rows(gcs, path) -> list[dict]:
  return [json.loads(line) for line in gcs.read(path).decode().splitlines()]


def test_metrics_writer_and_json_in_the_bucket(gcs, cwd):
  run = gcs.path("metrics_unit")
  w = MetricsWriter(run, sync_every_s=3600)
  w.write(1, {"loss": 3.5})
  deadline = time.monotonic() + 30  # the first row is copied at once, in the background
  while "metrics_unit/metrics.jsonl" not in gcs.list(run) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert _rows(gcs, f"{run}/metrics.jsonl") == [{"step": 1, "loss": 3.5}]
  w.write(2, {"loss": 3.0, "lr": np.float32(0.5)})  # within sync_every_s: copied at close()
  w.close()
  assert _rows(gcs, f"{run}/metrics.jsonl") == [{"step": 1, "loss": 3.5},
                                                {"step": 2, "loss": 3.0, "lr": 0.5}]

  # A resumed run keeps the earlier rows and adds its own TensorBoard file beside the first one.
  w = MetricsWriter(run)
  w.write(3, {"loss": 2.5})
  w.close()
  assert [r["step"] for r in _rows(gcs, f"{run}/metrics.jsonl")] == [1, 2, 3]
  tb = sorted(n for n in gcs.list(f"{run}/tensorboard/") if "tfevents" in n)
  assert len(tb) == 2
  scalars = sorted(e for n in tb for e in _events(gcs.read(n)))
  assert scalars == [("loss", 1, 3.5), ("loss", 2, 3.0), ("loss", 3, 2.5), ("lr", 2, 0.5)]

  write_json(f"{run}/summary.json", {"start_step": 2, "loss": 2.5})
  assert json.loads(gcs.read(f"{run}/summary.json")) == {"start_step": 2, "loss": 2.5}


class _Iterator:
  def __init__(self, position=0):
    self.position = position

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


def _state(seed):
  k = jax.random.key(seed)
  return {"step": jnp.int32(seed), "params": {"w": jax.random.normal(k, (4, 8))},
          "opt_state": {"mu": jnp.full((4, 8), float(seed))}}


def test_train_checkpointer_in_the_bucket(gcs, cwd):
  run = gcs.path("ckpt_unit")
  ckpt = TrainCheckpointer(run, CheckpointConfig(keep_last=2))
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), _Iterator(10 * step), {"model": {"d": step}})
  ckpt.wait()
  ckpt.close()
  names = gcs.list(f"{run}/checkpoints/")
  steps = {n.split("/")[2] for n in names}
  assert steps == {"2", "3"}, names  # keep_last deleted step 1 in the bucket
  assert "ckpt_unit/checkpoints/3/commit_success.txt" in names
  assert "ckpt_unit/checkpoints/3/data/process_0-of-1.json" in names

  # A save killed before it was finalized (on GCS: a step directory without commit_success.txt) is
  # removed at start-up and never resumed from.
  gcs.upload(f"{run}/checkpoints/4/state/partial", b"x")
  ckpt = TrainCheckpointer(run, CheckpointConfig(keep_last=2))
  assert not any(n.startswith("ckpt_unit/checkpoints/4/") for n in gcs.list(run))
  assert ckpt.latest_step() == 3 and ckpt.saved_process_count(3) == 1
  want = _state(3)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), want)
  it = _Iterator()
  got = ckpt.restore(3, abstract, it)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert it.position == 30
  assert ckpt.restore_config(3) == {"model": {"d": 3}}
  ckpt.close()


def _upload_tree(gcs, local: Path, prefix: str) -> str:
  for p in sorted(local.rglob("*")):
    if p.is_file():
      gcs.upload(f"{prefix}/{p.relative_to(local).as_posix()}", p.read_bytes())
  return gcs.path(prefix)


def _jsonl(path: Path, n: int = 60):
  paras = [ln for ln in (DATA / "ko" / "constitution.txt").read_text().splitlines() if ln.strip()]
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      f.write(json.dumps({"text": f"문서 {i}: " + paras[i % len(paras)]}, ensure_ascii=False) + "\n")


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    for k in KEYS:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_jsonl_text_and_tokenizer_from_the_bucket(gcs, cwd, tmp_path):
  local = tmp_path / "corpus"
  local.mkdir()
  _jsonl(local / "a.jsonl")
  (local / "b.txt").write_text((DATA / "ko" / "1809890.txt").read_text())
  remote = _upload_tree(gcs, local, "inputs")
  tok = gcs.upload("inputs_tok/ko_sp1024.model", TOK.read_bytes())

  def cfg(paths, **kw):
    return DataConfig(sources=[SourceConfig(paths=paths, name="j"), SourceConfig(paths=paths.replace(
      "a.jsonl", "b.txt"), name="t", doc_per="file")], seq_len=32, global_batch=4, seed=3, **kw)

  want = _take(make_train_iterator(cfg(str(local / "a.jsonl")), tokenizer_path=str(TOK)), 6)
  it = make_train_iterator(cfg(f"{remote}/a.jsonl"), tokenizer_path=tok)
  got = _take(it, 3)
  state = it.get_state()
  got += _take(it, 3)
  _assert_same(got, want)
  it = make_train_iterator(cfg(f"{remote}/a.jsonl"), tokenizer_path=tok)
  it.set_state(state)
  _assert_same(_take(it, 3), want[3:])

  # A glob and a directory prefix in the bucket, and the eval pass.
  one = lambda paths: make_eval_iterator(
    DataConfig(sources=[SourceConfig(paths=paths, format="jsonl")], seq_len=32, global_batch=4),
    tokenizer_path=tok)
  ref = list(make_eval_iterator(DataConfig(sources=[SourceConfig(paths=str(local / "a.jsonl"))],
                                           seq_len=32, global_batch=4), tokenizer_path=str(TOK)))
  _assert_same(list(one(f"{remote}/*.jsonl")), ref)
  gcs.upload("inputs_dir/sub/a.jsonl", (local / "a.jsonl").read_bytes())
  _assert_same(list(one(gcs.path("inputs_dir"))), ref)

  # Parquet through epath file objects (pyarrow's own gs:// client ignores the emulator).
  import pyarrow as pa
  import pyarrow.parquet as pq

  texts = [json.loads(line)["text"] for line in (local / "a.jsonl").read_text().splitlines()]
  pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet", row_group_size=16)
  pq_path = gcs.upload("inputs_pq/a.parquet", (tmp_path / "a.parquet").read_bytes())
  it = make_eval_iterator(DataConfig(sources=[SourceConfig(paths=pq_path)], seq_len=32,
                                     global_batch=4), tokenizer_path=tok)
  _assert_same(list(it), ref)


def test_prepared_arrayrecord_and_teacher_topk_from_the_bucket(gcs, cwd, tmp_path):
  from gemma2_jax.data import prepare

  _jsonl(tmp_path / "d.jsonl")
  prepare.tokenize_corpus(SourceConfig(paths=(str(tmp_path / "d.jsonl"),)), str(TOK),
                          str(tmp_path / "prep"), num_shards=2, num_workers=1, progress=False)
  remote = _upload_tree(gcs, tmp_path / "prep", "prepared")
  tok = gcs.upload("prepared_tok/ko_sp1024.model", TOK.read_bytes())
  # Whole epochs, read to the end: no read-ahead is left running against the bucket.
  cfg = lambda p: DataConfig(sources=[SourceConfig(paths=p, format="arrayrecord")], seq_len=32,
                             global_batch=4, seed=1, num_epochs=1)
  want = list(make_train_iterator(cfg(str(tmp_path / "prep" / "*.array_record*")),
                                  tokenizer_path=str(TOK)))
  # array_record reads gs:// itself (its bundled GCS client); meta.json is checked through epath.
  _assert_same(list(make_train_iterator(cfg(f"{remote}/*.array_record*"), tokenizer_path=tok)), want)

  rng = np.random.default_rng(0)
  T, k, V = 16, 4, 1024
  with TopKWriter(tmp_path / "topk", k=k, seq_len=T, vocab_size=V, piece_bytes=np.ones(V, np.int32),
                  rows_per_shard=3) as w:
    for _ in range(8):
      logp = -np.sort(rng.exponential(2.0, (T, k)), axis=1)
      ids = np.stack([rng.choice(V, k, replace=False) for _ in range(T)])
      w.write(rng.integers(0, V, T + 1), np.ones(T + 1, int), np.arange(T + 1), logp, ids)
  remote = _upload_tree(gcs, tmp_path / "topk", "topk")
  kw = dict(global_batch=2, seq_len=T, seed=2, num_epochs=2, process_index=0, process_count=1)
  want = list(make_offline_iterator(str(tmp_path / "topk"), **kw))
  got = list(make_offline_iterator(remote, **kw))
  assert len(got) == 8
  _assert_same(got, want)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])
  # Writing top-k records to a bucket is refused before anything is created (array_record writes
  # only local files), rather than making a local directory named `gs:`. (prepare_data tokenize
  # uploads finished shards: tests/test_prepare_distributed.py.)
  with pytest.raises(ValueError, match="local directory"):
    TopKWriter(gcs.path("topk_out"), k=k, seq_len=T, vocab_size=V, piece_bytes=np.ones(V, np.int32))
  assert gcs.list("topk_out") == {}


STEPS = 8


def _train_args(run: str, data: str) -> list[str]:
  from tests.multiprocess import TINY_TRAIN

  return [f"--workdir={run}", *[a.replace("configs/", f"{ROOT}/configs/") for a in TINY_TRAIN],
          f"--config.train.steps={STEPS}", "--config.train.global_batch=4",
          f"--config.data.tokenizer={data}/ko_sp1024.model",
          f"--config.data.train.paths={data}/train/*.txt",
          f"--config.data.eval.paths={data}/eval/1809899.txt"]


def test_train_in_the_bucket_killed_and_resumed(gcs, cwd):
  """`train --workdir=gs://...` with data on gs://: killed with SIGKILL mid-run, the re-run resumes
  from the bucket's checkpoint and metrics.jsonl keeps the first run's rows."""
  for p in sorted((DATA / "ko").glob("*.txt")):
    gcs.upload(f"e2e_data/{'eval' if p.name == '1809899.txt' else 'train'}/{p.name}", p.read_bytes())
  gcs.upload("e2e_data/ko_sp1024.model", TOK.read_bytes())
  run = gcs.path("e2e_run")
  args = _train_args(run, gcs.path("e2e_data"))
  env = dict(os.environ, **gcs.env, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")

  r = subprocess.run([sys.executable, str(ROOT / "tests" / "run_with_kill.py"), "after_step", "5",
                      "--", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
  objects = gcs.list(run)
  assert "e2e_run/checkpoints/2/commit_success.txt" in objects, sorted(objects)
  assert "e2e_run/config.json" in objects
  # The first row is copied at once; later ones (within sync_every_s) died with the process.
  first = [row for row in _rows(gcs, f"{run}/metrics.jsonl") if "loss" in row]
  assert first and first[0]["step"] == 1

  r = subprocess.run([sys.executable, "-m", "gemma2_jax.train", *args,
                      "--config.checkpoint.export_hf=True"], cwd=cwd, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads(gcs.read(f"{run}/summary.json"))
  start = summary["start_step"]
  assert start in (2, 4) and np.isfinite(summary["loss"]) and "eval_loss" in summary
  objects = gcs.list(run)
  assert f"e2e_run/checkpoints/{STEPS}/commit_success.txt" in objects
  assert any("/tensorboard/" in n and "tfevents" in n for n in objects)
  # The final HF export is in the bucket too (written locally, uploaded with config.json last).
  assert {f"e2e_run/hf_step{STEPS}/config.json", f"e2e_run/hf_step{STEPS}/model.safetensors"} <= set(objects)
  rows = [row for row in _rows(gcs, f"{run}/metrics.jsonl") if "loss" in row]
  assert rows[:len(first)] == first  # the killed run's rows are kept
  assert [r["step"] for r in rows[len(first):]] == list(range(start + 1, STEPS + 1))
