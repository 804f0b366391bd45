"""Chat / SFT data: Gemma's template as ids, the loss mask on model turns, whole-conversation packing,
mixtures with text, teacher-written responses (`sample --output`), malformed and over-long input."""

import json
import pathlib

import numpy as np
import pytest

from gemma2_jax.cli import prepare_data
from gemma2_jax.data import (
    BOS_ID,
    STATS,
    DataConfig,
    DataError,
    SourceConfig,
    Tokenizer,
    chat,
    make_eval_iterator,
    make_train_iterator,
    open_source,
    train_tokenizer,
)
from gemma2_jax.data.chat import conversation, render_prompt

DATA = pathlib.Path(__file__).parent / "data"
KO_FILES = sorted((DATA / "ko").glob("*.txt"))
PLAIN_TOK = str(DATA / "ko_sp1024.model")  # trained before the turn markers were added


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> str:
  return train_tokenizer([str(p) for p in KO_FILES], str(tmp_path_factory.mktemp("sp") / "sp"),
                         vocab_size=800, num_threads=1)


@pytest.fixture(scope="module")
def tok(tok_path) -> Tokenizer:
  return Tokenizer(tok_path)


@pytest.fixture(scope="module")
def paras() -> list[str]:
  text = (DATA / "ko" / "constitution.txt").read_text(encoding="utf-8")
  return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _messages(paras, i: int, exchanges: int) -> list[dict]:
  out = []
  for k in range(exchanges):
    out += [{"role": "user", "content": f"{k + 1}번 질문: {paras[(i + 2 * k) % len(paras)][:30]}"},
            {"role": "assistant", "content": paras[(i + 2 * k + 1) % len(paras)][:40]}]
  return out


def _jsonl(path, records) -> str:
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
  return str(path)


def _chat_cfg(path, **kw) -> DataConfig:
  kw = dict(dict(seq_len=128, global_batch=4, seed=1, tokenize_batch=8), **kw)
  return DataConfig(sources=[SourceConfig(paths=path, chat=True)], **kw)


def _segments(b):
  """(row, segment id, its tokens incl. the row's last one, its loss mask) of each segment."""
  full = np.concatenate([b["tokens"], b["targets"][:, -1:]], axis=1)
  seg = np.concatenate([b["segment_ids"], b["segment_ids"][:, -1:]], axis=1)
  for r in range(len(full)):
    for s in np.unique(seg[r][seg[r] != 0]):
      idx = np.flatnonzero(seg[r] == s)
      yield r, s, full[r, idx], b["loss_mask"][r, idx[:-1]]


def test_system_turn_is_prepended_to_the_first_user_turn():
  messages = [{"role": "system", "content": "짧게 답하라."}, {"role": "user", "content": "수도는?"},
              {"role": "assistant", "content": "서울."}, {"role": "user", "content": "고마워"}]
  c = conversation({"messages": messages})
  # the trailing user turn has no reply to learn: dropped
  assert c.turns == (("user", "짧게 답하라.\n\n수도는?"), ("model", "서울."))
  assert c.render() == ("<start_of_turn>user\n짧게 답하라.\n\n수도는?<end_of_turn>\n"
                        "<start_of_turn>model\n서울.<end_of_turn>\n")
  # the same conversation as prompt + response (prompt: a messages list, or a string)
  assert conversation({"prompt": messages[:2], "response": "서울."}) == c
  assert conversation({"prompt": "수도는?", "response": "서울."}).render() == (
      "<start_of_turn>user\n수도는?<end_of_turn>\n<start_of_turn>model\n서울.<end_of_turn>\n")


