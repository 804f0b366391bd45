"""Offline distillation records: teacher_logits CLI -> ArrayRecord top-k -> make_offline_iterator."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma2_jax import save_model
from gemma2_jax.checkpoint import load_params
from gemma2_jax.cli.teacher_logits import main as teacher_logits_main
from gemma2_jax.data import DataError, make_eval_iterator
from gemma2_jax.data.offline import TopKWriter, _Codec, make_offline_iterator
from gemma2_jax.model.config import tiny
from gemma2_jax.model.losses import topk_distill_sums
from gemma2_jax.model.transformer import Transformer, forward_hidden, logits_from_hidden
from gemma2_jax.training.experiment import from_config, load_config_file

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
SEQ_LEN, BATCH, K = 32, 4, 128

CONFIG = '''
import importlib.util
import ml_collections

_spec = importlib.util.spec_from_file_location("pretrain_tiny", {base!r})
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)


def get_config():
  c = _mod.get_config()
  c.model.num_layers = 2
  c.train.seq_len = {seq_len}
  c.train.global_batch = {batch}
  c.train.loss_chunk = 8  # several sequence chunks per row
  c.data.train.paths = {paths!r}
  c.teacher = ml_collections.ConfigDict(dict(checkpoint={teacher!r}, dtype="float32", preset=""))
  return c
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("offline")
  cfg = tiny(vocab_size=1024, num_layers=2)
  teacher = save_model(Transformer(cfg, rngs=nnx.Rngs(params=3)), tmp / "teacher", format="native")
  paths = ",".join(str(DATA / "ko" / n) for n in ("1809894.txt", "1809895.txt"))
  config = tmp / "distill_cfg.py"
  config.write_text(CONFIG.format(base=str(REPO / "configs" / "pretrain_tiny.py"), seq_len=SEQ_LEN,
                                  batch=BATCH, paths=paths, teacher=str(teacher)))
  out = tmp / "topk"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "gemma2_jax.teacher_logits", f"--config={config}",
                         f"--output_dir={out}", f"--topk={K}", "--no_progress"],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip().splitlines()[-1].startswith("done: "), proc.stdout
  exp = from_config(load_config_file(str(config)), num_devices=1)
  return dict(tmp=tmp, config=config, out=out, teacher=teacher, exp=exp,
              meta=json.loads((out / "meta.json").read_text()))


def _all_rows(out, **kw):
  it = make_offline_iterator(str(out), global_batch=1, seq_len=SEQ_LEN, num_epochs=1,
                             process_index=0, process_count=1, **kw)
  batches = list(it)
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_rows_match_data_pipeline(setup):
  exp, meta = setup["exp"], setup["meta"]
  got = _all_rows(setup["out"], shuffle=False)
  assert len(got["tokens"]) == meta["rows"] and meta["rows"] > 2 * BATCH
  # The eval iterator makes the same unshuffled pass, with its last partial batch padded.
  ref = list(make_eval_iterator(exp.data_train, tokenizer_path=exp.tokenizer, vocab_size=1024))
  assert len(ref) == -(-meta["rows"] // BATCH)  # the last partial batch was written too
  ref = {k: np.concatenate([b[k] for b in ref])[:meta["rows"]] for k in ref[0]}
  for key, value in ref.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert got[key].dtype == value.dtype, key
  assert got["topk_logprobs"].shape == (meta["rows"], SEQ_LEN, K)
  assert got["topk_logprobs"].dtype == np.float32 and got["topk_ids"].dtype == np.int32
  assert np.all(np.diff(got["topk_logprobs"], axis=-1) <= 0)  # sorted descending


def test_topk_equals_teacher_and_kl_is_zero(setup):
  meta, exp = setup["meta"], setup["exp"]
  step = meta["quantization"]["step"]
  b = _all_rows(setup["out"], shuffle=False)
  b = {k: v[:BATCH] for k, v in b.items()}
  cfg, params = load_params(setup["teacher"], "float32")
  hidden = forward_hidden(cfg, params, b["tokens"], b["positions"], b["segment_ids"])
  embedding = params["embedder"]["input_embedding"]
  logp = jax.nn.log_softmax(logits_from_hidden(cfg, embedding, hidden), axis=-1)
  want, _ = jax.lax.top_k(logp, K)
  tol = step / 2 + 1e-5
  np.testing.assert_allclose(b["topk_logprobs"], want, atol=tol, rtol=0)
  at_ids = jnp.take_along_axis(logp, b["topk_ids"], axis=-1)  # the stored ids carry those log-probs
  np.testing.assert_allclose(b["topk_logprobs"], at_ids, atol=tol, rtol=0)
  assert all(len(set(r)) == K for r in b["topk_ids"].reshape(-1, K).tolist())
  assert 0 < meta["quantization"]["max_abs_error"] <= step / 2 + 1e-6

  # The student == the teacher: the divergence over k kept tokens + tail is quantization noise.
  sums = topk_distill_sums(cfg, embedding, hidden, jnp.asarray(b["topk_logprobs"]),
                           jnp.asarray(b["topk_ids"]), jnp.asarray(b["targets"]),
                           jnp.asarray(b["loss_mask"]), loss="forward_kl", chunk_size=8)
  kl = float(sums["kl"] / sums["weight"])
  assert abs(kl) < 2 * step, kl
  assert exp.teacher.checkpoint == str(setup["teacher"])


def test_size_at_k128(setup, tmp_path):
  meta, out = setup["meta"], setup["out"]
  files = [out / s for s in meta["shards"]]
  assert meta["bytes"] == sum(f.stat().st_size for f in files)
  assert meta["k"] == K and meta["record_bytes_per_token"] <= 512
  # Gemma's vocabulary (18-bit ids): the entries are 31 bits, the row adds ~4 bytes/token. A shard file
  # adds a fixed ~128 KB (64 KiB-granular) of padding + index to its records, nothing per record.
  V = 256128
  rng = np.random.default_rng(0)
  with TopKWriter(tmp_path, k=K, seq_len=SEQ_LEN, vocab_size=V, piece_bytes=np.ones(V, np.int32)) as w:
    for _ in range(8):
      logp = -np.sort(rng.exponential(4.0, (SEQ_LEN, K)), axis=1)
      ids = np.stack([rng.choice(V, K, replace=False) for _ in range(SEQ_LEN)])
      seg = np.r_[np.ones(20, int), 2 * np.ones(SEQ_LEN + 1 - 20, int)]
      pos = np.r_[np.arange(20), np.arange(SEQ_LEN + 1 - 20)]
      w.write(rng.integers(0, V, SEQ_LEN + 1), seg, pos, logp, ids)
  assert w.meta["record_bytes_per_token"] <= 512, w.meta
  assert w.meta["bytes"] <= w.meta["record_bytes_per_token"] * w.meta["tokens"] + 192 * 1024
  b = next(make_offline_iterator(str(tmp_path), global_batch=8, seq_len=SEQ_LEN, shuffle=False,
                                 process_index=0, process_count=1))
  assert b["topk_ids"].max() >= 2**17  # high ids survive the packing
  assert b["topk_logprobs"].shape == (8, SEQ_LEN, K)


def test_codec_roundtrip_odd_widths():
  rng = np.random.default_rng(1)
  for V, k, T in [(7, 3, 5), (1024, 8, 3), (2**20, 5, 9), (256128, 16, 4)]:
    c = _Codec(seq_len=T, k=k, vocab_size=V)
    logp = -np.sort(rng.exponential(5.0, (T, k)), axis=1)
    ids = np.stack([rng.choice(V, k, replace=False) for _ in range(T)])
    got_logp, got_ids = c.unpack(np.stack([c.pack(logp, ids)] * 2))
    np.testing.assert_array_equal(got_ids[1], ids)
    np.testing.assert_allclose(got_logp[0], np.maximum(logp, c.logprob_min), atol=c.step / 2 + 1e-6)


def _rows_as_tuples(batches):
  return [tuple(r) for b in batches for r in b["tokens"].tolist()]


def test_iterator_shuffle_shard_resume(setup):
  out, n = str(setup["out"]), setup["meta"]["rows"]
  kw = dict(global_batch=1, seq_len=SEQ_LEN, num_epochs=1, process_index=0, process_count=1)
  plain = _rows_as_tuples(make_offline_iterator(out, shuffle=False, **kw))
  a = _rows_as_tuples(make_offline_iterator(out, seed=1, **kw))
  assert a == _rows_as_tuples(make_offline_iterator(out, seed=1, **kw))  # deterministic by seed
  assert a != _rows_as_tuples(make_offline_iterator(out, seed=2, **kw))
  assert a != plain and sorted(a) == sorted(plain) and len(a) == n  # a permutation of the rows

  # Two processes (1 row each per batch of 2): every row exactly once per epoch, for two epochs.
  per_proc = [_rows_as_tuples(make_offline_iterator(out, global_batch=2, seq_len=SEQ_LEN, seed=5,
                                                    num_epochs=2, process_index=p, process_count=2))
              for p in range(2)]
  assert len(per_proc[0]) == len(per_proc[1]) == n
  # Process p holds global slots p, p + 2, ... of the two concatenated epochs.
  epoch1 = per_proc[0][:(n + 1) // 2] + per_proc[1][:n // 2]
  epoch2 = per_proc[0][(n + 1) // 2:] + per_proc[1][n // 2:]
  assert sorted(epoch1) == sorted(plain) == sorted(epoch2) and epoch1 != epoch2

  # Resume: the state after 3 batches gives the same following batches.
  it = make_offline_iterator(out, global_batch=2, seq_len=SEQ_LEN, seed=7, process_index=0,
                             process_count=1)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(n)]  # runs past the first epoch boundary
  it2 = make_offline_iterator(out, global_batch=2, seq_len=SEQ_LEN, seed=7, process_index=0,
                              process_count=1)
  it2.set_state(state)
  for w in want:
    g = next(it2)
    for key in w:
      np.testing.assert_array_equal(g[key], w[key])
  with pytest.raises(DataError, match="different pipeline"):
    make_offline_iterator(out, global_batch=2, seq_len=SEQ_LEN, seed=8, process_index=0,
                          process_count=1).set_state(state)


def test_iterator_errors(setup, tmp_path):
  out = str(setup["out"])
  with pytest.raises(DataError, match="seq_len=32 but training uses seq_len=64"):
    make_offline_iterator(out, global_batch=2, seq_len=64, process_index=0, process_count=1)
  with pytest.raises(DataError, match="k=128 tokens, expected k=8"):
    make_offline_iterator(out, global_batch=2, seq_len=SEQ_LEN, k=8, process_index=0, process_count=1)
  with pytest.raises(DataError, match="no teacher top-k shards"):
    make_offline_iterator(str(tmp_path / "nowhere"), global_batch=2, seq_len=SEQ_LEN,
                          process_index=0, process_count=1)


def test_cli_bad_input(setup, tmp_path, capsys):
  config = setup["config"]
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "keep.txt").write_text("mine")
  assert teacher_logits_main([f"--config={config}", f"--output_dir={busy}"]) != 0
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "not an empty directory" in err[0]
  assert [p.name for p in busy.iterdir()] == ["keep.txt"] and (busy / "keep.txt").read_text() == "mine"

  fresh = tmp_path / "fresh"
  # global_batch 8 fits the 8 fake devices of this test process (the config's 4 is for 1 device).
  assert teacher_logits_main([f"--config={config}", f"--output_dir={fresh}",
                              f"--config.teacher.checkpoint={tmp_path / 'missing'}",
                              "--config.train.global_batch=8"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "missing" in err[0], err
  assert not fresh.exists()


def test_trainer_learns_from_offline_records(setup, tmp_path):
  """The trainer reads the records (shuffled) and minimizes the top-k + tail divergence."""
  import dataclasses

  from gemma2_jax.distill.config import DistillConfig
  from gemma2_jax.training.loop import Trainer

  exp = setup["exp"]
  exp = dataclasses.replace(
    exp, teacher=None,
    distill=DistillConfig(loss="forward_kl"), offline_paths=str(setup["out"]), data_eval=None,
    model=exp.model.replace(num_layers=2, d_model=32, head_dim=8, ffn_dim=64, query_pre_attn_scalar=8),
    train=dataclasses.replace(exp.train, steps=4, log_every=1, progress_bar=False),
    checkpoint=dataclasses.replace(exp.checkpoint, export_hf=False))
  exp = dataclasses.replace(exp, mesh={"dcn": 1, "data": 1, "fsdp": jax.device_count() // 2,
                                       "tensor": 2})
  summary = Trainer(exp, tmp_path).run()
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r["kd"]) and r["kd"] > 0 for r in rows)
  assert rows[-1]["kd"] < rows[0]["kd"]
  assert {"kl_t1", "top1_agreement", "teacher_ce"} <= set(summary)


def test_hf_teacher_with_real_rows_only(tmp_path):
  """An HF teacher stores only the real vocab rows (256000 of 256128): teacher_logits pads it."""
  cfg = tiny(vocab_size=1032, num_real_tokens=1024, num_layers=2)
  teacher = save_model(Transformer(cfg, rngs=nnx.Rngs(params=3)), tmp_path / "teacher", format="hf")
  assert json.loads((teacher / "config.json").read_text())["vocab_size"] == 1024
  config = tmp_path / "cfg.py"
  config.write_text(CONFIG.format(base=str(REPO / "configs" / "pretrain_tiny.py"), seq_len=SEQ_LEN,
                                  batch=BATCH, paths=str(DATA / "ko" / "1809894.txt"),
                                  teacher=str(teacher)))
  out = tmp_path / "topk"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "gemma2_jax.teacher_logits", f"--config={config}",
                         f"--output_dir={out}", "--topk=16", "--no_progress", "--max_rows=8",
                         "--config.model.vocab_size=1032", "--config.model.num_real_tokens=1024"],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stderr
  b = next(make_offline_iterator(str(out), global_batch=8, seq_len=SEQ_LEN, shuffle=False,
                                 process_index=0, process_count=1))
  assert b["topk_ids"].max() < 1024  # the padding rows are masked out of the teacher's logits


def test_two_processes_write_every_row_once(setup, tmp_path):
  """fsdp=2 over 2 processes: two data groups, each writes its shard of the rows to its own part;
  together they are exactly the pipeline's rows for that sharding, each once, with the teacher's
  top-k."""
  from gemma2_jax.data.offline import packed_rows
  from tests import multiprocess as mp

  out = tmp_path / "topk"
  mp.run([sys.executable, "-m", "gemma2_jax.teacher_logits", f"--config={setup['config']}",
          f"--output_dir={out}", f"--topk={K}", "--no_progress"], 2)
  parts = sorted(p.name for p in out.iterdir())
  assert parts == ["part-00000-of-00002", "part-00001-of-00002"]
  exp = setup["exp"]
  got = _all_rows(out, shuffle=False)  # the parts, in order
  want = [r for g in range(2) for r in packed_rows(exp.data_train, exp.tokenizer, vocab_size=1024,
                                                   process_index=g, process_count=2)[0]]
  assert len(got["tokens"]) == len(want) == sum(
    json.loads((out / p / "meta.json").read_text())["rows"] for p in parts)
  np.testing.assert_array_equal(got["tokens"], np.stack([r["tokens"][:-1] for r in want]))
  cfg, params = load_params(setup["teacher"], "float32")
  hidden = forward_hidden(cfg, params, got["tokens"], got["positions"], got["segment_ids"])
  logp = jax.nn.log_softmax(logits_from_hidden(cfg, params["embedder"]["input_embedding"], hidden))
  step = setup["meta"]["quantization"]["step"]
  np.testing.assert_allclose(got["topk_logprobs"], jax.lax.top_k(logp, K)[0], atol=step / 2 + 1e-5)


KILL_AFTER_ROWS = '''
import os, signal, sys
from gemma2_jax import teacher_logits
from gemma2_jax.data import offline
write = offline.TopKWriter.write
def killing_write(self, *a):
  if self.rows == 5:
    os.kill(os.getpid(), signal.SIGKILL)
  write(self, *a)
offline.TopKWriter.write = killing_write
sys.exit(teacher_logits.main(sys.argv[1:]))
'''


def test_killed_run_resumes_after_its_last_complete_shard(setup, tmp_path):
  out = tmp_path / "topk"
  args = [f"--config={setup['config']}", f"--output_dir={out}", f"--topk={K}", "--no_progress",
          "--rows_per_shard=2"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", KILL_AFTER_ROWS, *args], capture_output=True, text=True,
                     env=env, cwd=REPO, timeout=120)
  assert r.returncode == -9, r.stderr[-2000:]
  assert json.loads((out / "progress.json").read_text())["rows"] == 4  # two complete shards
  other = [a if not a.startswith("--topk=") else f"--topk={K // 2}" for a in args]
  r = subprocess.run([sys.executable, "-m", "gemma2_jax.teacher_logits", *other], capture_output=True,
                     text=True, env=env, cwd=REPO, timeout=120)
  assert r.returncode == 1 and "unfinished run with other settings" in r.stderr.splitlines()[-1]
  r = subprocess.run([sys.executable, "-m", "gemma2_jax.teacher_logits", *args], capture_output=True,
                     text=True, env=env, cwd=REPO, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert not (out / "progress.json").exists()
  got, want = _all_rows(out, shuffle=False), _all_rows(setup["out"], shuffle=False)
  for key in want:  # the same rows and top-k as the uninterrupted run, each once
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  meta = json.loads((out / "meta.json").read_text())
  assert meta["rows"] == setup["meta"]["rows"] and meta["loss_tokens"] == setup["meta"]["loss_tokens"]
  # A finished output is never written again.
  r = subprocess.run([sys.executable, "-m", "gemma2_jax.teacher_logits", *args], capture_output=True,
                     text=True, env=env, cwd=REPO, timeout=120)
  assert r.returncode == 1 and "holds a finished teacher_logits output" in r.stderr
