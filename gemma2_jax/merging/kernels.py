"""The merge methods on one tensor, streamed in row blocks, with mergekit's arithmetic.

A method sees its inputs only through a Group, which reads rows r0:r1 of each input when asked, and
yields the output block by block. A whole-tensor statistic (SLERP's angle, TIES' magnitude cut-off,
DARE's L1 rescale, Model Stock's cosines) is gathered in a pass over the blocks before the pass that
writes, so no input is ever held whole: peak memory is a few blocks per input, whatever the tensor
(Gemma's 256000-row embedding is ~20% of the 2B model). The results do not depend on the block size
(DARE's random masks are drawn in fixed blocks of the flattened tensor, not per read block).

The arithmetic follows mergekit 0.1.5 (merge_methods/*.py, sparsify.py) operation for operation in
float32; sums over a whole tensor or row (norms, dot products, L1 norms) are accumulated in float64,
which moves a result by ~1e-7 relative at most. TIES keeps the k largest |delta| like mergekit's
argsort; where several deltas tie at the cut-off, the first ones in row-major order are kept (torch's
argsort picks any).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np

CHUNK_ELEMENTS = 2 << 20  # elements per input read at a time (8 MiB of float32)
RNG_BLOCK = 1 << 20  # DARE's masks are drawn per this many flattened elements


class Group:
  """The inputs of one output tensor (HF layout, 1-D or 2-D): `read(i, r0, r1)` returns rows r0:r1
  of input i as float32 (a 1-D tensor is read whole). A tensor that fits in one block is read once
  and kept for every pass; a larger one is read again each pass, one block at a time."""

  def __init__(self, name: str, shape: tuple[int, ...], read: Callable[[int, int, int], np.ndarray],
               num_inputs: int, base: int | None, index: int = 0,
               chunk_elements: int = CHUNK_ELEMENTS):
    self.name, self.shape, self.base, self.index = name, tuple(shape), base, index
    self.num_inputs = num_inputs
    self._read = read
    n = self.shape[0] if self.shape else 1
    if len(self.shape) <= 1:
      self.ranges = [(0, n)]
    else:
      rows = max(1, chunk_elements // max(1, self.row_size))
      self.ranges = [(r, min(n, r + rows)) for r in range(0, n, rows)] or [(0, 0)]
    self._cache: dict[int, np.ndarray] | None = {} if len(self.ranges) == 1 else None

  @property
  def row_size(self) -> int:
    return int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1

  @property
  def numel(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def non_base(self) -> list[int]:
    return [i for i in range(self.num_inputs) if i != self.base]

  def rows(self, i: int, r: tuple[int, int]) -> np.ndarray:
    if self._cache is not None and i in self._cache:
      return self._cache[i]
    x = np.asarray(self._read(i, *r), dtype=np.float32)
    if self._cache is not None:
      self._cache[i] = x
    return x

  def blocks(self, inputs) -> Iterator[tuple[tuple[int, int], list[np.ndarray]]]:
    for r in self.ranges:
      yield r, [self.rows(i, r) for i in inputs]


Kernel = Callable[[Group, dict, list, int], Iterator[np.ndarray]]


def _sum(xs):
  out = xs[0].copy()
  for x in xs[1:]:
    out += x
  return out


def _dot(a: np.ndarray, b: np.ndarray, axis=None):
  """sum(a * b) accumulated in float64 (over everything, or along `axis`)."""
  if axis is None:
    return float(np.dot(a.ravel().astype(np.float64), b.ravel().astype(np.float64)))
  return np.einsum("ij,ij->i" if axis == 1 else "ij,ij->j", a, b, dtype=np.float64)


def linear(g: Group, shared: dict, per: list, seed: int) -> Iterator[np.ndarray]:
  """sum_i w_i x_i, divided by sum_i w_i when `normalize` (mergekit's linear_merge: every model, the
  base_model too if one is given, is an input with its own weight)."""
  ids = list(range(g.num_inputs))
  w = [np.float32(per[i]["weight"]) for i in ids]
  denom = _sum([np.asarray(x, np.float32) for x in w])
  for _, xs in g.blocks(ids):
    acc = np.zeros_like(xs[0])
    for x, wi in zip(xs, w, strict=True):
      acc += x * wi
    if shared["normalize"]:
      acc /= denom
    yield acc


def slerp(g: Group, shared: dict, per: list, seed: int) -> Iterator[np.ndarray]:
  """mergekit's SLERP on the raw weights of the base (t=0) and the other model (t=1), the whole tensor
  one vector; near-collinear (|cos| > 0.9995) it is the linear interpolation."""
  b = g.base
  o = g.non_base[0]
  saa = sbb = sab = 0.0
  for _, (a, x) in g.blocks([b, o]):
    saa += _dot(a, a)
    sbb += _dot(x, x)
    sab += _dot(a, x)
  na, nb = math.sqrt(saa), math.sqrt(sbb)
  na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
  dot = min(1.0, max(-1.0, sab / (na * nb)))
  t = float(np.float32(shared["t"]))
  ca, cb = slerp_coefficients(dot, t, threshold=0.9995)
  ca, cb = np.float32(ca), np.float32(cb)
  for _, (a, x) in g.blocks([b, o]):
    yield ca * a + cb * x


def slerp_coefficients(cos, t: float, *, threshold: float | None = None):
  """(c0, c1) with slerp = c0 v0 + c1 v1 for unit-vector cosine `cos` (scalar or array), in float64:
  sin((1-t) Omega) / sin(Omega) and sin(t Omega) / sin(Omega). Collinear inputs fall back to (1-t, t):
  |cos| > `threshold` (mergekit's slerp) or, without one, 1 - cos^2 <= 1e-16 (nuslerp)."""
  cos = np.asarray(cos, np.float64)
  colinear = np.abs(cos) > threshold if threshold is not None else (1 - cos * cos) <= 1e-16
  theta = np.arccos(np.where(colinear, 0.0, cos))
  s = np.where(colinear, 1.0, np.sin(theta))
  c0 = np.where(colinear, 1 - t, np.sin((1 - t) * theta) / s)
  c1 = np.where(colinear, t, np.sin(t * theta) / s)
  return c0, c1


def nuslerp(g: Group, shared: dict, per: list, seed: int) -> Iterator[np.ndarray]:
  """mergekit's NuSLERP: with a base model, WARP's SLERP of the two task vectors
  delta_m = theta_m - theta_base, base + sin((1-t) Omega)/sin(Omega) delta_1 + sin(t Omega)/sin(Omega)
  delta_2 with t = w_2 / (w_1 + w_2); without one, the same on the raw weights. Vectors: the whole
  tensor (`nuslerp_flatten`, the default), else each row, or each column with `nuslerp_row_wise`."""
  i0, i1 = g.non_base
  w0, w1 = per[i0]["weight"], per[i1]["weight"]
  total = w0 + w1
  t = 0.5 if abs(total) < 1e-6 else w1 / total
  b = g.base
  ids = [i0, i1] + ([b] if b is not None else [])
  mode = ("whole" if shared["nuslerp_flatten"] or len(g.shape) < 2 else
          "columns" if shared["nuslerp_row_wise"] else "rows")

  def vectors(xs):
    if b is None:
      return xs[0], xs[1]
    return xs[0] - xs[2], xs[1] - xs[2]

  def coefficients(s00, s11, s01):
    n0 = np.maximum(np.sqrt(s00), 1e-7)
    n1 = np.maximum(np.sqrt(s11), 1e-7)
    cos = np.clip(s01 / (n0 * n1), -1.0, 1.0)
    c0, c1 = slerp_coefficients(cos, t)
    return c0.astype(np.float32), c1.astype(np.float32)

  if mode != "rows":
    axis = None if mode == "whole" else 0
    s00 = s11 = s01 = 0.0
    for _, xs in g.blocks(ids):
      v0, v1 = vectors(xs)
      s00 = s00 + _dot(v0, v0, axis)
      s11 = s11 + _dot(v1, v1, axis)
      s01 = s01 + _dot(v0, v1, axis)
    c0, c1 = coefficients(s00, s11, s01)
  for _, xs in g.blocks(ids):
    v0, v1 = vectors(xs)
    if mode == "rows":
      c0, c1 = coefficients(_dot(v0, v0, 1), _dot(v1, v1, 1), _dot(v0, v1, 1))
      c0, c1 = c0[:, None], c1[:, None]
    out = c0 * v0 + c1 * v1
    yield out if b is None else xs[2] + out


def model_stock(g: Group, shared: dict, per: list, seed: int) -> Iterator[np.ndarray]:
  """Model Stock (Jang et al. 2024) as in mergekit: t = N cos / (1 + (N-1) cos) with cos the mean
  pairwise cosine of the N fine-tuned models' offsets from the base, then t * mean + (1 - t) * base;
  per row with `filter_wise`, else over the whole tensor."""
  b, ws = g.base, g.non_base
  n = len(ws)
  ids = [b] + ws
  pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]

  def ratio(norms, dots):
    cos = [np.clip(dots[p] / np.maximum(np.sqrt(norms[p[0]]) * np.sqrt(norms[p[1]]), 1e-6), -1, 1)
           for p in pairs]
    cos = np.mean(np.stack([np.asarray(c, np.float32) for c in cos]), axis=0, dtype=np.float32)
    denom = 1 + (n - 1) * cos
    singular = np.abs(denom) < 1e-6
    return np.where(singular, 0, n * cos / np.where(singular, 1, denom)).astype(np.float32)

  def stats(xs, axis):
    offsets = [x - xs[0] for x in xs[1:]]
    norms = [_dot(o, o, axis) for o in offsets]
    dots = {(i, j): _dot(offsets[i], offsets[j], axis) for i, j in pairs}
    return norms, dots

  rows = shared["filter_wise"] and len(g.shape) == 2
  if not rows:
    norms, dots = [0.0] * n, dict.fromkeys(pairs, 0.0)
    for _, xs in g.blocks(ids):
      bn, bd = stats(xs, None)
      norms = [a + c for a, c in zip(norms, bn, strict=True)]
      dots = {p: dots[p] + bd[p] for p in pairs}
    t = ratio(norms, dots)
  for _, xs in g.blocks(ids):
    if rows:
      t = ratio(*stats(xs, 1))[:, None]
    average = _sum(xs[1:]) / np.float32(n)
    yield t * average + (1 - t) * xs[0]


