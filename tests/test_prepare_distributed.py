"""`prepare_data tokenize` by several cooperating workers, straight to a bucket (tests/gcs.py's
emulator): 3 workers write what one writes, a worker killed with SIGKILL (mid-shard, then between
a shard and its summary) is re-run and finishes only its missing shards, no shard is ever visible
half-written, and the training pipeline's reader reads the result. Also the plan itself
(`plan_shards`), local output by two workers, and bad worker flags / a mismatched re-run as one
`error:` line.

`python -m tests.test_prepare_distributed MODE K -- tokenize ARGS` is the killed worker: the CLI with
a SIGKILL of itself at a chosen point (as tests/run_with_kill.py does for training), MODE `in_shard`
(after the first record of the K-th shard it writes, so that shard exists only as a local temporary
file) or `before_summary` (after the K-th shard was uploaded, before its summary is written).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.gcs import gcs_emulator  # noqa: F401  (the `gcs` fixture)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
TOK = DATA / "ko_sp1024.model"
KO_FILES = sorted((DATA / "ko").glob("*.txt"))
SHARDS = 14  # 11 files: constitution.txt is cut into 3 parts and 1809896.txt into 2
WORKERS = 3


def _env(gcs, tmp: Path) -> dict:
  tmp.mkdir(parents=True, exist_ok=True)
  return dict(os.environ, **gcs.env, JAX_PLATFORMS="cpu", TMPDIR=str(tmp))


def _tokenize(inputs: str, out: str, *extra: str, kill: tuple[str, int] | None = None) -> list[str]:
  head = ["-m", "gemma2_jax.prepare_data"] if kill is None else [
    "-m", "tests.test_prepare_distributed", kill[0], str(kill[1]), "--"]
  return [sys.executable, *head, "tokenize", "--input", inputs, "--tokenizer", str(TOK),
          "--output_dir", out, "--num_shards", str(SHARDS), "--num_workers", "1", "--no_progress",
          *extra]


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _records(path: str) -> list[bytes]:
  """Every record of the shards under `path`, in order, through the training pipeline's reader
  (ArrayRecord over gs:// with array_record's own GCS client), after its meta.json check."""
  from gemma2_jax.data import SourceConfig
  from gemma2_jax.data.pipeline import _check_prepared
  from gemma2_jax.data.sources import ArrayRecordTokensSource, open_source
  from gemma2_jax.data.tokenizer import Tokenizer

  src = open_source(SourceConfig(paths=f"{path}/*.array_record*", format="arrayrecord"))
  assert isinstance(src, ArrayRecordTokensSource)
  _check_prepared(src, Tokenizer(TOK), path)
  return [src[i].astype("<i4").tobytes() for i in range(len(src))]


def _expected_records() -> list[bytes]:
  from gemma2_jax.data.tokenizer import Tokenizer

  tok = Tokenizer(TOK)
  # split on "\n" only: str.splitlines also splits on U+2028 etc., which these files contain
  lines = [ln for p in KO_FILES for ln in p.read_text(encoding="utf-8").split("\n") if ln.strip()]
  return [np.asarray(tok.encode(ln), "<i4").tobytes() for ln in lines]


def _meta(gcs, prefix: str) -> dict:
  meta = json.loads(gcs.read(f"{prefix}/meta.json"))
  del meta["seconds"]  # the shards' own times
  return meta


def test_three_workers_to_the_bucket_equal_one_and_resume_after_sigkill(gcs, tmp_path):
  from gemma2_jax.data import SourceConfig
  from gemma2_jax.data.prepare import tokenize

  for p in KO_FILES:
    gcs.upload(f"dist/in/{p.name}", p.read_bytes())
  inputs, one, out = gcs.path("dist/in/*.txt"), gcs.path("dist/one"), gcs.path("dist/out")
  shards = {f"dist/out/data.array_record-{s:05d}-of-{SHARDS:05d}" for s in range(SHARDS)}
  summaries = {f"dist/out/summaries/data-{s:05d}-of-{SHARDS:05d}.json" for s in range(SHARDS)}

  # Three workers at once (worker 1 is killed inside its second shard), and meanwhile one worker
  # (the reference) in this process.
  env1 = _env(gcs, tmp_path / "tmp1")
  procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for cmd, env in [
    (_tokenize(inputs, out, "--worker_index", "0", "--worker_count", "3"), _env(gcs, tmp_path / "t0")),
    (_tokenize(inputs, out, "--worker_index", "1", "--worker_count", "3", kill=("in_shard", 2)),
     env1),
    (_tokenize(inputs, out, "--worker_index", "2", "--worker_count", "3"), _env(gcs, tmp_path / "t2")),
  ]]
  try:
    reference = tokenize(SourceConfig(paths=inputs), str(TOK), one, num_shards=SHARDS,
                         num_workers=1, progress=False)
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  assert reference.missing == [] and reference.meta_path == f"{one}/meta.json"
  w0, w1, w2 = results
  assert w1[0] == -signal.SIGKILL, w1[2][-3000:]
  for i, (rc, stdout, stderr) in ((0, w0), (2, w2)):
    assert rc == 0, stderr[-3000:]
    owners = re.search(r"not complete yet \(those of worker\(s\) ([0-9, ]+)\)", stdout)
    assert owners and "1" in owners[1].split(", ") and str(i) not in owners[1], stdout
  # Worker 1 wrote shard 1, then died in shard 4: shard 4 is only a local temporary file (its
  # records so far), never visible in the bucket; no meta.json.
  listed = gcs.list("dist/out/")
  missing = {4, 7, 10, 13}
  assert set(listed) == {n for n in shards | summaries if int(n.split("-")[-3][-5:]) not in missing}
  assert list((tmp_path / "tmp1").glob(f"prepare_data-*/data.array_record-00004-of-{SHARDS:05d}"))

  # Re-run, killed again right after uploading shard 4, before its summary: shard 4 is in the
  # bucket (whole), but without its summary it is not complete.
  r = _run(_tokenize(inputs, out, "--worker_index", "1", "--worker_count", "3",
                     kill=("before_summary", 1)), env1)
  assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
  listed = gcs.list("dist/out/")
  assert f"dist/out/data.array_record-00004-of-{SHARDS:05d}" in listed
  assert f"dist/out/summaries/data-00004-of-{SHARDS:05d}.json" not in listed
  assert "dist/out/meta.json" not in listed

  # The plain re-run redoes shard 4 and writes 7, 10, 13, skips shard 1, and writes meta.json.
  r = _run(_tokenize(inputs, out, "--worker_index", "1", "--worker_count", "3"), env1)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "worker 1 of 3: wrote 4 shards (1 of its 5 were complete already; 14 in all)" in r.stdout
  assert f"wrote {out}/meta.json" in r.stdout
  assert set(gcs.list("dist/out/")) == shards | summaries | {"dist/out/meta.json"}

  # Three workers wrote exactly what one wrote: the same shards, the same records in each.
  assert set(gcs.list("dist/one/")) == {n.replace("dist/out", "dist/one") for n in
                                        shards | summaries | {"dist/out/meta.json"}}
  for s in range(SHARDS):
    name = f"data.array_record-{s:05d}-of-{SHARDS:05d}"
    assert _records_of(gcs, f"dist/out/{name}") == _records_of(gcs, f"dist/one/{name}"), name
  got, want = _records(out), _records(one)
  assert got == want and len(set(got)) > 0
  assert sorted(got) == sorted(_expected_records())  # every document once (in corpus order, too)
  assert got == _expected_records()
  assert _meta(gcs, "dist/out") == _meta(gcs, "dist/one")
  assert _meta(gcs, "dist/out")["documents"] == len(got)


