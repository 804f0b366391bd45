"""Resume under a changed mixture (weights, added / removed sources) or global batch: every source
continues where it stopped, so no document is seen twice within its epoch and none is skipped."""

import json
import pathlib
import re

import numpy as np
import pytest

from gemma2_jax.data import BOS_ID, DataConfig, DataError, SourceConfig, Tokenizer, make_train_iterator

TOK = str(pathlib.Path(__file__).parent / "data" / "ko_sp1024.model")
KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask", "target_bytes")
WORDS = {"a": "alpha", "b": "beta", "c": "gamma"}
SIZES = {"a": 60, "b": 23, "c": 40}  # b is small: its epoch ends within the run


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
  d = tmp_path_factory.mktemp("mix")
  paths = {}
  for s, word in WORDS.items():
    docs = [f"{word} {i} " + " ".join([word] * (1 + (7 * i) % 4)) for i in range(SIZES[s])]
    if s == "b":
      paths[s] = str(d / "b.txt")
      (d / "b.txt").write_text("".join(t + "\n" for t in docs))
    else:
      paths[s] = str(d / f"{s}.jsonl")
      (d / f"{s}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
  return paths


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b) -> bool:
  return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True)
                                  for k in KEYS)


def _cfg(paths, weights, **kw):
  kw = dict(dict(seq_len=64, global_batch=4, seed=1, tokenize_batch=8), **kw)
  return DataConfig(sources=[SourceConfig(paths=paths[s], weight=w, name=s)
                             for s, w in weights.items()], **kw)


def _it(cfg):
  return make_train_iterator(cfg, tokenizer_path=TOK)


def _saved(it):
  return json.loads(json.dumps(it.get_state()))  # what a checkpoint stores


def _row_source(tok, row_tokens) -> str:
  """Rows never mix sources: the one source word in the row's text names its source."""
  text = tok.decode([t for t in row_tokens.tolist() if t > 2])
  (found,) = [s for s, w in WORDS.items() if w in text]
  return found


def _ids(tok, batches) -> dict[str, list[int]]:
  """Per source, the ids of the documents it started, in order (its rows concatenated)."""
  streams: dict[str, list[int]] = {s: [] for s in WORDS}
  for b in batches:
    full = np.concatenate([b["tokens"], b["targets"][:, -1:]], axis=1)
    keep = np.concatenate([b["segment_ids"] != 0, b["segment_ids"][:, -1:] != 0], axis=1)
    for r in range(len(full)):
      toks = full[r][keep[r]]
      streams[_row_source(tok, toks)].extend(toks.tolist())
  out = {}
  for s, stream in streams.items():
    docs = np.split(np.array(stream, np.int64), np.flatnonzero(np.array(stream) == BOS_ID))
    ids = []
    for d in docs:
      if len(d) > 1 and d[0] == BOS_ID:
        m = re.match(rf"{WORDS[s]} (\d+) ", tok.decode(d[1:].tolist()))
        if m:  # the last document of a stream may end before its id was packed
          ids.append(int(m.group(1)))
    out[s] = ids
  return out


def _once_per_epoch(ids, n):
  for e in range(0, len(ids), n):
    epoch = ids[e:e + n]
    assert len(set(epoch)) == len(epoch), f"a document repeats within epoch {e // n}: {epoch}"


def test_changed_weights_and_added_source_continue_without_replay(corpora):
  tok = Tokenizer(TOK)
  old = _cfg(corpora, {"a": 0.7, "b": 0.3})
  new = _cfg(corpora, {"a": 0.5, "b": 0.5, "c": 0.5})
  it = _it(old)
  before = _take(it, 10)
  state = _saved(it)
  resumed = _it(new)
  resumed.set_state(state)
  after = _take(resumed, 25)
  # A source's rows concatenated across the resume (a document cut there continues after it).
  got_before, got_all = _ids(tok, before), _ids(tok, before + after)
  # What each source alone would have given next: the unchanged run (a, b), a fresh new run (c).
  ref_old, ref_new = _ids(tok, _take(_it(old), 80)), _ids(tok, _take(_it(new), 40))
  for s in ("a", "b"):
    seen = got_all[s]
    # no replay, nothing skipped
    assert len(seen) > len(got_before[s]) + 5 and seen == ref_old[s][:len(seen)], s
    _once_per_epoch(seen, SIZES[s])
  assert len(got_all["b"]) > SIZES["b"]  # b went into its second epoch
  assert got_before["c"] == [] and got_all["c"] == ref_new["c"][:len(got_all["c"])]
  assert len(got_all["c"]) > 5
  _once_per_epoch(got_all["c"], SIZES["c"])
  # the new weights hold: b now gets about as many rows as a (it had 3/7 of a's before)
  n_rows = {s: 0 for s in WORDS}
  for b in after:
    full = np.concatenate([b["tokens"], b["targets"][:, -1:]], axis=1)
    for r in range(len(full)):
      n_rows[_row_source(tok, full[r][full[r] != 0])] += 1
  assert abs(n_rows["a"] - n_rows["b"]) <= 0.25 * len(after) * 4 and n_rows["c"] > 0
  # a changed mixture resumed again under the same config is exact (its reseeding is in the state)
  state2 = _saved(resumed)
  assert state2["fingerprint"].get("seed_slots") is None  # a, b, c kept their positions
  ref = _take(resumed, 6)
  again = _it(new)
  again.set_state(state2)
  assert _equal(_take(again, 6), ref)
  for x in (it, resumed, again):
    x.close()


