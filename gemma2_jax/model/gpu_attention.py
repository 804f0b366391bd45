"""Gemma 2 attention on GPU: a Pallas (Triton) flash-attention kernel, `attention_impl="gpu_flash"`.

Forward and backward apply what Gemma 2 needs and the stock GPU kernels drop (cuDNN / Transformer
Engine cannot soft-cap; tokamax 0.0.12 has no segment ids and no soft-cap in its Triton backward): the
logit soft-cap on each score tile before the online softmax (and its
derivative `1 - tanh^2` in the backward), the causal mask, the sliding window of local layers, and
segment ids of packed rows; any head dim (padded to a power of two, 128 and 256 included). Key blocks a
query block cannot see (above the diagonal; older than the window) are never loaded: the loops over
blocks start and stop at the band's edges, in the forward and in both backward kernels.

GQA without repeating K/V: each query head's program reads its kv head's K/V through the BlockSpec
index map (`n // G`). The dK/dV kernel runs per query head and its [B, S, N, H] fp32 result is summed
over the G heads of a group afterwards (no atomics; G x the size of dK, linear in T).

Layout is [B, T, N, H] as in the model; queries arrive rotated and pre-scaled. fp32 inputs use IEEE
fp32 dots (exact, no TF32); bf16 inputs use bf16 dots with fp32 accumulation. On any platform but GPU
the kernels run in Pallas interpret mode: exact but slow, for tests on CPU. Under an
`activation_sharding` mesh the kernel runs in `shard_map` over the batch and head mesh axes (a Triton
call is opaque to XLA's partitioner, which would otherwise gather the whole arrays onto every device).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec

from gemma2_jax.parallel.sharding import active_mesh_and_rules, current_platform, logical_to_spec

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: exp2(_MASKED - m) is exactly 0, no NaN
_LOG2E = math.log2(math.e)  # softmax runs in base 2 (exp2 is the GPU's native exponential)
_PAD_SEGMENT = -1


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes: a [q, H] query tile and a [kv, H] key tile live in registers/shared memory, so they are
  smaller than the XLA paths' `attention_block_size` (which this kernel does not use). Powers of two,
  at least 16 (Triton's dot). Defaults follow jax's Pallas flash example (halved kv tile for head
  dim 256), not tuned on hardware."""

  q: int
  kv: int
  q_bwd: int = 32
  kv_bwd: int = 32
  num_warps: int = 4
  num_stages: int = 2

  @classmethod
  def for_head_dim(cls, H: int) -> BlockSizes:
    return cls(q=64, kv=64) if H <= 128 else cls(q=64, kv=32, num_warps=8)


def _dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
  # HIGHEST: IEEE fp32 for fp32 tiles (TF32 would break the fp32 equality with XLA); bf16 tiles use
  # bf16 tensor cores either way. The accumulator is fp32.
  return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=lax.Precision.HIGHEST)


def _scores(q, k, seg_q, seg_k, q_start, k_start, *, softcap: float | None, window: int | None):
  """Capped fp32 logits of a [bq, bk] tile, and its visibility (causal, window, same segment)."""
  s = _dot(q, k, trans_b=True)
  c = s if softcap is None else softcap * jnp.tanh(s / softcap)
  t = q_start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
  u = k_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
  visible = (u <= t) & (seg_q[:, None] == seg_k[None, :])
  if window is not None:
    visible &= t - u < window
  return c, visible


def _kv_block_range(q_start, bq: int, bk: int, window: int | None):
  """Key blocks [lo, hi) holding keys that rows q_start..q_start+bq-1 can see."""
  hi = lax.div(q_start + bq + bk - 1, bk)
  if window is None:
    return 0, hi
  return lax.div(jnp.maximum(q_start - (window - 1), 0), bk), hi


