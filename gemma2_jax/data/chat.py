"""The one Gemma chat template (used by `sample --chat` and by chat training data).

A conversation renders as

  <start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n{text}<end_of_turn>\\n ...

and a prompt for generation ends with `<start_of_turn>model\\n`; the model answers `{text}<end_of_turn>`.
`assistant` is an alias of `model`. Gemma has no system role: a system message is prepended to the
first user turn, separated by a blank line (as the gemma library does).

Chat training data (`SourceConfig(chat=True)`, see `conversation` for the record fields) is the same
template as token ids (`encode`): `<start_of_turn>` and `<end_of_turn>` are single tokens (ids
106 / 107 in Gemma's tokenizer, user-defined symbols in one from `prepare_data train-tokenizer`), and
each token carries a loss weight: 1 on a model turn's text and its `<end_of_turn>` (what the model
writes when sampled), 0 on user turns and on the scaffolding (`<bos>`, `<start_of_turn>model\\n`, the
`\\n` after `<end_of_turn>`). A prompt for generation as ids is `prompt_ids` (what `sample --chat` and
`generate(chat=True)` feed): the ids `encode` gives the same turns, up to the reply's text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from gemma2_jax.errors import UserError

START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
ROLES = {"user": "user", "model": "model", "assistant": "model", "system": "system"}
RESPONSE_FIELDS = ("response", "completion")  # `completion`: what `sample --output` writes


class ChatError(UserError):
  """A malformed conversation (unknown role, empty content, wrong order)."""


def turn(role: str, text: str) -> str:
  return f"{START_OF_TURN}{role}\n{text}{END_OF_TURN}\n"


def generation_prefix() -> str:
  return f"{START_OF_TURN}model\n"


def normalize(messages: Sequence[dict]) -> list[tuple[str, str]]:
  """[{role, content}] -> [(user|model, text)], the system message folded into the first user turn."""
  out: list[tuple[str, str]] = []
  system = None
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise ChatError(f"message {i} needs 'role' and 'content' fields, got {m!r:.80}")
    role, text = ROLES.get(m["role"]), m["content"]
    if role is None:
      raise ChatError(f"message {i} has unknown role {m['role']!r}; use one of {sorted(ROLES)}")
    if not isinstance(text, str) or not text:
      raise ChatError(f"message {i} ({m['role']}) has empty or non-text content")
    if role == "system":
      if i != 0:
        raise ChatError(f"message {i}: a system message must come first")
      system = text
      continue
    if role == "user" and system is not None:
      text, system = f"{system}\n\n{text}", None
    out.append((role, text))
  if system is not None:
    raise ChatError("a system message needs a user message after it")
  return out


def render_prompt(messages: Sequence[dict] | str) -> str:
  """The text a model continues: the conversation so far, ending with the model's turn opener."""
  if isinstance(messages, str):
    messages = [{"role": "user", "content": messages}]
  turns = normalize(messages)
  if not turns or turns[-1][0] != "user":
    raise ChatError("a chat prompt must end with a user message")
  return "".join(turn(role, text) for role, text in turns) + generation_prefix()


@dataclasses.dataclass(frozen=True)
class Conversation:
  """One training conversation: (user|model, text) turns, system folded in, ending with a model turn.

  last_id: the last of the record's `completion_ids` (a `sample --output` line), else None. The
  sampler keeps the stop token there, so a last id that is neither `<eos>` nor `<end_of_turn>` means
  the reply was cut at --max_new_tokens: it is trained without an `<end_of_turn>` (`encode`), which
  would teach the model to stop mid-answer. The ids are compared with the training tokenizer's, so
  the teacher is taken to share it (as distillation needs); drop `completion_ids` otherwise.
  """

  turns: tuple[tuple[str, str], ...]
  last_id: int | None = None

  def render(self) -> str:
    return "".join(turn(role, text) for role, text in self.turns)


