"""`python -m gemma2_jax.sample --checkpoint PATH [--tokenizer PATH] (--prompt TEXT | --prompts FILE.jsonl)
[--chat] [--max_new_tokens N] [--temperature T] [--top_k K] [--top_p P] [--seed S] [--output FILE.jsonl]
[--distributed | --coordinator_address A --num_processes N --process_id I]`

Generates with the KV-cache sampler (gemma2_jax/sampler.py). PATH is any checkpoint `load_model`
reads (HF, Kaggle, native, a training workdir); the tokenizer defaults to `tokenizer.model` in the
checkpoint directory, or a workdir's training tokenizer. A prompt is encoded as `<bos>` + its pieces;
with `--chat` it is Gemma's chat template as ids (`data.chat.prompt_ids`: the ids chat training sees
for the same turns) and the reply ends at `<end_of_turn>`.
Generation stops at `<eos>`, `<end_of_turn>` (when the tokenizer has it), any `--stop_ids`, or after
`--max_new_tokens`. `--temperature 0` (the default) is greedy.

One `--prompt` streams the text to stdout. `--prompts` reads JSONL lines with a `prompt` field (or
`messages` with `--chat`) and runs them in batches with a progress bar; `--output` gets one JSON line
per prompt (`index`, `prompt`, `prompt_ids` exactly as fed, `<bos>` included, `completion`,
`completion_ids` with the stop token when one was hit, `logprobs`), flushed after every batch.
Re-running with the same `--output` skips the prompts it already holds (resumable: a kill loses at
most the batch in flight); an output holding other prompts is refused. Prompts run shortest first, in
batches of one prompt-length bucket, and each row's random key comes from (`--seed`, the prompt's line
index): a prompt's result does not depend on the batch it ran in (up to float rounding with the
batch's size: the last digits of its log-probs).

Several hosts (a TPU pod slice, or any multi-process job): run the same command on every host with
the distributed flags of training (`--distributed` on TPU pods / SLURM, or `--coordinator_address`,
`--num_processes`, `--process_id`). The model is loaded onto the mesh of all the job's devices (each
process reads only its shards of the checkpoint) and every batch is one global batch whose rows are
split over the processes' devices (`--batch_size` is rounded up so that every data-parallel group of
processes feeds whole rows to each batch shard; see `Layout`). Every process reads `--prompts` (the
same file, or identical copies: checked); only process 0 reads and appends `--output` (it need not be
on shared storage) and shows the progress bar. The output is byte for byte that of one process on the
same mesh with the same global batch. Bad input is the same `error: ...` line and exit 1 on every
process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from gemma2_jax.cli.common import ArgumentParser, add_distributed_flags, run_job

STREAM_CHUNK = 8  # tokens decoded per device call while streaming one prompt


def parse_args(argv):
  parser = ArgumentParser(prog="python -m gemma2_jax.sample", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="HF / Kaggle / native dir or a workdir")
  parser.add_argument("--tokenizer", default=None, help="SentencePiece model (default: see above)")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--prompt", help="one prompt; the completion streams to stdout")
  source.add_argument("--prompts", help="JSONL file: {'prompt': ...} or {'messages': [...]} lines")
  parser.add_argument("--chat", action="store_true", help="apply Gemma's chat template")
  parser.add_argument("--max_new_tokens", type=int, default=256)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top_k", type=int, default=None)
  parser.add_argument("--top_p", type=float, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--stop_ids", default="", help="extra stop token ids, comma-separated")
  parser.add_argument("--output", default=None, help="JSONL results (with --prompts)")
  parser.add_argument("--batch_size", type=int, default=8,
                      help="prompts per batch (rounded up to whole rows per batch shard and process)")
  parser.add_argument("--max_len", type=int, default=8192,
                      help="context length: prompt + max_new_tokens must fit (Gemma 2: 8192)")
  parser.add_argument("--dtype", default="auto",
                      help="param/compute dtype (auto: float32 on CPU, bfloat16 on accelerators)")
  parser.add_argument("--cache_dtype", default="bfloat16", help="KV cache dtype")
  parser.add_argument("--mesh", default="",
                      help="e.g. tensor=4,data=2 (default: tensor over the kv heads, data the rest)")
  parser.add_argument("--no_progress", action="store_true")
  add_distributed_flags(parser)
  args = parser.parse_args(argv)
  checks = [
    (args.max_new_tokens > 0, f"--max_new_tokens must be positive, got {args.max_new_tokens}"),
    (args.temperature >= 0, f"--temperature must be >= 0 (0 = greedy), got {args.temperature}"),
    (args.top_k is None or args.top_k > 0, f"--top_k must be positive, got {args.top_k}"),
    (args.top_p is None or 0 < args.top_p <= 1, f"--top_p must be in (0, 1], got {args.top_p}"),
    (args.batch_size > 0, f"--batch_size must be positive, got {args.batch_size}"),
    (args.output is None or args.prompts, "--output needs --prompts"),
  ]
  for ok, msg in checks:
    if not ok:
      parser.error(msg)
  try:
    args.stop_ids = tuple(int(s) for s in args.stop_ids.split(",") if s.strip())
  except ValueError:
    parser.error(f"--stop_ids must be comma-separated integers, got {args.stop_ids!r}")
  return args


class SampleError(ValueError):
  """Bad input found after parsing (tokenizer, prompts, output file)."""


def default_tokenizer(checkpoint: str) -> str:
  from etils import epath

  path = epath.Path(checkpoint)
  if (path / "tokenizer.model").exists():
    return os.fspath(path / "tokenizer.model")
  try:  # a training workdir names its tokenizer in config.json
    tok = json.loads((path / "config.json").read_text())["tokenizer"]
    if tok:
      return tok
  except (OSError, ValueError, KeyError, TypeError):
    pass
  raise SampleError(f"no tokenizer: {checkpoint} has no tokenizer.model; pass --tokenizer PATH")


def read_prompts(path: str, chat: bool) -> list:
  from etils import epath

  out = []
  field = "messages" if chat else "prompt"
  with epath.Path(path).open() as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise SampleError(f"{path}:{n}: not JSON ({e.msg})") from None
      value = record.get(field) if isinstance(record, dict) else None
      if value is None and chat and isinstance(record, dict) and "prompt" in record:
        value = record["prompt"]
      if not value:
        raise SampleError(f"{path}:{n}: no {field!r} field")
      out.append(value)
  if not out:
    raise SampleError(f"{path} holds no prompts")
  return out


def read_done(path: str, prompts: list) -> set[int]:
  """Indices already in a previous run's output; drops a last line cut off mid-write."""
  from etils import epath

  p = epath.Path(path)
  if not p.exists():
    return set()
  try:
    text = p.read_text()
  except UnicodeDecodeError:
    raise SampleError(f"{path} is not UTF-8 text, so not an output of this command; choose another "
                      "--output") from None
  lines = text.split("\n")
  complete, tail = lines[:-1], lines[-1]
  done = set()
  for n, line in enumerate(complete, 1):
    try:
      record = json.loads(line)
      i = record["index"]
    except (json.JSONDecodeError, KeyError, TypeError):
      raise SampleError(f"{path}:{n} is not an output line of this command; choose another "
                        "--output") from None
    if not (isinstance(i, int) and 0 <= i < len(prompts) and record.get("prompt") == prompts[i]):
      raise SampleError(f"{path}:{n} holds another prompt than line {i} of the input; choose "
                        "another --output")
    done.add(i)
  if tail:  # an interrupted write: keep the complete lines only
    p.write_text("\n".join(complete) + ("\n" if complete else ""))
  return done


