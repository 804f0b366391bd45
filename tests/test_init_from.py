"""Continued pre-training: `init_from` an HF checkpoint written by transformers starts from HF's model."""

import dataclasses

import jax
import numpy as np
import pytest

from gemma2_jax.checkpoint import CheckpointError
from gemma2_jax.model import Transformer, tiny
from gemma2_jax.parallel.sharding import make_mesh
from gemma2_jax.training.optim import make_optimizer
from gemma2_jax.training.state import init_state, state_shardings
from tests.hf_utils import hf_logits, random_hf_model
from tests.tiny import experiment_from, tiny_experiment


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf")
  cfg = tiny()
  model = random_hf_model(cfg)
  model.save_pretrained(path)
  return cfg, path, model


def _state(model_cfg, init_from, mesh):
  exp = experiment_from(tiny_experiment(), 8)
  exp = dataclasses.replace(exp, model=model_cfg, init_from=str(init_from),
                            mesh={"dcn": 1, "data": 1, "fsdp": 1, "tensor": 1, **mesh})
  tx, _ = make_optimizer(exp.optimizer, exp.train.steps)
  sh = state_shardings(exp, make_mesh(exp.mesh, jax.devices()[:int(np.prod(list(mesh.values())))]),
                       tx)
  return init_state(exp, tx, sh)


@pytest.mark.parametrize("mesh", [dict(), dict(fsdp=4, tensor=2)])
def test_step0_logits_equal_hf(hf_dir, mesh):
  cfg, path, hf_model = hf_dir
  state = _state(cfg, path, mesh)
  assert int(state.step) == 0
  mu = state.opt_state[1][0].mu  # fresh optimizer: zero moments
  assert all(float(np.abs(np.asarray(x)).max()) == 0 for x in jax.tree.leaves(mu))
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 16))
  ours = np.asarray(Transformer.from_params(cfg, state.params)(tokens))
  ref = hf_logits(hf_model, tokens)
  assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


def test_init_from_with_other_shapes_is_a_clear_error(hf_dir):
  cfg, path, _ = hf_dir
  with pytest.raises(CheckpointError, match="shape"):
    _state(cfg.replace(ffn_dim=cfg.ffn_dim * 2), path, {})