def task_arithmetic(g: Group, shared: dict, per: list, seed: int, *, sparsify: str | None = None,
                    consensus: bool = False) -> Iterator[np.ndarray]:
  """mergekit's generalized task arithmetic: deltas from the base, each sparsified (TIES: keep the
  `density` largest |delta|; DARE: keep each with probability `density`, seeded), L1-rescaled when
  `rescale`, times its weight; with `consensus` (TIES) only the deltas agreeing with the sign of their
  sum count; summed, divided by the weights that count when `normalize`, times `lambda`, added to the
  base."""
  b, nb = g.base, g.non_base
  if not nb:  # only the base listed: mergekit returns it
    for _, (x,) in g.blocks([b]):
      yield x.copy()
    return
  w = [np.float32(per[i]["weight"]) for i in nb]
  density = [per[i]["density"] for i in nb]
  masks = [_mask(g, sparsify, d, (seed, g.index, i)) if sparsify and d < 1 else None
           for i, d in zip(nb, density, strict=True)]
  ids = [b] + nb
  if any(m is not None and m.needs_stats for m in masks):  # TIES' cut-off: two passes of histograms
    for level in (0, 1):
      for _, xs in g.blocks(ids):
        for m, x in zip(masks, xs[1:], strict=True):
          if m is not None and m.needs_stats:
            m.histogram(x - xs[0], level)
      for m in masks:
        if m is not None and m.needs_stats:
          m.settle(level)
  scale = [np.float32(1)] * len(nb)
  if shared["rescale"] and any(m is not None for m in masks):  # mergekit rescales to the L1 norm
    before, after = [0.0] * len(nb), [0.0] * len(nb)
    for m in masks:
      if m is not None:
        m.start()
    for r, xs in g.blocks(ids):
      for k, (m, x) in enumerate(zip(masks, xs[1:], strict=True)):
        if m is not None:
          d = x - xs[0]
          before[k] += float(np.abs(d).sum(dtype=np.float64))
          after[k] += float(np.abs(d * m.block(d, r)).sum(dtype=np.float64))
    scale = [np.float32(1) if m is None or bf < 1e-7 or af < 1e-7 else np.float32(bf / af)
             for m, bf, af in zip(masks, before, after, strict=True)]
  for m in masks:
    if m is not None:
      m.start()
  lam = np.float32(shared["lambda"])
  for r, xs in g.blocks(ids):
    base = xs[0]
    deltas = []
    for k, x in enumerate(xs[1:]):
      d = x - base
      if masks[k] is not None:
        d *= masks[k].block(d, r)
        if scale[k] != 1:
          d *= scale[k]
      d *= w[k]
      deltas.append(d)
    if consensus:
      majority = np.where(_sum(deltas) >= 0, np.float32(1), np.float32(-1))
      mixed = np.zeros_like(base)
      divisor = np.zeros_like(base)
      for d, wk in zip(deltas, w, strict=True):
        agree = (np.sign(d) == majority).astype(np.float32)
        mixed += d * agree
        divisor += wk * agree
      divisor[divisor == 0] = 1
    else:
      mixed = _sum(deltas)
      divisor = _sum([np.asarray(x, np.float32) for x in w])
      if abs(divisor) < 1e-8:
        divisor = np.float32(1)
    if shared["normalize"]:
      mixed /= divisor
    if lam != 1:
      mixed *= lam
    yield base + mixed


