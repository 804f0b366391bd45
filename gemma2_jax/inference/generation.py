"""Sampling a checkpoint on the mesh of all the job's devices: the work of `python -m gemma2_jax.sample`
(see gemma2_jax/cli/sample.py for what it does, flag by flag).

`sample(job)` is the whole run: every process reads and checks every input alike, process 0 alone
reads and appends the output (`agree` hands its view to the others), then one streamed prompt
(`stream`) or batches of one prompt-length bucket each (`run_batches`), laid out over the processes
by `Layout`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import NamedTuple

from gemma2_jax.errors import UserError
from gemma2_jax.inference.prompts import SampleError, default_tokenizer, open_output, read_prompts

STREAM_CHUNK = 8  # tokens decoded per device call while streaming one prompt

# Fields of SampleJob that may differ between the processes of one job.
PER_PROCESS_FLAGS = ("no_progress", "checkpoint", "tokenizer", "prompts", "output")
ERROR_BYTES = 2048  # of process 0's error line, sent to the other processes


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleJob:
  """One run of `python -m gemma2_jax.sample`: every field is the flag of the same name."""

  checkpoint: str
  tokenizer: str | None  # None: `default_tokenizer(checkpoint)`
  prompt: str | None  # one prompt, streamed to stdout, or
  prompts: str | None  # a JSONL file of them, run in batches
  chat: bool
  max_new_tokens: int
  temperature: float
  top_k: int | None
  top_p: float | None
  seed: int
  stop_ids: tuple[int, ...]
  output: str | None
  batch_size: int
  max_len: int
  dtype: str
  cache_dtype: str
  mesh: str
  no_progress: bool


class Inputs(NamedTuple):
  """A job's inputs, read and checked alike by every process before any collective."""

  tokenizer: object
  prompts: list
  encoded: list[list[int]]
  cfg: object  # the checkpoint's ModelConfig
  mesh: object
  sampling: object  # SamplingConfig


def sample(job: SampleJob) -> None:
  """Runs `job` as this process's part of the job (every process calls it); a bad input is a
  SampleError (or another UserError) on every process alike."""
  import jax

  inputs = read_inputs(job)
  out, done, error = None, set(), None
  if jax.process_index() == 0:
    try:
      out, done = open_output(job.output, inputs.prompts)
    except (SampleError, OSError) as e:
      if jax.process_count() == 1:
        raise
      error = str(e) if isinstance(e, SampleError) else (
        f"{e.strerror or e}: {e.filename or job.output} (check the output path)")
  try:
    done = agree(job, inputs.prompts, inputs.encoded, done, error)
    if len(done) == len(inputs.prompts):  # a finished output: nothing to load
      if jax.process_index() == 0:
        print(f"{job.output} holds all {len(inputs.prompts)} prompts already", file=sys.stderr)
      return
    sampler = load_sampler(job.checkpoint, dtype_for(job.dtype), inputs.cfg, inputs.mesh)
    if job.prompt is not None:
      stream(sampler, inputs.tokenizer, inputs.encoded[0], inputs.sampling, job.seed)
    else:
      run_batches(sampler, inputs, job, done, out)
  finally:
    if out is not None:
      out.close()


