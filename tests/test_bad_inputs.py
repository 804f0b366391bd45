"""Bad input a new user could give, through the CLIs as a user runs them: each one ends with exactly one
`error: ...` line as the last line of stderr, a non-zero exit, and no pre-existing file changed.

One class of input per test (the numbers are those of the issue that collected them). The runs that
need a trained workdir share one, trained once per module (2 steps of a 2-layer d=32 model).
"""

from __future__ import annotations

import json
import shutil
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from tests.cli import DATA, TOK, assert_one_error, cli, snapshot, train
from tests.tiny import SMALL_MODEL


def _tiny_model():
  """The model TINY trains."""
  from gemma2_jax.model.config import tiny

  return tiny(vocab_size=1024, num_layers=2, **SMALL_MODEL)


def _params(cfg, seed=0):
  from gemma2_jax.model.transformer import param_shapes

  rng = np.random.default_rng(seed)

  def fill(tree):
    if isinstance(tree, dict):
      return {k: fill(v) for k, v in tree.items()}
    return rng.standard_normal(tree).astype(np.float32)

  return fill(param_shapes(cfg))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A finished 2-step run with checkpoints at steps 1 and 2 (copied by the tests that damage it)."""
  path = tmp_path_factory.mktemp("bad_inputs") / "run"
  proc = train(path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(p.name for p in (path / "checkpoints").iterdir()) == ["1", "2"]
  return path


def _copy(workdir, tmp_path) -> Path:
  return Path(shutil.copytree(workdir, tmp_path / "run"))


# --- 1. a config file that fails while loading ------------------------------------------------------

@pytest.mark.parametrize("body,line,what", [
  ("def get_config(:\n  pass\n", 1, "SyntaxError: invalid syntax"),
  ("import ml_collections\n\n\ndef get_config():\n  c = ml_collections.ConfigDict()\n"
   "  return c['model']\n", 6, "KeyError"),
], ids=["syntax", "exception_in_get_config"])
def test_config_file_that_fails_to_load(tmp_path, body, line, what):
  config = tmp_path / "my_config.py"
  config.write_text(body)
  before = snapshot(tmp_path)
  proc = cli("train", f"--config={config}", f"--workdir={tmp_path / 'run'}")
  assert_one_error(proc, f"config file {config} line {line}: {what}")
  assert snapshot(tmp_path) == before  # and no workdir


# --- 2. a data file that is not the format its source declares ------------------------------------

def test_text_in_a_parquet_file(tmp_path):
  bad = tmp_path / "corpus.parquet"
  bad.write_text("plain text, not Parquet\n")
  before = snapshot(tmp_path)
  proc = cli("prepare_data", "tokenize", "--input", bad, "--tokenizer", TOK, "--output_dir",
             tmp_path / "out", "--num_workers", "1", "--no_progress")
  assert_one_error(proc, f"{bad}: not a readable Parquet file (ArrowInvalid", rc=2)
  assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  from gemma2_jax.data import SourceConfig, prepare

  out = tmp_path_factory.mktemp("shards") / "ko"
  prepare.tokenize_corpus(SourceConfig(paths=(str(DATA / "ko" / "1809890.txt"),)), str(TOK),
                          str(out), num_workers=1, progress=False)
  return out


def test_truncated_arrayrecord_shard(shards, tmp_path):
  data = tmp_path / "ko"
  shutil.copytree(shards, data)
  shard = next(data.glob("*.array_record*"))
  shard.write_bytes(shard.read_bytes()[:100_000])  # cut short: the footer is gone
  before = snapshot(tmp_path)
  proc = train(tmp_path / "run", f"--config.data.train.paths={data}/*.array_record*",
               "--config.data.train.format=arrayrecord")
  assert_one_error(proc, f"{shard}: not a readable ArrayRecord file (RuntimeError: ")
  assert snapshot(tmp_path) == before  # and no workdir: the source is opened before it is made


def test_corrupt_arrayrecord_record_names_the_file(shards, tmp_path):
  """A shard that opens but whose records do not read back: the error comes from a reader thread."""
  from gemma2_jax.data import DataConfig, DataError, SourceConfig, make_train_iterator

  data = tmp_path / "ko"
  shutil.copytree(shards, data)
  shard = next(data.glob("*.array_record*"))
  raw = bytearray(shard.read_bytes())
  raw[1000:1050] = bytes(b ^ 0x5A for b in raw[1000:1050])  # inside the first records' chunks
  shard.write_bytes(bytes(raw))
  cfg = DataConfig(sources=[SourceConfig(paths=(str(shard),), format="arrayrecord")], seq_len=16,
                   global_batch=2, shuffle=False, tokenize_batch=4)
  before = set(threading.enumerate())
  it = make_train_iterator(cfg, tokenizer_path=TOK)
  with pytest.raises(DataError, match=rf"{shard}: cannot read ArrayRecord record \d+ \(RuntimeError"):
    for _ in range(50):
      next(it)
  # The iterator stopped and joined its reader threads before the error reached us.
  assert not [t for t in threading.enumerate() if t not in before and t.is_alive()]


def test_tfds_record_that_does_not_read_names_the_shard(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  from gemma2_jax.data import DataError, SourceConfig, open_source

  files = [types.SimpleNamespace(filename=f"/d/ko-train.array_record-{i}", num_records=2)
           for i in range(2)]

  class Broken:  # what tfds.data_source returns, over a shard cut short
    data_source = types.SimpleNamespace(_read_instructions=files)

    def __len__(self):
      return 4

    def __getitem__(self, i):
      raise RuntimeError("Corrupted Riegeli/records file: chunk data hash mismatch")

  monkeypatch.setattr(tfds, "data_source", lambda *a, **k: Broken())
  src = open_source(SourceConfig(format="tfds", tfds_name="ko_wiki"))
  with pytest.raises(DataError, match=r"/d/ko-train.array_record-1 \(TFDS 'ko_wiki' example 3\): "
                                      r"cannot read the TFDS record \(RuntimeError: Corrupted"):
    src[3]


# --- 3. reader threads stop before the error is printed ---------------------------------------------

def test_data_error_is_the_last_line(tmp_path):
  """The first chunk of documents holds a document too long for long_docs='error'; each later chunk
  a malformed line (logged as skipped when read) and documents slow to tokenize. Reader threads left
  running would log those after the error line."""
  rng = np.random.default_rng(0)
  syllables = np.array([chr(0xAC00 + i) for i in range(0, 11172, 37)])

  def text(words):  # random Hangul words: many byte-fallback pieces, slow to tokenize
    return " ".join(map("".join, syllables[rng.integers(0, len(syllables), (words, 3))]))

  corpus = tmp_path / "c.jsonl"
  with open(corpus, "w", encoding="utf-8") as f:
    f.write(json.dumps({"text": text(300)}, ensure_ascii=False) + "\n")
    f.write("".join(json.dumps({"text": "가"}) + "\n" for _ in range(3)))
    for _ in range(9):  # chunks of 4 documents: one malformed, three slow
      f.write('{"text": broken\n')
      f.write("".join(json.dumps({"text": text(6000)}, ensure_ascii=False) + "\n" for _ in range(3)))
  proc = train(tmp_path / "run", f"--config.data.train.paths={corpus}",
               "--config.data.train.format=jsonl", "--config.data.train.long_docs=error",
               "--config.data.train.tokenize_batch=4", "--config.data.train.shuffle=False")
  assert_one_error(proc, "is longer than a row of 17 (long_docs='error')")


# --- 4. init_from a checkpoint whose config disagrees with the run ---------------------------------

@pytest.fixture(scope="module")
def hf_of_the_run(tmp_path_factory):
  """An HF checkpoint with the tensors of the run's model."""
  from gemma2_jax.checkpoint import save_params

  cfg = _tiny_model()
  return save_params(_params(cfg), cfg, tmp_path_factory.mktemp("hf") / "hf", "hf")


