"""The files of `python -m gemma2_jax.sample`: a checkpoint's tokenizer, the JSONL prompts file, and
the resumable JSONL output (which prompts it already holds)."""

from __future__ import annotations

import json
import os

from gemma2_jax.errors import UserError


class SampleError(UserError):
  """Bad sampling input found after parsing (tokenizer, prompts, output file, mesh, dtype)."""


def default_tokenizer(checkpoint: str) -> str:
  """`tokenizer.model` in the checkpoint directory, or the tokenizer a training workdir names."""
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
  """The `prompt` (chat: `messages`, else `prompt`) of every non-empty JSONL line of `path`."""
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


def open_output(path: str | None, prompts: list):
  """(the output opened for appending, indices it already holds); (None, empty) without a path."""
  from etils import epath

  if not path:
    return None, set()
  done = read_done(path, prompts)
  return epath.Path(path).open("a"), done
