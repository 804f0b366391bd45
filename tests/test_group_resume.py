"""Resume under another data group count (process count): the new groups deal the documents no old
group had read, so within an epoch no document is read twice and none is skipped (but the rest of a
document an old group had cut at its last row: see DataIterator._regroup)."""

import collections
import json
import pathlib
import re

import numpy as np
import pytest

from gemma2_jax.data import (
  BOS_ID,
  EOS_ID,
  DataConfig,
  DataError,
  SourceConfig,
  Tokenizer,
  make_train_iterator,
)
from gemma2_jax.data.groups import EpochPlan, kth_left, merge

TOK = str(pathlib.Path(__file__).parent / "data" / "ko_sp1024.model")
KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask", "target_bytes")
WORDS = {"a": "alpha", "b": "beta"}
SIZES = {"a": 61, "b": 47}


def _text(s, i):
  return f"{WORDS[s]} {i} " + " ".join([WORDS[s]] * (1 + (7 * i) % 13))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
  d = tmp_path_factory.mktemp("groups")
  (d / "a.txt").write_text("".join(_text("a", i) + "\n" for i in range(SIZES["a"])))
  (d / "b.jsonl").write_text("".join(json.dumps({"text": _text("b", i)}) + "\n"
                                     for i in range(SIZES["b"])))
  return {"a": str(d / "a.txt"), "b": str(d / "b.jsonl")}


@pytest.fixture(scope="module")
def tok():
  return Tokenizer(TOK)


def _cfg(paths, weights, groups, **kw):
  # one row per group and batch: nothing is dropped at the end of a finite run
  kw = dict(dict(seq_len=32, global_batch=groups, seed=5, tokenize_batch=4), **kw)
  return DataConfig(sources=[SourceConfig(paths=paths[s], weight=w, name=s)
                             for s, w in weights.items()], **kw)


def _its(cfg, groups):
  return [make_train_iterator(cfg, process_index=g, process_count=groups, tokenizer_path=TOK)
          for g in range(groups)]


def _saved(it):
  return json.loads(json.dumps(it.get_state()))  # what a checkpoint stores


def _resume(cfg, groups, states):
  its = _its(cfg, groups)
  for it in its:
    it.set_state(states[0], peers=lambda: states)
  return its


def _streams(tok, batches, sources) -> dict[str, list[int]]:
  """Per source, the tokens of a group's rows concatenated (rows never mix sources; a row's source
  is told by the tokens only its documents have)."""
  own = {s: set(sum(tok.encode_batch([_text(s, i) for i in range(SIZES[s])]), [])) for s in WORDS}
  only = {s: own[s] - set().union(*(own[o] for o in WORDS if o != s)) for s in WORDS}
  out = collections.defaultdict(list)
  for b in batches:
    full = np.concatenate([b["tokens"], b["targets"][:, -1:]], axis=1)
    for r in range(len(full)):
      row = full[r][full[r] != 0].tolist()  # 0 (padding) is no document's token
      (s,) = [s for s in sources if only[s] & set(row)] if len(sources) > 1 else sources
      out[s].extend(row)
  return out


def _check(tok, old, new, sources, epochs=1, finished=True):
  """old / new: per group, its batches. Every document is read `epochs` times over all groups,
  but an old group's last document if it was cut there (its head was read; its rest is dropped).
  Not `finished` (the new groups stopped early): only that no document is read twice."""
  expected = {s: {i: tuple([BOS_ID, *ids, EOS_ID]) for i, ids in
                  enumerate(tok.encode_batch([_text(s, i) for i in range(SIZES[s])]))}
              for s in sources}
  whole = {s: {v: i for i, v in e.items()} for s, e in expected.items()}
  count = {s: collections.Counter() for s in sources}
  cuts = {s: [] for s in sources}
  for batches, last in [(b, False) for b in old] + [(b, finished) for b in new]:
    for s, stream in _streams(tok, batches, list(sources)).items():
      starts = [k for k, t in enumerate(stream) if t == BOS_ID] + [len(stream)]
      assert starts[0] == 0
      for lo, hi in zip(starts[:-1], starts[1:], strict=True):
        piece = tuple(stream[lo:hi])
        if piece in whole[s]:
          count[s][whole[s][piece]] += 1
          continue
        assert not last and hi == len(stream), f"{s}: {tok.decode(piece)!r} is cut inside a stream"
        cuts[s].append({i for i, e in expected[s].items() if e[:len(piece)] == piece})
  for s in sources:
    assert max(count[s].values()) <= epochs, f"{s}: a document is read twice within an epoch"
    if not finished:
      assert all(not (c <= {i for i in count[s] if count[s][i] == epochs}) for c in cuts[s]), s
      continue
    short = {i for i in expected[s] if count[s][i] < epochs}
    assert sum(epochs - count[s][i] for i in expected[s]) == len(cuts[s]), (s, short, cuts[s])
    assert all(any(i in c for c in cuts[s]) for i in short), (s, short, cuts[s])
  return count


