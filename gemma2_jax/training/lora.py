"""LoRA / QLoRA training (the `lora` config section; model/lora.py holds the adapters themselves).

The train state splits the model in two:
  - `TrainState.params` is the trainable tree only (adapters, and the embedding / norm deltas when
    those train), in model.param_dtype (fp32): the optimizer state (AdamW's moments) exists only for
    it, and a checkpoint holds it, its optimizer state, the data iterators and the resolved config,
    whose `init_from` and `lora` section are the pointer to the base.
  - the frozen base is not state: `load_base` reads it from `init_from` on every (re)start, in
    lora.base_dtype with its projections quantized (lora.quantize), laid out like the full model's
    params (Quantized codes and scales keep their weight's logical axes), and the step takes it beside
    the teacher (modes.LoraMode), never differentiated, never saved.
The eval step and the sampler (on-policy distillation) see the model through `Mode.model_params`; the
end of a run writes the merged weights as HF safetensors (`hf_step<N>`, the base's dtype) and the
adapter as a PEFT directory (`peft_step<N>`, see checkpoint/peft.py).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from gemma2_jax import checkpoint
from gemma2_jax.checkpoint import peft
from gemma2_jax.model import lora, quant
from gemma2_jax.model.quant import CONTRACTING
from gemma2_jax.model.transformer import LOGICAL_AXES, param_shapes
from gemma2_jax.parallel.sharding import logical_to_sharding
from gemma2_jax.training.experiment import ConfigError, Experiment

_DROPOUT = 0x4C6F5241  # folded into the step's key for the adapters' dropout ("LoRA")


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def base_shardings(exp: Experiment, mesh) -> dict:
  """The frozen base's shardings: the full model's, with Quantized nodes (codes and scales) where
  the projections are quantized."""
  return logical_to_sharding(lora.base_axes(exp.model, exp.lora), mesh, exp.rules)


def abstract_base(exp: Experiment, shardings) -> dict:
  """The frozen base as ShapeDtypeStructs carrying `shardings` (aot; the train program's argument)."""
  lc, dtype = exp.lora, jnp.dtype(exp.lora.base_dtype)

  def leaf(path, shape):
    node = shardings
    for k in path:
      node = node[k.key]
    name = path[-1].key
    if lc.quantize != "none" and name in CONTRACTING:
      return quant.abstract(shape, lc.quantize, lc.quant_block, CONTRACTING[name], node)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=node)

  return jax.tree_util.tree_map_with_path(leaf, param_shapes(exp.model), is_leaf=_is_shape)


def load_base(exp: Experiment, mesh) -> dict:
  """The frozen base from init_from on `mesh`, each process reading only its shards; quantized leaf
  by leaf (the full-precision leaf dropped once its codes exist), so the peak is the base in
  lora.base_dtype plus one quantized leaf."""
  plain = logical_to_sharding(LOGICAL_AXES, mesh, exp.rules)
  _, params = checkpoint.load_sharded(exp.init_from, exp.lora.base_dtype, plain, config=exp.model)
  if exp.lora.quantize == "none":
    return params
  return quant.quantize_tree(params, exp.lora.quantize, exp.lora.quant_block, base_shardings(exp, mesh))


def trainable_shardings(exp: Experiment, mesh) -> dict:
  return logical_to_sharding(lora.trainable_axes(exp.lora), mesh, exp.rules)


def abstract_trainable(exp: Experiment) -> dict:
  dtype = jnp.dtype(exp.model.param_dtype)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype),
                      lora.trainable_shapes(exp.model, exp.lora), is_leaf=_is_shape)


def init_trainable(exp: Experiment, shardings) -> dict:
  """A run's first trainable tree, created in its shards: fresh (A random from train.seed, B and
  deltas zero) or, with lora.init_adapter, the PEFT adapter's A and B (targets it lacks fresh)."""
  cfg, lc = exp.model, exp.lora
  fresh = jax.jit(lambda: lora.init_trainable(cfg, lc, jax.random.key(exp.train.seed), cfg.param_dtype),
                  out_shardings=shardings)()
  if not lc.init_adapter:
    return fresh
  adapter = peft.load_adapter(lc.init_adapter, cfg)
  check_adapter(exp, adapter)
  out = {**fresh, "adapters": dict(fresh["adapters"])}
  for name, ad in adapter.adapters.items():
    out["adapters"][name] = {k: _place(ad[k].astype(cfg.param_dtype), shardings["adapters"][name][k])
                             for k in ("a", "b")}
  return out