def read_inputs(job: SampleJob) -> Inputs:
  """Every input but the output: a wrong checkpoint path fails before anything heavy, a prompt too
  long for `max_len` before the model is read."""
  from gemma2_jax import checkpoint
  from gemma2_jax.data.tokenizer import Tokenizer
  from gemma2_jax.inference.sampler import SamplingConfig, encode_prompt, stop_ids

  cfg = checkpoint.read_config(job.checkpoint)
  tokenizer = Tokenizer(job.tokenizer or default_tokenizer(job.checkpoint))
  if job.prompt is not None:
    prompts, places = [job.prompt], ["--prompt"]
  else:
    prompts, places = read_prompts(job.prompts, job.chat)
  encoded = []
  for prompt, where in zip(prompts, places, strict=True):
    try:
      ids = encode_prompt(tokenizer, prompt, job.chat)
    except UserError as e:
      raise type(e)(f"{where}: {e}") from None
    if len(ids) + job.max_new_tokens > job.max_len:
      raise SampleError(f"{where}: the prompt has {len(ids)} tokens: with --max_new_tokens "
                        f"{job.max_new_tokens} it exceeds the context --max_len {job.max_len}")
    encoded.append(ids)
  tokenizer.check(cfg.vocab_size)
  dtype_for(job.dtype)
  mesh = make_sampler_mesh(job.mesh, cfg)
  sampling = SamplingConfig(max_new_tokens=job.max_new_tokens, temperature=job.temperature,
                            top_k=job.top_k, top_p=job.top_p,
                            cache_dtype=dtype_for(job.cache_dtype, "--cache_dtype"),
                            stop_tokens=stop_ids(tokenizer, job.chat, job.stop_ids))
  return Inputs(tokenizer, prompts, encoded, cfg, mesh, sampling)


def agree(job: SampleJob, prompts: list, encoded: list, done: set[int], error: str | None) -> set[int]:
  """Several processes: the one exchange before any other collective. Every process has read and
  checked the same inputs by then; process 0 alone has read the output (`done`, or `error`).

  Every process gets process 0's error (and raises it: the same line everywhere, nobody left
  waiting), a check that all run the same command on the same prompts (a digest of the prompts,
  their ids and the sampling flags), and the prompts already done. Returns `done` as process 0 has it.
  """
  import hashlib

  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  if jax.process_count() == 1:
    if error is not None:
      raise SampleError(error)
    return done
  flags = {k: v for k, v in sorted(dataclasses.asdict(job).items()) if k not in PER_PROCESS_FLAGS}
  digest = hashlib.sha256(json.dumps([flags, prompts, encoded], ensure_ascii=False).encode()).digest()
  line = (error or "").encode()[:ERROR_BYTES]
  record = np.zeros(len(digest) + 1 + ERROR_BYTES, np.uint8)
  record[:len(digest)] = np.frombuffer(digest, np.uint8)
  record[len(digest)] = error is not None
  record[len(digest) + 1:len(digest) + 1 + len(line)] = np.frombuffer(line, np.uint8)
  records = multihost_utils.process_allgather(record)  # [processes, ...] on every process
  if records[0, len(digest)]:
    raise SampleError(bytes(records[0, len(digest) + 1:]).rstrip(b"\0").decode(errors="ignore"))
  other = [i for i, r in enumerate(records) if (r[:len(digest)] != records[0, :len(digest)]).any()]
  if other:
    raise SampleError(f"process {other[0]} has other prompts, prompt ids or sampling flags than "
                      "process 0: run the same command on every host, with the same --prompts file "
                      "and tokenizer")
  mask = np.zeros(len(prompts), np.uint8)
  mask[sorted(done)] = 1
  return set(np.flatnonzero(multihost_utils.broadcast_one_to_all(mask)).tolist())


def make_sampler_mesh(spec: str, cfg):
  """The mesh of `--mesh` `spec` (see `mesh_sizes`) over all the job's devices."""
  import jax

  from gemma2_jax.parallel.sharding import make_mesh

  try:
    return make_mesh(mesh_sizes(spec, cfg.num_kv_heads, jax.device_count()))
  except ValueError as e:
    if isinstance(e, SampleError):
      raise
    raise SampleError(f"--mesh {spec!r}: {e}") from None


def load_sampler(checkpoint_path: str, dtype: str, cfg, mesh):
  """The Sampler of the checkpoint (config `cfg`) on `mesh`; each process reads only its shards."""
  from gemma2_jax import checkpoint
  from gemma2_jax.inference.sampler import Sampler
  from gemma2_jax.model.transformer import LOGICAL_AXES
  from gemma2_jax.parallel.sharding import DEFAULT_RULES, logical_to_sharding

  shardings = logical_to_sharding(LOGICAL_AXES, mesh, DEFAULT_RULES)
  cfg, params = checkpoint.load_sharded(checkpoint_path, dtype, shardings, config=cfg)
  return Sampler(cfg.replace(dtype=dtype), params, mesh=mesh)