def _take(it, n):
  return [next(it) for _ in range(n)]


@pytest.mark.parametrize("later", [[1], [4], [4, 1], [3, 2]])
def test_a_changed_group_count_reads_the_rest_of_the_epoch_once(corpora, tok, later):
  """2 groups read part of one epoch; then `later` group counts in turn read on (all but the last
  for a few batches, the last to the end of the epoch)."""
  weights = {"a": 1.0}
  groups = 2
  its = _its(_cfg(corpora, weights, groups, num_epochs=1), groups)
  old = [_take(it, 4 + 3 * g) for g, it in enumerate(its)]  # the groups stand apart
  for i, count in enumerate(later):
    states = [_saved(it) for it in its]
    its = _resume(_cfg(corpora, weights, count, num_epochs=1), count, states)
    last = i == len(later) - 1
    got = [list(it) if last else _take(it, 3) for it in its]
    if last:
      count = _check(tok, old, got, weights)["a"]
      # Unread at the end of the epoch: at most the document each old group had cut at a switch.
      assert SIZES["a"] - len(+count) <= groups + sum(later[:-1])
    else:
      old += got


def test_old_groups_in_different_epochs(corpora, tok):
  """One old group already in its second epoch, the other still in its first: the new groups read
  the rest of the first, then the rest of the second, then nothing more (num_epochs=2)."""
  weights = {"a": 1.0}
  its = _its(_cfg(corpora, weights, 2, num_epochs=2), 2)
  old = [_take(its[0], 40), _take(its[1], 6)]
  assert _saved(its[0])["fingerprint"]["num_epochs"] == 2
  states = [_saved(it) for it in its]
  new = [list(it) for it in _resume(_cfg(corpora, weights, 3, num_epochs=2), 3, states)]
  _check(tok, old, new, weights, epochs=2)


def test_mixture_regrouped_with_new_weights_continues_each_source(corpora, tok):
  """2 -> 4 groups together with new weights: each source goes on without replay; resumed again
  under 4 groups it is bit-identical (the plans are in the state)."""
  its = _its(_cfg(corpora, {"a": 0.6, "b": 0.4}, 2), 2)
  old = [_take(it, 5) for it in its]
  states = [_saved(it) for it in its]
  new_cfg = _cfg(corpora, {"a": 0.3, "b": 0.7}, 4)
  new_its = _resume(new_cfg, 4, states)
  new = [_take(it, 10) for it in new_its]
  before = _check(tok, old, [], WORDS, finished=False)
  after = _check(tok, old, new, WORDS, finished=False)  # a and b stay within their first epoch
  read_on = {s: sum(after[s].values()) - sum(before[s].values()) for s in WORDS}
  assert read_on["b"] > 1.5 * read_on["a"] > 3  # both read on, by the new weights
  fp = _saved(new_its[1])["fingerprint"]
  assert fp["process_count"] == 4 and sorted(fp["plans"]) == ["a", "b"]
  again = _its(new_cfg, 4)
  for a, it in zip(again, new_its, strict=True):
    a.set_state(_saved(it))
    ref = _take(it, 3)
    got = _take(a, 3)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(ref, got, strict=True) for k in KEYS)


def test_group_count_change_without_the_other_states_is_refused(corpora):
  cfg = _cfg(corpora, {"a": 1.0}, 2)
  its = _its(cfg, 2)
  _take(its[0], 2)
  one = make_train_iterator(cfg.replace(global_batch=1), tokenizer_path=TOK)
  with pytest.raises(DataError, match="needs every group's saved state"):
    one.set_state(_saved(its[0]))
  with pytest.raises(DataError, match=r"groups \[1\] of 2 are missing"):
    one.set_state(_saved(its[0]), peers=lambda: [_saved(its[0])])


def test_renumbered_processes_take_their_own_groups_state(corpora):
  """Same group count, another process order: each takes its own group's state, exactly."""
  cfg = _cfg(corpora, {"a": 1.0}, 2)
  its = _its(cfg, 2)
  for it in its:
    _take(it, 3)
  states = [_saved(it) for it in its]
  fresh = _its(cfg, 2)[1]
  fresh.set_state(states[0], peers=lambda: states)
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(_take(fresh, 3), _take(its[1], 3),
                                                       strict=True) for k in KEYS)


