"""GPU flash kernel (Pallas Triton, `attention_impl="gpu_flash"`) == the XLA reference, in interpret mode.

fp32 throughout: forward rel <= 1e-5, gradients rel <= 1e-4, with GQA, three packed segments plus
padding, soft-cap on, T not a multiple of the tiles, head dims 128 and 256, global and local layers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma2_jax.model.attention import attention_xla
from gemma2_jax.model.gpu_attention import BlockSizes, attention_gpu_flash

B, N, K = 2, 4, 2
# 16-row tiles (Triton's smallest dot): T = 40 spans 3 of them, padded.
BLOCKS = BlockSizes(q=16, kv=16, q_bwd=16, kv_bwd=16)


def _inputs(T, H, seed=0):
  rng = np.random.RandomState(seed)
  q = rng.randn(B, T, N, H).astype(np.float32) * H**-0.5 * 4  # logits of tens: the soft-cap bites
  k = rng.randn(B, T, K, H).astype(np.float32)
  v = rng.randn(B, T, K, H).astype(np.float32)
  seg = np.ones((B, T), np.int32)
  seg[0, T // 4:] = 2
  seg[0, T // 2:] = 3  # three packed segments
  seg[1, T // 3:] = 5
  seg[1, T - 5:] = 0  # trailing padding
  return q, k, v, seg


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("H,window,softcap", [(128, None, 50.0), (128, 20, 50.0), (256, 12, 50.0),
                                              (128, 7, None)])
def test_gpu_flash_equals_reference(H, window, softcap):
  T = 40
  q, k, v, seg = _inputs(T, H)
  cot = np.random.RandomState(1).randn(B, T, N, H).astype(np.float32)

  def run(fn, **kw):
    def loss(q, k, v):
      out = fn(q, k, v, seg, window=window, softcap=softcap, **kw)
      return jnp.sum(out * cot), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads

  ref, g_ref = run(attention_xla)
  out, g = run(attention_gpu_flash, blocks=BLOCKS, interpret=True)
  assert _rel(out, ref) <= 1e-5
  for name, a, b in zip("qkv", g, g_ref, strict=True):
    assert _rel(a, b) <= 1e-4, name


def test_gpu_flash_skips_blocks_outside_the_band():
  """Loop bounds: no visible key is left out of a query tile's range, and no tile wholly outside the
  band (above the diagonal, older than the window) is inside it, for both kernels' ranges."""
  from gemma2_jax.model.gpu_attention import _kv_block_range, _q_block_range

  nb, b = 9, 16
  T = nb * b
  for window in (None, 1, 16, 17, 40, 1000):
    t, s = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    visible = (s <= t) & ((t - s < window) if window else True)
    tile_visible = visible.reshape(nb, b, nb, b).any(axis=(1, 3))
    for i in range(nb):
      lo, hi = (int(x) for x in _kv_block_range(i * b, b, b, window))
      assert [j for j in range(nb) if tile_visible[i, j]] == list(range(lo, hi)), (window, i)
    for j in range(nb):
      lo, hi = (int(x) for x in _q_block_range(j * b, b, b, nb, window))
      assert [i for i in range(nb) if tile_visible[i, j]] == list(range(lo, hi)), (window, j)


def test_attention_dispatches_gpu_flash():
  """`attention_impl="gpu_flash"` reaches the kernel (interpret mode off GPU) with its default tiles,
  a head dim below the smallest tile and T shorter than one tile."""
  from gemma2_jax.model.attention import attention

  T, H = 20, 16
  q, k, v, seg = _inputs(T, H, seed=2)
  out = attention(q, k, v, seg, window=6, softcap=50.0, impl="gpu_flash", block_size=512)
  ref = attention_xla(q, k, v, seg, window=6, softcap=50.0)
  assert _rel(out, ref) <= 1e-5


def test_gpu_flash_under_a_mesh_equals_reference():
  """Under `activation_sharding` the kernel runs per (batch, head) shard in shard_map: same values and
  gradients as the reference on one device; heads that do not split evenly are one clear error."""
  from gemma2_jax.parallel.sharding import DEFAULT_RULES, activation_sharding, make_mesh

  T, H = 20, 16
  q, k, v, seg = _inputs(T, H, seed=5)
  mesh = make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])

  def run(fn, **kw):
    def loss(q, k, v):
      with activation_sharding(mesh, DEFAULT_RULES):
        out = fn(q, k, v, seg, window=6, softcap=50.0, **kw)
      return jnp.sum(jnp.sin(out)), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

  (_, ref), g_ref = run(attention_xla)
  (_, out), g = run(attention_gpu_flash, blocks=BLOCKS)
  assert _rel(out, ref) <= 1e-5
  for name, a, b in zip("qkv", g, g_ref, strict=True):
    assert _rel(a, b) <= 1e-4, name
  with activation_sharding(make_mesh({"data": 2, "tensor": 4}, jax.devices()[:8]), DEFAULT_RULES):
    with pytest.raises(ValueError, match="divide evenly"):
      attention_gpu_flash(q, k, v, seg, window=6, softcap=50.0)


def test_gpu_flash_lowers_for_cuda():
  """No GPU here: lowering for CUDA from this host still runs every Pallas Triton lowering rule of the
  forward and both backward kernels (an op or shape Triton cannot take fails here, not on the GPU)."""
  B_, T, N_, K_, H = 1, 1000, 8, 4, 256  # 2B's heads; T padded to whole tiles

  def loss(q, k, v, seg):
    out = attention_gpu_flash(q, k, v, seg, window=512, softcap=50.0, interpret=False)
    return jnp.sum(out.astype(jnp.float32))

  args = [jax.ShapeDtypeStruct((B_, T, n, H), jnp.bfloat16) for n in (N_, K_, K_)]
  args.append(jax.ShapeDtypeStruct((B_, T), jnp.int32))
  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(lowering_platforms=("cuda",))
  assert lowered.as_text().count("__gpu$xla.gpu.triton") == 3  # forward, dK/dV, dQ
