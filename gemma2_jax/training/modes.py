"""Training modes: cross-entropy, online distillation (on-policy is its sampling option) and offline
distillation from stored teacher top-k. A mode is everything a step needs that differs between them:
its batch spec (`batch`), its data iterator (`train_iterator`), its extra inputs (`teacher_inputs`,
`load_teacher`: the frozen teacher), its loss (`objective`, whose sums METRIC_NAMES names; `anchor`:
the student's EMA when distill.anchor_kl_weight > 0) and, for on-policy distillation, the student's
`sampling` inside the step.

A new objective is one more subclass here; the program builder (training/programs.py), the loop and
`aot` take it as they are. `LoraMode` wraps any of them for a LoRA / QLoRA student.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from gemma2_jax import checkpoint
from gemma2_jax.distill import onpolicy
from gemma2_jax.distill.config import distill_schedule
from gemma2_jax.distill.teacher import load_teacher, teacher_runtime_config, teacher_shardings
from gemma2_jax.inference.sampler import SamplingConfig
from gemma2_jax.model.config import ModelConfig, get_preset
from gemma2_jax.model.lora import effective_params, merged_params
from gemma2_jax.model.losses import cross_entropy_sums, distill_sums, topk_distill_sums
from gemma2_jax.model.transformer import forward_hidden, param_shapes
from gemma2_jax.parallel.sharding import DataGroup, batch_sharding
from gemma2_jax.training import lora
from gemma2_jax.training.experiment import ConfigError, Experiment

# The step's summed statistics -> the metric each is logged as (divided by the token weight). The one
# table of metric names: losses and the eval step name their sums, the trainer logs these.
METRIC_NAMES = {"nll": "ce", "kd": "kd", "teacher_nll": "teacher_ce", "kl": "kl_t1",
                "agree": "top1_agreement", "z_loss": "z_loss", "anchor_kl": "anchor_kl"}
# Per-step raw sums of on-policy steps (rows with a response, rows the student answered, tokens it
# wrote): the loop turns them into rates over each log window.
ONPOLICY_SUMS = ("rows", "gen_rows", "gen_tokens")
TOPK_DEFAULT = 128  # teacher_logits' default --topk


def loss_sums(model_cfg: ModelConfig, params: dict, batch: dict, *, chunk: int, z_loss: float):
  """The cross-entropy sums (nll, weight, correct, z_loss) of a batch under `params`."""
  hidden_BTD = forward_hidden(model_cfg, params, batch["tokens"], batch["positions"],
                              batch["segment_ids"])
  return cross_entropy_sums(model_cfg, params["embedder"]["input_embedding"], hidden_BTD,
                            batch["targets"], batch["loss_mask"], chunk_size=chunk, z_loss=z_loss)


@dataclasses.dataclass(frozen=True)
class Field:
  """One batch array: [B, T, *trailing] of `dtype`, its first axes laid out by `logical` names."""

  name: str
  dtype: Any
  trailing: tuple[int, ...] = ()

  def abstract(self, batch: int, length: int, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((batch, length, *self.trailing), jnp.dtype(self.dtype), sharding=sharding)


TEXT_FIELDS = (Field("tokens", np.int32), Field("targets", np.int32), Field("positions", np.int32),
               Field("segment_ids", np.int32), Field("loss_mask", np.float32))
EVAL_FIELDS = (*TEXT_FIELDS, Field("target_bytes", np.int32))


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """The typed batch of a program: which keys, their dtypes and shapes; rows over the batch axes."""

  fields: tuple[Field, ...]

  @property
  def keys(self) -> tuple[str, ...]:
    return tuple(f.name for f in self.fields)

  def abstract(self, batch: int, length: int, mesh, rules) -> dict:
    sharding = batch_sharding(mesh, rules)
    return {f.name: f.abstract(batch, length, sharding) for f in self.fields}

  def host(self, rows: dict) -> dict:
    """A host batch reduced to the spec's keys, in the spec's dtypes (the program's exact inputs)."""
    return {f.name: np.asarray(rows[f.name], f.dtype) for f in self.fields}


TEXT_BATCH = BatchSpec(TEXT_FIELDS)
EVAL_BATCH = BatchSpec(EVAL_FIELDS)


class Mode:
  """Cross-entropy on the data's next tokens (pre-training, continued pre-training, SFT)."""

  name = "ce"
  teacher_cfg: ModelConfig | None = None
  sampling: SamplingConfig | None = None  # on-policy: the student's sampling inside the step

  def __init__(self, exp: Experiment):
    self.exp = exp

  @property
  def batch(self) -> BatchSpec:
    return TEXT_BATCH

  def train_iterator(self, group: DataGroup):
    from gemma2_jax.data.pipeline import make_train_iterator

    exp = self.exp
    return make_train_iterator(exp.data_train, process_index=group.index, process_count=group.count,
                               tokenizer_path=exp.tokenizer, vocab_size=exp.model.vocab_size,
                               num_real_tokens=exp.model.num_real_tokens)

  def teacher_inputs(self, mesh) -> tuple[Any, Any]:
    """(abstract teacher params with shardings, their shardings); None, None without a teacher."""
    return None, None

  def load_teacher(self, mesh):
    """The frozen teacher's params on `mesh` (None without one)."""
    return None

  def loading(self) -> tuple[str, str]:
    """(what load_teacher does, the path it reads): the storage deadline's words."""
    t = self.exp.teacher
    return "loading the teacher's weights", t.checkpoint if t else ""

  def objective(self, params, batch, teacher_params, step, anchor=None):
    """(scalar to differentiate, summed statistics) of one micro-batch. `anchor`: the EMA params the
    step passes when distill.anchor_kl_weight > 0 (only online distillation takes it)."""
    t = self.exp.train
    sums = loss_sums(self.exp.model, params, batch, chunk=t.loss_chunk, z_loss=t.z_loss)
    return sums["nll"] + sums.get("z_loss", 0.0), sums

  def model_params(self, params, inputs):
    """What the eval step and the export take, from the train state's params and the step's frozen
    inputs (`load_teacher`'s): the params themselves."""
    return params

  def sampling_params(self, params, inputs):
    """The student's params as the sampler takes them (on-policy distillation, inside the step)."""
    return params


class _Distill(Mode):
  """What online and offline distillation share: the schedule and the student's forward."""

  def _kd_kwargs(self, step) -> dict:
    d, t = self.exp.distill, self.exp.train
    alpha, temperature = distill_schedule(d, step)
    return dict(loss=d.loss, beta=d.beta, temperature=temperature, alpha=alpha,
                chunk_size=t.loss_chunk, z_loss=t.z_loss)

  def _student_hidden(self, params, batch):
    return forward_hidden(self.exp.model, params, batch["tokens"], batch["positions"],
                          batch["segment_ids"])


class OnlineKD(_Distill):
  """The frozen teacher's forward runs inside the step (under stop_gradient) on the same rows.

  On-policy (distill.onpolicy_lambda > 0, gemma2_jax/distill/onpolicy.py): the step may first replace
  each row's final model turn by the student's own sample, which ends at the tokenizer's stop tokens.
  """

  name = "online"

  def __init__(self, exp: Experiment, teacher_cfg: ModelConfig | None = None,
               stop_tokens: tuple[int, ...] | None = None):
    """`teacher_cfg`: the teacher's runtime config (default: read from exp.teacher, no weights).
    `stop_tokens`: where on-policy samples end (default: the tokenizer's `<eos>` and `<end_of_turn>`)."""
    super().__init__(exp)
    self.teacher_cfg = teacher_cfg or teacher_model_config(exp)
    if exp.distill.onpolicy_lambda:
      stop_tokens = stop_tokens or onpolicy.stop_tokens_for(exp.tokenizer)
      self.sampling = onpolicy.sampling_config(exp.distill, stop_tokens, exp.model.dtype)

  def teacher_inputs(self, mesh):
    shardings = teacher_shardings(self.exp.teacher, self.exp.rules, mesh)
    dtype = jnp.dtype(self.teacher_cfg.param_dtype)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, dtype, sharding=sh),
                            param_shapes(self.teacher_cfg), shardings,
                            is_leaf=lambda x: isinstance(x, tuple))
    return abstract, shardings

  def load_teacher(self, mesh):
    exp = self.exp
    return load_teacher(exp.teacher, self.teacher_cfg, exp.rules, mesh)

  def objective(self, params, batch, teacher_params, step, anchor=None):
    """With `anchor` (the student's EMA: WARP's KL anchor), `loss` also holds
    distill.anchor_kl_weight * KL(P_S || P_EMA) (distill/config.py)."""
    teacher_params = jax.lax.stop_gradient(teacher_params)
    teacher_hidden_BTD = forward_hidden(self.teacher_cfg, teacher_params, batch["tokens"],
                                        batch["positions"], batch["segment_ids"])
    anchor_kw = {}
    if anchor is not None:
      anchor = jax.lax.stop_gradient(anchor)
      anchor_kw = dict(anchor_embedding_VD=anchor["embedder"]["input_embedding"],
                       anchor_hidden_BTD=self._student_hidden(anchor, batch))
    sums = distill_sums(self.exp.model, params["embedder"]["input_embedding"],
                        self._student_hidden(params, batch), self.teacher_cfg,
                        teacher_params["embedder"]["input_embedding"], teacher_hidden_BTD,
                        batch["targets"], batch["loss_mask"], **self._kd_kwargs(step), **anchor_kw)
    if anchor is not None:
      sums["loss"] = sums["loss"] + self.exp.distill.anchor_kl_weight * sums["anchor_kl"]
    return sums["loss"] + sums.get("z_loss", 0.0), sums