def test_loss_mask_counts_exactly_the_model_turns(tmp_path, tok, tok_path, paras):
  messages = _messages(paras, 0, 2)
  q1, a1, q2, a2 = (m["content"] for m in messages)
  [(ids, weights, cuts)] = chat.encode([conversation({"messages": messages})], tok, bos=True)
  sot, eot = tok.chat_ids()
  assert (sot, eot) == (4, 5)  # user-defined pieces right after the 4 special ids
  enc, nl = tok.encode, tok.encode("\n")
  parts = [([BOS_ID], 0), ([sot], 0), (enc("user\n" + q1), 0), ([eot], 0), (nl, 0),
           ([sot], 0), (enc("model\n"), 0), (enc(a1), 1), ([eot], 1), (nl, 0),
           ([sot], 0), (enc("user\n" + q2), 0), ([eot], 0), (nl, 0),
           ([sot], 0), (enc("model\n"), 0), (enc(a2), 1), ([eot], 1), (nl, 0)]
  assert ids.tolist() == [i for p, _ in parts for i in p]
  assert weights.tolist() == [w for p, w in parts for _ in p]
  assert tok.decode(ids) == conversation({"messages": messages}).render()
  # a prompt is the ids the sampler feeds for it (<bos> + the rendered prompt, markers single ids)
  opener = len(enc("model\n"))
  first_reply = 1 + 1 + len(enc("user\n" + q1)) + 1 + len(nl) + 1 + opener
  assert ids[:first_reply].tolist() == chat.prompt_ids(messages[:1], tok)
  assert ids[:first_reply].tolist() == [BOS_ID, *enc(render_prompt(messages[:1]))]
  second_reply = cuts[0] + len(nl) + 1 + len(enc("user\n" + q2)) + 1 + len(nl) + 1 + opener
  assert ids[:second_reply].tolist() == chat.prompt_ids(messages[:3], tok)

  # through the pipeline: a position counts when the token it predicts is a model turn's
  path = _jsonl(tmp_path / "one.jsonl", [{"messages": messages}])
  b = next(make_eval_iterator(_chat_cfg(path, global_batch=1), tokenizer_path=tok_path))
  n = len(ids)
  np.testing.assert_array_equal(b["tokens"][0, :n], ids)
  np.testing.assert_array_equal(b["loss_mask"][0, :n - 1], weights[1:])
  assert not b["loss_mask"][0, n - 1:].any() and not b["segment_ids"][0, n:].any()
  counted = b["targets"][0][b["loss_mask"][0] > 0]
  assert tok.decode(counted) == f"{a1}<end_of_turn>{a2}<end_of_turn>"
  # bits per byte: the reply's text bytes; the turn marker is scaffolding, 0 bytes
  assert b["target_bytes"][0].sum() == len(a1.encode()) + len(a2.encode())


def test_prompt_ids_are_the_trainer_ids_up_to_the_reply(tok, paras):
  """chat.prompt_ids (what `sample --chat` feeds the teacher) == chat.encode's ids of the same
  conversation up to the last model turn's text: a reply is written after the very ids the student is
  trained on before it, multi-turn and system prompts included."""
  from gemma2_jax.inference.sampler import encode_prompt

  messages = [{"role": "system", "content": "법률가처럼 답하라."}, *_messages(paras, 5, 3)]
  [(ids, weights, cuts)] = chat.encode([conversation({"messages": messages})], tok, bos=True)
  nl = tok.encode("\n")
  for k, model_turn in enumerate(range(2, len(messages), 2)):  # each model turn's reply in turn
    reply = tok.encode(messages[model_turn]["content"])
    end = cuts[k] - 1 - len(reply)  # the reply's first token (cuts: just after its <end_of_turn>)
    got = chat.prompt_ids(messages[:model_turn], tok)
    assert got == ids[:end].tolist(), k
    assert ids[end:cuts[k] - 1].tolist() == reply and weights[end:cuts[k]].all()
    assert tok.decode(got) == render_prompt(messages[:model_turn])
    assert encode_prompt(tok, messages[:model_turn], chat=True) == got  # the sampler's ids
  assert cuts[-1] + len(nl) == len(ids)
  assert chat.prompt_ids(messages[:-1], tok, bos=False) == chat.prompt_ids(messages[:-1], tok)[1:]
  # a string is one user turn; a prompt must end with a user message; the markers are checked
  assert chat.prompt_ids("수도는?", tok) == chat.prompt_ids([{"role": "user", "content": "수도는?"}],
                                                            tok)
  with pytest.raises(chat.ChatError, match="must end with a user message"):
    chat.prompt_ids(messages, tok)
  with pytest.raises(DataError, match=r"has no <start_of_turn> / <end_of_turn> piece"):
    chat.prompt_ids("수도는?", Tokenizer(PLAIN_TOK))