def _records_of(gcs, name: str) -> list[bytes]:
  """The records of one shard object, read from a local copy."""
  import tempfile

  from array_record.python.array_record_module import ArrayRecordReader

  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "shard")
    Path(path).write_bytes(gcs.read(name))
    reader = ArrayRecordReader(path)
    try:
      return [reader.read() for _ in range(reader.num_records())]
    finally:
      reader.close()


def test_plan_shards():
  from gemma2_jax.data.prepare import plan_shards

  # At least as many shards as files: parts, the next one always to the file of the largest parts.
  assert plan_shards([10, 40], 5) == [[(0, 0, 1)], *[[(1, j, 4)] for j in range(4)]]
  assert plan_shards([100, 1, 1], 3) == [[(0, 0, 1)], [(1, 0, 1)], [(2, 0, 1)]]
  # Fewer: runs of whole files by bytes, none empty; no splitting (a document per file): files.
  assert plan_shards([100, 1, 1, 1], 2) == [[(0, 0, 1)], [(1, 0, 1), (2, 0, 1), (3, 0, 1)]]
  assert plan_shards([1, 1, 1, 100], 3) == [[(0, 0, 1), (1, 0, 1)], [(2, 0, 1)], [(3, 0, 1)]]
  assert plan_shards([5, 5], 4, split=False) == [[(0, 0, 1)], [(1, 0, 1)]]
  rng = random.Random(0)
  for _ in range(300):
    sizes = [rng.choice([0, 1, rng.randrange(1, 10**6)]) for _ in range(rng.randrange(1, 20))]
    for num_shards in (1, 2, len(sizes), len(sizes) + 1, 3 * len(sizes) + 5):
      for split in (True, False):
        plan = plan_shards(sizes, num_shards, split=split)
        assert plan == plan_shards(list(sizes), num_shards, split=split)  # deterministic
        assert len(plan) == (num_shards if split and num_shards >= len(sizes)
                             else min(num_shards, len(sizes)))
        assert all(plan)
        pieces = [p for shard in plan for p in shard]  # every part of every file once, in order
        assert pieces == [(f, j, n) for f, _ in enumerate(sizes)
                          for n in [next(x[2] for x in pieces if x[0] == f)] for j in range(n)]
  # Balanced: 4 files of 1..4 GB in 10 shards: parts of at most ~1.33x the mean part.
  plan = plan_shards([1, 2, 3, 4], 10)
  parts = {f: n for shard in plan for f, _, n in shard}
  assert max(s / parts[f] for f, s in enumerate([1, 2, 3, 4])) <= 1.34


