"""A teacher's top-k log-probs of one epoch of a config's training rows, written as offline
distillation records: the work of `python -m gemma2_jax.teacher_logits` (what it writes and how it is
resumed: gemma2_jax/cli/teacher_logits.py and gemma2_jax/data/offline.py).

`write_teacher_logits` is the whole run (the output directory's checks, the experiment, `run`); `run`
writes this process's share of the records, one forward of the teacher's top-k program at a time.
"""

from __future__ import annotations

import contextlib
import itertools
import os

from gemma2_jax.training.experiment import ConfigError

# The files of a teacher_logits output besides its record shards and `part-*` directories.
OUTPUT_FILES = {"piece_bytes.npy", "progress.json", "progress.json.tmp", "meta.json"}


def write_teacher_logits(config_path: str, overrides: dict[str, str], output_dir: str, *, k: int,
                         max_rows: int | None = None, batch_size: int | None = None,
                         progress: bool = True, rows_per_shard: int = 1024) -> dict | None:
  """Checks `output_dir` (new, or an unfinished output of ours to continue), loads the experiment of
  the config file with its `--config.` overrides and runs `run`; returns its meta. A directory this
  call created is removed again when it fails before any record was committed."""
  import jax

  from gemma2_jax.parallel import distributed

  check_output_dir(output_dir)
  distributed.barrier("teacher_logits_checked_output", timeout_s=600)  # before anyone writes
  created = not os.path.exists(output_dir)
  try:
    exp = load_experiment(config_path, overrides)
    return run(exp, output_dir, k=k, max_rows=max_rows, batch_size=batch_size, progress=progress,
               rows_per_shard=rows_per_shard)
  except BaseException:
    if created and jax.process_index() == 0 and os.path.isdir(output_dir) and not any(
        f in ("meta.json", "progress.json") for _, _, files in os.walk(output_dir) for f in files):
      import shutil

      shutil.rmtree(output_dir, ignore_errors=True)  # only what this run created
    raise


def check_output_dir(out: str) -> None:
  """A ConfigError unless `out` is new or an unfinished output of ours (see `output_state`)."""
  state = output_state(out)
  if state == "finished":
    raise ConfigError(f"output_dir {out} holds a finished teacher_logits output; nothing was "
                      "written (use a new --output_dir)")
  if state == "other":
    raise ConfigError(f"output_dir {out} exists and is not an empty directory (nor an unfinished "
                      "teacher_logits output to continue); nothing was written")


def output_state(out: str) -> str:
  """'new' (absent or empty), 'unfinished' (a stopped run of ours: continue it), 'finished', 'other'."""
  from gemma2_jax.data.offline import SHARD_PREFIX

  if not os.path.exists(out) or (os.path.isdir(out) and not os.listdir(out)):
    return "new"
  if not os.path.isdir(out):
    return "other"
  names = os.listdir(out)
  if not all(n in OUTPUT_FILES or n.startswith((SHARD_PREFIX, "part-")) for n in names):
    return "other"
  parts = [os.path.join(out, n) for n in names if n.startswith("part-")]
  finished = [os.path.exists(os.path.join(d, "meta.json")) for d in parts or [out]]
  return "finished" if all(finished) else "unfinished"


def load_experiment(config_path: str, overrides: dict[str, str]):
  """The Experiment of the config file with its overrides; it must name a teacher checkpoint that
  exists here."""
  import jax

  from gemma2_jax.checkpoint import CheckpointError
  from gemma2_jax.parallel.sharding import num_slices
  from gemma2_jax.training.experiment import apply_overrides, from_config, load_config_file

  config = apply_overrides(load_config_file(config_path), overrides)
  exp = from_config(config, num_devices=jax.device_count(), num_slices=num_slices(jax.devices()))
  if exp.teacher is None or not exp.teacher.checkpoint:
    raise ConfigError("teacher.checkpoint is not set: give the teacher's HF / Kaggle / native "
                      "checkpoint (--config.teacher.checkpoint=/path)")
  if not os.path.exists(exp.teacher.checkpoint):
    raise CheckpointError(f"teacher checkpoint {exp.teacher.checkpoint} does not exist")
  return exp


def run(exp, output_dir: str, *, k: int, max_rows: int | None = None, batch_size: int | None = None,
        progress: bool = True, rows_per_shard: int = 1024) -> dict | None:
  """Writes this process's share of the records; returns its part's meta (None if it writes none).

  Processes whose devices hold the same batch rows form one data group (see sharding.DataGroup):
  each group reads its shard of the rows and its first process writes them, to `output_dir` itself
  with one group, else to `output_dir/part-GGGGG-of-NNNNN/`; the reader takes the parts together,
  so every row is written exactly once. Re-running after a stop continues each part after its
  last complete shard of `rows_per_shard` rows.
  """
  import jax

  from gemma2_jax.data.offline import packed_rows
  from gemma2_jax.distill.teacher import load_teacher
  from gemma2_jax.parallel.sharding import data_group, make_mesh, process_row_blocks
  from gemma2_jax.training import modes, programs

  mesh = make_mesh(exp.mesh)
  teacher_cfg = modes.teacher_model_config(exp)
  params = load_teacher(exp.teacher, teacher_cfg, exp.rules, mesh)
  if k > teacher_cfg.vocab_size:
    raise ConfigError(f"--topk {k} exceeds the teacher's vocab_size {teacher_cfg.vocab_size}")
  topk = programs.topk_program(exp, teacher_cfg, mesh, k, batch_size)
  group = data_group(topk.batch_sharding, topk.rows)
  writer_process = min(p for p, blocks in process_row_blocks(topk.batch_sharding, topk.rows).items()
                       if blocks == group.blocks)
  rows, tok = packed_rows(exp.data_train, exp.tokenizer, vocab_size=teacher_cfg.vocab_size,
                          num_real_tokens=teacher_cfg.num_real_tokens, process_index=group.index,
                          process_count=group.count)
  quota = None if max_rows is None else max_rows // group.count + (group.index < max_rows % group.count)
  writer = None
  if jax.process_index() == writer_process:
    writer = open_writer(exp, output_dir, group, tok, k=k, vocab_size=teacher_cfg.vocab_size,
                         rows_per_forward=topk.rows, rows_per_shard=rows_per_shard)
  resumed = resumed_rows(writer, writer_process)
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm import tqdm

    bar = tqdm(desc="teacher top-k (this data group)", unit="row", total=quota, dynamic_ncols=True)
  with bar if bar is not None else contextlib.nullcontext():
    write_rows(lambda *a: topk(params, *a), topk.batch_sharding, rows, writer, rows_per_forward=group.rows,
               seq_len=exp.data_train.seq_len, resumed=resumed, quota=quota, bar=bar)
  return writer.meta if writer is not None else None


