"""Pipeline invariants: packing, determinism, exactly-once sharding, resume, mixtures, eval."""

import collections
import json
import pathlib

import numpy as np
import pytest

from gemma2_jax.data import (
    BOS_ID,
    EOS_ID,
    DataConfig,
    DataError,
    SourceConfig,
    Tokenizer,
    make_eval_iterator,
    make_train_iterator,
)

DATA = pathlib.Path(__file__).parent / "data"
TOK = str(DATA / "ko_sp1024.model")
KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask", "target_bytes")


def _korean_paragraphs() -> list[str]:
  text = (DATA / "ko" / "constitution.txt").read_text(encoding="utf-8")
  return [ln for ln in text.splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, list[str]]:
  """JSONL of 150 unique Korean documents of varied length (some longer than a row)."""
  paras = _korean_paragraphs()
  rng = np.random.default_rng(0)
  docs = []
  for i in range(150):
    k = int(rng.integers(1, 4))
    picks = rng.choice(len(paras), size=k, replace=False)
    docs.append(f"문서 {i}번: " + "\n".join(paras[j] for j in picks))
  path = tmp_path_factory.mktemp("corpus") / "ko.jsonl"
  with open(path, "w", encoding="utf-8") as f:
    for d in docs:
      f.write(json.dumps({"text": d, "id": len(docs)}, ensure_ascii=False) + "\n")
  return str(path), docs


def _cfg(path, **kw) -> DataConfig:
  kw = dict(dict(seq_len=32, global_batch=4, seed=3, tokenize_batch=16), **kw)
  return DataConfig(sources=[SourceConfig(paths=path)], **kw)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b) -> bool:
  return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True)
                                  for k in KEYS)


def _documents(batches) -> list[list[int]]:
  """Re-assembles documents from a stream of packed rows: split at <bos>, drop padding."""
  stream = np.concatenate([_row_tokens(b) for b in batches])
  docs, cur = [], []
  for t in stream.tolist():
    if t == BOS_ID and cur:
      docs.append(cur)
      cur = []
    cur.append(t)
  if cur:
    docs.append(cur)
  return docs


def _row_tokens(b) -> np.ndarray:
  """Non-padding tokens of each row in order, including the row's last token (only a target)."""
  full = np.concatenate([b["tokens"], b["targets"][:, -1:]], axis=1)  # [B, T+1]
  keep = np.concatenate([b["segment_ids"] != 0, full[:, -1:] != 0], axis=1)  # <pad> is id 0
  return np.concatenate([full[r][keep[r]] for r in range(len(full))])


def _texts(tok, docs) -> list[str]:
  out = []
  for d in docs:
    assert d[0] == BOS_ID and d[-1] == EOS_ID, d[:3]
    out.append(tok.decode(d[1:-1]))
  return out


def test_batch_layout_and_packing_invariants(corpus):
  path, _ = corpus
  it = make_train_iterator(_cfg(path), tokenizer_path=TOK, vocab_size=1024)
  tok = Tokenizer(TOK)
  pb = tok.piece_bytes()
  for b in _take(it, 12):
    assert set(b) == set(KEYS)
    for k in KEYS:
      assert b[k].shape == (4, 32), k
    assert b["loss_mask"].dtype == np.float32
    tokens, targets, pos, seg, mask = (b[k] for k in KEYS[:5])
    # targets are the next tokens of the same row
    np.testing.assert_array_equal(targets[:, :-1], tokens[:, 1:])
    for r in range(4):
      s, p = seg[r], pos[r]
      nz = s != 0
      # padding only at the end; segment ids 1, 2, ... in order
      assert not np.any(nz[np.argmin(nz):]) or nz.all()
      assert s[0] == 1 and np.all(np.diff(s[nz]) >= 0) and np.all(np.diff(s[nz]) <= 1)
      # positions restart at 0 for each segment and count up inside it
      starts = np.flatnonzero(np.diff(s, prepend=0) != 0)
      assert np.all(p[starts[s[starts] != 0]] == 0)
      inside = (np.diff(s, prepend=-1) == 0) & nz
      assert np.all(p[inside] == np.roll(p, 1)[inside] + 1)
      # a document starts with <bos> unless it is the continuation of a split one (position 0)
      doc_starts = (tokens[r] == BOS_ID) & nz
      assert np.all(p[doc_starts] == 0)
    # no loss on padding, at document ends (<eos> would predict the next <bos>), across segments
    assert np.all(mask[seg == 0] == 0)
    assert np.all(mask[tokens == EOS_ID] == 0)
    assert np.all(mask[targets == BOS_ID] == 0)
    assert np.all(mask[:, :-1][seg[:, 1:] != seg[:, :-1]] == 0)
    # everything else is trained on
    assert np.all(mask[(seg != 0) & (tokens != EOS_ID)][:-1] >= 0)
    np.testing.assert_array_equal(b["target_bytes"], np.where(mask > 0, pb[targets], 0))
  assert it.batch_size == 4


