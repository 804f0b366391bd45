"""Remote (gs://) text / JSONL / Parquet sources shared out by bytes between data groups, through the
GCS emulator (tests/gcs.py) behind a counting HTTP proxy: every document is read exactly once per
epoch over the groups, each group indexes and reads only its own byte range with ranged GETs (never a
whole object), and a group resumes exactly.

The two data groups are two iterators in this process (process_index 0 and 1 of 2), built and read
one after the other so that the proxy's log tells their requests apart; a real multi-process run
goes through the same code (open_source -> RemoteLinesSource, _ShardedEpochChunks).
"""

from __future__ import annotations

import collections
import json
import pathlib
import random

import numpy as np
import pytest

from gemma2_jax.data import (
  BOS_ID,
  EOS_ID,
  DataConfig,
  SourceConfig,
  Tokenizer,
  make_eval_iterator,
  make_train_iterator,
  sources,
)
from tests.gcs import CountingProxy, gcs_emulator  # noqa: F401  (the `gcs` fixture)

DATA = pathlib.Path(__file__).parent / "data"
TOK = str(DATA / "ko_sp1024.model")
KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask", "target_bytes")
BLOCK = 4096  # remote_read_block_bytes in these tests: the index scan reads at most this past a range


@pytest.fixture
def proxy(gcs, monkeypatch):
  """Routes this process's gcsfs requests through a CountingProxy."""
  proxy = CountingProxy(gcs.url)
  # gcsfs reads the variable at each request: cached filesystems follow it too.
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
  yield proxy
  proxy.close()


# --- the corpus --------------------------------------------------------------------------------------


def _corpus(n_files: int = 3, docs_per_file: int = 60, seed: int = 0) -> list[list[str]]:
  paras = [ln for ln in (DATA / "ko" / "constitution.txt").read_text().splitlines() if ln.strip()]
  rng = random.Random(seed)
  return [[f"문서 {f}-{i}: " + " ".join(rng.sample(paras, rng.randint(1, 3)))
           for i in range(docs_per_file)] for f in range(n_files)]


def _upload_jsonl(gcs, prefix: str, files: list[list[str]]) -> list[bytes]:
  blobs = []
  for f, docs in enumerate(files):
    blob = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode()
    gcs.upload(f"{prefix}/part{f}.jsonl", blob)
    blobs.append(blob)
  return blobs


def _shard_lines(blobs: list[bytes], shard: int, num_shards: int):
  """What data group `shard` must hold: {file: (start, stop) of the group's byte range} and the
  (file, start, stop) of each line that starts in it."""
  total = sum(len(b) for b in blobs)
  lo, hi = total * shard // num_shards, total * (shard + 1) // num_shards
  ranges, lines, offset = {}, [], 0
  for f, blob in enumerate(blobs):
    a, b = max(lo, offset) - offset, min(hi, offset + len(blob)) - offset
    if a < b:
      ranges[f] = (a, b)
      start = 0
      for line in blob.split(b"\n")[:-1]:
        if a <= start < b:
          lines.append((f, start, start + len(line)))
        start += len(line) + 1
    offset += len(blob)
  return ranges, lines


# --- documents back from batches (as tests/test_data_pipeline.py) ------------------------------------


def _documents(batches, tok) -> list[str]:
  rows = []
  for b in batches:
    full = np.concatenate([b["tokens"], b["targets"][:, -1:]], axis=1)
    keep = np.concatenate([b["segment_ids"] != 0, full[:, -1:] != 0], axis=1)
    rows += [full[r][keep[r]] for r in range(len(full))]
  docs, cur = [], []
  for t in np.concatenate(rows).tolist():
    if t == BOS_ID and cur:
      docs.append(cur)
      cur = []
    cur.append(t)
  if cur:
    docs.append(cur)
  assert all(d[0] == BOS_ID and d[-1] == EOS_ID for d in docs)
  return [tok.decode(d[1:-1]) for d in docs]


def _cfg(paths: str, **kw) -> DataConfig:
  return DataConfig(sources=[SourceConfig(paths=paths)], **dict(dict(
    seq_len=64, global_batch=4, seed=5, tokenize_batch=16, remote_read_concurrency=4,
    remote_read_block_bytes=BLOCK), **kw))