def open_writer(exp, output_dir: str, group, tok, *, k: int, vocab_size: int, rows_per_forward: int,
                rows_per_shard: int):
  """The TopKWriter of data group `group`'s part of the output, resuming a stopped run of it."""
  from gemma2_jax.data.offline import TopKWriter

  data = exp.data_train
  part = output_dir if group.count == 1 else os.path.join(
    output_dir, f"part-{group.index:05d}-of-{group.count:05d}")
  sources = [s.label for s in data.sources]
  return TopKWriter(part, k=k, seq_len=data.seq_len, vocab_size=vocab_size,
                    piece_bytes=tok.piece_bytes(), tokenizer=exp.tokenizer, tokenizer_sha256=tok.sha256,
                    extra_meta=dict(teacher=exp.teacher.checkpoint, teacher_dtype=exp.teacher.dtype,
                                    data_sources=sources, part=group.index, parts=group.count),
                    rows_per_shard=rows_per_shard, resume=True,
                    # A re-run continues an unfinished output only under the same settings.
                    run=dict(teacher=exp.teacher.checkpoint, teacher_dtype=exp.teacher.dtype,
                             data_sources=sources, k=k, seq_len=data.seq_len,
                             tokenizer_sha256=tok.sha256, rows_per_forward=rows_per_forward,
                             part=group.index, parts=group.count))


def resumed_rows(writer, writer_process: int) -> int:
  """Rows already written (complete shards of an earlier, stopped run): every process of the group
  skips them; only the group's writer can see its files, so the count is shared."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  resumed = writer.rows if writer is not None else 0
  if jax.process_count() > 1:
    resumed = int(multihost_utils.process_allgather(np.int64(resumed))[writer_process])
  return resumed


def write_rows(topk, batch_sharding, rows, writer, *, rows_per_forward: int, seq_len: int, resumed: int,
               quota: int | None, bar) -> None:
  """Runs `topk` (tokens, positions, segment_ids -> top-k log-probs, ids, global arrays) over the
  rows after the first `resumed`, `rows_per_forward` at a time, up to `quota` of them; the writer
  (None on the other processes of a data group) writes each row and its top-k, and meta.json at the
  end. Every process runs every forward (they are collectives) until no group has rows left."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from gemma2_jax.data.pipeline import stop_threads
  from gemma2_jax.parallel.sharding import global_to_host, host_to_global

  b = rows_per_forward
  row_iter = iter(rows)
  try:
    for _ in range(resumed):  # packing is deterministic: skipping costs tokenization, no forward
      next(row_iter)
    it = (_stack(chunk) for chunk in iter(lambda: list(itertools.islice(row_iter, b)), []))
    done = resumed
    if bar is not None:
      bar.update(resumed)
    with writer if writer is not None else contextlib.nullcontext():  # meta.json when done
      while True:
        batch = next(it, None) if quota is None or done < quota else None
        more = np.int32(batch is not None)
        if jax.process_count() > 1:
          more = multihost_utils.process_allgather(more).max()
        if not more:
          break
        if batch is None:  # this group is done: feed empty rows, write nothing
          full = seg = pos = np.zeros((0, seq_len + 1), np.int32)
        else:
          full, seg, pos = batch["tokens"], batch["tokens_segment_ids"], batch["tokens_positions"]
        n = len(full)
        if n < b:  # a last partial batch: pad with empty rows so the compiled shape is reused
          full, seg, pos = (np.pad(a, ((0, b - n), (0, 0))) for a in (full, seg, pos))
        logp, ids = topk(*(host_to_global(np.ascontiguousarray(a[:, :-1], np.int32), batch_sharding)
                           for a in (full, pos, seg)))
        logp, ids = global_to_host(logp), global_to_host(ids)
        n = n if quota is None else min(n, quota - done)
        for i in range(n if writer is not None else 0):
          writer.write(full[i], seg[i], pos[i], logp[i], ids[i])
        done += n
        if bar is not None:
          bar.update(n)
  except BaseException:
    stop_threads(row_iter)  # no reader thread logs on after the error line
    raise


def _stack(rows: list[dict]) -> dict:
  import numpy as np

  return {key: np.stack([r[key] for r in rows]) for key in rows[0]}