def open_output(args, prompts: list):
  """(the output opened for appending, indices it already holds); (None, empty) without --output."""
  from etils import epath

  if not args.output:
    return None, set()
  done = read_done(args.output, prompts)
  return epath.Path(args.output).open("a"), done


# Names of the flags that may differ between the processes of one job.
PER_PROCESS_FLAGS = ("distributed", "coordinator_address", "num_processes", "process_id",
                     "no_progress", "checkpoint", "tokenizer", "prompts", "output")
ERROR_BYTES = 2048  # of process 0's error line, sent to the other processes


def agree(args, prompts: list, encoded: list, done: set[int], error: str | None) -> set[int]:
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
  flags = {k: v for k, v in sorted(vars(args).items()) if k not in PER_PROCESS_FLAGS}
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


def make_sampler_mesh(args, cfg):
  import jax

  from gemma2_jax.parallel.sharding import make_mesh

  try:
    return make_mesh(mesh_sizes(args.mesh, cfg.num_kv_heads, jax.device_count()))
  except ValueError as e:
    if isinstance(e, SampleError):
      raise
    raise SampleError(f"--mesh {args.mesh!r}: {e}") from None


def load(args, cfg=None, mesh=None):
  """The Sampler on the mesh of all the job's devices; each process reads only its shards."""
  from gemma2_jax import checkpoint
  from gemma2_jax.inference.sampler import Sampler
  from gemma2_jax.model.transformer import LOGICAL_AXES
  from gemma2_jax.parallel.sharding import DEFAULT_RULES, logical_to_sharding

  cfg = cfg or checkpoint.read_config(args.checkpoint)
  dtype = dtype_for(args.dtype)
  mesh = mesh or make_sampler_mesh(args, cfg)
  shardings = logical_to_sharding(LOGICAL_AXES, mesh, DEFAULT_RULES)
  cfg, params = checkpoint.load_sharded(args.checkpoint, dtype, shardings, config=cfg)
  cfg = cfg.replace(dtype=dtype)
  return Sampler(cfg, params, mesh=mesh)


