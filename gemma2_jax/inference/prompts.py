"""The files of `python -m gemma2_jax.sample`: a checkpoint's tokenizer, the JSONL prompts file, and
the resumable JSONL output (which prompts it already holds)."""

from __future__ import annotations

import json
import os

from gemma2_jax.errors import UserError


class SampleError(UserError):
  """Bad sampling input found after parsing (tokenizer, prompts, output file, mesh, dtype)."""


def default_tokenizer(checkpoint: str) -> str:
  """`tokenizer.model` in the checkpoint directory, or the tokenizer a training workdir names (a
  workdir's damaged config.json is reported as such, with how to restore it)."""
  from etils import epath

  from gemma2_jax.checkpoint import workdir

  path = epath.Path(checkpoint)
  if (path / "tokenizer.model").exists():
    return os.fspath(path / "tokenizer.model")
  tok = workdir.run_config(path).get("tokenizer") if workdir.is_workdir(path) else None
  if tok:
    return tok
  raise SampleError(f"no tokenizer: {checkpoint} has no tokenizer.model; pass --tokenizer PATH")


PROMPT_FORMATS = "JSONL (one {\"prompt\": ...} or {\"messages\": [...]} per line) or Parquet (a " \
                 "prompt or messages column)"


def read_prompts(path: str, chat: bool) -> tuple[list, list[str]]:
  """(prompts, where each came from as `path:line`, or `path:row N` for Parquet) of a JSONL or
  Parquet file: each record's `prompt`, or with `chat` its `messages` (or a `prompt` as the turns)."""
  from etils import epath

  with epath.Path(path).open("rb") as f:
    parquet = f.read(4) == b"PAR1"
  records = _parquet_records(path) if parquet else _jsonl_records(path)
  prompts, places = [], []
  for where, record in records:
    prompts.append(_prompt_of(record, where, chat))
    places.append(where)
  if not prompts:
    raise SampleError(f"{path} holds no prompts")
  return prompts, places


def _jsonl_records(path: str):
  from etils import epath

  with epath.Path(path).open("rb") as f:
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError:
        raise SampleError(f"{path}:{n}: not UTF-8 text; --prompts takes {PROMPT_FORMATS}") from None
      if not line.strip():
        continue
      try:
        yield f"{path}:{n}", json.loads(line)
      except json.JSONDecodeError as e:
        raise SampleError(f"{path}:{n}: not JSON ({e.msg}); --prompts takes {PROMPT_FORMATS}") from None


def _parquet_records(path: str):
  import pyarrow.parquet as pq
  from etils import epath

  try:
    with epath.Path(path).open("rb") as f:
      rows = pq.read_table(f).to_pylist()
  except Exception as e:  # pyarrow raises its own types for a damaged file
    raise SampleError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())[:200]})") from None
  for n, row in enumerate(rows):
    yield f"{path}:row {n}", row


def _prompt_of(record, where: str, chat: bool):
  """The prompt of one record; a SampleError naming `where` when it has none of the right kind."""
  if not isinstance(record, dict):
    raise SampleError(f"{where}: expected an object with a 'prompt'{' or messages' if chat else ''} "
                      "field")
  value = record.get("messages") if chat else None
  field = "messages"
  if value is None:
    value, field = record.get("prompt"), "prompt"
  if value is None or value == "" or value == []:
    raise SampleError(f"{where}: no {'messages or prompt' if chat else 'prompt'!r} field")
  if isinstance(value, list) and not chat:
    raise SampleError(f"{where}: 'prompt' is a list of messages; pass --chat to render them with "
                      "Gemma's chat template")
  if not isinstance(value, (str, list)):
    raise SampleError(f"{where}: {field!r} must be a string"
                      f"{' or a list of messages' if chat else ''}, got {type(value).__name__}")
  return value


def read_done(path: str, prompts: list) -> set[int]:
  """Indices a previous run's output at `path` already holds. The file is changed only when it is
  recognisably ours: every complete line a record of one of `prompts` and an unfinished last line
  (a kill mid-write) the start of such a record, which is then cut off. Anything else is refused and
  left as it is."""
  from etils import epath

  p = epath.Path(path)
  if not p.exists():
    return set()
  if p.is_dir():
    raise SampleError(f"--output {path} is a directory; give a file path")
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
  if tail:
    if not _cut_record(tail, prompts):
      raise SampleError(f"{path}:{len(complete) + 1} is not an output line of this command (nor one "
                        "cut off mid-write); choose another --output")
    p.write_text("\n".join(complete) + ("\n" if complete else ""))
  return done


def _cut_record(tail: str, prompts: list) -> bool:
  """Whether `tail` is the start of an output record of `prompts` that a kill cut off (what
  `generation.result_lines` writes begins with the index and the prompt)."""
  import re

  if tail.startswith("{") and '{"index": '.startswith(tail):
    return True
  m = re.match(r'\{"index": (\d+)', tail)
  if m is None or int(m.group(1)) >= len(prompts):
    return False
  head = json.dumps({"index": int(m.group(1)), "prompt": prompts[int(m.group(1))]},
                    ensure_ascii=False)[:-1]
  return tail.startswith(head) or head.startswith(tail)


def open_output(path: str | None, prompts: list):
  """(the output opened for appending, indices it already holds); (None, empty) without a path."""
  from etils import epath

  if not path:
    return None, set()
  done = read_done(path, prompts)
  return epath.Path(path).open("a"), done