def dtype_for(name: str, flag: str = "--dtype") -> str:
  """The float dtype `name` (or alias) names; `auto`: float32 on CPU (bf16 matmuls are slow there),
  bfloat16 on accelerators. A SampleError naming `flag` for anything else."""
  import jax

  from gemma2_jax.model.config import float_dtype

  if name == "auto":
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
  try:
    return float_dtype(name)
  except UserError as e:
    raise SampleError(f"{flag} {e} or auto") from None


def mesh_sizes(spec: str, num_kv_heads: int, num_devices: int) -> dict[str, int]:
  """`axis=size,...` over dcn/data/fsdp/tensor (one size may be -1); empty: tensor over the kv
  heads, data the rest."""
  import math

  if not spec:
    tensor = math.gcd(num_kv_heads, num_devices)
    return {"dcn": 1, "data": num_devices // tensor, "fsdp": 1, "tensor": tensor}
  sizes = {"dcn": 1, "data": 1, "fsdp": 1, "tensor": 1}
  for part in spec.split(","):
    name, _, value = part.partition("=")
    if name.strip() not in sizes or not value.strip().lstrip("-").isdigit():
      raise SampleError(f"--mesh {spec!r}: expected axis=size pairs over {sorted(sizes)}")
    sizes[name.strip()] = int(value)
  return sizes


class Layout:
  """How one global batch of `size` rows is fed by the processes and read back.

  The processes whose devices hold the same rows form a data group (`sharding.data_group`); group g
  feeds rows [g * local, (g + 1) * local) of a batch's list as its own rows, which the Sampler lays out
  on the group's blocks of the global array (`sharding.host_to_global`): global row r is list position
  `order[r]`. `Sampler.start` pads the rows it is given to a multiple of the mesh's batch shards (all
  of them, not this group's share), so every group feeds such a multiple of real prompts and the
  Sampler adds no rows: `size` = groups x min_rows / groups rounded up to the batch shards, which is
  min_rows itself when that is a multiple of groups x shards (then the batches are those of one
  process on the same mesh). One process: min_rows rounded up to the batch shards, as before.
  """

  def __init__(self, sampler, min_rows: int):
    import math

    from gemma2_jax.parallel.sharding import data_group, process_row_blocks

    if sampler.row_sharding is None:
      self.index, self.local, self.order = 0, min_rows, list(range(min_rows))
      self.size, self.shards, self.groups = min_rows, 1, 1
      return
    self.shards = shards = sampler.rows_multiple
    self.groups = groups = data_group(sampler.row_sharding, shards).count
    self.local = math.ceil(math.ceil(min_rows / groups) / shards) * shards
    self.size = self.local * groups
    self.index = data_group(sampler.row_sharding, self.size).index
    blocks = sorted(set(process_row_blocks(sampler.row_sharding, self.size).values()))
    self.order = [0] * self.size
    for g, group_blocks in enumerate(blocks):
      at = g * self.local
      for start, stop in group_blocks:
        for r in range(start, stop):
          self.order[r], at = at, at + 1

  def start(self, sampler, rows: list[int], encoded, sampling, seed: int):
    """Prefills the prompts `rows` (indices into `encoded`, at most `size`; the batch filled with
    copies of the first), each process its group's share; per-row keys from the indices."""
    batch = rows + [rows[0]] * (self.size - len(rows))
    mine = batch[self.index * self.local:(self.index + 1) * self.local]
    return sampler.start([encoded[i] for i in mine], sampling, seed=seed, row_ids=mine)

  def results(self, state, n: int) -> list:
    """The first `n` rows' SampleResults, in list order, on every process."""
    from jax.experimental import multihost_utils

    from gemma2_jax.inference.sampler import SampleResult

    tokens, lengths, logprobs = multihost_utils.process_allgather(
      (state.tokens_BN, state.lengths_B, state.logprobs_BN), tiled=True)
    if len(tokens) != self.size:
      raise AssertionError(f"the sampler ran {len(tokens)} rows, expected {self.size}")
    out = [None] * n
    for r, at in enumerate(self.order):
      if at < n:
        out[at] = SampleResult(tokens[r, :lengths[r]].tolist(), logprobs[r, :lengths[r]].tolist())
    return out


def batches(todo: list[int], encoded: list, size: int):
  """The pending prompts shortest first (then by index), in batches of at most `size` that hold one
  prompt-length bucket each: every process's rows then have the batch's bucket, and a prompt is
  padded to its own bucket whatever the batch."""
  import itertools

  from gemma2_jax.inference.sampler import bucket_length

  todo = sorted(todo, key=lambda i: (len(encoded[i]), i))
  for _, same in itertools.groupby(todo, key=lambda i: bucket_length(len(encoded[i]))):
    same = list(same)
    for start in range(0, len(same), size):
      yield same[start:start + size]


def stream(sampler, tokenizer, prompt_ids, sampling, seed: int):
  """Decodes STREAM_CHUNK tokens per call and prints the text as it grows (process 0)."""
  import jax

  from gemma2_jax.inference.sampler import completion_text

  layout = Layout(sampler, 1)
  state = layout.start(sampler, [0], [prompt_ids], sampling, seed)
  printed, n = "", 0
  write = jax.process_index() == 0
  while True:
    n = min(n + STREAM_CHUNK, sampling.max_new_tokens)
    state = sampler.continue_(state, sampling, until=n)
    r = layout.results(state, 1)[0]
    text = completion_text(tokenizer, r.tokens, sampling.stop_tokens)
    if text.startswith(printed):  # a byte-fallback character may still be incomplete
      if write:
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
      printed = text
    if len(r.tokens) < n or n == sampling.max_new_tokens:
      break
  if write:
    sys.stdout.write(text[len(printed):] + "\n")


def run_batches(sampler, inputs: Inputs, job: SampleJob, done: set[int], out):
  """Every process runs every batch (its share of the rows); process 0 writes the results, one line
  per prompt, flushed after each batch (stdout without an output file), and shows the progress bar."""
  import jax
  from tqdm import tqdm

  prompts, encoded, sampling = inputs.prompts, inputs.encoded, inputs.sampling
  layout = Layout(sampler, job.batch_size)
  write = jax.process_index() == 0
  todo = [i for i in range(len(prompts)) if i not in done]
  if write and layout.size != job.batch_size:
    print(f"batches of {layout.size} prompts: --batch_size {job.batch_size} rounded up to whole rows "
          f"per batch shard ({layout.shards}) on each of {layout.groups} data group(s) of processes",
          file=sys.stderr)
  bar = tqdm(total=len(prompts), initial=len(done), desc="sample", unit="prompt",
             disable=job.no_progress or not write, dynamic_ncols=True, file=sys.stderr)
  try:
    for rows in batches(todo, encoded, layout.size):
      state = sampler.continue_(layout.start(sampler, rows, encoded, sampling, job.seed), sampling)
      results = layout.results(state, len(rows))
      if write:
        lines = result_lines(inputs, rows, results)
        if out is not None:
          out.write(lines)
          out.flush()
        else:
          sys.stdout.write(lines)
          sys.stdout.flush()
      bar.update(len(rows))
  finally:
    bar.close()


def result_lines(inputs: Inputs, rows: list[int], results: list) -> str:
  """The output's JSON lines of prompts `rows` with their SampleResults."""
  from gemma2_jax.inference.sampler import completion_text

  lines = []
  for i, r in zip(rows, results, strict=True):
    text = completion_text(inputs.tokenizer, r.tokens, inputs.sampling.stop_tokens)
    record = {"index": i, "prompt": inputs.prompts[i], "prompt_ids": inputs.encoded[i],
              "completion": text, "completion_ids": r.tokens,
              "logprobs": [round(x, 6) for x in r.logprobs]}
    lines.append(json.dumps(record, ensure_ascii=False) + "\n")
  return "".join(lines)