def _counts(summary) -> dict:
  return {k: v for k, v in dataclasses.asdict(summary).items() if k != "seconds"}


def test_two_local_workers_equal_one(tmp_path):
  from gemma2_jax.data import SourceConfig
  from gemma2_jax.data.prepare import tokenize

  src = SourceConfig(paths=str(DATA / "ko" / "18098*.txt"))
  kw = dict(num_shards=5, num_workers=1, progress=False)
  one = tokenize(src, str(TOK), str(tmp_path / "one"), **kw)
  assert one.total is not None and one.missing == []
  (tmp_path / "two").mkdir()
  (tmp_path / "two" / ".data.array_record-00001-of-00005.tmp-123").write_bytes(b"killed")
  first = tokenize(src, str(TOK), str(tmp_path / "two"), worker_index=1, worker_count=2, **kw)
  assert first.total is None and first.written == [1, 3] and first.missing == [0, 2, 4]
  assert first.owners == [0] and not (tmp_path / "two" / "meta.json").exists()
  second = tokenize(src, str(TOK), str(tmp_path / "two"), worker_index=0, worker_count=2, **kw)
  assert second.written == [0, 2, 4] and second.missing == []
  assert _counts(second.total) == _counts(one.total)
  for p in sorted((tmp_path / "one").glob("*.array_record*")):
    assert (tmp_path / "two" / p.name).read_bytes() == p.read_bytes(), p.name
  # The killed run's temporary file is gone with the last shard; nothing else is left over.
  assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
    p.name for p in (tmp_path / "one").iterdir())
  again = tokenize(src, str(TOK), str(tmp_path / "two"), worker_index=1, worker_count=2, **kw)
  assert again.written == [] and again.skipped == [1, 3]
  assert _counts(again.total) == _counts(one.total)


def test_bad_worker_flags_and_a_mismatched_rerun_are_one_error_line(gcs, tmp_path, capsys):
  from gemma2_jax.cli import prepare_data
  from gemma2_jax.data import DataError, SourceConfig
  from gemma2_jax.data.prepare import tokenize
  from tests.cli import assert_one_error

  one_file = str(KO_FILES[0])
  out = gcs.path("mismatch/out")
  tokenize(SourceConfig(paths=one_file), str(TOK), out, num_shards=2, num_workers=1,
           progress=False)
  before = {n: gcs.read(n) for n in gcs.list("mismatch/")}
  args = ["tokenize", "--input", one_file, "--tokenizer", str(TOK), "--output_dir", out,
          "--no_progress"]
  # As a user runs it: one line, exit 2.
  assert_one_error(_run([sys.executable, "-m", "gemma2_jax.prepare_data", *args, "--worker_index",
                         "3", "--worker_count", "3"], _env(gcs, tmp_path / "tmp")),
                   "--worker_index must be in 0..2", rc=2)

  def one_error(*extra) -> str:
    capsys.readouterr()
    try:
      rc = prepare_data.main([*args, *extra])
    except SystemExit as e:  # the argument parser's error
      rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err

  assert "--worker_count must be >= 1" in one_error("--worker_count", "0")
  assert "--worker_index must be in 0..1" in one_error("--worker_index", "-1", "--worker_count", "2")
  # Another shard count into the same output: refused before anything is written.
  err = one_error("--num_shards", "3")
  assert "holds 2 shard(s) of another plan" in err and "the same --num_shards" in err
  # Other input under the same shard names: refused, naming the summary.
  with pytest.raises(DataError, match="shard 0 was made from other inputs"):
    tokenize(SourceConfig(paths=str(KO_FILES[1])), str(TOK), out, num_shards=2, num_workers=1,
             progress=False)
  assert {n: gcs.read(n) for n in gcs.list("mismatch/")} == before


def _killing_main(argv: list[str]) -> int:
  """The CLI, SIGKILLing itself at the point `argv[:2]` names (see the module docstring)."""
  mode, k = argv[0], int(argv[1])
  args = argv[argv.index("--") + 1:]
  from array_record.python import array_record_module

  from gemma2_jax.cli import prepare_data
  from gemma2_jax.data import prepare

  shards = {"n": 0}
  if mode == "in_shard":
    writer_class = array_record_module.ArrayRecordWriter

    class KillingWriter:
      def __init__(self, *a):
        shards["n"] += 1
        self._writer = writer_class(*a)

      def write(self, record):
        self._writer.write(record)
        if shards["n"] == k:
          os.kill(os.getpid(), signal.SIGKILL)

      def close(self):
        self._writer.close()

    array_record_module.ArrayRecordWriter = KillingWriter
  elif mode == "before_summary":
    write_summary = prepare._write_summary

    def killing_write_summary(job, summary):
      shards["n"] += 1
      if shards["n"] == k:
        os.kill(os.getpid(), signal.SIGKILL)
      write_summary(job, summary)

    prepare._write_summary = killing_write_summary
  else:
    raise SystemExit(f"unknown mode {mode}")
  return prepare_data.main(args)


if __name__ == "__main__":
  sys.exit(_killing_main(sys.argv[1:]))