def test_packed_conversations_are_whole_and_never_attend_across(tmp_path, tok, tok_path, paras):
  records = [{"messages": _messages(paras, 3 * i, 1 + i % 3)} for i in range(30)]
  path = _jsonl(tmp_path / "chats.jsonl", records)
  encoded = {tuple(ids.tolist()): weights
             for ids, weights, _ in chat.encode([conversation(r) for r in records], tok, bos=True)}
  assert max(map(len, encoded)) <= 301  # all fit a row: none is cut
  it = make_eval_iterator(_chat_cfg(path, seq_len=300), tokenizer_path=tok_path)
  batches = list(it)
  seen = []
  for b in batches:
    for _, _, toks, mask in _segments(b):
      key = tuple(toks.tolist())
      assert key in encoded  # a whole conversation, from its <bos> to its last "\n"
      np.testing.assert_array_equal(mask, encoded[key][1:])
      seen.append(key)
    seg, mask = b["segment_ids"], b["loss_mask"]
    assert not mask[seg == 0].any()
    # never a target across a boundary: the last token of a conversation predicts nothing
    assert not mask[:, :-1][seg[:, 1:] != seg[:, :-1]].any()
  assert sorted(seen) == sorted(encoded)  # each once, in one pass
  assert sum(int((b["segment_ids"] != 0).any(axis=1).sum()) for b in batches) < len(records)

  # and the model's attention sees its own conversation only: changing the keys/values of one
  # conversation leaves every other position of the row as it was
  from gemma2_jax.model.attention import attention_xla

  seg = np.concatenate([b["segment_ids"] for b in batches])
  seg = seg[seg.max(axis=1) >= 2][:1]  # a row holding two conversations or more
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(1, seg.shape[1], 2, 8)).astype(np.float32) for _ in range(3))
  for changed in (1, 2):
    k2, v2 = k.copy(), v.copy()
    k2[seg == changed] += 1.0
    v2[seg == changed] += 1.0
    out = np.asarray(attention_xla(q, k, v, seg, window=None, softcap=None))
    out2 = np.asarray(attention_xla(q, k2, v2, seg, window=None, softcap=None))
    rest = (seg != changed) & (seg != 0)
    np.testing.assert_array_equal(out[rest], out2[rest])
    assert not np.allclose(out[seg == changed], out2[seg == changed])


