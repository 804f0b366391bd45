"""Corpus -> ArrayRecord shards of SentencePiece ids (tokenize once, train many times), and a
small SentencePiece trainer (`train_corpus_tokenizer`). CLI: `python -m gemma2_jax.prepare_data
{tokenize,train-tokenizer}` (gemma2_jax/cli/prepare_data.py).

Records hold one document each as little-endian int32 ids *without* <bos>/<eos> (the pipeline adds
them per DataConfig). `meta.json` beside the shards records the tokenizer hash and the summary (its
`seconds`: the shards' own times added up), and is written last.

Output to a local directory or straight to a bucket (gs://), by one command or by N cooperating
workers (`worker_index` of `worker_count`: one command per host or per process, no coordination
service):
  plan     Every worker lists the input files (sorted, sizes from the listing) and computes the same
           plan (`plan_shards`): output shard s of S is a run of whole input files, or one part of
           a large file (a remote text / JSONL / Parquet part holds the documents that start in its
           share of the file's bytes and reads only those; a local one: its share of the file's
           documents). The plan depends on the inputs and `num_shards` only, never on the number of
           workers or processes: any worker count writes the same shards.
  work     Worker w writes the shards s with s % worker_count == w, `num_workers` processes at a time.
           A shard is written to a local temporary file and then renamed into place (local output)
           or uploaded (a bucket: the object appears only once its upload completes), so a shard is
           visible under its final name only when it is whole. Then its summary,
           `summaries/{name}-SSSSS-of-NNNNN.json` (counts and the pieces of input it was made from),
           is written: the shard is complete when both exist.
  resume   A re-run skips its complete shards and writes the others (a killed worker re-run finishes
           only what it had left); a summary whose pieces differ from this run's plan (other input,
           num_shards or tokenizer) is an error, as are shards of another shard count.
  meta     After its own shards, each worker lists the summaries: the one that finds all S complete
           sums them and writes meta.json last (two finishing together write the same file). A
           worker that finishes early reports which shards are missing and exits; re-running any
           worker once all are complete writes meta.json.

Chat data (`--chat`) is not pre-tokenized: the shards hold no loss weights, and the pipeline renders
and encodes conversations on the fly. `train-tokenizer --chat` trains on the conversations' text; every
trained tokenizer has Gemma's turn markers `<start_of_turn>` / `<end_of_turn>` as single pieces.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gemma2_jax.data.chat import Conversation
from gemma2_jax.data.config import SourceConfig
from gemma2_jax.data.sources import STATS, DataError, open_source
from gemma2_jax.paths import is_remote

log = logging.getLogger(__name__)

# group_size:1 keeps every record independently readable: random access for global shuffling.
ARRAY_RECORD_OPTIONS = "group_size:1"
_CHUNK = 512  # documents per SentencePiece batch call
# Default shard count: at least one shard per process of every worker, and about one per GiB of
# input (a shard is the unit of resume: a killed worker redoes at most one per process).
SHARD_BYTES = 1 << 30
SUMMARIES = "summaries"  # subdirectory of the per-shard summaries (outside the shards' glob)


@dataclasses.dataclass
class Summary:
  documents: int = 0
  tokens: int = 0
  bytes: int = 0
  chars: int = 0
  skipped_empty: int = 0
  bad_utf8: int = 0
  bad_records: int = 0
  seconds: float = 0.0

  def add(self, other: Summary) -> None:
    for f in dataclasses.fields(self):
      if f.name != "seconds":
        setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

  def lines(self) -> list[str]:
    tok = max(self.tokens, 1)
    rate = self.tokens / self.seconds if self.seconds else 0.0
    return [
        f"documents   {self.documents:,}  (skipped: {self.skipped_empty:,} empty, "
        f"{self.bad_records:,} bad records; {self.bad_utf8:,} with invalid UTF-8 repaired)",
        f"tokens      {self.tokens:,}",
        f"bytes       {self.bytes:,} UTF-8  ({self.chars:,} chars)",
        f"chars/token {self.chars / tok:.3f}   bytes/token {self.bytes / tok:.3f}",
        f"time        {self.seconds:.1f} s  ({rate:,.0f} tokens/s)",
    ]


@dataclasses.dataclass
class TokenizeReport:
  """What one `tokenize` call did. `summary`: the shards it wrote (seconds: its wall time);
  `total`: every shard's summary summed, as in meta.json (seconds: the shards' own times added up),
  None while shards are missing; `missing`: the shards not complete yet (owned by `owners`)."""

  summary: Summary
  total: Summary | None
  num_shards: int
  written: list[int]
  skipped: list[int]
  missing: list[int]
  worker_index: int
  worker_count: int
  meta_path: str | None

  @property
  def owners(self) -> list[int]:
    return sorted({s % self.worker_count for s in self.missing})


# --- the plan ------------------------------------------------------------------------------------

Piece = tuple[int, int, int]  # (input file, part, parts): part `part` of `parts` of that file


def plan_shards(sizes: Sequence[int], num_shards: int, *, split: bool = True) -> list[list[Piece]]:
  """Input files (their sizes in bytes, in corpus order) -> output shards, each a list of pieces.

  num_shards >= files (and `split`): each file is cut into parts, at least one, num_shards in all,
  the next part always going to the file whose parts are largest (so the parts are about equally
  large); a shard is one part. Fewer shards than files (or no splitting: a document per file): runs
  of whole consecutive files, about equal in bytes, none empty (min(num_shards, files) shards).
  The shards keep corpus order. A pure function of its arguments: every worker computes the same.
  """
  n = len(sizes)
  if n == 0 or num_shards < 1:
    raise ValueError(f"no shards for {n} files and num_shards={num_shards}")
  if split and num_shards >= n:
    parts = [1] * n
    heap = [(-size, f) for f, size in enumerate(sizes)]
    heapq.heapify(heap)
    for _ in range(num_shards - n):
      _, f = heapq.heappop(heap)
      parts[f] += 1
      heapq.heappush(heap, (-sizes[f] / parts[f], f))
    return [[(f, j, parts[f])] for f in range(n) for j in range(parts[f])]
  s = min(num_shards, n)
  total = max(sum(sizes), 1)
  shards: list[list[Piece]] = [[] for _ in range(s)]
  offset, k = 0, -1
  for f, size in enumerate(sizes):
    want = (2 * offset + size) * s // (2 * total)  # the shard holding the file's middle byte
    # Never skip a shard (one more at most per file) and leave a file for each shard still empty.
    k = min(max(want, k, s - (n - f)), k + 1, s - 1)
    shards[k].append((f, 0, 1))
    offset += size
  return shards


def shard_name(name: str, s: int, num_shards: int) -> str:
  return f"{name}.array_record-{s:05d}-of-{num_shards:05d}"


def summary_name(name: str, s: int, num_shards: int) -> str:
  return f"{name}-{s:05d}-of-{num_shards:05d}.json"


# --- storage: a local directory or a bucket ------------------------------------------------------


def _join(directory: str, *names: str) -> str:
  return "/".join([directory.rstrip("/"), *names]) if is_remote(directory) else os.path.join(
    directory, *names)


def _fs(path: str):
  """(fsspec filesystem, path for it) of a remote path."""
  import fsspec

  return fsspec.core.url_to_fs(path)


def _storage_error(path: str, what: str, e: BaseException) -> DataError:
  text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
  return DataError(f"{path}: cannot {what} ({type(e).__name__}{': ' + text if text else ''})")


def _list(directory: str) -> set[str]:
  """Names of the files in `directory` (none when it does not exist), listed afresh: a bucket
  listing is never served from gcsfs's cache, which would hide other workers' shards."""
  if not is_remote(directory):
    try:
      return {e.name for e in os.scandir(directory) if e.is_file()}
    except FileNotFoundError:
      return set()
  fs, path = _fs(directory)
  try:
    fs.invalidate_cache(path)
    entries = fs.ls(path, detail=True)
  except FileNotFoundError:
    return set()
  except Exception as e:
    raise _storage_error(directory, "list", e) from None
  return {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") != "directory"}


def _read(path: str) -> bytes:
  if not is_remote(path):
    with open(path, "rb") as f:
      return f.read()
  fs, p = _fs(path)
  try:
    return fs.cat_file(p)
  except Exception as e:
    raise _storage_error(path, "read", e) from None


def _write_bytes(path: str, data: bytes) -> None:
  """Writes a whole file at once: a local one through a temporary name, a remote one with one
  upload (an object appears complete or not at all)."""
  if is_remote(path):
    fs, p = _fs(path)
    try:
      fs.pipe_file(p, data)
    except Exception as e:
      raise _storage_error(path, "write", e) from None
    return
  tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def _publish(tmp: str, path: str) -> None:
  """Moves a finished local shard `tmp` to its final name `path` (renamed, or uploaded)."""
  if not is_remote(path):
    os.replace(tmp, path)
    return
  fs, p = _fs(path)
  try:
    fs.put_file(tmp, p)
  except Exception as e:
    raise _storage_error(path, "upload a shard to", e) from None


def _sizes(files: Sequence[str]) -> list[int]:
  """Every file's size: remote ones from one listing per directory."""
  out = [0] * len(files)
  by_dir: dict[str, list[int]] = {}
  for f, path in enumerate(files):
    if is_remote(path):
      by_dir.setdefault(path.rsplit("/", 1)[0], []).append(f)
    else:
      out[f] = os.path.getsize(path)
  for directory, members in by_dir.items():
    fs, p = _fs(directory)
    try:
      listed = {e["name"].rstrip("/"): int(e["size"]) for e in fs.ls(p, detail=True)
                if e.get("type") != "directory"}
      for f in members:
        key = _fs(files[f])[1]
        out[f] = listed[key] if key in listed else int(fs.size(key))
    except Exception as e:
      raise _storage_error(directory, "list the input files in", e) from None
  return out


