"""`python -m gemma2_jax.sample --checkpoint PATH [--tokenizer PATH] (--prompt TEXT | --prompts FILE.jsonl)
[--chat] [--max_new_tokens N] [--temperature T] [--top_k K] [--top_p P] [--seed S] [--output FILE.jsonl]`

Generates with the KV-cache sampler (gemma2_jax/sampler.py). PATH is any checkpoint `load_model`
reads (HF, Kaggle, native, a training workdir); the tokenizer defaults to `tokenizer.model` in the
checkpoint directory, or a workdir's training tokenizer. A prompt is encoded as `<bos>` + its pieces;
with `--chat` it is first wrapped in Gemma's chat template and the reply ends at `<end_of_turn>`.
Generation stops at `<eos>`, `<end_of_turn>` (when the tokenizer has it), any `--stop_ids`, or after
`--max_new_tokens`. `--temperature 0` (the default) is greedy.

One `--prompt` streams the text to stdout. `--prompts` reads JSONL lines with a `prompt` field (or
`messages` with `--chat`) and runs them in batches with a progress bar; `--output` gets one JSON line
per prompt (`index`, `prompt`, `prompt_ids` exactly as fed, `<bos>` included, `completion`,
`completion_ids` with the stop token when one was hit, `logprobs`). Re-running with the same
`--output` skips the prompts it already holds (resumable); an output holding other prompts is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from gemma2_jax.cli import ArgumentParser, run_job

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
  parser.add_argument("--batch_size", type=int, default=8, help="prompts per generate call")
  parser.add_argument("--max_len", type=int, default=8192,
                      help="context length: prompt + max_new_tokens must fit (Gemma 2: 8192)")
  parser.add_argument("--dtype", default="auto",
                      help="param/compute dtype (auto: float32 on CPU, bfloat16 on accelerators)")
  parser.add_argument("--cache_dtype", default="bfloat16", help="KV cache dtype")
  parser.add_argument("--mesh", default="",
                      help="e.g. tensor=4,data=2 (default: tensor over the kv heads, data the rest)")
  parser.add_argument("--no_progress", action="store_true")
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
  text = p.read_text()
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


def load(args):
  import jax

  from gemma2_jax import checkpoint
  from gemma2_jax.model.transformer import LOGICAL_AXES
  from gemma2_jax.sampler import Sampler
  from gemma2_jax.sharding import DEFAULT_RULES, logical_to_sharding, make_mesh

  cfg = checkpoint.read_config(args.checkpoint)
  dtype = dtype_for(args.dtype)
  mesh = make_mesh(mesh_sizes(args.mesh, cfg.num_kv_heads, jax.device_count()))
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
    from gemma2_jax import checkpoint
    from gemma2_jax.data.tokenizer import Tokenizer
    from gemma2_jax.sampler import SamplingConfig, encode_prompt, stop_ids

    checkpoint.detect_format(args.checkpoint)  # a wrong path fails before anything heavy
    tokenizer = Tokenizer(args.tokenizer or default_tokenizer(args.checkpoint))
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts, args.chat)
    encoded = [encode_prompt(tokenizer, p, args.chat) for p in prompts]
    for i, ids in enumerate(encoded):
      if len(ids) + args.max_new_tokens > args.max_len:
        where = "the prompt" if args.prompt is not None else f"prompt {i + 1} of {args.prompts}"
        raise SampleError(f"{where} has {len(ids)} tokens: with --max_new_tokens "
                          f"{args.max_new_tokens} it exceeds the context --max_len {args.max_len}")
    done = read_done(args.output, prompts) if args.output else set()
    sampler = load(args)
    tokenizer.check(sampler.cfg.vocab_size)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, cache_dtype=args.cache_dtype,
                              stop_tokens=stop_ids(tokenizer, args.chat, args.stop_ids))
    if args.prompt is not None:
      stream(sampler, tokenizer, encoded[0], sampling, args.seed)
    else:
      run_batches(sampler, tokenizer, prompts, encoded, sampling, args, done)
    return 0

  def expected():
    from gemma2_jax.data.chat import ChatError
    from gemma2_jax.sampler import PromptError

    return (SampleError, ChatError, PromptError)

  return run_job(args, run, expected)


def stream(sampler, tokenizer, prompt_ids, sampling, seed: int):
  """Decodes STREAM_CHUNK tokens per call and prints the text as it grows."""
  from gemma2_jax.sampler import completion_text, results

  state = sampler.start([prompt_ids], sampling, seed=seed)
  printed, n = "", 0
  while True:
    n = min(n + STREAM_CHUNK, sampling.max_new_tokens)
    state = sampler.continue_(state, sampling, until=n)
    r = results(state, 1)[0]
    text = completion_text(tokenizer, r.tokens, sampling.stop_tokens)
    if text.startswith(printed):  # a byte-fallback character may still be incomplete
      sys.stdout.write(text[len(printed):])
      sys.stdout.flush()
      printed = text
    if len(r.tokens) < n or n == sampling.max_new_tokens:
      break
  sys.stdout.write(text[len(printed):] + "\n")


def run_batches(sampler, tokenizer, prompts, encoded, sampling, args, done: set[int]):
  from etils import epath
  from tqdm import tqdm

  from gemma2_jax.sampler import completion_text

  todo = [i for i in range(len(prompts)) if i not in done]
  bar = tqdm(total=len(prompts), initial=len(done), desc="sample", unit="prompt",
             disable=args.no_progress, dynamic_ncols=True, file=sys.stderr)
  out = epath.Path(args.output).open("a") if args.output else None
  try:
    # Similar lengths together: fewer padding tokens and fewer bucket programs.
    todo.sort(key=lambda i: len(encoded[i]))
    for start in range(0, len(todo), args.batch_size):
      rows = todo[start:start + args.batch_size]
      results = sampler([encoded[i] for i in rows], sampling, seed=args.seed, row_ids=rows,
                        min_rows=args.batch_size)
      for i, r in zip(rows, results, strict=True):
        text = completion_text(tokenizer, r.tokens, sampling.stop_tokens)
        record = {"index": i, "prompt": prompts[i], "prompt_ids": encoded[i], "completion": text,
                  "completion_ids": r.tokens, "logprobs": [round(x, 6) for x in r.logprobs]}
        if out is not None:
          out.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
          print(json.dumps(record, ensure_ascii=False))
      if out is not None:
        out.flush()
      bar.update(len(rows))
  finally:
    bar.close()
    if out is not None:
      out.close()


if __name__ == "__main__":
  sys.exit(main())