def _mask(g: Group, kind: str, density: float, key: tuple):
  return _Magnitude(g, density) if kind == "magnitude" else _Bernoulli(g, density, key)


class _Magnitude:
  """Keeps the k = max(1, int(density * numel)) largest |delta| of a tensor (mergekit's magnitude()),
  found without holding the tensor: a histogram of the float32 bit patterns' high 16 bits finds the
  bin of the k-th largest, a second one of that bin's low 16 bits finds its exact value."""

  def __init__(self, g: Group, density: float):
    self.g = g
    self.k = 0 if density <= 0 or g.numel == 0 else max(1, int(density * g.numel))
    self.needs_stats = 0 < self.k < g.numel
    self.hist = np.zeros(1 << 16, np.int64)
    self.high = self.threshold = 0
    self.above = self.ties = self.taken = 0

  def histogram(self, d: np.ndarray, level: int):
    bits = np.abs(d).view(np.uint32).ravel()
    if level == 0:
      self.hist += np.bincount(bits >> 16, minlength=1 << 16)
    else:
      sel = bits[(bits >> 16) == self.high]
      self.hist += np.bincount(sel & 0xFFFF, minlength=1 << 16)

  def settle(self, level: int):
    want = self.k - self.above  # how many of the remaining largest are still to find
    from_top = np.cumsum(self.hist[::-1])
    j = int(np.searchsorted(from_top, want))
    value = (1 << 16) - 1 - j
    above = int(from_top[j] - self.hist[value])
    if level == 0:
      self.high, self.above = value, self.above + above
    else:
      self.threshold = (self.high << 16) | value
      self.ties = want - above  # of the elements equal to the cut-off, how many to keep
    self.hist[:] = 0

  def start(self):
    self.taken = 0

  def block(self, d: np.ndarray, r) -> np.ndarray:
    if self.k == 0:
      return np.zeros(d.shape, np.float32)
    if self.k >= self.g.numel:
      return np.ones(d.shape, np.float32)
    bits = np.abs(d).view(np.uint32)
    keep = bits > self.threshold
    equal = bits == self.threshold
    n_equal = int(equal.sum())
    if n_equal:
      left = self.ties - self.taken
      if left < n_equal:  # keep only the first `left` of them, in row-major order
        flat = equal.ravel()
        flat[np.flatnonzero(flat)[max(left, 0):]] = False
      keep |= equal
      self.taken += min(n_equal, max(left, 0))
    return keep.astype(np.float32)


