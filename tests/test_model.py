"""Model invariants on tiny configs, and parameter counts of the real sizes via eval_shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma2_jax.model import Transformer, gemma2_2b, gemma2_9b, gemma2_27b, tiny
from gemma2_jax.model.config import ModelConfig, get_preset
from gemma2_jax.model.transformer import PADDED_LOGIT, init_params, param_shapes
from tests.tiny import random_params


@pytest.mark.parametrize("preset,count", [(gemma2_2b, 2_614_636_800), (gemma2_9b, 9_242_164_736),
                                          (gemma2_27b, 27_227_718_144)])
def test_real_sizes_parameter_count(preset, count):
  cfg = preset()
  shapes = jax.eval_shape(lambda: nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == count == cfg.num_params()
  assert shapes["embedder"]["input_embedding"].shape == (256128, cfg.d_model)


def test_27b_query_scale_is_d_model_over_heads():
  assert gemma2_27b().query_scale == pytest.approx(144**-0.5)
  assert gemma2_9b().query_scale == pytest.approx(256**-0.5)


@pytest.fixture(scope="module")
def tiny_model():
  cfg = tiny(vocab_size=131, d_model=37, ffn_dim=53, num_heads=6, num_kv_heads=3, head_dim=10)
  return Transformer.from_params(cfg, random_params(cfg, seed=3))


def test_init_params_shapes_and_scale():
  cfg = tiny()
  params = init_params(cfg, seed=0)
  shapes = jax.tree.map(lambda a: a.shape, params)
  assert shapes == jax.tree.map(tuple, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
  emb = np.asarray(params["embedder"]["input_embedding"])
  assert abs(emb.std() * np.sqrt(cfg.d_model) - 1.0) < 0.1  # unit-scale embeddings after sqrt(D)
  assert (np.asarray(params["final_norm"]["scale"]) == 0).all()  # norms start as identity
  assert not np.array_equal(emb, np.asarray(init_params(cfg, seed=1)["embedder"]["input_embedding"]))


def _tokens(cfg, B=3, T=13, seed=0):
  return np.random.RandomState(seed).randint(0, cfg.vocab_size, (B, T)).astype(np.int32)


def test_shapes_dtypes_jit_and_eager_agree(tiny_model):
  cfg = tiny_model.config
  tokens = _tokens(cfg)
  eager = tiny_model(tokens)
  jitted = nnx.jit(lambda m, t: m(t))(tiny_model, tokens)
  assert eager.shape == (3, 13, cfg.vocab_size) and eager.dtype == jnp.float32
  assert np.isfinite(np.asarray(eager)).all()
  np.testing.assert_allclose(jitted, eager, atol=1e-5)
  hidden = tiny_model.hidden_states(tokens)
  assert hidden.shape == (3, 13, cfg.d_model)
  np.testing.assert_array_equal(tiny_model.logits(hidden), eager)


def test_causal(tiny_model):
  tokens = _tokens(tiny_model.config)
  changed = tokens.copy()
  changed[:, 8] = (changed[:, 8] + 1) % tiny_model.config.vocab_size
  a, b = np.asarray(tiny_model(tokens)), np.asarray(tiny_model(changed))
  np.testing.assert_array_equal(a[:, :8], b[:, :8])
  assert np.abs(a[:, 8:] - b[:, 8:]).max() > 0


@pytest.mark.parametrize("remat", ["full", "save_dots", "offload"])
def test_remat_policies_do_not_change_values_or_gradients(tiny_model, remat):
  cfg = tiny_model.config
  tokens = _tokens(cfg)
  params = tiny_model.params()

  def loss(params, cfg):
    logits = Transformer.from_params(cfg, params)(tokens)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  l0, g0 = jax.value_and_grad(loss)(params, cfg)
  l1, g1 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, cfg.replace(remat=remat))
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), g1, g0)
  if remat == "offload":  # the layer pairs' inputs saved for the backward live in host memory
    jaxpr = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, cfg.replace(remat=remat)))
    assert "<host>" in jaxpr


def _count_eqns(jaxpr) -> int:
  total = len(jaxpr.eqns)
  for eqn in jaxpr.eqns:
    for v in eqn.params.values():
      for sub in v if isinstance(v, (list, tuple)) else [v]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          total += _count_eqns(inner)
  return total


def test_layers_are_scanned_so_program_size_is_depth_independent():
  def n_eqns(L):
    cfg = tiny(num_layers=L)
    params = jax.eval_shape(lambda: init_params(cfg))
    jaxpr = jax.make_jaxpr(lambda p, t: Transformer.from_params(cfg, p)(t))(
      params, jnp.zeros((1, 8), jnp.int32))
    return _count_eqns(jaxpr.jaxpr)

  assert n_eqns(4) == n_eqns(12)


def test_unrolled_layers_equal_scanned(tiny_model):
  cfg = tiny_model.config
  tokens = _tokens(cfg)
  unrolled = Transformer.from_params(cfg.replace(scan_layers=False), tiny_model.params())
  np.testing.assert_allclose(unrolled(tokens), tiny_model(tokens), atol=1e-5)


def test_padded_vocab_rows_get_zero_probability():
  cfg = tiny(vocab_size=64, num_real_tokens=50)
  model = Transformer.from_params(cfg, random_params(cfg))
  logits = np.asarray(model(_tokens(cfg.replace(vocab_size=50))))
  assert (logits[..., 50:] == PADDED_LOGIT).all()
  assert np.abs(logits[..., :50]).max() <= 30.0
  assert np.asarray(jax.nn.softmax(logits)[..., 50:]).max() == 0.0


@pytest.mark.parametrize("kw,msg", [
  (dict(num_layers=3), "even"),
  (dict(num_heads=4, num_kv_heads=3), "multiple"),
  (dict(attention_impl="flash"), "attention_impl"),
  (dict(remat="some"), "remat"),
  (dict(num_real_tokens=10_000), "num_real_tokens"),
])
def test_bad_config_is_one_clear_error(kw, msg):
  with pytest.raises(ValueError, match=msg):
    tiny(**kw)


def test_config_json_round_trip_and_unknown_keys():
  cfg = gemma2_27b(attention_impl="blockwise")
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="unknown ModelConfig keys"):
    ModelConfig.from_dict({**cfg.to_dict(), "n_layer": 3})
  with pytest.raises(ValueError, match="unknown model preset"):
    get_preset("gemma2_7b")
