"""Which documents a data group reads per epoch, also after a resume under another group count.

Epoch e of a source is a permutation of its n documents (seeded with seed + e); the permutation's
slots are dealt to the G data groups round-robin: group g reads slots g, g + G, g + 2G, ... in this
order, so a group's position in an epoch is one number, how many of its slots it has read.

When a run resumes with G' groups instead, the slots the G old groups had read are taken out of the
epoch and the slots left (in slot order) are dealt to the G' new groups round-robin. That removal is
a "layer" [G, counts] (old group g had read its first counts[g] slots); a second change within the
same epoch stacks a second layer over the space left by the first, and so on. So every document of
the epoch is still read once: the old groups' documents are not read again and none is skipped.
Epochs the old groups had not reached are dealt as usual.

A plan (JSON, kept in the data state): {"from": e0, "epochs": [layers of e0, layers of e0 + 1, ...]}
where e0 is the earliest epoch an old group was in: the new groups start there.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _left(x: np.ndarray, readers: int, counts: np.ndarray) -> np.ndarray:
  """How many of the positions [0, x) are left after reader p read its first counts[p] of p, p + R, ..."""
  p = np.arange(readers)
  below = np.maximum(0, (x[:, None] - p + readers - 1) // readers)  # reader p's positions below x
  return np.maximum(0, below - counts).sum(axis=1)


def kth_left(r: np.ndarray, readers: int, counts, size: int) -> np.ndarray:
  """The r-th (ascending, 0-based) positions of [0, size) left by a layer [readers, counts]."""
  counts = np.asarray(counts, np.int64)
  r = np.asarray(r, np.int64)
  lo, hi = np.zeros_like(r), np.full_like(r, size - 1)
  while (lo < hi).any():  # smallest x with more than r left positions in [0, x]
    mid = (lo + hi) // 2
    found = _left(mid + 1, readers, counts) > r
    hi, lo = np.where(found, mid, hi), np.where(found, lo, mid + 1)
  return lo


class EpochPlan:
  """Chunk c of group `group` of `groups` -> (epoch, its slots): the arithmetic of one source.

  `presharded`: the source holds only this group's documents (all of them are its slots)."""

  def __init__(self, n: int, group: int, groups: int, chunk: int, *, presharded: bool = False,
               plan: dict[str, Any] | None = None):
    self.n, self.group, self.groups = n, group, groups
    self.first, self.step = (0, 1) if presharded else (group, groups)
    self.per_epoch = len(range(self.first, n, self.step))  # documents of a regular epoch
    self.chunk = max(1, min(chunk, self.per_epoch))
    self.chunks_per_epoch = -(-self.per_epoch // self.chunk)
    plan = plan or {"from": 0, "epochs": []}
    self.start, self.layers = int(plan["from"]), [list(ls) for ls in plan["epochs"]]
    self.sizes = [self._sizes(ls) for ls in self.layers]  # each layer's space, then what is left
    self.docs_t = [len(range(group, s[-1], groups)) for s in self.sizes]
    self.chunks_t = [-(-d // self.chunk) for d in self.docs_t]

  def _sizes(self, layers) -> list[int]:
    sizes = [self.n]
    for _, counts in layers:
      sizes.append(sizes[-1] - int(sum(counts)))
    return sizes

  @property
  def end(self) -> int:
    """The first regular epoch."""
    return self.start + len(self.layers)

  def docs(self, epoch: int) -> int:
    j = epoch - self.start
    return self.docs_t[j] if 0 <= j < len(self.layers) else self.per_epoch

  def chunks(self, num_epochs: int | None) -> int | None:
    if num_epochs is None:
      return None
    planned = sum(m for e, m in enumerate(self.chunks_t, self.start) if e < num_epochs)
    return planned + self.chunks_per_epoch * max(0, num_epochs - self.end)

  def locate(self, c: int) -> tuple[int, int]:
    """Chunk c -> (its epoch, how many of the group's slots of that epoch come before it)."""
    for j, m in enumerate(self.chunks_t):
      if c < m:
        return self.start + j, c * self.chunk
      c -= m
    e, k = divmod(c, self.chunks_per_epoch)
    return self.end + e, k * self.chunk

  def slots(self, epoch: int, lo: int, hi: int) -> list[int]:
    """The permutation slots of the group's documents lo..hi-1 of `epoch`."""
    j = epoch - self.start
    if not 0 <= j < len(self.layers):
      return list(range(self.first + lo * self.step, self.first + hi * self.step, self.step))
    x = self.group + np.arange(lo, hi, dtype=np.int64) * self.groups
    for (readers, counts), size in zip(reversed(self.layers[j]), reversed(self.sizes[j][:-1]),
                                       strict=True):
      x = kth_left(x, readers, counts, size)
    return x.tolist()

  def position(self, consumed, num_epochs: int | None) -> tuple[int, int]:
    """A group's saved [chunk, documents of it read] -> (epoch, slots of that epoch read)."""
    c, i = int(consumed[0]), int(consumed[1])
    total = self.chunks(num_epochs)
    if total is not None and c >= total:
      return num_epochs, 0
    epoch, before = self.locate(c)
    return epoch, before + i


def merge(plans: list[EpochPlan], positions: list[tuple[int, int]],
          num_epochs: int | None) -> dict[str, Any]:
  """The plan that continues old groups 0..G-1 (their plans and (epoch, read) positions)."""
  groups = len(plans)
  e0 = min(e for e, _ in positions)
  e1 = max(e for e, _ in positions)
  if num_epochs is not None:
    e1 = min(e1, num_epochs - 1)
  old = plans[0]
  epochs = []
  for e in range(e0, e1 + 1):
    j = e - old.start
    layers = [list(x) for x in old.layers[j]] if 0 <= j < len(old.layers) else []
    counts = [plan.docs(e) if pe > e else k if pe == e else 0
              for plan, (pe, k) in zip(plans, positions, strict=True)]
    if any(counts):
      layers.append([groups, counts])
    epochs.append(layers)
  return {"from": e0, "epochs": epochs}


# grain iterators that pass documents / rows on one by one, holding none back.
_PASS_THROUGH = ("_MapDatasetIterator", "_FilterDatasetIterator", "_BatchDatasetIterator")


def read_position(source_iter) -> list[int] | None:
  """[chunk, documents of it read] of one source's live grain iterator: how far its packer has
  read, not counting a document it holds without having put any of it in a row yet. None when
  a stage keeps documents back (a chat source's best-fit bins, grain worker processes) or is not
  known: not re-mappable.

  Reads grain internals (guarded): the flattening stage's state and the concat-then-split packer's
  remainder; every stage above the flattening must be one that holds at most that remainder."""
  node, packer = source_iter, None
  while node is not None:
    name = type(node).__name__
    if name == "_ConcatThenSplitDatasetIterator":
      packer = node
    elif name == "_FlatMapDatasetIterator":
      state = node.get_state()
      c, i = int(state["parent"]["next_index"]), int(state["next_index_in_buffer"])
      if packer is not None:
        if getattr(packer, "_packed_elements", None):
          return None
        held = getattr(packer, "_remainder_element", None)
        if held is not None and all(sl[0] <= 0 for sl in held.slices.values()):
          i -= 1  # pulled, but none of it is in a row: not read
      return [c, i]
    elif name not in _PASS_THROUGH:
      return None
    parents = [p for p in getattr(node, "_parents", ()) if hasattr(p, "__next__")]
    node = parents[0] if len(parents) == 1 else None
  return None
