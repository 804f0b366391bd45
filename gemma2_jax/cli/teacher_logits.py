"""`python -m gemma2_jax.teacher_logits --config=configs/<x>.py --output_dir=DIR [--topk=128]
[--max_rows=N] [--config.a.b=v ...]`

Runs the config's teacher (section `teacher`: checkpoint, dtype, preset) once over one epoch of the
packed rows of `data.train` in order (no shuffle; the last partial batch included) and writes, per
row, the teacher's top-k log-probs and ids of every position, with the row itself, as ArrayRecord
shards + meta.json (layout and sizes: gemma2_jax/data/offline.py). Train on them with
`--config.distill.offline_paths=DIR`; the trainer shuffles the rows.

Logits are built per sequence chunk of `train.loss_chunk` tokens and reduced to top-k at once, so a
[B, T, V] logits tensor never exists. Multi-host: as for training (`--distributed` or
`--coordinator_address/--num_processes/--process_id`); each data group of processes writes its rows
to `output_dir/part-*` (see `run`). A non-empty output_dir is refused; bad input is one
`error: ...` line, exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys

from gemma2_jax.cli.common import ArgumentParser, add_distributed_flags, parse_with_overrides, run_job


def parse_args(argv):
  parser = ArgumentParser(prog="python -m gemma2_jax.teacher_logits", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="experiment config file (configs/*.py)")
  parser.add_argument("--output_dir", required=True, help="new or empty directory for the records")
  parser.add_argument("--topk", type=int, default=128, help="teacher tokens kept per position")
  parser.add_argument("--max_rows", type=int, default=None, help="stop after this many packed rows")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="rows per teacher forward (default: one per batch shard of the mesh)")
  parser.add_argument("--rows_per_shard", type=int, default=1024,
                      help="rows per record file; a stopped run re-run continues after its last "
                           "complete file")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  add_distributed_flags(parser)
  args, overrides = parse_with_overrides(parser, argv)
  if args.topk < 1:
    parser.error(f"--topk must be >= 1, got {args.topk}")
  if args.max_rows is not None and args.max_rows < 1:
    parser.error(f"--max_rows must be >= 1, got {args.max_rows}")
  if args.rows_per_shard < 1:
    parser.error(f"--rows_per_shard must be >= 1, got {args.rows_per_shard}")
  if args.batch_size is not None and args.batch_size < 1:
    parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
  return args, overrides


def make_topk_fn(cfg, k: int, chunk: int):
  """(params, tokens, positions, segment_ids [B, T]) -> (log-probs float32, ids int32) [B, T, k].

  The teacher's logits exist one [B, chunk, V] chunk at a time (lax.map over T chunks).
  """
  import jax
  import jax.numpy as jnp

  from gemma2_jax.model.transformer import forward_hidden, logits_from_hidden

  def fn(params, tokens_BT, positions_BT, segment_ids_BT):
    hidden_BTD = forward_hidden(cfg, params, tokens_BT, positions_BT, segment_ids_BT)
    B, T, D = hidden_BTD.shape
    c = min(chunk, T)
    n = -(-T // c)
    hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, n * c - T), (0, 0)))
    hidden_nBcD = jnp.moveaxis(hidden_BTD.reshape(B, n, c, D), 1, 0)
    embedding_VD = params["embedder"]["input_embedding"]

    def one(hidden_BcD):
      logp_BcV = jax.nn.log_softmax(logits_from_hidden(cfg, embedding_VD, hidden_BcD), axis=-1)
      return jax.lax.top_k(logp_BcV.astype(jnp.float32), k)

    logp_nBck, ids_nBck = jax.lax.map(one, hidden_nBcD)
    def back(x):
      return jnp.moveaxis(x, 0, 1).reshape(B, n * c, k)[:, :T]
    return back(logp_nBck), back(ids_nBck).astype(jnp.int32)

  return fn


def topk_step(exp, teacher_cfg, mesh, k: int, batch_size: int | None = None):
  """(jitted (params, tokens, positions, segment_ids) -> (top-k log-probs, ids), batch sharding, rows
  per forward): the step `run` executes, shared with the AOT check."""
  import jax
  from jax.sharding import NamedSharding

  from gemma2_jax.parallel.sharding import batch_shards, logical_to_spec

  batch_sharding = NamedSharding(mesh, logical_to_spec(("batch", "length"), exp.rules))
  n_shards = batch_shards(batch_sharding)
  # One row per batch shard by default: train.global_batch rows (512 x 8k for distill_9b) in one
  # forward would need ~0.5 TB for a single chunk's fp32 logits over a 256k vocab.
  B = batch_size or n_shards
  if B % n_shards:
    raise ValueError(f"batch of {B} rows is not divisible by the {n_shards} batch shards of the mesh")
  out_sharding = NamedSharding(mesh, logical_to_spec(("batch", "length", None), exp.rules))
  # Traced at the first call or lower(), which the callers make under activation_sharding.
  step = jax.jit(make_topk_fn(teacher_cfg, k, exp.train.loss_chunk),
                 out_shardings=(out_sharding, out_sharding))
  return step, batch_sharding, B


def _stack(rows: list[dict]) -> dict:
  import numpy as np

  return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def run(exp, output_dir: str, *, k: int, max_rows: int | None = None, batch_size: int | None = None,
        progress: bool = True, rows_per_shard: int = 1024) -> dict:
  """Writes this process's share of the records; returns its part's meta (None if it writes none).

  Processes whose devices hold the same batch rows form one data group (see sharding.DataGroup):
  each group reads its shard of the rows and its first process writes them, to `output_dir` itself
  with one group, else to `output_dir/part-GGGGG-of-NNNNN/`; the reader takes the parts together,
  so every row is written exactly once. Re-running after a stop continues each part after its
  last complete shard of `rows_per_shard` rows.
  """
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from gemma2_jax.data.offline import TopKWriter, packed_rows
  from gemma2_jax.data.pipeline import stop_threads
  from gemma2_jax.distill.teacher import load_teacher
  from gemma2_jax.parallel.sharding import (
    activation_sharding,
    data_group,
    global_to_host,
    host_to_global,
    make_mesh,
    process_row_blocks,
  )

  mesh = make_mesh(exp.mesh)
  teacher_cfg, params = load_teacher(exp.teacher, exp.model, exp.rules, mesh)
  if k > teacher_cfg.vocab_size:
    raise ValueError(f"--topk {k} exceeds the teacher's vocab_size {teacher_cfg.vocab_size}")
  data = exp.data_train
  T = data.seq_len
  topk, batch_sharding, B = topk_step(exp, teacher_cfg, mesh, k, batch_size)
  group = data_group(batch_sharding, B)
  writer_process = min(
    p for p, blocks in process_row_blocks(batch_sharding, B).items() if blocks == group.blocks)
  writes = jax.process_index() == writer_process
  rows, tok = packed_rows(data, exp.tokenizer, vocab_size=teacher_cfg.vocab_size,
                          num_real_tokens=teacher_cfg.num_real_tokens, process_index=group.index,
                          process_count=group.count)
  quota = None if max_rows is None else max_rows // group.count + (group.index < max_rows % group.count)
  writer = None
  if writes:
    part = output_dir if group.count == 1 else os.path.join(
      output_dir, f"part-{group.index:05d}-of-{group.count:05d}")
    writer = TopKWriter(part, k=k, seq_len=T, vocab_size=teacher_cfg.vocab_size,
                        piece_bytes=tok.piece_bytes(), tokenizer=exp.tokenizer,
                        tokenizer_sha256=tok.sha256,
                        extra_meta=dict(teacher=exp.teacher.checkpoint, teacher_dtype=exp.teacher.dtype,
                                        data_sources=[s.label for s in data.sources],
                                        part=group.index, parts=group.count),
                        rows_per_shard=rows_per_shard, resume=True,
                        # A re-run continues an unfinished output only under the same settings.
                        run=dict(teacher=exp.teacher.checkpoint, teacher_dtype=exp.teacher.dtype,
                                 data_sources=[s.label for s in data.sources], k=k, seq_len=T,
                                 tokenizer_sha256=tok.sha256, rows_per_forward=B,
                                 part=group.index, parts=group.count))
  # Rows already written (complete shards of an earlier, stopped run): every process of the group
  # skips them; only the group's writer can see its files, so the count is shared.
  resumed = writer.rows if writer is not None else 0
  if jax.process_count() > 1:
    resumed = int(multihost_utils.process_allgather(np.int64(resumed))[writer_process])
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm import tqdm

    bar = tqdm(desc="teacher top-k (this data group)", unit="row", total=quota, dynamic_ncols=True)
  b = group.rows  # rows this process feeds per forward
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
        # Every process runs every forward (they are collectives): stop once no group has rows left.
        more = np.int32(batch is not None)
        if jax.process_count() > 1:
          more = multihost_utils.process_allgather(more).max()
        if not more:
          break
        if batch is None:  # this group is done: feed empty rows, write nothing
          full = seg = pos = np.zeros((0, T + 1), np.int32)
        else:
          full, seg, pos = batch["tokens"], batch["tokens_segment_ids"], batch["tokens_positions"]
        n = len(full)
        if n < b:  # a last partial batch: pad with empty rows so the compiled shape is reused
          pad = ((0, b - n), (0, 0))
          full, seg, pos = (np.pad(a, pad) for a in (full, seg, pos))
        with activation_sharding(mesh, exp.rules):
          logp, ids = topk(params, *(host_to_global(np.ascontiguousarray(a[:, :-1], np.int32),
                                                    batch_sharding) for a in (full, pos, seg)))
        logp, ids = global_to_host(logp), global_to_host(ids)
        if quota is not None:
          n = min(n, quota - done)
        if writer is not None:
          for i in range(n):
            writer.write(full[i], seg[i], pos[i], logp[i], ids[i])
        done += n
        if bar is not None:
          bar.update(n)
  except BaseException:
    stop_threads(row_iter)  # no reader thread logs on after the error line
    raise
  if bar is not None:
    bar.close()
  return writer.meta if writer is not None else None


def _output_state(out: str) -> str:
  """'new' (absent or empty), 'unfinished' (a stopped run of ours: continue it), 'finished', 'other'."""
  from gemma2_jax.data.offline import SHARD_PREFIX

  if not os.path.exists(out) or (os.path.isdir(out) and not os.listdir(out)):
    return "new"
  if not os.path.isdir(out):
    return "other"
  names = os.listdir(out)
  ours = {"piece_bytes.npy", "progress.json", "progress.json.tmp", "meta.json"}
  if not all(n in ours or n.startswith((SHARD_PREFIX, "part-")) for n in names):
    return "other"
  parts = [os.path.join(out, n) for n in names if n.startswith("part-")]
  finished = [os.path.exists(os.path.join(d, "meta.json")) for d in parts or [out]]
  return "finished" if all(finished) else "unfinished"


def main(argv=None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  out = args.output_dir

  def write() -> int:
    import jax

    from gemma2_jax.checkpoint import CheckpointError
    from gemma2_jax.parallel import distributed
    from gemma2_jax.training.experiment import ConfigError, apply_overrides, from_config, load_config_file

    state = _output_state(out)
    if state == "finished":
      raise ConfigError(f"output_dir {out} holds a finished teacher_logits output; nothing was "
                        "written (use a new --output_dir)")
    if state == "other":
      raise ConfigError(f"output_dir {out} exists and is not an empty directory (nor an unfinished "
                        "teacher_logits output to continue); nothing was written")
    distributed.barrier("teacher_logits_checked_output", timeout_s=600)  # before anyone writes
    created = not os.path.exists(out)
    try:
      config = apply_overrides(load_config_file(args.config), overrides)
      exp = from_config(config, num_devices=jax.device_count())
      if exp.teacher is None or not exp.teacher.checkpoint:
        raise ConfigError("teacher.checkpoint is not set: give the teacher's HF / Kaggle / native "
                          "checkpoint (--config.teacher.checkpoint=/path)")
      if not os.path.exists(exp.teacher.checkpoint):
        raise CheckpointError(f"teacher checkpoint {exp.teacher.checkpoint} does not exist")
      meta = run(exp, out, k=args.topk, max_rows=args.max_rows, batch_size=args.batch_size,
                 progress=not args.no_progress, rows_per_shard=args.rows_per_shard)
    except BaseException:
      if created and jax.process_index() == 0 and os.path.isdir(out) and not any(
          f in ("meta.json", "progress.json") for _, _, files in os.walk(out) for f in files):
        import shutil

        shutil.rmtree(out, ignore_errors=True)  # only what this run created
      raise
    if meta is not None and jax.process_index() == 0:
      q = meta["quantization"]
      parts = f" (part {meta['part'] + 1} of {meta['parts']})" if meta["parts"] > 1 else ""
      print(f"done{parts}: {meta['rows']} rows, {meta['tokens']} tokens, k={meta['k']}, "
            f"{meta['record_bytes_per_token']:.1f} bytes/token ({meta['bytes_per_token']:.1f} with "
            f"the files' fixed overhead), max |dequant - logprob| = {q['max_abs_error']:.2g}; "
            f"output_dir={out}")
    return 0

  return run_job(args, write, lambda: (ValueError,))