# --- tests -------------------------------------------------------------------------------------------


def test_two_data_groups_read_every_document_once_and_only_their_bytes(gcs, proxy):
  files = _corpus()
  blobs = _upload_jsonl(gcs, "remote_shards", files)
  names = [f"remote_shards/part{f}.jsonl" for f in range(len(blobs))]
  tok = Tokenizer(TOK)
  seen: collections.Counter = collections.Counter()
  for shard in (0, 1):
    ranges, lines = _shard_lines(blobs, shard, 2)
    del proxy.log[:]
    it = make_train_iterator(_cfg(gcs.path("remote_shards/*.jsonl"), num_epochs=1, global_batch=2),
                             process_index=shard, process_count=2, tokenizer_path=TOK)
    index_reads = proxy.media_reads(read_only=True)
    del proxy.log[:]
    got = _documents(list(it), tok)
    doc_reads = proxy.media_reads(read_only=True)

    # The group holds exactly the documents whose lines start in its byte range.
    want = [json.loads(blobs[f][a:b])["text"] for f, a, b in lines]
    assert sorted(got) == sorted(want) and got != want  # all of them, shuffled
    seen.update(got)

    # Index: only the group's range (from the byte before it) plus the rest of its last line.
    for name, a, b in index_reads:
      lo, hi = ranges[names.index(name)]
      assert lo - 1 <= a and b <= hi + BLOCK, (shard, name, a, b, lo, hi)
    shard_bytes = sum(hi - lo for lo, hi in ranges.values())
    index_bytes = sum(b - a for _, a, b in index_reads)
    assert shard_bytes <= index_bytes <= shard_bytes + len(ranges) * (BLOCK + 1)

    # Documents: their own bytes (neighbours coalesced across at most _COALESCE_GAP bytes), within
    # the documents' extent, with fewer requests than documents.
    extent = {f: (min(a for g, a, _ in lines if g == f), max(b for g, _, b in lines if g == f))
              for f in ranges}
    for name, a, b in doc_reads:
      lo, hi = extent[names.index(name)]
      assert lo <= a and b <= hi, (shard, name, a, b, lo, hi)
    doc_bytes = sum(b - a for _, a, b in lines)
    assert doc_bytes <= sum(b - a for _, a, b in doc_reads) <= 1.05 * doc_bytes
    assert len(doc_reads) <= len(lines)

  # Together the two groups read every document exactly once.
  assert seen == collections.Counter(d for docs in files for d in docs)

  # An unshuffled pass (eval) reads its neighbouring documents in blocks of up to BLOCK bytes.
  it = make_eval_iterator(_cfg(gcs.path("remote_shards/*.jsonl"), global_batch=2),
                          process_index=1, process_count=2, tokenizer_path=TOK)
  del proxy.log[:]
  got = _documents(list(it), tok)
  ranges, lines = _shard_lines(blobs, 1, 2)
  assert got == [json.loads(blobs[f][a:b])["text"] for f, a, b in lines]
  doc_reads = proxy.media_reads(read_only=True)
  chunks = -(-len(lines) // 16)  # a chunk (tokenize_batch documents) is one batched read
  blocks = -(-sum(b - a for _, a, b in lines) // BLOCK)
  assert len(doc_reads) <= chunks + blocks + len(ranges) < len(lines) / 3


def test_a_data_group_resumes_exactly(gcs, proxy):
  """A resumed shard gives the batches of the run it resumes (two epochs, each reshuffled); a state
  from another group's position is refused by the fingerprint."""
  _upload_jsonl(gcs, "remote_resume", _corpus(n_files=2, docs_per_file=50, seed=1))
  cfg = _cfg(gcs.path("remote_resume"), global_batch=2, num_epochs=2)
  kw = dict(process_index=1, process_count=2, tokenizer_path=TOK)
  ref = list(make_train_iterator(cfg, **kw))
  assert len(ref) > 10
  k = len(ref) // 2 + 1  # in the second epoch
  it = make_train_iterator(cfg, **kw)
  _ = [next(it) for _ in range(k)]
  state = json.loads(json.dumps(it.get_state()))
  assert state["fingerprint"]["byte_sharded_sources"] == [0]
  fresh = make_train_iterator(cfg, **kw)
  fresh.set_state(state)
  rest = list(fresh)
  assert len(rest) == len(ref) - k
  for x, y in zip(rest, ref[k:], strict=True):
    for key in KEYS:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)
  it.close()


def test_parquet_data_groups_read_only_their_row_groups(gcs, proxy, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  files = _corpus(n_files=2, docs_per_file=80, seed=2)
  for f, docs in enumerate(files):
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), tmp_path / f"{f}.parquet",
                   row_group_size=10)
    gcs.upload(f"remote_pq/{f}.parquet", (tmp_path / f"{f}.parquet").read_bytes())
  sizes = [(tmp_path / f"{f}.parquet").stat().st_size for f in range(2)]
  total = sum(sizes)
  seen: collections.Counter = collections.Counter()
  for shard in (0, 1):
    del proxy.log[:]
    src = sources.open_source(SourceConfig(paths=gcs.path("remote_pq/*.parquet")), shard=shard,
                              num_shards=2, reads=sources.RemoteReads(4, BLOCK))
    assert src.presharded and 0 < len(src) < 160
    got = src.__getitems__(list(range(len(src))))
    seen.update(got)
    reads = proxy.media_reads(read_only=True)
    # footers (the last bytes of a file) and the "text" chunks of the group's own row groups only
    lo, hi = total * shard // 2, total * (shard + 1) // 2
    for name, a, b in reads:
      f = int(name.rsplit("/", 1)[1][0])
      md = pq.read_metadata(tmp_path / f"{f}.parquet")
      base = sum(sizes[:f])
      if b == sizes[f]:
        continue  # the footer
      g = next(g for g in range(md.num_row_groups)
               if sources._row_group_bytes(md, g, ["text"]) == (a, b))
      assert lo <= base + sources._row_group_bytes(md, g)[0] < hi, (shard, name, g)
  assert seen == collections.Counter(d for docs in files for d in docs)