def conversation(record: Mapping) -> Conversation:
  """A JSONL object / Parquet row -> Conversation; raises ChatError for a malformed one.

  Fields: `messages` ([{role: user|model|assistant|system, content}]), or `prompt` (a string: one
  user turn, or a messages list ending with a user message) with `response` or `completion` (the
  model's reply): the output of `python -m gemma2_jax.sample --chat --output` reads as it is.
  Trailing turns after the last model turn are dropped (there is no reply in them to train on).
  """
  if not isinstance(record, Mapping):
    raise ChatError(f"expected a JSON object, got {type(record).__name__}")
  last_id = None
  if "messages" in record:
    messages = record["messages"]
    if not isinstance(messages, Sequence) or isinstance(messages, str):
      raise ChatError(f"'messages' is {type(messages).__name__}, not a list")
    turns = normalize(messages)
  else:
    field = next((f for f in RESPONSE_FIELDS if f in record), None)
    if "prompt" not in record or field is None:
      raise ChatError(f"needs a 'messages' field, or 'prompt' and 'response' (or 'completion'); "
                      f"has {sorted(record)[:8]}")
    prompt, reply = record["prompt"], record[field]
    if isinstance(prompt, str):
      prompt = [{"role": "user", "content": prompt}]
    elif not isinstance(prompt, Sequence):
      raise ChatError(f"'prompt' is {type(prompt).__name__}, not a string or a messages list")
    turns = normalize(prompt)
    if not turns or turns[-1][0] != "user":
      raise ChatError("a prompt must end with a user message")
    if not isinstance(reply, str) or not reply:
      raise ChatError(f"{field!r} is empty or not a string")
    turns.append(("model", reply))
    ids = record.get("completion_ids") if field == "completion" else None
    if isinstance(ids, Sequence | np.ndarray) and len(ids) and isinstance(ids[-1], int | np.integer):
      last_id = int(ids[-1])
  for i, (_, text) in enumerate(turns):
    if text.isspace():  # normalize lets it through (a prompt may be blank); a target may not be
      raise ChatError(f"turn {i} is only whitespace")
  last_model = max((i for i, (role, _) in enumerate(turns) if role == "model"), default=None)
  if last_model is None:
    raise ChatError("no model (assistant) turn to train on")
  return Conversation(tuple(turns[:last_model + 1]), last_id)


def _texts(turns: Sequence[tuple[str, str]]) -> list[str]:
  """The text between the markers of each turn, encoded on its own: `{role}\\n{text}` for a user
  turn, the bare text for a model turn (its `model\\n` opener is a segment of its own)."""
  return [text if role == "model" else f"{role}\n{text}" for role, text in turns]


def _parts(turns: Sequence[tuple[str, str]], pieces, ids: tuple, *, cut_last: bool = False,
           open_reply: bool = False) -> tuple[list[tuple[list[int], int]], list[int]]:
  """The template at the id level, the one implementation: (ids, loss weight) parts and cuts.

  `pieces` yields the ids of `_texts(turns)` in order; `ids` = (bos or None, <start_of_turn>,
  <end_of_turn>, ids of `model\\n`, ids of `\\n`). `cut_last`: the last (model) turn ends without
  `<end_of_turn>` (a reply cut at --max_new_tokens); `open_reply`: the parts end with the model's
  turn opener, the prompt a model continues.
  """
  bos, sot, eot, model_opener, newline = ids
  parts: list[tuple[list[int], int]] = [([bos], 0)] if bos is not None else []
  cuts = []
  for k, (role, _) in enumerate(turns):
    if role != "model":
      parts += [([sot], 0), (next(pieces), 0), ([eot], 0), (newline, 0)]
      continue
    parts += [([sot], 0), (model_opener, 0), (next(pieces), 1)]
    if k == len(turns) - 1 and cut_last:
      break
    parts.append(([eot], 1))
    cuts.append(sum(len(p) for p, _ in parts))
    parts.append((newline, 0))
  if open_reply:
    parts += [([sot], 0), (model_opener, 0)]
  return parts, cuts