class _Bernoulli:
  """DARE's random drop: keep each element with probability `density` (mergekit's bernoulli()). The
  uniforms come from numpy's PCG64 seeded by (seed, tensor, model, fixed block of RNG_BLOCK flattened
  elements), so a mask is the same however the tensor is read."""

  needs_stats = False

  def __init__(self, g: Group, density: float, key: tuple):
    self.g, self.density, self.key = g, density, tuple(int(k) for k in key)

  def start(self):
    pass

  def block(self, d: np.ndarray, r) -> np.ndarray:
    if self.density <= 0:
      return np.zeros(d.shape, np.float32)
    e0, e1 = r[0] * self.g.row_size, r[1] * self.g.row_size
    if len(self.g.shape) <= 1:
      e0, e1 = 0, self.g.numel
    u = np.empty(e1 - e0, np.float32)
    for j in range(e0 // RNG_BLOCK, (e1 - 1) // RNG_BLOCK + 1 if e1 > e0 else 0):
      lo, hi = max(e0, j * RNG_BLOCK), min(e1, (j + 1) * RNG_BLOCK)
      draws = np.random.default_rng((*self.key, j)).random(hi - j * RNG_BLOCK, dtype=np.float32)
      u[lo - e0:hi - e0] = draws[lo - j * RNG_BLOCK:]
    return (u < np.float32(self.density)).astype(np.float32).reshape(d.shape)


def liti(init: np.ndarray, merged: np.ndarray, eta: float) -> np.ndarray:
  """WARP's LITI: (1 - eta) theta_init + eta theta_merged, in float32."""
  return np.float32(1 - eta) * init + np.float32(eta) * merged


def kernel(method) -> Kernel:
  """The kernel of a merging.config.Method."""
  if method.name in ("task_arithmetic", "ties", "dare_linear", "dare_ties"):
    return lambda g, shared, per, seed: task_arithmetic(
      g, shared, per, seed, sparsify=method.sparsify, consensus=method.consensus)
  return {"linear": linear, "slerp": slerp, "nuslerp": nuslerp, "model_stock": model_stock}[method.name]


def merge_arrays(method, arrays: list[np.ndarray], base: int | None, shared: dict, per: list[dict],
                 *, seed: int = 0, index: int = 0, chunk_elements: int = CHUNK_ELEMENTS) -> np.ndarray:
  """One tensor merged from in-memory arrays (tests, experiments): the same kernels as a checkpoint
  merge, read in blocks of `chunk_elements`."""
  arrays = [np.asarray(a, np.float32) for a in arrays]
  shape = arrays[0].shape
  g = Group("tensor", shape, lambda i, r0, r1: arrays[i] if len(shape) <= 1 else arrays[i][r0:r1],
            len(arrays), base, index, chunk_elements)
  blocks = list(kernel(method)(g, shared, per, seed))
  return np.concatenate(blocks) if len(shape) >= 1 and len(blocks) > 1 else blocks[0].reshape(shape)