@pytest.mark.parametrize("num_shards", [1, 2, 5])
def test_streaming_index_matches_the_whole_file_index(tmp_path, num_shards, monkeypatch):
  """_index_lines over byte ranges, in tiny blocks and tails, finds the lines _line_index finds in
  whole files (CRLF, blank lines, a last line without a newline), each in exactly one range."""
  rng = random.Random(num_shards)
  monkeypatch.setattr(sources, "_TAIL_BYTES", 3)
  for trial in range(40):
    paths = []
    for k in range(rng.randint(1, 3)):
      parts = [rng.choice([b"", b"a", b"\r", b"abc" * rng.randint(0, 40), b"x\r"])
               + rng.choice([b"\n", b"\r\n", b"\n\n"]) for _ in range(rng.randint(0, 25))]
      data = b"".join(parts) + rng.choice([b"", b"tail", b"tail\r", b"\r"])
      paths.append(tmp_path / f"{trial}_{k}.txt")
      paths[-1].write_bytes(data)
    files = sources._Files([str(p) for p in paths])
    want = []
    for f, p in enumerate(paths):
      starts, stops, _ = sources._line_index(np.frombuffer(p.read_bytes(), np.uint8))
      want += [(f, int(a), int(b)) for a, b in zip(starts, stops, strict=True)]
    sizes = files.sizes()
    got = []
    for shard in range(num_shards):
      total = sum(sizes)
      segments = sources._segments(sizes, total * shard // num_shards,
                                   total * (shard + 1) // num_shards)
      reads = sources.RemoteReads(concurrency=rng.choice([1, 3]), block_bytes=rng.choice([5, 64]))
      starts, lens, counts = sources._index_lines(files, sizes, segments, reads)
      fs = np.repeat([f for f, _, _ in segments], counts)
      got += [(int(f), int(a), int(a + n)) for f, a, n in zip(fs, starts, lens, strict=True)]
    assert got == want, trial
