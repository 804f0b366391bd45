"""SentencePiece tokenizer with Gemma conventions (<pad>=0 <eos>=1 <bos>=2 <unk>=3, byte fallback).

Chat data needs Gemma's turn markers `<start_of_turn>` / `<end_of_turn>` as single pieces (ids
106 / 107 in Gemma's tokenizer); `train_tokenizer` adds them as user-defined symbols (ids 4 / 5).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm

from gemma2_jax.data.chat import END_OF_TURN, START_OF_TURN
from gemma2_jax.data.sources import DataError

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
END_OF_TURN_ID = 107  # Gemma's `<end_of_turn>`; a custom tokenizer's id comes from the tokenizer.
# Models may pad the embedding past the tokenizer (Gemma: 256000 pieces, 256128 rows); a bigger gap
# is taken as a tokenizer that belongs to another model.
MAX_PADDING_ROWS = 256

# The trainer's fixed pieces (the 4 special ids, the 2 chat turn markers and 256 byte-fallback pieces)
# plus at least one character; a real corpus needs a piece per distinct character on top
# (SentencePiece says how many).
MIN_VOCAB_SIZE = 4 + 2 + 256 + 1

# Trainer options that reproduce Gemma's tokenizer behaviour: identity normalisation and no dummy
# prefix or whitespace collapsing, so decode(encode(text)) == text byte for byte (Hangul included).
GEMMA_TRAINER_OPTIONS = dict(
    model_type="bpe", pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
    byte_fallback=True, split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
    normalization_rule_name="identity", allow_whitespace_only_pieces=True,
    max_sentence_length=1 << 20,
    # User-defined, not control: like Gemma's, they are single pieces wherever they occur in text,
    # so the sampler's encode of a rendered chat prompt yields them.
    user_defined_symbols=[START_OF_TURN, END_OF_TURN],
)


class Tokenizer:
  """Picklable SentencePiece wrapper (grain workers re-load the model from its bytes)."""

  def __init__(self, path_or_bytes: str | os.PathLike | bytes, *, num_threads: int = -1):
    if isinstance(path_or_bytes, bytes):
      self._proto = path_or_bytes
      self.path = None
    else:
      self.path = os.fspath(path_or_bytes)
      try:
        if "://" in self.path:
          from etils import epath

          self._proto = epath.Path(self.path).read_bytes()
        else:
          with open(self.path, "rb") as f:
            self._proto = f.read()
      except FileNotFoundError:
        raise DataError(f"tokenizer model not found: {self.path}") from None
    self.num_threads = num_threads
    self._load()

  def _load(self):
    self.sp = spm.SentencePieceProcessor()
    try:
      self.sp.LoadFromSerializedProto(self._proto)
    except Exception as e:
      raise DataError(f"not a SentencePiece model: {self.path or '<bytes>'} ({e})") from None

  def __getstate__(self):
    return {"_proto": self._proto, "path": self.path, "num_threads": self.num_threads}

  def __setstate__(self, d):
    self.__dict__.update(d)
    self._load()

  @property
  def vocab_size(self) -> int:
    return self.sp.GetPieceSize()

  @property
  def sha256(self) -> str:
    return hashlib.sha256(self._proto).hexdigest()

  def check(self, vocab_size: int | None = None, *, num_real_tokens: int | None = None) -> None:
    """Fails at start-up unless n_pieces <= vocab_size <= n_pieces + MAX_PADDING_ROWS (and
    n_pieces == num_real_tokens when given) and the special ids are Gemma's."""
    n = self.vocab_size
    if vocab_size is not None and n > vocab_size:
      raise DataError(f"tokenizer {self.path} has {n} pieces but the model's vocab_size is "
                      f"{vocab_size}: ids >= {vocab_size} would index past the embedding")
    if vocab_size is not None and vocab_size - n > MAX_PADDING_ROWS:
      raise DataError(f"tokenizer {self.path} has {n} pieces but the model's vocab_size is "
                      f"{vocab_size}: more than {MAX_PADDING_ROWS} padding rows means this is "
                      "not the model's tokenizer")
    if num_real_tokens is not None and n != num_real_tokens:
      raise DataError(f"tokenizer {self.path} has {n} pieces but the model expects "
                      f"num_real_tokens={num_real_tokens}")
    got = (self.sp.pad_id(), self.sp.eos_id(), self.sp.bos_id(), self.sp.unk_id())
    if got != (PAD_ID, EOS_ID, BOS_ID, UNK_ID):
      raise DataError(f"tokenizer {self.path} has special ids pad/eos/bos/unk={got}; Gemma "
                      f"needs {(PAD_ID, EOS_ID, BOS_ID, UNK_ID)}")

  def chat_ids(self) -> tuple[int, int]:
    """(<start_of_turn>, <end_of_turn>) ids; a DataError naming the tokenizer when it lacks them."""
    ids = tuple(self.sp.PieceToId(p) for p in (START_OF_TURN, END_OF_TURN))
    missing = [p for p, i in zip((START_OF_TURN, END_OF_TURN), ids, strict=True)
               if i == self.sp.unk_id() or self.sp.IdToPiece(i) != p]
    if missing:
      raise DataError(f"tokenizer {self.path or '<bytes>'} has no {' / '.join(missing)} piece; chat "
                      "data needs Gemma's turn markers as single tokens (Gemma's tokenizer has them; "
                      "`prepare_data train-tokenizer` adds them to a new one)")
    return ids

  def encode(self, text: str) -> list[int]:
    return self.sp.EncodeAsIds(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    # Batch mode releases the GIL and spreads the documents over SentencePiece's own threads.
    return self.sp.Encode(list(texts), out_type=int, num_threads=self.num_threads)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self.sp.DecodeIds([int(i) for i in ids])

  def piece_bytes(self) -> np.ndarray:
    """[vocab] int32: UTF-8 bytes each piece stands for (0 for control/unknown ids).

    Summing it over predicted tokens gives the byte count for bits-per-byte. The chat turn markers
    count 0 too: they are the template's scaffolding, not bytes of the text.
    """
    n = self.vocab_size
    out = np.zeros(n, np.int32)
    markers = {START_OF_TURN, END_OF_TURN}
    for i in range(n):
      if self.sp.IsControl(i) or self.sp.IsUnknown(i) or self.sp.IdToPiece(i) in markers:
        continue
      if self.sp.IsByte(i):
        out[i] = 1
      else:
        out[i] = len(self.sp.IdToPiece(i).replace("\u2581", " ").encode("utf-8"))
    return out


def train_tokenizer(inputs: Sequence[str] | str, model_prefix: str, *, vocab_size: int,
                    character_coverage: float = 0.9995, input_sentence_size: int = 2_000_000,
                    num_threads: int | None = None, **overrides) -> str:
  """Trains a Gemma-convention SentencePiece model on text files; returns the .model path.

  The model has Gemma's chat turn markers as user-defined pieces (GEMMA_TRAINER_OPTIONS)."""
  from gemma2_jax.data.sources import expand_paths

  if vocab_size < MIN_VOCAB_SIZE:
    raise DataError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (4 special ids, 2 chat turn markers, "
                    f"256 byte-fallback pieces and the corpus's characters), got {vocab_size}")
  files = expand_paths(inputs)
  opts = dict(GEMMA_TRAINER_OPTIONS, input=",".join(files), model_prefix=model_prefix,
              vocab_size=vocab_size, character_coverage=character_coverage,
              input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
              num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
  opts.update(overrides)
  try:
    spm.SentencePieceTrainer.Train(**opts)
  except RuntimeError as e:
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    m = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", text)
    if m:  # SentencePiece's own words are an internal assertion
      raise DataError(f"vocab_size {m[1]} is smaller than the {m[2]} pieces this corpus needs (its "
                      f"characters at character_coverage={character_coverage}, the special ids, chat "
                      "turn markers and byte-fallback pieces): raise vocab_size or lower "
                      "character_coverage") from None
    raise DataError(f"SentencePiece training failed: {text}") from None
  return model_prefix + ".model"
