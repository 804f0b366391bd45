"""TrainState, its shardings, sharded initialisation and its abstract (shapes + shardings) form."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from gemma2_jax import checkpoint
from gemma2_jax.model.transformer import LOGICAL_AXES, init_params, param_shapes
from gemma2_jax.parallel.sharding import (
  batch_sharding,
  host_to_global,
  logical_to_sharding,
)
from gemma2_jax.training import lora
from gemma2_jax.training.experiment import Experiment


@dataclasses.dataclass(frozen=True)
class TrainState:
  """`ema`: the exponential moving average of `params` (train.ema_decay > 0, see steps.py), the same
  tree, dtype and shardings; None when off. A None `ema` is no node of the pytree at all, so a run
  without EMA saves and restores exactly the checkpoints it did before the field existed."""

  step: jax.Array
  params: dict
  opt_state: optax.OptState
  ema: dict | None = None

  def replace(self, **changes) -> TrainState:
    return dataclasses.replace(self, **changes)


def _flatten(s: TrainState):
  names = ("step", "params", "opt_state") + (("ema",) if s.ema is not None else ())
  return tuple((jax.tree_util.GetAttrKey(n), getattr(s, n)) for n in names), s.ema is not None


def _unflatten(has_ema: bool, children) -> TrainState:
  return TrainState(*children) if has_ema else TrainState(*children, ema=None)


jax.tree_util.register_pytree_with_keys(TrainState, _flatten, _unflatten)


@dataclasses.dataclass
class Shardings:
  mesh: jax.sharding.Mesh
  state: TrainState
  batch: NamedSharding
  replicated: NamedSharding


def state_shardings(exp: Experiment, mesh, tx) -> Shardings:
  """The train state's shardings: the params' (a LoRA run's: its trainable tree, training/lora.py)
  and their optimizer state's."""
  if exp.lora is not None:
    params = lora.trainable_shardings(exp, mesh)
  else:
    params = logical_to_sharding(LOGICAL_AXES, mesh, exp.rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract_params = _abstract_params(exp)
  # A state leaf shaped like its param is sharded like it; any other (Adafactor's factored row and
  # column statistics: a few MB for the 9B) is replicated.
  opt_state = optax.tree_utils.tree_map_params(
    tx, lambda leaf, p, s: s if leaf.shape == p.shape else replicated,
    jax.eval_shape(tx.init, abstract_params), abstract_params, params,
    transform_non_params=lambda _: replicated)
  batch = batch_sharding(mesh, exp.rules)
  ema = params if exp.train.ema_decay else None
  return Shardings(mesh=mesh, state=TrainState(step=replicated, params=params, opt_state=opt_state,
                                               ema=ema),
                   batch=batch, replicated=replicated)


def _abstract_params(exp: Experiment):
  if exp.lora is not None:
    return lora.abstract_trainable(exp)
  model_cfg = exp.model
  dtype = jnp.dtype(model_cfg.param_dtype)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(model_cfg),
                      is_leaf=lambda x: isinstance(x, tuple))


def init_state(exp: Experiment, tx, sh: Shardings) -> TrainState:
  """Params and optimizer state are created directly in their shards (nothing on one device first).

  With `init_from`, the weights come from that checkpoint (HF / Kaggle / native) and the optimizer
  starts fresh: continued pre-training. A LoRA run's params are its adapters (fresh, or
  lora.init_adapter's); its base is the mode's frozen input, not state.
  """
  if exp.lora is not None:
    params = lora.init_trainable(exp, sh.state.params)
  elif exp.init_from:
    # Read with the run's model config (any tensor of another shape is an error naming it); each
    # process reads only the slices its devices hold.
    _, params = checkpoint.load_sharded(exp.init_from, exp.model.param_dtype, sh.state.params,
                                        config=exp.model)
  else:
    params = jax.jit(lambda: init_params(exp.model, exp.train.seed),
                     out_shardings=sh.state.params)()

  def from_params(params):
    ema = _copy(params) if exp.train.ema_decay else None  # the EMA starts at the initial weights
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema=ema)

  return jax.jit(from_params, out_shardings=sh.state, donate_argnums=0)(params)


def to_global(batch: dict, sh: Shardings) -> dict:
  """This process's numpy rows (its data group's share) -> global jax arrays on the batch sharding."""
  return {k: host_to_global(np.asarray(v), sh.batch) for k, v in batch.items()}


def abstract_state(exp: Experiment, tx, sh: Shardings, *, ema: bool | None = None) -> TrainState:
  """The train state as shapes carrying their target shardings (restore / AOT compile). `ema`: with or
  without the EMA field (default: as train.ema_decay says; a resume reads a checkpoint as it is)."""
  params = _abstract_params(exp)
  ema = bool(exp.train.ema_decay) if ema is None else ema
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                      opt_state=jax.eval_shape(tx.init, params), ema=params if ema else None)
  shardings = sh.state.replace(ema=sh.state.params if ema else None)
  return jax.tree.map(lambda s, shard: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shard),
                      shapes, shardings)


def start_ema(state: TrainState, sh: Shardings) -> TrainState:
  """`state` with its EMA set to a copy of its params (a resume of a checkpoint saved without one)."""
  return state.replace(ema=jax.jit(_copy, out_shardings=sh.state.params)(state.params))


def _copy(tree):
  # A distinct buffer per leaf: the train step donates the state, params and EMA alike.
  return jax.tree.map(jnp.copy, tree)
