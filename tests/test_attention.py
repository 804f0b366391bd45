"""Attention: blockwise == reference, and the window / causal / segment masks are exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma2_jax.model.attention import attention_blockwise, attention_xla

B, N, K, H = 2, 4, 2, 8


def _qkv(T, seed=0):
  rng = np.random.RandomState(seed)
  q = rng.randn(B, T, N, H).astype(np.float32)
  k = rng.randn(B, T, K, H).astype(np.float32)
  v = rng.randn(B, T, K, H).astype(np.float32)
  return q, k, v


def _segments(T):
  seg = np.ones((B, T), np.int32)
  seg[0, T // 3:] = 2
  seg[1, T // 2:] = 3
  seg[1, T - 3:] = 0  # trailing padding
  return seg


@pytest.mark.parametrize("T,block,window", [(29, 8, 5), (32, 8, 9), (32, 32, 8), (17, 4, None),
                                            (40, 7, 100), (24, 6, 1)])
def test_blockwise_equals_reference(T, block, window):
  q, k, v = _qkv(T)
  seg = _segments(T)
  ref = attention_xla(q, k, v, seg, window=window, softcap=50.0)
  out = jax.jit(attention_blockwise, static_argnames=("window", "softcap", "block_size"))(
    q, k, v, seg, window=window, softcap=50.0, block_size=block)
  np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)


def test_blockwise_gradients_equal_reference():
  q, k, v = _qkv(20)
  seg = _segments(20)

  def loss(fn, **kw):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, seg, window=6, softcap=50.0, **kw)))

  g_ref = jax.grad(loss(attention_xla), argnums=(0, 1, 2))(q, k, v)
  g_blk = jax.grad(loss(attention_blockwise, block_size=4), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_blk, g_ref, strict=True):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_window_is_exact(impl):
  """Query t sees keys t-W+1..t: a change at distance W is invisible, at W-1 it is not."""
  T, W, t = 24, 6, 20
  q, k, v = _qkv(T)
  seg = np.ones((B, T), np.int32)

  def run(k, v):
    if impl == "xla":
      return np.asarray(attention_xla(q, k, v, seg, window=W, softcap=50.0))
    return np.asarray(attention_blockwise(q, k, v, seg, window=W, softcap=50.0, block_size=4))

  base = run(k, v)
  for dist, visible in [(W, False), (W - 1, True), (W + 3, False), (0, True)]:
    k2, v2 = k.copy(), v.copy()
    k2[:, t - dist] += 1.0
    v2[:, t - dist] += 1.0
    changed = np.abs(run(k2, v2)[:, t] - base[:, t]).max() > 0
    assert changed == visible, f"distance {dist}"


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_causal_and_segment_isolation(impl):
  T = 18
  q, k, v = _qkv(T)
  seg = np.ones((B, T), np.int32)
  seg[:, 9:] = 2

  def run(k, v):
    if impl == "xla":
      return np.asarray(attention_xla(q, k, v, seg, window=None, softcap=50.0))
    return np.asarray(attention_blockwise(q, k, v, seg, window=None, softcap=50.0, block_size=4))

  base = run(k, v)
  k2, v2 = k.copy(), v.copy()
  k2[:, 12] += 1.0  # future of rows < 12, and a different segment than rows < 9
  v2[:, 12] += 1.0
  out = run(k2, v2)
  np.testing.assert_array_equal(out[:, :12], base[:, :12])
  assert np.abs(out[:, 12:] - base[:, 12:]).max() > 0
  k3, v3 = k.copy(), v.copy()
  k3[:, 3] += 1.0  # segment 1 only: segment 2 rows must not move
  v3[:, 3] += 1.0
  out = run(k3, v3)
  np.testing.assert_array_equal(out[:, 9:], base[:, 9:])
  assert np.abs(out[:, 3:9] - base[:, 3:9]).max() > 0
