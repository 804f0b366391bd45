"""Gemma 2 attention on TPU with the Pallas splash-attention kernel (`attention_impl="splash"`).

The kernel skips the key blocks a mask hides (causal, and for local layers everything older than the
window), applies the logit soft-cap before the mask in forward and backward, keeps packed sequences
apart by segment ids, and serves G query heads from each kv head without repeating K/V. Queries arrive
rotated and pre-scaled (the kernel has no scale argument). Under an `activation_sharding` mesh it runs
in `shard_map` over the batch and head mesh axes; elsewhere it runs on the whole arrays. On any platform
but TPU it runs in Pallas interpret mode: exact but slow, for tests on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import NamedSharding, PartitionSpec

from gemma2_jax.parallel.sharding import active_mesh_and_rules, current_platform, logical_to_spec

LANES = 128  # splash tiles (q and kv blocks) are multiples of the TPU's 128 lanes
_PAD_SEGMENT = -1  # padded positions form their own segment: real tokens never see them


def tile_sizes(T: int, block_size: int) -> tuple[int, int]:
  """(block, padded length): the configured block rounded down to whole lanes (at least one lane
  tile) and no longer than the row; the row padded to whole blocks."""
  block = min(max(LANES, block_size // LANES * LANES), -(-T // LANES) * LANES)
  return block, -(-T // block) * block


@functools.lru_cache(maxsize=64)
def make_kernel(T: int, num_heads: int, window: int | None, softcap: float | None, block: int,
                head_shards: int, interpret: bool) -> sa.splash_attention_kernel.SplashAttentionKernel:
  """One kernel per (length, heads, window, ...): the mask analysis is numpy work over T x T, done once
  per shape instead of once per layer call or per trace (the scanned pairs trace their body twice,
  remat and the backward pass again)."""
  if window is None or window >= T:
    mask = sa.CausalMask((T, T))
  else:
    # Query t sees keys t-W+1..t. LocalMask((W-1, 0)) is that set exactly (its right edge 0 is the
    # causal mask), and unlike `CausalMask & LocalMask` it stays computable: the kernel evaluates the
    # partial blocks from indices instead of reading stored mask blocks.
    mask = sa.LocalMask((T, T), window_size=(window - 1, 0), offset=0)
  sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  # Concrete mask arrays even when the first call happens while tracing a jit (they are cached).
  with jax.ensure_compile_time_eval():
    return sa.make_splash_mha(sa.MultiHeadMask([mask] * num_heads), block_sizes=sizes,
                              attn_logits_soft_cap=softcap, head_shards=head_shards, q_seq_shards=1,
                              interpret=interpret)


def _run_kernel(kernel, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT):
  """The kernel is per example, heads-major: vmap it over the batch."""
  q_BNTH, k_BKSH, v_BKSH = (jnp.swapaxes(a, 1, 2) for a in (q_BTNH, k_BSKH, v_BSKH))
  segments = sa.SegmentIds(q=segment_ids_BT, kv=segment_ids_BT)
  out_BNTH = jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH, segments)
  return jnp.swapaxes(out_BNTH, 1, 2)


def _head_axes(rules):
  """Mesh axes of the head dimension: q and kv heads must split alike (shard i holds kv heads
  [iK/s, (i+1)K/s) and exactly their query groups)."""
  q_spec = logical_to_spec(("batch", "length", "q_heads", "head_dim"), rules)
  kv_spec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), rules)
  if q_spec[2] != kv_spec[2]:
    raise ValueError(f"splash attention needs q_heads and kv_heads on the same mesh axes, got "
                     f"{q_spec[2]!r} and {kv_spec[2]!r} in the sharding rules")
  return q_spec[0], q_spec[2]


def attention_splash(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, window: int | None,
                     softcap: float | None, block_size: int):
  """Same contract and values as `attention.attention_xla` (see tests/test_splash.py)."""
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  block, Tp = tile_sizes(T, block_size)
  if Tp != T:
    q_BTNH, k_BSKH, v_BSKH = (jnp.pad(a, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
                              for a in (q_BTNH, k_BSKH, v_BSKH))
    segment_ids_BT = jnp.pad(segment_ids_BT, ((0, 0), (0, Tp - T)), constant_values=_PAD_SEGMENT)
  segment_ids_BT = segment_ids_BT.astype(jnp.int32)
  interpret = current_platform() != "tpu"
  active = active_mesh_and_rules()
  if active is None:
    kernel = make_kernel(Tp, N, window, softcap, block, 1, interpret)
    out_BTNH = _run_kernel(kernel, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
  else:
    mesh, rules = active
    batch_axes, head_axes = _head_axes(rules)
    names = (head_axes,) if isinstance(head_axes, str) else tuple(head_axes or ())
    head_shards = int(np.prod([mesh.shape[a] for a in names]))
    if N % head_shards or K % head_shards:
      raise ValueError(f"splash attention shards heads {head_shards} ways (mesh axes {names}): "
                       f"{N} query and {K} kv heads must both divide evenly")
    kernel = make_kernel(Tp, N, window, softcap, block, head_shards, interpret)
    kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, PartitionSpec(head_axes, None)))
    qkv_spec = PartitionSpec(batch_axes, None, head_axes, None)
    seg_spec = PartitionSpec(batch_axes, None)
    out_BTNH = jax.shard_map(_run_kernel, mesh=mesh,
                             in_specs=(kernel_spec, qkv_spec, qkv_spec, qkv_spec, seg_spec),
                             out_specs=qkv_spec, check_vma=False)(
      kernel, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
  return out_BTNH[:, :T]