def dtype_for(name: str) -> str:
  """`auto`: float32 on CPU (bf16 matmuls are slow there), bfloat16 on accelerators."""
  import jax
  import numpy as np

  if name == "auto":
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
  try:
    return np.dtype(name).name if name != "bfloat16" else name
  except TypeError:
    raise SampleError(f"--dtype {name!r}: use float32, bfloat16 or auto") from None


def mesh_sizes(spec: str, num_kv_heads: int, num_devices: int) -> dict[str, int]:
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


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)

  def run() -> int:
    import jax

    from gemma2_jax import checkpoint
    from gemma2_jax.data.tokenizer import Tokenizer
    from gemma2_jax.inference.sampler import SamplingConfig, encode_prompt, stop_ids

    # Every input is read and checked by every process alike before any collective (bad input is
    # then the same error line on every process, and none waits on another that stopped); only the
    # output is process 0's, and `agree` hands its error to the others.
    checkpoint.detect_format(args.checkpoint)  # a wrong path fails before anything heavy
    tokenizer = Tokenizer(args.tokenizer or default_tokenizer(args.checkpoint))
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts, args.chat)
    encoded = [encode_prompt(tokenizer, p, args.chat) for p in prompts]
    for i, ids in enumerate(encoded):
      if len(ids) + args.max_new_tokens > args.max_len:
        where = "the prompt" if args.prompt is not None else f"prompt {i + 1} of {args.prompts}"
        raise SampleError(f"{where} has {len(ids)} tokens: with --max_new_tokens "
                          f"{args.max_new_tokens} it exceeds the context --max_len {args.max_len}")
    cfg = checkpoint.read_config(args.checkpoint)
    tokenizer.check(cfg.vocab_size)
    dtype_for(args.dtype)
    mesh = make_sampler_mesh(args, cfg)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, cache_dtype=args.cache_dtype,
                              stop_tokens=stop_ids(tokenizer, args.chat, args.stop_ids))
    out, done, error = None, set(), None
    if jax.process_index() == 0:
      try:
        out, done = open_output(args, prompts)
      except (SampleError, OSError) as e:
        if jax.process_count() == 1:
          raise
        error = str(e) if isinstance(e, SampleError) else (
          f"{e.strerror or e}: {e.filename or args.output} (check the output path)")
    try:
      done = agree(args, prompts, encoded, done, error)
      if len(done) == len(prompts):  # a finished output: nothing to load
        if jax.process_index() == 0:
          print(f"{args.output} holds all {len(prompts)} prompts already", file=sys.stderr)
        return 0
      sampler = load(args, cfg, mesh)
      if args.prompt is not None:
        stream(sampler, tokenizer, encoded[0], sampling, args.seed)
      else:
        run_batches(sampler, tokenizer, prompts, encoded, sampling, args, done, out)
    finally:
      if out is not None:
        out.close()
    return 0

  def expected():
    from gemma2_jax.data.chat import ChatError
    from gemma2_jax.inference.sampler import PromptError

    return (SampleError, ChatError, PromptError)

  return run_job(args, run, expected)


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


def run_batches(sampler, tokenizer, prompts, encoded, sampling, args, done: set[int], out):
  """Every process runs every batch (its share of the rows); process 0 writes the results, one line
  per prompt, flushed after each batch (stdout without --output), and shows the progress bar."""
  import jax
  from tqdm import tqdm

  from gemma2_jax.inference.sampler import completion_text

  layout = Layout(sampler, args.batch_size)
  write = jax.process_index() == 0
  todo = [i for i in range(len(prompts)) if i not in done]
  if write and layout.size != args.batch_size:
    print(f"batches of {layout.size} prompts: --batch_size {args.batch_size} rounded up to whole rows "
          f"per batch shard ({layout.shards}) on each of {layout.groups} data group(s) of processes",
          file=sys.stderr)
  bar = tqdm(total=len(prompts), initial=len(done), desc="sample", unit="prompt",
             disable=args.no_progress or not write, dynamic_ncols=True, file=sys.stderr)
  try:
    for rows in batches(todo, encoded, layout.size):
      state = sampler.continue_(layout.start(sampler, rows, encoded, sampling, args.seed), sampling)
      results = layout.results(state, len(rows))
      if write:
        lines = []
        for i, r in zip(rows, results, strict=True):
          text = completion_text(tokenizer, r.tokens, sampling.stop_tokens)
          record = {"index": i, "prompt": prompts[i], "prompt_ids": encoded[i], "completion": text,
                    "completion_ids": r.tokens, "logprobs": [round(x, 6) for x in r.logprobs]}
          lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        if out is not None:
          out.write("".join(lines))
          out.flush()
        else:
          sys.stdout.write("".join(lines))
          sys.stdout.flush()
      bar.update(len(rows))
  finally:
    bar.close()