def encode(conversations: Sequence[Conversation], tok, *, bos: bool
           ) -> list[tuple[np.ndarray, np.ndarray, list[int]]]:
  """Conversations -> (ids int32, loss weights uint8, cuts) each; `tok` is a data.Tokenizer.

  The turn markers are looked up as ids (`tok.chat_ids()`, a DataError for a tokenizer without
  them) and the text between them is encoded on its own, rather than trusting SentencePiece to cut
  the rendered text at the markers (it does for user-defined pieces, not for control pieces).
  Between two markers the text is one string, except that a model turn's text is encoded apart from
  its `model\\n` opener, as the sampler prompts with the opener and the model writes the text after
  it: `prompt_ids` of a conversation's turns before a model turn are exactly the ids here up to that
  turn's text (the ids the sampler feeds are the ids the trainer sees).

  cuts: token offsets just after each closed model turn's `<end_of_turn>`, where the conversation
  may be truncated (see `fit`).
  """
  sot, eot = tok.chat_ids()
  segments = ["model\n", "\n"]
  for c in conversations:
    segments += _texts(c.turns)
  pieces = iter(tok.encode_batch(segments))
  model_opener, newline = next(pieces), next(pieces)
  stops = (tok.sp.eos_id(), eot)
  ids = (tok.sp.bos_id() if bos else None, sot, eot, model_opener, newline)
  out = []
  for c in conversations:
    cut_last = c.last_id is not None and c.last_id not in stops  # see Conversation
    parts, cuts = _parts(c.turns, pieces, ids, cut_last=cut_last)
    out.append((np.fromiter((i for p, _ in parts for i in p), np.int32),
                np.fromiter((w for p, w in parts for _ in p), np.uint8), cuts))
  return out


def prompt_ids(messages: Sequence[dict] | str, tok, bos: bool = True) -> list[int]:
  """The ids a model continues for a chat prompt: `<bos>` + the conversation so far + the model's
  turn opener `<start_of_turn>model\\n` (`render_prompt` as ids). `tok` is a data.Tokenizer.

  The same ids as `encode` gives the same turns up to the reply's text (the template at the id
  level is `_parts`, shared by both); the markers are checked once, by `tok.chat_ids()` (a DataError
  for a tokenizer without them). A string is one user message; a ChatError for a malformed
  conversation or one that does not end with a user message.
  """
  if isinstance(messages, str):
    messages = [{"role": "user", "content": messages}]
  turns = normalize(messages)
  if not turns or turns[-1][0] != "user":
    raise ChatError("a chat prompt must end with a user message")
  sot, eot = tok.chat_ids()
  pieces = iter(tok.encode_batch(["model\n", "\n", *_texts(turns)]))
  ids = (tok.sp.bos_id() if bos else None, sot, eot, next(pieces), next(pieces))
  parts, _ = _parts(turns, pieces, ids, open_reply=True)
  return [int(i) for p, _ in parts for i in p]


def fit(ids: np.ndarray, weights: np.ndarray, cuts: Sequence[int], max_len: int
        ) -> tuple[np.ndarray, np.ndarray] | None:
  """A conversation of more than `max_len` tokens cut to fit a row; None when nothing trainable fits.

  Cut after the last model turn whose `<end_of_turn>` fits; when not even the first one does, the
  first `max_len` tokens are kept if a reply token is among them (the reply is then cut short,
  without `<end_of_turn>`, like one cut at --max_new_tokens); else None (the prompt alone fills the
  row). A kept piece trains on every reply token it holds (only a row's first token is no target).
  """
  if len(ids) <= max_len:
    return ids, weights
  n = max((c for c in cuts if c <= max_len), default=None)
  if n is None:
    n = max_len
    if not weights[1:n].any():
      return None
  return ids[:n], weights[:n]