def _q_block_range(k_start, bk: int, bq: int, nq: int, window: int | None):
  """Query blocks [lo, hi) holding rows that see some key of k_start..k_start+bk-1."""
  lo = lax.div(k_start, bq)
  if window is None:
    return lo, nq
  return lo, jnp.minimum(lax.div(k_start + bk - 1 + window - 1, bq) + 1, nq)


def _fwd_kernel(q_ref, k_ref, v_ref, seg_ref, o_ref, lse_ref, *, softcap, window, bq: int, bk: int):
  i = pl.program_id(0)
  q_start = i * bq
  q = q_ref[...]
  seg_q = seg_ref[pl.ds(q_start, bq)]
  H = q.shape[-1]

  def body(j, carry):
    acc, m, l = carry
    k_start = j * bk
    k = k_ref[pl.ds(k_start, bk), :]
    v = v_ref[pl.ds(k_start, bk), :]
    c, visible = _scores(q, k, seg_q, seg_ref[pl.ds(k_start, bk)], q_start, k_start,
                         softcap=softcap, window=window)
    c = jnp.where(visible, c * _LOG2E, _MASKED)
    m_new = jnp.maximum(m, c.max(axis=1))
    # Masked entries add exp2(0) = 1 while a row has seen only masked keys; the row's diagonal key is
    # always visible, and once it raises m the correction exp2(_MASKED - m) = 0 wipes them exactly.
    p = jnp.exp2(c - m_new[:, None])
    correction = jnp.exp2(m - m_new)
    acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l * correction + p.sum(axis=1)

  lo, hi = _kv_block_range(q_start, bq, bk, window)
  init = (jnp.zeros((bq, H), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = lax.fori_loop(lo, hi, body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l)  # base-2 logsumexp of the capped logits


def _dkv_kernel(q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, softcap,
                window, bq: int, bk: int, nq: int):
  j = pl.program_id(0)
  k_start = j * bk
  k = k_ref[...]
  v = v_ref[...]
  seg_k = seg_ref[pl.ds(k_start, bk)]

  def body(i, carry):
    dk, dv = carry
    q_start = i * bq
    q = q_ref[pl.ds(q_start, bq), :]
    do = do_ref[pl.ds(q_start, bq), :]
    c, visible = _scores(q, k, seg_ref[pl.ds(q_start, bq)], seg_k, q_start, k_start,
                         softcap=softcap, window=window)
    p = jnp.where(visible, jnp.exp2(c * _LOG2E - lse_ref[pl.ds(q_start, bq)][:, None]), 0.0)
    dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
    ds = p * (_dot(do, v, trans_b=True) - delta_ref[pl.ds(q_start, bq)][:, None])
    if softcap is not None:
      ds = ds * (1.0 - jnp.square(c / softcap))  # d(cap * tanh(s / cap)) / ds
    dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  lo, hi = _q_block_range(k_start, bk, bq, nq, window)
  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(lo, hi, body, (zeros, zeros))
  dk_ref[...] = dk
  dv_ref[...] = dv


def _dq_kernel(q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, delta_ref, dq_ref, *, softcap, window,
               bq: int, bk: int):
  i = pl.program_id(0)
  q_start = i * bq
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  seg_q = seg_ref[pl.ds(q_start, bq)]

  def body(j, dq):
    k_start = j * bk
    k = k_ref[pl.ds(k_start, bk), :]
    v = v_ref[pl.ds(k_start, bk), :]
    c, visible = _scores(q, k, seg_q, seg_ref[pl.ds(k_start, bk)], q_start, k_start,
                         softcap=softcap, window=window)
    p = jnp.where(visible, jnp.exp2(c * _LOG2E - lse[:, None]), 0.0)
    ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
    if softcap is not None:
      ds = ds * (1.0 - jnp.square(c / softcap))
    return dq + _dot(ds.astype(k.dtype), k)

  lo, hi = _kv_block_range(q_start, bq, bk, window)
  dq_ref[...] = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32)).astype(dq_ref.dtype)