# --- writing one shard ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Job:
  shard: int
  source: SourceConfig  # the whole corpus (format resolved)
  inputs: list[tuple[str | None, int, int]]  # (input file, part, parts); file None: a TFDS source
  nbytes: int  # input bytes of the pieces (progress)
  tok: object
  output_dir: str
  name: str
  num_shards: int
  plan: dict  # what the summary records (and a re-run compares)
  bad_utf8: str
  bad_records: str


_counter = None


def _init_worker(counter):
  global _counter
  _counter = counter


def _empty(e: DataError) -> bool:
  """open_source's refusal of a piece with no documents (a blank file, a part no line starts in):
  here a shard of no records, not an error."""
  return "empty corpus" in str(e) or "no document starts" in str(e)


def _open_pieces(job: _Job) -> list[tuple[object, int, int]]:
  """(source, first, stop) document ranges of the shard's pieces, in order."""
  opts = dict(bad_utf8=job.bad_utf8, bad_records=job.bad_records)
  first, part, parts = job.inputs[0]
  if first is None:  # TFDS: part `part` of the documents
    src = open_source(job.source, **opts)
    return [(src, part * len(src) // parts, (part + 1) * len(src) // parts)]
  sc = dataclasses.replace(job.source, paths=tuple(path for path, _, _ in job.inputs), name=None)
  try:
    if parts == 1:  # whole files: one source over all of them
      src = open_source(sc, **opts)
      return [(src, 0, len(src))]
    src = open_source(sc, shard=part, num_shards=parts, **opts)
  except DataError as e:
    if not _empty(e):
      raise
    log.warning("shard %d: %s; it holds no records", job.shard, e)
    return []
  if getattr(src, "presharded", False):  # holds just the documents starting in this part's bytes
    return [(src, 0, len(src))]
  n = len(src)
  return [(src, part * n // parts, (part + 1) * n // parts)]


def _write_shard(job: _Job) -> Summary:
  """Writes shard `job.shard` (a local temporary file, then renamed into place or uploaded) and then
  its summary; returns the summary."""
  from array_record.python.array_record_module import ArrayRecordWriter

  t0 = time.perf_counter()
  tok = job.tok
  tok.num_threads = 1  # parallelism comes from the worker processes
  STATS.clear()
  out = Summary()
  ranges = _open_pieces(job)
  final = _join(job.output_dir, shard_name(job.name, job.shard, job.num_shards))
  if is_remote(job.output_dir):
    tmp_dir = tempfile.mkdtemp(prefix="prepare_data-")
    tmp = os.path.join(tmp_dir, os.path.basename(final))
  else:
    os.makedirs(job.output_dir, exist_ok=True)
    tmp_dir = None
    tmp = _join(job.output_dir, f".{os.path.basename(final)}.tmp-{os.getpid()}")
  total_docs = sum(hi - lo for _, lo, hi in ranges) or 1
  done_docs = 0
  try:
    writer = ArrayRecordWriter(tmp, ARRAY_RECORD_OPTIONS)
    try:
      for src, lo, hi in ranges:
        for start in range(lo, hi, _CHUNK):
          ids = range(start, min(start + _CHUNK, hi))
          docs = (list(src.__getitems__(list(ids))) if hasattr(src, "__getitems__")
                  else [src[i] for i in ids])
          texts = [d for d in docs if isinstance(d, str) and d.strip()]
          out.skipped_empty += sum(1 for d in docs if isinstance(d, str) and not d.strip())
          for text, toks in zip(texts, tok.encode_batch(texts), strict=True):
            writer.write(np.asarray(toks, dtype="<i4").tobytes())
            out.documents += 1
            out.tokens += len(toks)
            out.chars += len(text)
            out.bytes += len(text.encode("utf-8"))
          if _counter is not None:
            before = job.nbytes * done_docs // total_docs
            done_docs += len(ids)
            with _counter.get_lock():
              _counter.value += job.nbytes * done_docs // total_docs - before
    finally:
      writer.close()
    _publish(tmp, final)
  finally:
    if tmp_dir is not None:
      shutil.rmtree(tmp_dir, ignore_errors=True)
    elif os.path.exists(tmp):
      os.remove(tmp)
  out.bad_utf8 = STATS["bad_utf8"]
  out.bad_records = STATS["bad_records"]
  out.seconds = time.perf_counter() - t0
  _write_summary(job, out)
  return out


def _write_summary(job: _Job, summary: Summary) -> None:
  """The shard's completion record, written after the shard itself."""
  data = dict(shard=shard_name(job.name, job.shard, job.num_shards), plan=job.plan,
              summary=dataclasses.asdict(summary))
  directory = _join(job.output_dir, SUMMARIES)
  if not is_remote(directory):
    os.makedirs(directory, exist_ok=True)
  _write_bytes(_join(directory, summary_name(job.name, job.shard, job.num_shards)),
               json.dumps(data, indent=1, ensure_ascii=False).encode())


# --- the command ---------------------------------------------------------------------------------

_SHARD_RE = re.compile(r"-(\d{5,})-of-(\d{5,})$")


def _check_foreign(names: set[str], name: str, num_shards: int, output_dir: str) -> None:
  """Shards named like ours but not of this plan (another shard count) would be read with ours."""
  prefix = f"{name}.array_record-"
  foreign = sorted(n for n in names if n.startswith(prefix) and (
    not (m := _SHARD_RE.search(n)) or int(m[2]) != num_shards or int(m[1]) >= num_shards))
  if foreign:
    raise DataError(f"output_dir {output_dir} holds {len(foreign)} shard(s) of another plan "
                    f"({foreign[0]}; this run writes {shard_name(name, 0, num_shards)} ...): give "
                    "every worker and every re-run the same --num_shards, or use a new --output_dir")


def _load_summaries(output_dir: str, name: str, num_shards: int, shards: Sequence[int],
                    plans: dict[int, dict]) -> dict[int, Summary]:
  """The summaries of `shards`, each checked against this run's plan of the shard."""
  directory = _join(output_dir, SUMMARIES)
  paths = [_join(directory, summary_name(name, s, num_shards)) for s in shards]
  with ThreadPoolExecutor(16) as pool:
    datas = list(pool.map(_read, paths))
  out = {}
  for s, path, data in zip(shards, paths, datas, strict=True):
    try:
      d = json.loads(data)
      summary = Summary(**d["summary"])
      plan = d["plan"]
    except (ValueError, KeyError, TypeError) as e:
      raise DataError(f"{path}: not a shard summary written by prepare_data ({e}); delete it to "
                      "redo the shard") from None
    if plan != plans[s]:
      diff = sorted(k for k in set(plan) | set(plans[s]) if plan.get(k) != plans[s].get(k))
      raise DataError(f"{path}: shard {s} was made from other {', '.join(diff)} than this run plans "
                      "(other --input files or sizes, --num_shards, --tokenizer or format options): "
                      "re-run with the same ones, or use a new --output_dir")
    out[s] = summary
  return out


def tokenize(source: SourceConfig, tokenizer_path: str, output_dir: str, *,
             num_shards: int | None = None, num_workers: int | None = None,
             worker_index: int = 0, worker_count: int = 1, bad_utf8: str = "replace",
             bad_records: str = "skip", name: str = "data", progress: bool = True) -> TokenizeReport:
  """Writes this worker's missing shards `{output_dir}/{name}.array_record-SSSSS-of-NNNNN` (and
  their summaries), then meta.json if every shard is complete. See the module docstring."""
  from gemma2_jax.data.tokenizer import Tokenizer

  if source.chat:
    raise DataError(f"source {source.label!r} is chat data: it is tokenized by the training pipeline "
                    "(shards would lose which tokens the loss counts); train from the JSONL / Parquet")
  if not 0 <= worker_index < worker_count:
    raise DataError(f"worker_index {worker_index} is not one of the {worker_count} workers "
                    f"(0..{worker_count - 1})")
  if not is_remote(output_dir) and os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise DataError(f"output_dir {output_dir} exists and is not a directory; name a new or existing "
                    "directory")
  t0 = time.perf_counter()
  tok = Tokenizer(tokenizer_path)
  tok.check()
  files, sizes, fmt = _input_files(source)
  source = dataclasses.replace(source, format=fmt)
  procs = num_workers or min(os.cpu_count() or 1, 8)
  if num_shards is None:
    num_shards = max(worker_count * procs, -(-sum(sizes) // SHARD_BYTES))
  shards = plan_shards(sizes, num_shards, split=not (fmt == "text" and source.doc_per == "file"))
  num_shards = len(shards)
  options = dict(format=fmt, text_field=source.text_field, doc_per=source.doc_per,
                 tfds_name=source.tfds_name, tfds_split=source.tfds_split)
  # Local inputs by absolute path: a re-run from another directory finds the same plan.
  where = [f if f is None or is_remote(f) else os.path.abspath(f) for f in files]
  plans = {s: dict(inputs=[[where[f], sizes[f], part, parts] for f, part, parts in pieces],
                   tokenizer_sha256=tok.sha256, options=options)
           for s, pieces in enumerate(shards)}

  names = _list(output_dir)
  _check_foreign(names, name, num_shards, output_dir)
  mine = list(range(worker_index, num_shards, worker_count))
  have = _list(_join(output_dir, SUMMARIES))
  complete = [s for s in mine if shard_name(name, s, num_shards) in names
              and summary_name(name, s, num_shards) in have]
  _load_summaries(output_dir, name, num_shards, complete, plans)  # a stale one is an error
  todo = [s for s in mine if s not in complete]
  jobs = [_Job(shard=s, source=source,
               inputs=[(files[f], part, parts) for f, part, parts in shards[s]],
               nbytes=sum(sizes[f] // parts for f, _, parts in shards[s]), tok=tok,
               output_dir=output_dir, name=name, num_shards=num_shards, plan=plans[s],
               bad_utf8=bad_utf8, bad_records=bad_records) for s in todo]
  done = _run_jobs(jobs, procs, progress=progress, desc=f"tokenize (worker {worker_index} of "
                   f"{worker_count})" if worker_count > 1 else "tokenize")
  done.seconds = time.perf_counter() - t0
  report = TokenizeReport(summary=done, total=None, num_shards=num_shards, written=todo,
                          skipped=complete, missing=[], worker_index=worker_index,
                          worker_count=worker_count, meta_path=None)
  return _finalize(report, output_dir, name, plans, source.label, dict(
    tokenizer=str(tokenizer_path), tokenizer_sha256=tok.sha256, vocab_size=tok.vocab_size,
    source=dataclasses.asdict(source), record_format="int32 little-endian"))


def _input_files(source: SourceConfig) -> tuple[list, list[int], str]:
  """(files, their sizes in bytes, format) of a source to tokenize; empty line-files left out."""
  from gemma2_jax.data.sources import expand_paths, infer_format

  if source.format == "tfds":
    return [None], [1], "tfds"
  files = expand_paths(source.paths)
  fmt = source.format if source.format != "auto" else infer_format(files)
  if fmt == "arrayrecord":
    raise DataError(f"source {source.label!r} is already tokenized")
  sizes = _sizes(files)
  if fmt in ("text", "jsonl") and source.doc_per == "line":  # an empty file holds no line
    files, sizes = [f for f, n in zip(files, sizes, strict=True) if n], [n for n in sizes if n]
    if not files:
      raise DataError(f"source {source.label!r}: empty corpus (every file is empty)")
  return files, sizes, fmt


def _run_jobs(jobs: list[_Job], procs: int, *, progress: bool, desc: str) -> Summary:
  """Writes the jobs' shards, in this process or a pool of `procs` (spawned), with a byte bar."""
  from tqdm import tqdm

  done = Summary()
  bar = tqdm(total=sum(j.nbytes for j in jobs), unit="B", unit_scale=True, disable=not progress,
             desc=desc)
  if min(procs, len(jobs)) <= 1:
    _init_worker(None)
    for job in jobs:
      done.add(_write_shard(job))
      bar.update(job.nbytes)
  else:
    ctx = mp.get_context("spawn")  # fork is unsafe once threads (grain, tqdm, gcsfs) exist
    counter = ctx.Value("q", 0)
    with ctx.Pool(min(procs, len(jobs)), initializer=_init_worker, initargs=(counter,)) as pool:
      res = pool.map_async(_write_shard, jobs, chunksize=1)
      while not res.ready():
        res.wait(0.2)
        bar.update(counter.value - bar.n)
      for part in res.get():
        done.add(part)
    bar.update(bar.total - bar.n)
  bar.close()
  return done


def _finalize(report: TokenizeReport, output_dir: str, name: str, plans: dict[int, dict],
              label: str, meta: dict) -> TokenizeReport:
  """meta.json, written last, by whichever worker finds every shard complete."""
  n = report.num_shards
  names = _list(output_dir)
  _check_foreign(names, name, n, output_dir)
  have = _list(_join(output_dir, SUMMARIES))
  report.missing = [s for s in range(n) if shard_name(name, s, n) not in names
                    or summary_name(name, s, n) not in have]
  if report.missing:
    return report
  total = Summary()
  for summary in _load_summaries(output_dir, name, n, range(n), plans).values():
    total.add(summary)
    total.seconds += summary.seconds
  if total.documents == 0:
    raise DataError(f"source {label!r}: no non-empty documents to tokenize")
  meta = dict(dataclasses.asdict(total), **meta, shards=[shard_name(name, s, n) for s in range(n)])
  report.meta_path = _join(output_dir, "meta.json")
  _write_bytes(report.meta_path, json.dumps(meta, indent=1, ensure_ascii=False).encode())
  report.total = total
  if not is_remote(output_dir):  # temporary files of killed runs (shards are all complete)
    for leftover in os.listdir(output_dir):
      if leftover.startswith(f".{name}.array_record-") and ".tmp-" in leftover:
        os.remove(os.path.join(output_dir, leftover))
  return report


def tokenize_corpus(source: SourceConfig, tokenizer_path: str, output_dir: str, **kw) -> Summary:
  """`tokenize` (same arguments) -> the totals of meta.json once every shard is complete, else the
  summary of the shards this call wrote."""
  report = tokenize(source, tokenizer_path, output_dir, **kw)
  return report.total or report.summary


def _dump_text(source: SourceConfig, path: str, max_docs: int) -> int:
  """Writes one document per line for the SentencePiece trainer (which reads lines)."""
  src = open_source(source)
  step = max(1, len(src) // max_docs)
  n = 0
  with open(path, "w", encoding="utf-8") as f:
    for i in range(0, len(src), step):
      d = src[i]
      if isinstance(d, Conversation):  # the text of its turns (the markers are pieces already)
        d = "\n".join(text for _, text in d.turns)
      if isinstance(d, str) and d.strip():
        f.write(d.replace("\n", " ") + "\n")
        n += 1
  return n


def train_corpus_tokenizer(source: SourceConfig, model_prefix: str, *, vocab_size: int,
                           character_coverage: float = 0.9995, max_docs: int = 1_000_000) -> str:
  """Trains a SentencePiece model with Gemma's conventions (`tokenizer.train_tokenizer`) on the
  documents of `source` and returns its path: text files of one document a line as they are, any
  other source through a dump of up to `max_docs` of its documents (a conversation: its turns' text)."""
  from gemma2_jax.data.sources import expand_paths, infer_format
  from gemma2_jax.data.tokenizer import train_tokenizer

  with tempfile.TemporaryDirectory() as tmp:
    fmt = source.format if source.format != "auto" else infer_format(expand_paths(source.paths))
    if fmt == "text" and source.doc_per == "line" and not source.chat:
      inputs = list(source.paths)  # the trainer reads lines itself
    else:
      inputs = [os.path.join(tmp, "corpus.txt")]
      _dump_text(source, inputs[0], max_docs)
    return train_tokenizer(inputs, model_prefix, vocab_size=vocab_size,
                           character_coverage=character_coverage)