def check_adapter(exp: Experiment, adapter: peft.Adapter):
  """lora.init_adapter must be an adapter this run's adapters can continue: the same rank and
  scale, targets among the run's, no whole modules (those would need the base to become deltas)."""
  lc, where = exp.lora, f"lora.init_adapter {exp.lora.init_adapter}"
  if adapter.rank != lc.rank:
    raise ConfigError(f"{where} has r={adapter.rank}, the run lora.rank={lc.rank}: set "
                      f"lora.rank={adapter.rank}")
  if adapter.alpha != lc.alpha or adapter.rslora != lc.rslora:
    raise ConfigError(f"{where} has lora_alpha={adapter.alpha:g} use_rslora={adapter.rslora}, the run "
                      f"lora.alpha={lc.alpha:g} lora.rslora={lc.rslora}: set them to match")
  extra = sorted(set(adapter.adapters) - set(lc.target_names()))
  if extra:
    raise ConfigError(f"{where} adapts {lora.TARGETS[extra[0]].hf}, which lora.targets "
                      f"{list(lc.targets)} leaves out: add {extra[0]!r} to lora.targets")
  if adapter.modules:
    raise ConfigError(f"{where} saves whole modules (modules_to_save: "
                      f"{adapter.config.get('modules_to_save')}); "
                      "merge it into the base first (python -m gemma2_jax.convert --merge_lora) and "
                      "point init_from at the result")


def _place(x: np.ndarray, sharding) -> jax.Array:
  """A host array every process holds whole, as a global array on `sharding` (no cross-host check)."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def dropout_key(exp: Experiment, step):
  """The adapters' dropout key of a step: a function of (train.seed, step), so a resumed run drops
  the same units. Every micro-batch of a step uses it (their rows differ, their masks do not)."""
  key = jax.random.fold_in(jax.random.key(exp.train.seed), jnp.asarray(step, jnp.uint32))
  return jax.random.fold_in(key, _DROPOUT)


def check_resume(workdir, saved: dict, mine: dict):
  """A workdir's run (its config.json, `saved`) and this one must agree on what the checkpoints
  hold: both LoRA or neither, and the adapters' shapes and scale. The base's dtype, quantization and
  the dropout may change (they are not in the checkpoint); another init_from gets a note."""
  a, b = saved.get("lora"), mine.get("lora")
  if bool(a) != bool(b):
    raise checkpoint.CheckpointError(
      f"workdir {workdir} holds a {'LoRA' if a else 'full-parameter'} run, this config trains "
      f"{'LoRA adapters' if b else 'every parameter'}; use a new --workdir")
  if not a:
    return
  def resolved(section):  # targets as the projections they name ("all" == every one by name)
    return {**section, "targets": lora.LoraConfig(targets=section.get("targets", ("all",))).target_names()}

  theirs, ours = resolved(a), resolved(b)
  for key in ("rank", "targets", "alpha", "rslora", "train_embeddings", "train_norms"):
    if theirs.get(key) != ours.get(key):
      raise checkpoint.CheckpointError(
        f"workdir {workdir} holds adapters with lora.{key}={theirs.get(key)!r}, this config has "
        f"{ours.get(key)!r}; use a new --workdir (or the run's own lora settings)")
  if saved.get("init_from") != mine.get("init_from"):
    print(f"note: workdir {workdir} trained its adapters on init_from={saved.get('init_from')!r}; "
          f"this run loads the base from {mine.get('init_from')!r} (it must hold the same weights)",
          file=sys.stderr)


def _host(x: jax.Array) -> np.ndarray:
  """A (small) global array whole on this host; on several processes a collective (every process
  calls it in the same order)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  replicated = NamedSharding(x.sharding.mesh, PartitionSpec())
  return np.asarray(jax.jit(lambda v: v, out_shardings=replicated)(x).addressable_data(0))