def test_loss_mask_counts_every_in_document_prediction(corpus):
  path, docs = corpus
  cfg = _cfg(path, seq_len=4096, global_batch=1)
  b = next(make_eval_iterator(cfg, tokenizer_path=TOK))
  seg, mask, tokens = b["segment_ids"][0], b["loss_mask"][0], b["tokens"][0]
  n_docs = seg.max()
  # One long row: every token except an <eos> predicts its successor in the same document (the
  # row holds T + 1 tokens, so even the last input position has an in-document target).
  expected = np.sum((seg != 0) & (tokens != EOS_ID))
  assert n_docs > 3
  assert mask.sum() == expected


def test_determinism_by_seed(corpus):
  path, _ = corpus
  a = _take(make_train_iterator(_cfg(path), tokenizer_path=TOK), 8)
  b = _take(make_train_iterator(_cfg(path), tokenizer_path=TOK), 8)
  c = _take(make_train_iterator(_cfg(path, seed=4), tokenizer_path=TOK), 8)
  assert _equal(a, b)
  assert not _equal(a, c)


def test_unshuffled_order_follows_the_corpus(corpus):
  path, docs = corpus
  tok = Tokenizer(TOK)
  it = make_train_iterator(_cfg(path, shuffle=False, num_epochs=1, global_batch=1),
                           tokenizer_path=TOK)
  got = _texts(tok, _documents(list(it)))
  assert got == docs


@pytest.mark.parametrize("num_procs", [2, 4])
def test_exactly_once_per_epoch_across_processes(corpus, num_procs):
  path, docs = corpus
  tok = Tokenizer(TOK)
  epoch1, epoch2 = collections.Counter(), collections.Counter()
  for p in range(num_procs):
    it = make_train_iterator(_cfg(path, num_epochs=2, global_batch=num_procs),
                             process_index=p, process_count=num_procs, tokenizer_path=TOK)
    got = _texts(tok, _documents(list(it)))
    per_epoch = len(range(p, len(docs), num_procs))
    assert len(got) == 2 * per_epoch
    epoch1.update(got[:per_epoch])
    epoch2.update(got[per_epoch:])
  # each epoch is a fresh global permutation dealt round-robin to the processes
  assert epoch1 == collections.Counter(docs)
  assert epoch2 == collections.Counter(docs)


def test_resume_mid_epoch_gives_identical_batches(corpus):
  path, _ = corpus
  cfg = _cfg(path, seq_len=24, tokenize_batch=8)
  ref_it = make_train_iterator(cfg, tokenizer_path=TOK)
  ref = _take(ref_it, 60)  # several epochs of shuffled data
  for k in (0, 1, 7, 23, 41):
    it = make_train_iterator(cfg, tokenizer_path=TOK)
    _take(it, k)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    fresh = make_train_iterator(cfg, tokenizer_path=TOK)
    fresh.set_state(state)
    assert _equal(_take(fresh, 60 - k), ref[k:]), k


def test_resume_refuses_a_different_pipeline(corpus):
  path, _ = corpus
  it = make_train_iterator(_cfg(path), tokenizer_path=TOK)
  _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))
  with pytest.raises(DataError, match="saved by a different pipeline.*'seed': \\(3, 4\\)"):
    make_train_iterator(_cfg(path, seed=4), tokenizer_path=TOK).set_state(state)
  other = make_train_iterator(_cfg(path), process_index=1, process_count=2, tokenizer_path=TOK)
  with pytest.raises(DataError, match="process_count.*needs every group's saved state"):
    other.set_state(state)  # the other groups' states come with a checkpoint (test_group_resume)


def test_resume_with_worker_threads_and_mixture(tmp_path, corpus):
  path, _ = corpus
  en = tmp_path / "en.txt"
  en.write_text("".join(f"English document number {i} with some words.\n" for i in range(80)))
  cfg = DataConfig(sources=[SourceConfig(paths=path, weight=0.7, name="ko"),
                            SourceConfig(paths=str(en), weight=0.3, name="en")],
                   seq_len=32, global_batch=2, seed=1, tokenize_batch=8, num_threads=2)
  ref = _take(make_train_iterator(cfg, tokenizer_path=TOK), 40)
  it = make_train_iterator(cfg, tokenizer_path=TOK)
  _take(it, 17)
  state = json.loads(json.dumps(it.get_state()))
  fresh = make_train_iterator(cfg, tokenizer_path=TOK)
  fresh.set_state(state)
  assert _equal(_take(fresh, 23), ref[17:])