class OfflineKD(_Distill):
  """Distillation from the teacher's top-k log-probs stored by `teacher_logits` (k from the records)."""

  name = "offline"

  def __init__(self, exp: Experiment, k: int | None = None):
    super().__init__(exp)
    self.k = records_k(exp.offline_paths, k)

  @property
  def batch(self) -> BatchSpec:
    return BatchSpec((*TEXT_FIELDS, Field("topk_logprobs", np.float32, (self.k,)),
                      Field("topk_ids", np.int32, (self.k,))))

  def train_iterator(self, group: DataGroup):
    from gemma2_jax.data.offline import make_offline_iterator

    d = self.exp.data_train
    return make_offline_iterator(self.exp.offline_paths, global_batch=d.global_batch, seq_len=d.seq_len,
                                 seed=d.seed, shuffle=d.shuffle, num_epochs=d.num_epochs, k=self.k,
                                 process_index=group.index, process_count=group.count)

  def objective(self, params, batch, teacher_params, step, anchor=None):
    sums = topk_distill_sums(self.exp.model, params["embedder"]["input_embedding"],
                             self._student_hidden(params, batch), batch["topk_logprobs"],
                             batch["topk_ids"], batch["targets"], batch["loss_mask"],
                             **self._kd_kwargs(step))
    return sums["loss"] + sums.get("z_loss", 0.0), sums