def test_init_from_hf_whose_config_disagrees(hf_of_the_run, tmp_path):
  hf = Path(shutil.copytree(hf_of_the_run, tmp_path / "hf"))
  config = json.loads((hf / "config.json").read_text())
  (hf / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))  # tensors: d=32
  before = snapshot(tmp_path)
  proc = train(tmp_path / "run", f"--config.init_from={hf}")
  assert_one_error(proc, f"init_from {hf}: the checkpoint's config has d_model=48, the model config "
                         "given has d_model=32")
  assert snapshot(tmp_path) == before  # and no workdir


def test_config_comparison_ignores_runtime_fields_and_vocab_padding(hf_of_the_run):
  from gemma2_jax.checkpoint import CheckpointError, check_config

  run = _tiny_model()
  check_config(hf_of_the_run, run.replace(dtype="bfloat16", param_dtype="bfloat16", remat="full",
                                          attention_impl="blockwise", attention_block_size=4,
                                          scan_layers=False))
  check_config(hf_of_the_run, run.replace(vocab_size=1152, num_real_tokens=1024))  # padded rows
  for field, value in (("sliding_window", 16), ("query_pre_attn_scalar", 16), ("final_softcap", None),
                       ("vocab_size", 2048)):
    with pytest.raises(CheckpointError, match=f"has {field}="):
      check_config(hf_of_the_run, run.replace(**{field: value}))