def test_chat_and_text_mix_and_resume_exactly(tmp_path, tok, tok_path, paras):
  path = _jsonl(tmp_path / "chats.jsonl",
                [{"messages": _messages(paras, i, 1 + i % 2)} for i in range(40)])
  cfg = DataConfig(sources=[SourceConfig(paths=path, chat=True, name="sft", weight=1.0),
                            SourceConfig(paths=str(KO_FILES[0]), name="pretrain", weight=1.0)],
                   seq_len=64, global_batch=4, seed=2, tokenize_batch=8)
  sot, _ = tok.chat_ids()
  it = make_train_iterator(cfg, tokenizer_path=tok_path)
  first = [next(it) for _ in range(3)]
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  assert state["fingerprint"]["chat_packing_bins"] == 32
  rest = [next(it) for _ in range(3)]
  kinds = set()
  for b in first + rest:
    for r in range(4):
      seg, mask = b["segment_ids"][r], b["loss_mask"][r]
      plain = (seg[:-1] != 0) & (seg[1:] == seg[:-1])
      if sot in b["tokens"][r]:
        kinds.add("chat")
        assert mask[:-1].sum() < plain.sum()  # prompts and scaffolding do not count
      else:  # a text row keeps the plain mask: every in-document prediction
        kinds.add("text")
        np.testing.assert_array_equal(mask[:-1], plain)
  assert kinds == {"chat", "text"}
  fresh = make_train_iterator(cfg, tokenizer_path=tok_path)
  fresh.set_state(state)
  for a, b in zip(rest, [next(fresh) for _ in range(3)], strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  it.close()
  fresh.close()
  # a text-only pipeline's fingerprint is what it was before chat sources existed
  plain_it = make_train_iterator(DataConfig(sources=[SourceConfig(paths=str(KO_FILES[0]))],
                                            seq_len=64, global_batch=4), tokenizer_path=tok_path)
  fp = plain_it.get_state()["fingerprint"]
  plain_it.close()
  assert "chat" not in fp["sources"][0] and "chat_packing_bins" not in fp


def _sample_output(tok, paras) -> list[dict]:
  """Lines as `python -m gemma2_jax.sample --prompts ... --chat --output` writes them."""
  _, eot = tok.chat_ids()
  out = []
  for i, (prompt, reply, stopped) in enumerate([
      (paras[0][:20], paras[1][:30], True),
      ([{"role": "system", "content": "법률가처럼"}, {"role": "user", "content": paras[2][:20]}],
       paras[3][:30], True),
      (paras[4][:20], paras[5][:30], False)]):  # cut at --max_new_tokens: no stop token
    ids = tok.encode(reply) + ([eot] if stopped else [])
    out.append({"index": i, "prompt": prompt, "prompt_ids": [BOS_ID, 7, 8], "completion": reply,
                "completion_ids": ids, "logprobs": [-0.5] * len(ids)})
  return out


def test_teacher_written_responses_are_read_directly(tmp_path, tok, paras):
  import pyarrow as pa
  import pyarrow.parquet as pq

  _, eot = tok.chat_ids()
  lines = _sample_output(tok, paras)
  convs = [conversation(rec) for rec in lines]
  assert convs[1].turns[0] == ("user", f"법률가처럼\n\n{paras[2][:20]}")
  encoded = chat.encode(convs, tok, bos=True)
  for (ids, weights, _), rec in zip(encoded, lines, strict=True):
    reply = tok.encode(rec["completion"])
    if rec["index"] < 2:  # stopped at <end_of_turn>: the model learns to stop there
      assert ids[-len(reply) - 2:].tolist() == [*reply, eot, *tok.encode("\n")]
      assert weights[-len(reply) - 2:].tolist() == [1] * (len(reply) + 1) + [0]
    else:  # cut short: its text counts, and no <end_of_turn> that would teach stopping mid-answer
      assert ids[-len(reply):].tolist() == reply and weights[-len(reply):].all()
      assert eot not in ids[-len(reply) - 1:].tolist()

  jsonl = _jsonl(tmp_path / "responses.jsonl", lines)
  src = open_source(SourceConfig(paths=jsonl, chat=True))
  assert [src[i] for i in range(3)] == convs
  # the same in Parquet: prompt / completion / completion_ids columns, and a messages column
  strings = [r for r in lines if isinstance(r["prompt"], str)]
  pq.write_table(pa.Table.from_pylist(strings), tmp_path / "responses.parquet")
  src = open_source(SourceConfig(paths=str(tmp_path / "responses.parquet"), chat=True))
  assert [src[i] for i in range(len(src))] == [conversation(r) for r in strings]
  messages = [{"messages": [*([] if isinstance(r["prompt"], str) else r["prompt"]),
                            {"role": "user", "content": "질문"},
                            {"role": "model", "content": r["completion"]}]} for r in lines]
  pq.write_table(pa.Table.from_pylist(messages), tmp_path / "messages.parquet")
  src = open_source(SourceConfig(paths=str(tmp_path / "messages.parquet"), chat=True))
  assert [src[i] for i in range(3)] == [conversation(m) for m in messages]
  pq.write_table(pa.Table.from_pylist([{"text": "x"}]), tmp_path / "text.parquet")
  with pytest.raises(DataError, match="text.parquet: a chat source needs a 'messages' column"):
    open_source(SourceConfig(paths=str(tmp_path / "text.parquet"), chat=True))


BAD = [
    ({"messages": [{"role": "bot", "content": "?"}, {"role": "model", "content": "!"}]},
     "message 0 has unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "model", "content": "!"}]},
     "message 0 (user) has empty or non-text content"),
    ({"messages": [{"role": "user", "content": "질문"}]}, "no model (assistant) turn"),
    ({"prompt": "질문", "response": "  "}, "turn 1 is only whitespace"),
    ({"text": "평문"}, "needs a 'messages' field, or 'prompt' and 'response'"),
    ("[1, 2]", "expected a JSON object"),
]


def test_malformed_conversations_follow_bad_records(tmp_path, paras):
  good = {"messages": _messages(paras, 0, 1)}
  path = _jsonl(tmp_path / "bad.jsonl", [good, *(rec for rec, _ in BAD), good])
  sc = SourceConfig(paths=path, chat=True)
  STATS.clear()
  src = open_source(sc, bad_records="skip")
  got = [src[i] for i in range(len(src))]
  assert got[0] == got[-1] == conversation(good) and got[1:-1] == [None] * len(BAD)
  assert STATS["bad_records"] == len(BAD)
  src = open_source(sc, bad_records="fail")
  for line, (_, message) in enumerate(BAD, start=2):
    with pytest.raises(DataError, match=f"bad.jsonl:{line}: malformed conversation: .*"
                                        f"{message.replace('(', '[(]').replace(')', '[)]')}"):
      src[line - 1]
  # the same in Parquet, named by row group and row
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.Table.from_pylist([good, BAD[0][0]]), tmp_path / "bad.parquet")
  sc = SourceConfig(paths=str(tmp_path / "bad.parquet"), chat=True)
  assert open_source(sc, bad_records="skip")[1] is None
  with pytest.raises(DataError, match="bad.parquet row group 0 row 1: malformed conversation: "
                                      "message 0 has unknown role 'bot'"):
    open_source(sc, bad_records="fail")[1]


