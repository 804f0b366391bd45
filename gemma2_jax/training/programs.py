"""The one builder of every compiled program: the train step, the eval step, the teacher's top-k step
and the sampler's prefill / decode.

Each builder returns a `Program`: the jitted function with its input / output shardings and donation,
the abstract arguments it is compiled for (shapes and dtypes carrying their shardings) and the mesh
and rules of its activation-sharding context. `Trainer`, `evaluate`, `teacher_logits` and the
benchmarks call the programs; `aot` lowers and compiles the very same objects from abstract inputs,
so the pre-flight checks exactly what runs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma2_jax.distill.teacher import teacher_shardings
from gemma2_jax.distill.topk import make_topk_fn
from gemma2_jax.inference.sampler import Sampler, SamplingConfig, bucket_length
from gemma2_jax.model.config import ModelConfig
from gemma2_jax.model.lora import effective_params
from gemma2_jax.model.transformer import LOGICAL_AXES, param_shapes
from gemma2_jax.parallel.sharding import (
  activation_sharding,
  batch_sharding,
  batch_shards,
  check_batch,
  logical_to_sharding,
  logical_to_spec,
)
from gemma2_jax.training import lora
from gemma2_jax.training.experiment import Experiment
from gemma2_jax.training.modes import EVAL_BATCH, Mode
from gemma2_jax.training.optim import make_optimizer
from gemma2_jax.training.state import Shardings, abstract_state, state_shardings
from gemma2_jax.training.steps import make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class Program:
  """A jitted function, the abstract arguments it is compiled for, and its sharding context."""

  name: str
  fn: Any  # the jax.jit-wrapped function (shardings and donation set)
  args: tuple  # abstract arguments: ShapeDtypeStruct leaves carrying their shardings
  mesh: Mesh
  rules: tuple

  def context(self):
    return activation_sharding(self.mesh, self.rules)

  def __call__(self, *args):
    with self.context():
      return self.fn(*args)

  def trace(self) -> jax.stages.Traced:
    with self.context():
      return self.fn.trace(*self.args)

  def lower(self) -> jax.stages.Lowered:
    with self.context():
      return self.trace().lower()


@dataclasses.dataclass(frozen=True)
class TrainProgram(Program):
  """The train step, with the optimizer and state shardings it was built with."""

  tx: Any = None
  schedule: Any = None
  shardings: Shardings | None = None


def abstract_tree(shapes: dict, dtype, shardings) -> dict:
  """A param-shapes tree (tuples) as ShapeDtypeStructs of `dtype` carrying `shardings`."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, jnp.dtype(dtype), sharding=sh), shapes,
                      shardings, is_leaf=lambda x: isinstance(x, tuple))


def train_program(exp: Experiment, mode: Mode, mesh: Mesh) -> TrainProgram:
  """(state, batch, teacher_params) -> (state, metrics), the state donated; the batch is the mode's."""
  tx, schedule = make_optimizer(exp.optimizer, exp.train.steps)
  sh = state_shardings(exp, mesh, tx)
  teacher, teacher_sh = mode.teacher_inputs(mesh)
  fn = jax.jit(make_train_step(exp, mode, tx, schedule),
               in_shardings=(sh.state, sh.batch, teacher_sh),
               out_shardings=(sh.state, sh.replicated), donate_argnums=0)
  batch = mode.batch.abstract(exp.train.global_batch, exp.train.seq_len, mesh, exp.rules)
  return TrainProgram(name="train step", fn=fn, args=(abstract_state(exp, tx, sh), batch, teacher),
                      mesh=mesh, rules=exp.rules, tx=tx, schedule=schedule, shardings=sh)


def eval_program(model: ModelConfig, mesh: Mesh, rules, *, batch: int, seq_len: int, chunk: int,
                 micro_batches: int = 1) -> Program:
  """(params, batch) -> summed eval statistics, in `micro_batches` (the trainer: its train step's)."""
  params_sh = logical_to_sharding(LOGICAL_AXES, mesh, rules)
  batch_sh = batch_sharding(mesh, rules)
  fn = jax.jit(make_eval_step(model, chunk=chunk, micro_batches=micro_batches),
               in_shardings=(params_sh, batch_sh), out_shardings=NamedSharding(mesh, PartitionSpec()))
  args = (abstract_tree(param_shapes(model), model.param_dtype, params_sh),
          EVAL_BATCH.abstract(batch, seq_len, mesh, rules))
  return Program(name="eval step", fn=fn, args=args, mesh=mesh, rules=rules)


def trainer_eval_program(exp: Experiment, mesh: Mesh) -> Program:
  """The trainer's periodic eval: the eval data's rows (every eval set has the train data's), in the
  train step's micro-batches (its memory). A LoRA run's takes `LoraMode.model_params`: the frozen
  base and the trainable tree, {"base", "trainable"}."""
  d = exp.data_train
  if exp.lora is None:
    return eval_program(exp.model, mesh, exp.rules, batch=d.global_batch, seq_len=d.seq_len,
                        chunk=exp.train.loss_chunk, micro_batches=exp.train.grad_accum_steps)
  step = make_eval_step(exp.model, chunk=exp.train.loss_chunk, micro_batches=exp.train.grad_accum_steps)

  def lora_eval_step(params, batch):
    return step(effective_params(exp.model, exp.lora, params["base"], params["trainable"]), batch)

  base_sh = lora.base_shardings(exp, mesh)
  params_sh = {"base": base_sh, "trainable": lora.trainable_shardings(exp, mesh)}
  fn = jax.jit(lora_eval_step, in_shardings=(params_sh, batch_sharding(mesh, exp.rules)),
               out_shardings=NamedSharding(mesh, PartitionSpec()))
  trainable = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                           lora.abstract_trainable(exp), params_sh["trainable"])
  args = ({"base": lora.abstract_base(exp, base_sh), "trainable": trainable},
          EVAL_BATCH.abstract(d.global_batch, d.seq_len, mesh, exp.rules))
  return Program(name="eval step", fn=fn, args=args, mesh=mesh, rules=exp.rules)