def _write_token_shards(path: pathlib.Path, docs: list[np.ndarray]) -> None:
  from array_record.python.array_record_module import ArrayRecordWriter

  w = ArrayRecordWriter(str(path), "group_size:1")
  for d in docs:
    w.write(np.asarray(d, "<i4").tobytes())
  w.close()


def test_mixture_proportions(tmp_path):
  rng = np.random.default_rng(0)
  # Token ranges tell the sources apart: A uses ids 10..99, B ids 500..599.
  a = [rng.integers(10, 100, size=rng.integers(5, 60)) for _ in range(400)]
  b = [rng.integers(500, 600, size=rng.integers(5, 60)) for _ in range(400)]
  _write_token_shards(tmp_path / "a.array_record", a)
  _write_token_shards(tmp_path / "b.array_record", b)
  cfg = DataConfig(sources=[
      SourceConfig(paths=str(tmp_path / "a.array_record"), weight=0.7, name="a"),
      SourceConfig(paths=str(tmp_path / "b.array_record"), weight=0.3, name="b")],
      seq_len=64, global_batch=8, seed=0)
  it = make_train_iterator(cfg, tokenizer_path=TOK, vocab_size=1024)
  n_a = n_b = 0
  for batch in _take(it, 50):
    toks = batch["tokens"][batch["segment_ids"] != 0]
    n_a += int(np.sum((toks >= 10) & (toks < 100)))
    n_b += int(np.sum((toks >= 500) & (toks < 600)))
  assert abs(n_a / (n_a + n_b) - 0.7) < 0.02
  # rows never mix sources, so a resumed mixture is a stream of whole rows from each
  again = _take(make_train_iterator(cfg, tokenizer_path=TOK), 3)
  assert _equal(again, _take(make_train_iterator(cfg, tokenizer_path=TOK), 3))


def test_eval_iterator_is_one_deterministic_padded_pass(corpus):
  path, docs = corpus
  tok = Tokenizer(TOK)
  cfg = _cfg(path, seq_len=64, global_batch=8)
  batches = list(make_eval_iterator(cfg, tokenizer_path=TOK))
  assert all(b["tokens"].shape == (8, 64) for b in batches)
  assert _texts(tok, _documents(batches)) == docs  # corpus order, nothing dropped
  assert batches[-1]["segment_ids"][-1].sum() == 0 or len(batches) * 8 * 64 > 0
  again = list(make_eval_iterator(cfg, tokenizer_path=TOK))
  assert _equal(batches, again)
  # fixed step count for multi-host eval: padded with empty batches, then stops
  n = len(batches) + 2
  padded = list(make_eval_iterator(cfg, tokenizer_path=TOK, num_batches=n))
  assert len(padded) == n and padded[-1]["loss_mask"].sum() == 0
  assert len(list(make_eval_iterator(cfg, tokenizer_path=TOK, num_batches=2))) == 2


def test_multiple_epochs_repeat_every_document(corpus):
  path, docs = corpus
  tok = Tokenizer(TOK)
  got = _texts(tok, _documents(list(make_train_iterator(
      _cfg(path, num_epochs=3, global_batch=1), tokenizer_path=TOK))))
  assert collections.Counter(got) == collections.Counter(docs * 3)


def test_config_from_dict_like_ml_collections(corpus):
  ml_collections = pytest.importorskip("ml_collections")
  path, _ = corpus
  c = ml_collections.ConfigDict()
  c.sources = [dict(paths=[path], format="jsonl", weight=1.0, text_field="text")]
  c.seq_len, c.global_batch, c.seed = 32, 4, 3
  c.tokenize_batch = 16
  it = make_train_iterator(c, tokenizer_path=TOK)
  assert _equal(_take(it, 2), _take(make_train_iterator(_cfg(path), tokenizer_path=TOK), 2))
  with pytest.raises(ValueError, match="unknown data config keys"):
    DataConfig.from_dict(dict(sources=[dict(paths=[path])], seq_len=8, global_batch=1, x=1))


@pytest.mark.slow
def test_worker_processes_resume(corpus):
  path, _ = corpus
  cfg = _cfg(path, num_workers=2)
  ref = _take(make_train_iterator(cfg, tokenizer_path=TOK), 20)
  it = make_train_iterator(cfg, tokenizer_path=TOK)
  _take(it, 9)
  state = json.loads(json.dumps(it.get_state()))
  fresh = make_train_iterator(cfg, tokenizer_path=TOK)
  fresh.set_state(state)
  assert _equal(_take(fresh, 11), ref[9:])