class MergedSlices:
  """One leaf of the merged model (base + adapters + deltas, fp32), computed on the devices for the
  slice an exporter asks for (a layer's tensor) and copied to the host: the HF export of a LoRA run
  holds one tensor at a time, never a merged copy of the model. Every process makes the same
  requests (a collective), as for checkpoint.export's slices."""

  def __init__(self, lcfg, path: tuple[str, ...], base_leaf, trainable: dict, shape: tuple[int, ...],
               mesh):
    self.shape, self.dtype = shape, np.dtype(np.float32)
    self._args = (base_leaf, trainable)
    replicated = NamedSharding(mesh, PartitionSpec())

    def take(base_leaf, trainable, index):
      if index.shape[0] == 0:
        return lora.merged_leaf(lcfg, path, base_leaf, trainable)
      return lora.merged_leaf(lcfg, path, base_leaf, trainable, layer=index[0])[tuple(index[1:])]

    self._take = jax.jit(take, out_shardings=replicated)

  def __getitem__(self, index):
    index = index if isinstance(index, tuple) else (index,)
    out = self._take(*self._args, np.asarray(index, np.int32))
    return np.asarray(out.addressable_data(0))

  def __array__(self, dtype=None, copy=None):
    out = self[()]
    return out if dtype is None else out.astype(dtype)


def export(model_params: dict, exp: Experiment, workdir, steps: int, suffix: str = "") -> dict:
  """The end of a LoRA run: the adapter as PEFT (`peft_step<N><suffix>`; the embedding / norms that
  trained as modules_to_save, whole) and the merged weights as HF safetensors (`hf_step<N><suffix>`,
  in lora.base_dtype; suffix "_ema": the EMA's). A finished run re-run finds both written and writes
  nothing."""
  from jax.experimental import multihost_utils

  from gemma2_jax.checkpoint.export import export_hf
  from gemma2_jax.parallel import distributed
  from gemma2_jax.parallel.deadline import deadline

  cfg, lc = exp.model, exp.lora
  base, trainable = model_params["base"], model_params["trainable"]
  mesh = jax.tree.leaves(trainable)[0].sharding.mesh
  path = workdir / f"peft_step{steps}{suffix}"
  with deadline("checking the PEFT export", path):
    here = path.exists()
  if not bool(multihost_utils.broadcast_one_to_all(np.int32(here))):
    adapters = jax.tree.map(_host, trainable["adapters"])
    modules = {}
    for leaf_path in lora.delta_paths(lc):
      node = base
      for k in leaf_path:
        node = node[k]
      merge = jax.jit(lambda b, t, p=leaf_path: lora.merged_leaf(lc, p, b, t))
      modules[leaf_path] = _host(merge(node, trainable))
    if jax.process_index() == 0:
      with deadline("writing the PEFT export", path):
        peft.save_adapter(path, cfg, lc, adapters, modules, base=exp.init_from)
    distributed.barrier("export_peft", timeout_s=3600)
  shapes = param_shapes(cfg)
  changed = set(lora.delta_paths(lc)) | {("layers", *lora.TARGETS[n].leaf) for n in lc.target_names()}

  def leaf(path, value):  # a leaf nothing changes goes as it is (export_hf reads it slice by slice)
    if path in changed or quant.is_quantized(value):
      return MergedSlices(lc, path, value, trainable, lora.leaf_at(shapes, path), mesh)
    return value

  flat = jax.tree_util.tree_flatten_with_path(base, is_leaf=quant.is_quantized)[0]
  merged = lora.nest((p, leaf(p, value)) for p, value in ((tuple(k.key for k in kp), v) for kp, v in flat))
  hf_path = export_hf(merged, cfg.replace(param_dtype=lc.base_dtype), workdir / f"hf_step{steps}{suffix}")
  return {"hf_export": str(hf_path), "peft_export": str(path)}
