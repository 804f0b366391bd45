"""Frozen weights stored quantized (QLoRA's base): int8 and 4-bit NF4, dequantized per use.

A `Quantized` weight is a pytree (codes, scales) that keeps its weight's leading axes, so the stacked
[L, ...] layout, the scan over layer pairs and the logical-axis shardings of the weight it replaces all
apply to it unchanged; `dequantize` rebuilds one layer's weight inside the forward (transformer.py runs
it under `jax.checkpoint`, so the backward recomputes it instead of keeping a dequantized copy).

Formats (scales are fp32 absmax, never themselves quantized: QLoRA's double quantization is not done):
  nf4   QLoRA's NormalFloat-4 code book (Dettmers et al. 2023, bitsandbytes' table), per-block absmax
        scales over `block` consecutive weights of the last axis; two 4-bit codes per uint8 (low nibble
        first), 4 + 32 / block bits per weight (4.5 at block 64).
  int8  symmetric absmax / 127: per block of the last axis (block > 0), or per output channel
        (block 0: the absmax over the weight's contracting axes).
Error bounds (tests/test_lora.py): nf4 |w - dq| <= absmax(block) x half the widest gap of the code
book (0.152); int8 <= scale / 2.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("int8", "nf4")

# bitsandbytes' NF4 table (create_normal_map(offset=0.9677...)): 16 values in [-1, 1], exact zero.
NF4_CODE = np.array([
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
  -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
  0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
  0.7229568362236023, 1.0], np.float32)
NF4_MAX_ERROR = float(np.max(np.diff(NF4_CODE)) / 2)  # of a weight, in units of its block's absmax

# The contracting axes of each projection leaf, counted from the end (so they hold for the stacked
# [L, ...], the pair-split [P, 2, ...] and one layer's weight alike): int8's per-channel scales reduce
# over them. Blocks always run along the last axis.
CONTRACTING = {
  "q_einsum": (-2,),  # [N, D, H]
  "kv_einsum": (-2,),  # [2, K, D, H]
  "attn_vec_einsum": (-3, -2),  # [N, H, D]
  "gating_einsum": (-1,),  # [2, F, D]
  "linear": (-2,),  # [F, D]
}


@flax.struct.dataclass
class Quantized:
  """A frozen weight as codes and fp32 scales; the static fields say how to read them back."""

  codes: jax.Array  # int8 [..., n]; nf4: uint8 [..., n / 2]
  scales: jax.Array  # fp32 [..., n / block] (blocks of the last axis) or per channel (keepdims)
  kind: str = flax.struct.field(pytree_node=False)
  block: int = flax.struct.field(pytree_node=False)  # 0: int8 per output channel
  contracting: tuple[int, ...] = flax.struct.field(pytree_node=False)


def is_quantized(x) -> bool:
  return isinstance(x, Quantized)


def check_block(kind: str, block: int, shape: tuple[int, ...], name: str) -> str | None:
  """Why `kind` at `block` cannot store a weight of `shape` (None when it can)."""
  n = shape[-1]
  if kind == "nf4" and block < 2:
    return f"nf4 needs a block of at least 2 weights, got {block}"
  if block and n % block:
    return f"quant_block={block} does not divide the last axis ({n}) of {name} {tuple(shape)}"
  if kind == "nf4" and block % 2:
    return f"nf4 packs two codes per byte: quant_block must be even, got {block}"
  return None


def stored_shapes(shape: tuple[int, ...], kind: str, block: int,
                  contracting: tuple[int, ...]) -> tuple[tuple, np.dtype, tuple, tuple]:
  """(codes shape, codes dtype, scales shape, which axes of the scales keep the weight's sharding)."""
  *lead, n = shape
  codes = (*lead, n // 2) if kind == "nf4" else tuple(shape)
  if block:
    scales = (*lead, n // block)
    kept = tuple(True for _ in shape)
  else:
    axes = {a % len(shape) for a in contracting}
    scales = tuple(1 if i in axes else s for i, s in enumerate(shape))
    kept = tuple(i not in axes for i in range(len(shape)))
  return codes, np.dtype(np.uint8 if kind == "nf4" else np.int8), scales, kept


def abstract(shape: tuple[int, ...], kind: str, block: int, contracting: tuple[int, ...],
             sharding=None) -> Quantized:
  """The Quantized weight of `shape` as ShapeDtypeStructs (`sharding`: a Quantized of shardings)."""
  codes, dtype, scales, _ = stored_shapes(shape, kind, block, contracting)
  sh = sharding or Quantized(codes=None, scales=None, kind=kind, block=block, contracting=contracting)
  return Quantized(codes=jax.ShapeDtypeStruct(codes, dtype, sharding=sh.codes),
                   scales=jax.ShapeDtypeStruct(scales, jnp.float32, sharding=sh.scales),
                   kind=kind, block=block, contracting=contracting)


def logical_axes(axes: tuple, shape: tuple[int, ...], kind: str, block: int,
                 contracting: tuple[int, ...]) -> Quantized:
  """A weight's logical axes for its codes and scales: the weight's own, except per-channel scales'
  reduced (size-1) axes, which are replicated."""
  kept = stored_shapes(shape, kind, block, contracting)[3]
  return Quantized(codes=tuple(axes), scales=tuple(a if k else None for a, k in zip(axes, kept, strict=True)),
                   kind=kind, block=block, contracting=contracting)


def quantize(w, kind: str, block: int, contracting: tuple[int, ...]) -> Quantized:
  """`w` (any float dtype) as a Quantized weight; computed in fp32."""
  if kind not in KINDS:
    raise ValueError(f"unknown quantization {kind!r}; choose one of {KINDS}")
  w = jnp.asarray(w, jnp.float32)
  if block:
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // block, block)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    norm = blocks / jnp.where(absmax == 0, 1.0, absmax)[..., None]
    norm = norm.reshape(w.shape)
  else:
    absmax = jnp.max(jnp.abs(w), axis=contracting, keepdims=True)
    norm = w / jnp.where(absmax == 0, 1.0, absmax)
  if kind == "int8":
    codes = jnp.clip(jnp.round(norm * 127.0), -127, 127).astype(jnp.int8)
    return Quantized(codes=codes, scales=absmax / 127.0, kind=kind, block=block, contracting=contracting)
  # nf4: the nearest code (ties to the lower one: thresholds at the midpoints, as bitsandbytes).
  mid = jnp.asarray((NF4_CODE[1:] + NF4_CODE[:-1]) / 2)
  idx = jnp.sum(norm[..., None] > mid, axis=-1).astype(jnp.uint8)
  pairs = idx.reshape(*idx.shape[:-1], idx.shape[-1] // 2, 2)
  codes = pairs[..., 0] | (pairs[..., 1] << 4)
  return Quantized(codes=codes, scales=absmax, kind=kind, block=block, contracting=contracting)


def dequantize(q: Quantized, dtype=jnp.float32):
  """The weight `q` stores, in `dtype` (scaled in fp32, then cast)."""
  if q.kind == "nf4":
    lo, hi = q.codes & 0xF, q.codes >> 4
    idx = jnp.stack([lo, hi], axis=-1).reshape(*q.codes.shape[:-1], 2 * q.codes.shape[-1])
    norm = jnp.take(jnp.asarray(NF4_CODE), idx.astype(jnp.int32))
  else:
    norm = q.codes.astype(jnp.float32)
  if q.block:
    n = norm.shape[-1]
    w = (norm.reshape(*norm.shape[:-1], n // q.block, q.block) * q.scales[..., None]).reshape(norm.shape)
  else:
    w = norm * q.scales
  return w.astype(dtype)


@functools.lru_cache(maxsize=64)
def _quantizer(kind: str, block: int, contracting: tuple[int, ...], sharding):
  """`quantize` jitted onto `sharding` (one compile per weight shape and layout, reused)."""
  return jax.jit(functools.partial(quantize, kind=kind, block=block, contracting=contracting),
                 out_shardings=sharding)


def quantize_tree(params: dict, kind: str, block: int, shardings: dict | None = None) -> dict:
  """`params` with each projection leaf (CONTRACTING) replaced by its Quantized form, one leaf at a
  time (jitted, laid out on `shardings`: the base tree's logical shardings made Quantized), so the
  full-precision weights are dropped as they go. Embedding and norms are left as they are."""
  out = {}
  for key in list(params):
    value = params.pop(key)
    if isinstance(value, dict):
      out[key] = quantize_tree(value, kind, block, shardings[key] if shardings else None)
    elif key in CONTRACTING:
      out[key] = _quantizer(kind, block, CONTRACTING[key], shardings[key] if shardings else None)(value)
    else:
      out[key] = value
    del value
  return out
