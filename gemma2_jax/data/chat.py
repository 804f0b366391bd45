"""The one Gemma chat template (used by `sample --chat` and by chat training data).

A conversation renders as

  <start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n{text}<end_of_turn>\\n ...

and a prompt for generation ends with `<start_of_turn>model\\n`; the model answers `{text}<end_of_turn>`.
`assistant` is an alias of `model`. Gemma has no system role: a system message is prepended to the
first user turn, separated by a blank line (as the gemma library does).
"""

from __future__ import annotations

from collections.abc import Sequence

START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
ROLES = {"user": "user", "model": "model", "assistant": "model", "system": "system"}


class ChatError(ValueError):
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