# --- 5. a workdir whose config.json is not JSON ----------------------------------------------------

def test_workdir_config_json_truncated(workdir, tmp_path):
  run = _copy(workdir, tmp_path)
  config = run / "config.json"
  config.write_bytes(config.read_bytes()[:50])
  before = snapshot(run)
  proc = train(run)
  assert_one_error(proc, f"{config} is not valid JSON", "config/metadata")
  assert snapshot(run) == before


# --- 6. a workdir whose newest checkpoint does not read back ---------------------------------------

def test_newest_checkpoint_with_a_truncated_array_file(workdir, tmp_path):
  run = _copy(workdir, tmp_path)
  arrays = sorted((run / "checkpoints" / "2" / "state").rglob("ocdbt.process_0/d/*"),
                  key=lambda p: p.stat().st_size)
  arrays[-1].write_bytes(arrays[-1].read_bytes()[:100])
  before = snapshot(run)
  proc = train(run, "--config.train.steps=3")
  line = assert_one_error(proc, f"checkpoint step 2 in {run / 'checkpoints'} cannot be read",
                          "nothing was changed", f"mv {run / 'checkpoints' / '2'} ",
                          "resumes from step 1")
  assert "OCDBT database" in line and "TensorStore" not in line
  assert snapshot(run) == before  # refused, nothing deleted or rewritten


# --- 7. convert to a non-float dtype -----------------------------------------------------------------

def test_convert_refuses_a_non_float_dtype(hf_of_the_run, tmp_path):
  before = snapshot(hf_of_the_run)
  proc = cli("convert", "--src", hf_of_the_run, "--dst", tmp_path / "out", "--to", "native",
             "--dtype", "int8")
  assert_one_error(proc, "argument --dtype: 'int8' is not a float dtype", rc=2)
  assert not (tmp_path / "out").exists() and snapshot(hf_of_the_run) == before

  from gemma2_jax.checkpoint import CheckpointError, load_params, save_params

  cfg, params = load_params(hf_of_the_run)
  with pytest.raises(CheckpointError, match="cannot write weights as int8"):
    save_params(params, cfg, tmp_path / "api", "native", "int8")
  assert not (tmp_path / "api").exists()


# --- 8. an output path that is an existing file ------------------------------------------------------

def test_prepare_data_output_dir_is_a_file(tmp_path):
  existing = tmp_path / "notes.txt"
  existing.write_text("mine\n")
  before = snapshot(tmp_path)
  common = ["tokenize", "--input", DATA / "ko" / "1809890.txt", "--tokenizer", TOK, "--num_workers",
            "1", "--no_progress", "--output_dir"]
  assert_one_error(cli("prepare_data", *common, existing),
                   f"output_dir {existing} exists and is not a directory", rc=2)
  assert_one_error(cli("prepare_data", *common, existing / "sub"),  # the OSError itself
                   f"error: Not a directory: {existing / 'sub'}", rc=2)
  assert snapshot(tmp_path) == before


# --- 9. a Kaggle tree of shapes that match no release, without a config ------------------------------

def test_kaggle_of_no_release_shapes_needs_a_config(tmp_path):
  from gemma2_jax.checkpoint import save_params
  from gemma2_jax.model.config import tiny

  cfg = tiny()
  kaggle = save_params(_params(cfg), cfg, tmp_path / "kaggle", "kaggle")
  before = snapshot(kaggle)
  proc = cli("convert", "--src", kaggle, "--dst", tmp_path / "hf", "--to", "hf")
  assert_one_error(proc, f"{kaggle}: a Kaggle checkpoint of shapes L=4 D=64", "matches no Gemma 2 "
                   "release", "--preset or --model_config")
  assert not (tmp_path / "hf").exists()
  proc = cli("convert", "--src", kaggle, "--dst", tmp_path / "hf", "--to", "hf", "--preset", "tiny")
  assert proc.returncode == 0, proc.stderr[-3000:]
  hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert hf_config["query_pre_attn_scalar"] == cfg.query_pre_attn_scalar == 24
  assert snapshot(kaggle) == before


# --- 10. train-tokenizer with a vocab size that cannot be -------------------------------------------

@pytest.mark.parametrize("size", ["0", "-3"])
def test_train_tokenizer_vocab_size_is_validated(tmp_path, size):
  proc = cli("prepare_data", "train-tokenizer", "--input", DATA / "ko" / "1809890.txt",
             "--model_prefix", tmp_path / "sp", f"--vocab_size={size}")
  line = assert_one_error(proc, "--vocab_size must be at least 263", f"got {size}", rc=2)
  assert "trainer_interface" not in line and not list(tmp_path.iterdir())