def _params(blocks: BlockSizes):
  return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _forward(q, k, v, seg, *, softcap, window, blocks: BlockSizes, interpret: bool):
  """Padded inputs [B, Tp, N, Hp], [B, Tp, K, Hp], [B, Tp] -> output like q, base-2 lse [B, N, Tp]."""
  B, Tp, N, Hp = q.shape
  G = N // k.shape[2]
  bq, bk = blocks.q, blocks.kv
  full_kv = pl.BlockSpec((None, Tp, None, Hp), lambda i, b, n: (b, 0, lax.div(n, G), 0))
  q_tile = pl.BlockSpec((None, bq, None, Hp), lambda i, b, n: (b, i, n, 0))
  return pl.pallas_call(
    functools.partial(_fwd_kernel, softcap=softcap, window=window, bq=bq, bk=bk),
    grid=(Tp // bq, B, N),
    in_specs=[q_tile, full_kv, full_kv, pl.BlockSpec((None, Tp), lambda i, b, n: (b, 0))],
    out_specs=[q_tile, pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i))],
    out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)],
    compiler_params=_params(blocks), interpret=interpret, name="gemma2_flash_fwd",
  )(q, k, v, seg)


def _backward(q, k, v, seg, o, lse, do, *, softcap, window, blocks: BlockSizes, interpret: bool):
  B, Tp, N, Hp = q.shape
  K = k.shape[2]
  G = N // K
  bq, bk = blocks.q_bwd, blocks.kv_bwd
  # rowsum(dO * O) = rowsum(P * dP): the softmax Jacobian's per-row term (dC = P * (dP - delta)).
  delta = jnp.einsum("BTNH,BTNH->BNT", do.astype(jnp.float32), o.astype(jnp.float32))
  seg_full = pl.BlockSpec((None, Tp), lambda x, b, n: (b, 0))
  full_q = pl.BlockSpec((None, Tp, None, Hp), lambda x, b, n: (b, 0, n, 0))
  full_row = pl.BlockSpec((None, None, Tp), lambda x, b, n: (b, n, 0))
  kv_tile = pl.BlockSpec((None, bk, None, Hp), lambda j, b, n: (b, j, lax.div(n, G), 0))
  dkv_tile = pl.BlockSpec((None, bk, None, Hp), lambda j, b, n: (b, j, n, 0))
  dk_BSNH, dv_BSNH = pl.pallas_call(
    functools.partial(_dkv_kernel, softcap=softcap, window=window, bq=bq, bk=bk, nq=Tp // bq),
    grid=(Tp // bk, B, N),
    in_specs=[full_q, kv_tile, kv_tile, seg_full, full_q, full_row, full_row],
    out_specs=[dkv_tile, dkv_tile],
    out_shape=[jax.ShapeDtypeStruct((B, Tp, N, Hp), jnp.float32)] * 2,
    compiler_params=_params(blocks), interpret=interpret, name="gemma2_flash_dkv",
  )(q, k, v, seg, do, lse, delta)

  full_kv = pl.BlockSpec((None, Tp, None, Hp), lambda i, b, n: (b, 0, lax.div(n, G), 0))
  q_tile = pl.BlockSpec((None, bq, None, Hp), lambda i, b, n: (b, i, n, 0))
  row_tile = pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i))
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, softcap=softcap, window=window, bq=bq, bk=bk),
    grid=(Tp // bq, B, N),
    in_specs=[q_tile, full_kv, full_kv, seg_full, q_tile, row_tile, row_tile],
    out_specs=q_tile,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=_params(blocks), interpret=interpret, name="gemma2_flash_dq",
  )(q, k, v, seg, do, lse, delta)
  # Heads of a group share their kv head: its gradient is the sum of theirs.
  dk = dk_BSNH.reshape(B, Tp, K, G, Hp).sum(3).astype(k.dtype)
  dv = dv_BSNH.reshape(B, Tp, K, G, Hp).sum(3).astype(v.dtype)
  return dq, dk, dv