class LoraMode(Mode):
  """Any mode above with a LoRA student (training/lora.py): the train state's params are the
  trainable tree, the frozen base is loaded with the teacher and passed beside it to the step
  ({"base", "teacher"}), and the inner mode's objective runs on the base with the adapters in.
  The rest (batch, data, teacher, sampling, metric names) is the inner mode's."""

  def __init__(self, exp: Experiment, inner: Mode):
    super().__init__(exp)
    self.inner = inner
    self.name, self.teacher_cfg, self.sampling = inner.name, inner.teacher_cfg, inner.sampling

  @property
  def batch(self) -> BatchSpec:
    return self.inner.batch

  def train_iterator(self, group: DataGroup):
    return self.inner.train_iterator(group)

  def teacher_inputs(self, mesh):
    teacher, teacher_sh = self.inner.teacher_inputs(mesh)
    base_sh = lora.base_shardings(self.exp, mesh)
    return ({"base": lora.abstract_base(self.exp, base_sh), "teacher": teacher},
            {"base": base_sh, "teacher": teacher_sh})

  def load_teacher(self, mesh):
    return {"base": lora.load_base(self.exp, mesh), "teacher": self.inner.load_teacher(mesh)}

  def loading(self) -> tuple[str, str]:
    what, path = self.inner.loading()
    return ("loading the LoRA base (init_from)" + (f" and {what.removeprefix('loading ')}" if path else ""),
            ", ".join(p for p in (self.exp.init_from, path) if p))

  def objective(self, params, batch, inputs, step, anchor=None):
    exp = self.exp
    effective = effective_params(exp.model, exp.lora, inputs["base"], params, lora.dropout_key(exp, step))
    if anchor is not None:  # the EMA of the trainable tree, on the same base (no dropout)
      anchor = effective_params(exp.model, exp.lora, inputs["base"], anchor)
      return self.inner.objective(effective, batch, inputs["teacher"], step, anchor=anchor)
    return self.inner.objective(effective, batch, inputs["teacher"], step)

  def model_params(self, params, inputs):
    return {"base": inputs["base"], "trainable": params}

  def sampling_params(self, params, inputs):
    # A dense merged copy (the sampler's decode layout transposes every weight anyway).
    exp = self.exp
    return merged_params(exp.model, exp.lora, inputs["base"], params, exp.model.dtype)


def records_k(paths: str, k: int | None = None) -> int:
  """Top-k of the offline records at `paths`; `k` (aot: the records may not exist yet) when they are
  not readable here."""
  from gemma2_jax.data import DataError
  from gemma2_jax.data.offline import resolve_shards

  try:
    stored = resolve_shards(paths)[1]["k"]
  except (DataError, OSError):
    if k is None:
      raise
    return k
  if k is not None and k != stored:
    raise ConfigError(f"the teacher top-k records at {paths} keep k={stored}, not {k}")
  return stored


def teacher_model_config(exp: Experiment) -> ModelConfig:
  """The teacher's runtime config from its preset or its checkpoint's config file (no weights read).

  A preset gives shapes only: its vocab is the student's (one tokenizer on both sides).
  """
  t = exp.teacher
  cfg = (get_preset(t.preset).replace(vocab_size=exp.model.vocab_size) if t.preset
         else checkpoint.read_config(t.checkpoint))
  return teacher_runtime_config(t, exp.model, cfg)


def for_experiment(exp: Experiment, *, topk: int | None = None,
                   stop_tokens: tuple[int, ...] | None = None) -> Mode:
  """The mode an experiment trains in. `topk`: the offline records' k when they cannot be read;
  `stop_tokens`: on-policy samples' stop tokens when the tokenizer cannot be read."""
  if exp.distill_mode == "online":
    mode = OnlineKD(exp, stop_tokens=stop_tokens)
  elif exp.distill_mode == "offline":
    mode = OfflineKD(exp, topk)
  else:
    mode = Mode(exp)
  return mode if exp.lora is None else LoraMode(exp, mode)