def test_plan_arithmetic():
  # reader 0 of 2 read 3 of 0, 2, 4; reader 1 read 1 of 1, 3, 5, 7: left 3, 5, 6, 7, 8
  assert kth_left(np.arange(5), 2, [3, 1], 9).tolist() == [3, 5, 6, 7, 8]
  old = [EpochPlan(9, g, 2, 2) for g in range(2)]
  plan = merge(old, [(0, 3), (0, 1)], None)
  assert plan == {"from": 0, "epochs": [[[2, [3, 1]]]]}
  new = [EpochPlan(9, g, 3, 2, plan=plan) for g in range(3)]
  assert [p.slots(0, 0, p.docs(0)) for p in new] == [[3, 7], [5, 8], [6]]
  assert [p.locate(1) for p in new] == [(1, 0), (1, 0), (1, 0)]  # epoch 1 is dealt as usual
  assert new[0].slots(1, 0, 3) == [0, 3, 6]


def test_checkpoint_of_two_processes_restored_by_one(corpora, tok, tmp_path):
  """Through TrainCheckpointer: a step holding the data states of 2 processes (as a 2-process run
  writes them) restores into this 1-process run, which reads both and finishes the epoch."""
  import jax
  import jax.numpy as jnp

  from gemma2_jax.checkpoint.manager import CheckpointConfig, TrainCheckpointer

  weights = {"a": 1.0}
  its = _its(_cfg(corpora, weights, 2, num_epochs=1), 2)
  old = [_take(it, 5 + g) for g, it in enumerate(its)]
  ckpt = TrainCheckpointer(tmp_path, CheckpointConfig(async_save=False))
  state = {"w": jnp.arange(3.0)}
  ckpt.save(7, state, its[0], {})
  ckpt.wait()
  data = tmp_path / "checkpoints" / "7" / "data"
  (data / "process_0-of-1.json").unlink()
  for g, it in enumerate(its):
    (data / f"process_{g}-of-2.json").write_text(json.dumps(it.get_state()))
  assert ckpt.saved_process_count(7) == 2
  one = make_train_iterator(_cfg(corpora, weights, 1, num_epochs=1), tokenizer_path=TOK)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  got = ckpt.restore(7, abstract, one)
  np.testing.assert_array_equal(got["w"], state["w"])
  _check(tok, old, [list(one)], weights)
  # the same process count but another data group count: grain's restore passes the other files
  (data / "process_1-of-2.json").unlink()
  (data / "process_0-of-2.json").rename(data / "process_0-of-1.json")
  with pytest.raises(DataError, match=r"groups \[1\] of 2 are missing"):
    ckpt.restore(7, abstract, make_train_iterator(_cfg(corpora, weights, 1, num_epochs=1),
                                                  tokenizer_path=TOK))
  ckpt.close()


@pytest.mark.parametrize("pack", [False, True])
def test_chat_source_regrouped(tmp_path, pack):
  """One conversation per row continues under another group count; best-fit packing (whose bins
  hold conversations back) is refused with the way forward."""
  from gemma2_jax.data import train_tokenizer

  ko = sorted((pathlib.Path(__file__).parent / "data" / "ko").glob("*.txt"))
  sp = train_tokenizer([str(p) for p in ko], str(tmp_path / "sp"), vocab_size=800, num_threads=1)
  chats = tmp_path / "c.jsonl"
  chats.write_text("".join(json.dumps({"messages": [
      {"role": "user", "content": f"q {i}"},
      {"role": "assistant", "content": f"answer {i} " * (i % 5 + 1)}]}) + "\n" for i in range(40)))

  def cfg(groups):
    return DataConfig(sources=[SourceConfig(paths=str(chats), chat=True, pack=pack, name="c")],
                      seq_len=32, global_batch=groups, seed=1, tokenize_batch=4, num_epochs=1)

  its = [make_train_iterator(cfg(2), process_index=g, process_count=2, tokenizer_path=sp)
         for g in range(2)]
  old = [b for it in its for b in _take(it, 3)]
  states = [_saved(it) for it in its]
  one = make_train_iterator(cfg(1), tokenizer_path=sp)
  if pack:
    with pytest.raises(DataError, match="source 'c': .* cannot continue under another data group"):
      one.set_state(states[0], peers=lambda: states)
    return
  one.set_state(states[0], peers=lambda: states)
  rows = old + list(one)
  tok = Tokenizer(sp)
  texts = [tok.decode(b["tokens"][0][b["segment_ids"][0] != 0].tolist()) for b in rows]
  seen = sorted(int(re.search(r"q (\d+)", t).group(1)) for t in texts)
  assert seen == list(range(40))  # every conversation once, in one row each