@dataclasses.dataclass(frozen=True)
class TopKProgram(Program):
  """The teacher's top-k step, with the rows it takes per forward and their sharding."""

  rows: int = 0
  batch_sharding: NamedSharding | None = None


def topk_program(exp: Experiment, teacher_cfg: ModelConfig, mesh: Mesh, k: int,
                 batch_size: int | None = None) -> TopKProgram:
  """(teacher params, tokens, positions, segment_ids [B, T]) -> (top-k log-probs, ids) [B, T, k]:
  `python -m gemma2_jax.teacher_logits`'s step. B defaults to one row per batch shard."""
  batch_sh = batch_sharding(mesh, exp.rules)
  # One row per batch shard by default: train.global_batch rows (512 x 8k for distill_9b) in one
  # forward would need ~0.5 TB for a single chunk's fp32 logits over a 256k vocab.
  B = batch_size or batch_shards(batch_sh)
  check_batch(B, mesh.shape, exp.rules, "the teacher's batch (--batch_size)")
  out_sh = NamedSharding(mesh, logical_to_spec(("batch", "length", None), exp.rules))
  t_sh = teacher_shardings(exp.teacher, exp.rules, mesh)
  fn = jax.jit(make_topk_fn(teacher_cfg, k, exp.train.loss_chunk), in_shardings=(t_sh, *[batch_sh] * 3),
               out_shardings=(out_sh, out_sh))
  rows = jax.ShapeDtypeStruct((B, exp.train.seq_len), jnp.int32, sharding=batch_sh)
  return TopKProgram(name="teacher_logits step", fn=fn,
                     args=(abstract_tree(param_shapes(teacher_cfg), teacher_cfg.param_dtype, t_sh),
                           rows, rows, rows),
                     mesh=mesh, rules=exp.rules, rows=B, batch_sharding=batch_sh)


@dataclasses.dataclass(frozen=True)
class SamplerPrograms:
  """`python -m gemma2_jax.sample`'s two programs on a mesh (the Sampler's own jitted prefill and
  decode, the decode state donated), and what they were built for."""

  sampler: Sampler
  rows: int  # the batch as run: batch_size rounded up to a multiple of the batch shards
  bucket: int  # the prompt bucket (power of two) the prompts are left-padded to
  prefill: Program
  decode_fn: Any  # decode's abstract state comes from prefill's outputs: see `decode`

  def decode(self, prefill_out_info, sampling: SamplingConfig) -> Program:
    """The decode program for the state prefill returns (its out_info: shapes and shardings)."""
    S = jax.ShapeDtypeStruct
    state = jax.tree.map(lambda x: S(x.shape, x.dtype, sharding=x.sharding), prefill_out_info)
    s = self.sampler
    return Program(name="decode", fn=self.decode_fn, args=(s.cfg, s.params, state, sampling,
                                                           S((), jnp.int32)),
                   mesh=s.mesh, rules=s.rules)


def sampler_programs(cfg: ModelConfig, mesh: Mesh, rules, *, batch_size: int, prompt_len: int,
                     sampling: SamplingConfig) -> SamplerPrograms:
  """The sampler's prefill for `batch_size` rows of a `prompt_len`-token prompt bucket, params (abstract)
  laid out by `rules` on `mesh`, rows as Sampler.start pads them."""
  S = jax.ShapeDtypeStruct
  params = abstract_tree(param_shapes(cfg), cfg.param_dtype, logical_to_sharding(LOGICAL_AXES, mesh, rules))
  sampler = Sampler(cfg, params, mesh=mesh, rules=rules)
  B = batch_size + -batch_size % sampler.rows_multiple
  T = bucket_length(prompt_len)

  def rows(shape, dtype):  # as Sampler.start lays out host rows
    spec = PartitionSpec(*sampler.row_sharding.spec[:1], *[None] * (len(shape) - 1))
    return S(shape, dtype, sharding=NamedSharding(mesh, spec))

  prefill = Program(name="prefill", fn=sampler.prefill_fn,
                    args=(cfg, params, rows((B, T), jnp.int32), rows((B,), jnp.int32), S((), jnp.uint32),
                          rows((B,), jnp.uint32), sampling),
                    mesh=mesh, rules=sampler.rules)
  return SamplerPrograms(sampler=sampler, rows=B, bucket=T, prefill=prefill, decode_fn=sampler.decode_fn)


def tree_bytes(tree, per_chip: bool) -> int:
  """Bytes of a tree of sharded (abstract) arrays: in all, or on one chip."""
  return sum(math.prod(x.sharding.shard_shape(x.shape) if per_chip else x.shape)
             * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