def test_over_long_conversations_are_cut_at_a_turn_boundary(tmp_path, tok, tok_path, paras):
  messages = _messages(paras, 10, 2)
  c = conversation({"messages": messages})
  [(ids, weights, cuts)] = chat.encode([c], tok, bos=True)
  n = len(ids)
  # the trailing "\n" (no target of the loss) may go; then the last <end_of_turn> is the end
  assert cuts == [cuts[0], n - len(tok.encode("\n"))]
  assert chat.fit(ids, weights, cuts, n - 1)[0].tolist() == ids[:cuts[1]].tolist()
  # cut after the first reply's <end_of_turn> when the second does not fit
  kept, w = chat.fit(ids, weights, cuts, cuts[1] - 1)
  assert len(kept) == cuts[0] and tok.decode(kept) == (
      chat.turn("user", messages[0]["content"]) + chat.turn("model", messages[1]["content"])[:-1])
  np.testing.assert_array_equal(w, weights[:cuts[0]])
  # not even the first reply fits: its beginning is kept (trained without <end_of_turn>)
  prompt_len = int(np.argmax(weights))  # the first reply token
  kept, w = chat.fit(ids, weights, cuts, prompt_len + 3)
  assert len(kept) == prompt_len + 3 and w[prompt_len:].all() and not w[:prompt_len].any()
  # the prompt alone fills the row: nothing to train on
  assert chat.fit(ids, weights, cuts, prompt_len) is None
  assert chat.fit(ids, weights, cuts, n) == (ids, weights)

  # in the pipeline: counted and logged; long_docs="error" makes it an error
  short = {"messages": _messages(paras, 0, 1)}
  path = _jsonl(tmp_path / "long.jsonl", [short, {"messages": messages}])
  seq_len = cuts[1] - 2  # rows that end one token short of the second <end_of_turn>
  STATS.clear()
  rows = [s for b in make_eval_iterator(_chat_cfg(path, seq_len=seq_len), tokenizer_path=tok_path)
          for s in _segments(b)]
  assert STATS["long_chats"] == 1
  assert sorted(len(t) for *_, t, _ in rows) == sorted(
      [cuts[0], len(chat.encode([conversation(short)], tok, bos=True)[0][0])])
  with pytest.raises(DataError, match=f"a conversation of {n} tokens is longer than a row of "
                                      f"{seq_len + 1} [(]long_docs='error'[)]"):
    list(make_eval_iterator(_chat_cfg(path, seq_len=seq_len, long_docs="error"),
                            tokenizer_path=tok_path))


