"""Splash attention (the TPU Pallas kernel, run here in interpret mode) == the XLA reference.

Tolerances (fp32): forward max |diff| <= 1e-5 x max |ref|, gradients <= 1e-4, for the kernel alone and
for the whole model, on one device and under a data x fsdp x tensor mesh of 8 fake CPU devices.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma2_jax.model import tiny
from gemma2_jax.model.attention import attention, attention_xla
from gemma2_jax.model.config import resolve_attention_impl
from gemma2_jax.model.splash import attention_splash, make_kernel, tile_sizes
from gemma2_jax.model.transformer import LOGICAL_AXES, forward_hidden
from gemma2_jax.parallel.sharding import (
  DEFAULT_RULES,
  activation_sharding,
  current_platform,
  logical_to_sharding,
  make_mesh,
)
from tests.tiny import random_params


def _rel(ours, ref):
  return float(np.abs(np.asarray(ours) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max())


def _inputs(B, T, N, K, H, seed=0):
  rng = np.random.RandomState(seed)
  # Unscaled queries: logits of std ~sqrt(H) (10-16), where the soft-cap at 50 visibly bends them.
  q, k, v = (rng.randn(B, T, n, H).astype(np.float32) for n in (N, K, K))
  seg = np.ones((B, T), np.int32)  # three packed documents per row, boundaries inside blocks
  seg[:, T // 3:] = 2
  seg[:, 2 * T // 3 + 5:] = 3
  seg[1, T - 7:] = 0  # trailing padding
  return q, k, v, seg


@pytest.mark.parametrize("T,N,K,H,window,block", [
  (256, 4, 2, 128, 100, 128),   # GQA, window < T and not a block multiple, two blocks
  (200, 4, 1, 256, None, 512),  # MQA, global, T padded to the 256 block; head_dim 256
  (256, 2, 2, 128, 129, 256),   # MHA, window one past half the row, a single block
])
def test_splash_equals_reference_forward_and_gradients(T, N, K, H, window, block):
  q, k, v, seg = _inputs(2, T, N, K, H)

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, seg, window=window, softcap=50.0)))

  splash = functools.partial(attention_splash, block_size=block)
  out = jax.jit(lambda q, k, v: splash(q, k, v, seg, window=window, softcap=50.0))(q, k, v)
  ref = attention_xla(q, k, v, seg, window=window, softcap=50.0)
  assert out.shape == ref.shape and _rel(out, ref) <= 1e-5
  grads = jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
  ref_grads = jax.grad(loss(attention_xla), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(grads, ref_grads, strict=True):
    assert _rel(g, r) <= 1e-4


def test_tile_sizes():
  assert tile_sizes(8192, 1024) == (1024, 8192)
  assert tile_sizes(24, 5) == (128, 128)  # at least one lane tile; short rows padded to it
  assert tile_sizes(200, 512) == (256, 256)
  assert tile_sizes(1000, 300) == (256, 1024)  # blocks are whole lane tiles


def test_auto_resolves_per_platform():
  assert resolve_attention_impl("auto", "tpu") == "splash"
  assert resolve_attention_impl("auto", "gpu") == "gpu_flash"
  assert resolve_attention_impl("auto", "cpu") == "xla"
  assert resolve_attention_impl("blockwise", "tpu") == "blockwise"
  assert current_platform() == "cpu"
  with activation_sharding(make_mesh({"fsdp": -1}, jax.devices()[:2]), DEFAULT_RULES):
    assert current_platform() == "cpu"  # the mesh's devices decide (TPU ones in an AOT compile)


def _model_loss(cfg, mesh=None):
  def loss(params, tokens, seg):
    if mesh is None:
      hidden = forward_hidden(cfg, params, tokens, segment_ids_BT=seg)
    else:
      with activation_sharding(mesh, DEFAULT_RULES):
        hidden = forward_hidden(cfg, params, tokens, segment_ids_BT=seg)
    return jnp.mean(jnp.sin(hidden.astype(jnp.float32))), hidden
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _assert_grads_close(grads, ref_grads):
  errors = jax.tree.map(_rel, grads, ref_grads)
  assert max(jax.tree.leaves(errors)) <= 1e-4, errors


def test_whole_model_splash_equals_xla_one_device_and_under_a_tensor_parallel_mesh():
  """An HF-parity config (tests/test_parity.py "gqa_window": GQA, window 8 < T, query scalar 24 !=
  head_dim 16), scanned layer pairs with full remat; T=24 is padded to one 128 tile."""
  cfg = tiny(remat="full")
  params = random_params(cfg, seed=1)
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, cfg.vocab_size, (8, 24)).astype(np.int32)
  seg = np.ones((8, 24), np.int32)
  seg[:, 9:] = 2
  seg[:, 17:] = 3
  (_, ref_hidden), ref_grads = _model_loss(cfg.replace(attention_impl="xla"))(params, tokens, seg)

  make_kernel.cache_clear()
  (_, hidden), grads = _model_loss(cfg.replace(attention_impl="splash"))(params, tokens, seg)
  assert _rel(hidden, ref_hidden) <= 1e-5
  _assert_grads_close(grads, ref_grads)
  # One kernel per layer kind (local, global), shared by all layers, the remat and the backward.
  assert make_kernel.cache_info().currsize == 2

  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
  sharded = jax.device_put(params, logical_to_sharding(LOGICAL_AXES, mesh, DEFAULT_RULES))
  (_, hidden), grads = _model_loss(cfg.replace(attention_impl="splash"), mesh)(sharded, tokens, seg)
  assert _rel(hidden, ref_hidden) <= 1e-5
  _assert_grads_close(grads, ref_grads)


def test_heads_must_split_alike():
  q, k, v, seg = _inputs(2, 128, 4, 2, 16)
  mesh = make_mesh({"fsdp": 2, "tensor": 4}, jax.devices()[:8])
  with activation_sharding(mesh, DEFAULT_RULES), pytest.raises(ValueError, match="divide evenly"):
    attention(q, k, v, seg, window=None, softcap=50.0, impl="splash", block_size=128)
  rules = dict(DEFAULT_RULES) | {"kv_heads": None}
  with activation_sharding(mesh, tuple(rules.items())), pytest.raises(ValueError, match="same mesh"):
    attention(q, k, v, seg, window=None, softcap=50.0, impl="splash", block_size=128)
