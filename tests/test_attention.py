"""Attention: blockwise == reference, and the window / causal / segment masks are exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma2_jax.model.attention import _band_schedule, attention_blockwise, attention_xla

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


@pytest.mark.parametrize("T,block,window,softcap", [(29, 8, 5, 50.0), (29, 8, None, 50.0),
                                                    (40, 7, 100, 50.0), (30, 4, 9, None)])
def test_blockwise_custom_vjp_equals_reference(T, block, window, softcap):
  """The flash-style backward == autodiff of the reference, fp32 rel <= 1e-4: GQA, three packed
  segments plus padding, soft-cap, local (window < T) and global layers, T not a multiple of the block."""
  q, k, v = _qkv(T, seed=3)
  q *= 3.0  # logits of tens: the soft-cap's derivative matters
  seg = _segments(T)
  seg[0, 2 * T // 3:] = 4  # a third segment in row 0
  cot = np.random.RandomState(4).randn(B, T, N, H).astype(np.float32)

  def grads(fn, **kw):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, seg, window=window, softcap=softcap, **kw) * cot)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  g_ref = grads(attention_xla)
  g_blk = grads(attention_blockwise, block_size=block)
  for name, a, b in zip("qkv", g_blk, g_ref, strict=True):
    assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-4, name


@pytest.mark.parametrize("nb,n_off", [(1, 1), (2, 2), (7, 7), (8, 8), (16, 3), (9, 2), (5, 1)])
def test_band_schedule_visits_each_visible_block_once(nb, n_off):
  """Every block pair of the band (and nothing outside it: no fully masked pair) runs exactly once, and
  no step has two lanes on one query block or one key block (scatters never collide)."""
  q_idx, k_idx, valid = _band_schedule(nb, n_off)
  pairs = sorted(zip(q_idx[valid].tolist(), k_idx[valid].tolist(), strict=True))
  assert pairs == [(qb, kb) for qb in range(nb) for kb in range(max(0, qb - n_off + 1), qb + 1)]
  for step_q, step_k in zip(q_idx, k_idx, strict=True):
    assert len(set(step_q.tolist())) == len(step_q) and len(set(step_k.tolist())) == len(step_k)
  assert valid.mean() >= 0.75  # the steps are balanced: padding lanes are few


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