def test_chat_needs_a_tokenizer_with_turn_markers(tmp_path, paras):
  path = _jsonl(tmp_path / "c.jsonl", [{"messages": _messages(paras, 0, 1)}])
  with pytest.raises(DataError, match=r"tokenizer .*ko_sp1024\.model has no <start_of_turn> / "
                                      "<end_of_turn> piece; chat data needs"):
    make_train_iterator(_chat_cfg(path), tokenizer_path=PLAIN_TOK)
  # the shipped tokenizer predates the markers; text training with it is unaffected
  assert Tokenizer(PLAIN_TOK).sp.PieceToId("<end_of_turn>") == Tokenizer(PLAIN_TOK).sp.unk_id()
  with pytest.raises(ValueError, match="a chat source is jsonl or parquet, not 'text'"):
    SourceConfig(paths=path, format="text", chat=True)
  txt = tmp_path / "c.txt"
  txt.write_text("평문\n", encoding="utf-8")
  with pytest.raises(DataError, match="a chat source is JSONL or Parquet, not text"):
    open_source(SourceConfig(paths=str(txt), chat=True))


def test_prepare_data_trains_on_chats_and_refuses_to_pre_tokenize_them(tmp_path, capsys, paras,
                                                                        tok_path):
  path = _jsonl(tmp_path / "c.jsonl", [{"messages": _messages(paras, i, 2)} for i in range(60)])
  rc = prepare_data.main(["train-tokenizer", "--chat", "--input", path, "--model_prefix",
                          str(tmp_path / "sp"), "--vocab_size", "500", "--character_coverage", "0.98"])
  assert rc == 0, capsys.readouterr().err
  sp = Tokenizer(tmp_path / "sp.model").sp
  assert [sp.id_to_piece(i) for i in (4, 5)] == ["<start_of_turn>", "<end_of_turn>"]
  rc = prepare_data.main(["tokenize", "--chat", "--input", path, "--tokenizer", tok_path,
                          "--output_dir", str(tmp_path / "o"), "--no_progress"])
  err = capsys.readouterr().err
  assert rc == 2 and "is chat data: it is tokenized by the training pipeline" in err
  assert err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_offline_teacher_records_refuse_chat_sources(tmp_path, tok_path, paras):
  from gemma2_jax.data.offline import packed_rows
  from gemma2_jax.data.sources import DataError

  path = _jsonl(tmp_path / "c.jsonl", [{"messages": _messages(paras, 0, 1)}])
  with pytest.raises(DataError, match="cannot be written as offline teacher records"):
    packed_rows(_chat_cfg(path, seq_len=64, global_batch=2), tok_path)