def _pad(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, multiple: int):
  """Rows to whole tiles (padding keys come after every real row: causally invisible; padding rows are
  their own segment and see themselves, so their lse stays finite), head dim to a power of two (zero
  columns change no dot product)."""
  T, H = q_BTNH.shape[1], q_BTNH.shape[3]
  dt = -T % multiple
  dh = pl.next_power_of_2(H) - H
  q, k, v = (jnp.pad(a, ((0, 0), (0, dt), (0, 0), (0, dh))) for a in (q_BTNH, k_BSKH, v_BSKH))
  seg = jnp.pad(segment_ids_BT.astype(jnp.int32), ((0, 0), (0, dt)), constant_values=_PAD_SEGMENT)
  return q, k, v, seg


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, window, softcap, blocks, interpret):
  return _flash_fwd(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, window, softcap, blocks, interpret)[0]


def _flash_fwd(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, window, softcap, blocks, interpret):
  T, H = q_BTNH.shape[1], q_BTNH.shape[3]
  tile = max(blocks.q, blocks.kv, blocks.q_bwd, blocks.kv_bwd)  # powers of two: a common multiple
  q, k, v, seg = _pad(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, tile)
  o, lse = _forward(q, k, v, seg, softcap=softcap, window=window, blocks=blocks, interpret=interpret)
  return o[:, :T, :, :H], (q, k, v, seg, o, lse)


def _flash_bwd(window, softcap, blocks, interpret, residuals, do_BTNH):
  q, k, v, seg, o, lse = residuals
  T, H = do_BTNH.shape[1], do_BTNH.shape[3]
  do = jnp.pad(do_BTNH, ((0, 0), (0, q.shape[1] - T), (0, 0), (0, q.shape[3] - H)))
  dq, dk, dv = _backward(q, k, v, seg, o, lse, do, softcap=softcap, window=window, blocks=blocks,
                         interpret=interpret)
  return dq[:, :T, :, :H], dk[:, :T, :, :H], dv[:, :T, :, :H], None


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention_gpu_flash(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, window: int | None,
                        softcap: float | None, blocks: BlockSizes | None = None,
                        interpret: bool | None = None):
  """Same contract and values as `attention.attention_xla` (see tests/test_gpu_attention.py).

  `interpret` defaults to True off GPU (the platform being traced for, `current_platform`).
  """
  N, H = q_BTNH.shape[2:]
  K = k_BSKH.shape[2]
  if blocks is None:
    blocks = BlockSizes.for_head_dim(pl.next_power_of_2(H))
  if interpret is None:
    interpret = current_platform() not in ("gpu", "cuda")
  run = lambda q, k, v, seg: _flash(q, k, v, seg, window, softcap, blocks, interpret)
  active = active_mesh_and_rules()
  if active is None:
    return run(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
  mesh, rules = active
  # Shard i holds kv heads [iK/s, (i+1)K/s) and exactly their query groups, so q and kv heads must
  # split alike; every shard then sees whole rows (the mask needs all of a row's keys).
  q_spec = logical_to_spec(("batch", "length", "q_heads", "head_dim"), rules)
  kv_spec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), rules)
  if q_spec[2] != kv_spec[2]:
    raise ValueError(f"gpu_flash attention needs q_heads and kv_heads on the same mesh axes, got "
                     f"{q_spec[2]!r} and {kv_spec[2]!r} in the sharding rules")
  batch_axes, head_axes = q_spec[0], q_spec[2]
  names = (head_axes,) if isinstance(head_axes, str) else tuple(head_axes or ())
  head_shards = math.prod(mesh.shape[a] for a in names)
  if N % head_shards or K % head_shards:
    raise ValueError(f"gpu_flash attention shards heads {head_shards} ways (mesh axes {names}): "
                     f"{N} query and {K} kv heads must both divide evenly")
  spec = PartitionSpec(batch_axes, None, head_axes, None)
  return jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, PartitionSpec(batch_axes, None)),
                       out_specs=spec, check_vma=False)(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