def test_removed_source_is_kept_and_continues_when_it_returns(corpora):
  tok = Tokenizer(TOK)
  abc = _cfg(corpora, {"a": 1.0, "b": 1.0, "c": 1.0})
  it = _it(abc)
  first = _take(it, 8)
  only_c = _cfg(corpora, {"c": 1.0})  # a and b set aside, c alone (seed slot 2 kept)
  it2 = _it(only_c)
  it2.set_state(_saved(it))
  state = _saved(it2)
  assert sorted(state["retired"]) == ["a", "b"] and state["fingerprint"]["seed_slots"] == [2]
  mid = _take(it2, 4)
  exact = _it(only_c)  # the same reseeded mixture resumed again: rebuilt with slot 2, exact
  exact.set_state(_saved(it2))
  probe = _it(only_c)
  probe.set_state(state)
  assert _equal(_take(probe, 4), mid) and exact.get_state()["fingerprint"]["seed_slots"] == [2]
  back = _cfg(corpora, {"b": 1.0, "c": 1.0})  # b returns; a stays aside
  it3 = _it(back)
  it3.set_state(_saved(it2))
  assert sorted(_saved(it3)["retired"]) == ["a"]
  last = _take(it3, 8)
  seen, ref = _ids(tok, first + mid + last), _ids(tok, _take(_it(abc), 60))
  for s in "bc":
    assert len(seen[s]) > len(_ids(tok, first)[s]) + 3 and seen[s] == ref[s][:len(seen[s])], s
  assert _ids(tok, mid)["a"] == _ids(tok, mid)["b"] == _ids(tok, last)["a"] == []
  for x in (it, it2, it3, exact, probe):
    x.close()


@pytest.mark.parametrize("weights", [{"a": 1.0}, {"a": 0.7, "b": 0.3}])
def test_changed_global_batch_resumes_without_replay(corpora, weights):
  tok = Tokenizer(TOK)
  cfg = _cfg(corpora, weights)
  it = _it(cfg)
  before = _take(it, 6)
  bigger = _it(cfg.replace(global_batch=6))
  bigger.set_state(_saved(it))
  after = _take(bigger, 8)
  assert after[0]["tokens"].shape == (6, 64)
  if len(weights) == 1:  # one source: the row stream goes on exactly, only regrouped
    rows = lambda bs: np.concatenate([b["tokens"] for b in bs])  # noqa: E731
    assert np.array_equal(rows(before + after), rows(_take(_it(cfg), 6 + 12)))
  ref = _ids(tok, _take(_it(cfg), 40))
  got_before, got_all = _ids(tok, before), _ids(tok, before + after)
  for s in weights:
    seen = got_all[s]
    assert len(seen) > len(got_before[s]) + 3 and seen == ref[s][:len(seen)], s
    _once_per_epoch(seen, SIZES[s])
  it.close()
  bigger.close()


def test_unchanged_config_resumes_bit_identically(corpora):
  cfg = _cfg(corpora, {"a": 0.7, "b": 0.3})
  ref = _take(_it(cfg), 20)
  it = _it(cfg)
  _take(it, 9)
  fresh = _it(cfg)
  fresh.set_state(_saved(it))
  assert _equal(_take(fresh, 11), ref[9:])
  assert all(k in ref[0] for k in KEYS)


def test_what_cannot_change_is_refused(corpora):
  it = _it(_cfg(corpora, {"a": 0.7, "b": 0.3}))
  _take(it, 2)
  state = _saved(it)
  with pytest.raises(DataError, match=r"'seq_len': \(64, 32\).*only source weights"):
    _it(_cfg(corpora, {"a": 0.5, "b": 0.5}, seq_len=32)).set_state(state)
  other = make_train_iterator(_cfg(corpora, {"a": 0.5, "b": 0.5}), process_index=0,
                              process_count=2, tokenizer_path=TOK)
  with pytest.raises(DataError, match="needs every group's saved state.*restore_data=False"):
    other.set_state(state)  # without the other groups' states (see test_group_resume)
  moved = DataConfig(sources=[SourceConfig(paths=corpora["a"], name="a"),
                              SourceConfig(paths=corpora["c"], name="b", format="jsonl")],
                     seq_len=64, global_batch=4, seed=1, tokenize_batch=8)
  with pytest.raises(DataError, match="source 'b' changed.*give a different corpus a new name"):
    _it(moved).set_state(state)
  unnamed = DataConfig(sources=[SourceConfig(paths=corpora["a"])], seq_len=64, global_batch=4,
                       seed=1, tokenize_batch=8)
  with pytest.raises(DataError, match="name every source"):
    _it(unnamed).set_state(state)
