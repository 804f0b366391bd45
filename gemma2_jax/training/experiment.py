"""The experiment layer: an ml_collections config (from configs/*.py) -> typed, validated configs.

This is the only place that reads ConfigDicts; everything downstream takes frozen dataclasses.
Every problem is reported as one ConfigError line before anything is compiled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import types
import typing
from typing import Any, Literal, Union

from gemma2_jax.checkpoint.manager import CheckpointConfig
from gemma2_jax.data.config import DataConfig
from gemma2_jax.distill.config import DistillConfig, TeacherConfig
from gemma2_jax.errors import UserError
from gemma2_jax.model.config import ModelConfig
from gemma2_jax.model.lora import LoraConfig
from gemma2_jax.parallel.sharding import (
  DEFAULT_RULES,
  MESH_AXES,
  MeshError,
  check_batch,
  normalize_rules,
  resolve_mesh_shape,
)
from gemma2_jax.training.benchmark_hook import BenchmarksConfig
from gemma2_jax.training.optim import OptimizerConfig

TOP_LEVEL = ("model", "mesh", "sharding_rules", "optimizer", "train", "data", "init_from", "checkpoint",
             "teacher", "distill", "lora")


class ConfigError(UserError):
  pass


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  steps: int
  global_batch: int  # sequences per optimizer step, over all processes
  seq_len: int
  grad_accum_steps: int = 1  # micro-batches per step (each of global_batch / grad_accum_steps)
  seed: int = 0
  loss_chunk: int = 1024  # tokens per sequence chunk of the chunked loss
  z_loss: float = 0.0
  log_every: int = 10
  eval_every: int = 0  # 0 = only at the end (if data.eval is set)
  eval_batches: int = 8
  nonfinite: Literal["stop", "skip"] = "stop"
  profile_start: int = -1  # first step of a jax.profiler trace; -1 = off
  profile_steps: int = 3
  peak_tflops_per_device: float = 0.0  # 0 = look up the device kind (unknown kinds: no MFU)
  progress_bar: bool = True
  # An exponential moving average of the weights (a LoRA run: of its trainable tree), kept in the train
  # state and checkpointed: ema <- ema_decay * ema + (1 - ema_decay) * params after every step (optax /
  # Flax / timm convention; WARP's mu = 0.01 is ema_decay = 0.99). 0 = off. The decay ramps linearly
  # from 0 at step 0 to ema_decay at step ema_warmup_steps (0 = no ramp). The end of the run exports
  # it beside the weights (hf_step<N>_ema); eval_ema also evaluates it (eval_ema_loss, eval_ema/<set>/...).
  ema_decay: float = 0.0
  ema_warmup_steps: int = 0
  eval_ema: bool = False
  # Periodic lm-eval benchmarks on the training params (training/benchmark_hook.py); off by default.
  benchmarks: BenchmarksConfig = BenchmarksConfig()

  def __post_init__(self):
    for name in ("steps", "global_batch", "seq_len", "grad_accum_steps", "loss_chunk", "log_every",
                 "eval_batches", "profile_steps"):
      if getattr(self, name) < 1:
        raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
    if self.nonfinite not in ("stop", "skip"):
      raise ConfigError(f"train.nonfinite must be 'stop' or 'skip', got {self.nonfinite!r}")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ConfigError(f"train.ema_decay must be in [0, 1) (0 = off; WARP's mu 0.01 is 0.99), got "
                        f"{self.ema_decay}")
    if self.ema_warmup_steps < 0:
      raise ConfigError(f"train.ema_warmup_steps must be >= 0, got {self.ema_warmup_steps}")
    if self.eval_ema and not self.ema_decay:
      raise ConfigError("train.eval_ema needs an EMA to evaluate: set train.ema_decay > 0 (e.g. 0.99)")


@dataclasses.dataclass(frozen=True)
class Experiment:
  model: ModelConfig
  mesh: dict[str, int]
  rules: tuple
  optimizer: OptimizerConfig
  train: TrainConfig
  data_train: DataConfig
  # Eval sets by name: "" is a single unnamed set (logged as eval_loss, ...), others as
  # eval/<name>/loss, ...; all have the train data's rows (seq_len, global_batch).
  data_eval: dict[str, DataConfig]
  tokenizer: str
  init_from: str
  checkpoint: CheckpointConfig = CheckpointConfig()
  teacher: TeacherConfig | None = None  # online distillation
  distill: DistillConfig | None = None  # set for online (teacher) or offline (offline_paths) distillation
  offline_paths: str = ""  # teacher top-k records written by `python -m gemma2_jax.teacher_logits`
  # LoRA / QLoRA: the params in `model` are the frozen base (read from init_from at every start),
  # the train state holds only the adapters (training/lora.py).
  lora: LoraConfig | None = None

  @property
  def distill_mode(self) -> str:
    if self.distill is None:
      return "ce"
    return "offline" if self.offline_paths else "online"

  @property
  def anchored(self) -> bool:
    """Whether the student's EMA is a KL anchor of the objective (WARP; distill.anchor_kl_weight)."""
    return self.distill is not None and self.distill.anchor_kl_weight > 0

  def to_json_dict(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self), default=list))


def _type_ok(value, hint) -> bool:
  origin = typing.get_origin(hint)
  if origin in (Union, types.UnionType):
    return any(_type_ok(value, a) for a in typing.get_args(hint))
  if origin is Literal:
    return value in typing.get_args(hint)
  if hint is type(None):
    return value is None
  if hint is float:
    return isinstance(value, int | float) and not isinstance(value, bool)
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if hint in (str, bool):
    return isinstance(value, hint)
  return True  # containers: checked by the dataclass itself


def typed(cls, section: str, values: dict, **extra):
  """cls(**values) with unknown keys and wrong types reported as one line naming the key."""
  hints = typing.get_type_hints(cls)
  unknown = sorted(set(values) - set(hints))
  if unknown:
    raise ConfigError(f"unknown key {section}.{unknown[0]} (valid keys: {', '.join(sorted(hints))})")
  values = dict(values)
  for key, value in values.items():
    if dataclasses.is_dataclass(hints[key]) and (value is None or isinstance(value, dict)):
      values[key] = typed(hints[key], f"{section}.{key}", value or {})  # a nested section
    elif not _type_ok(value, hints[key]):
      raise ConfigError(f"{section}.{key} = {value!r} has type {type(value).__name__}, expected "
                        f"{hints[key]}")
  try:
    return cls(**values, **extra)
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{section}: {e}") from None


def _plain(x: Any):
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return type(x)(_plain(v) for v in x)
  return x


SOURCE_SHORTCUT = ("paths", "format", "text_field", "doc_per", "chat", "pack")


def _data_config(section: str, d: dict | None, shape: dict) -> DataConfig | None:
  """A data section; `paths` / `format` / `text_field` / `doc_per` / `chat` / `pack` are a one-source
  shortcut."""
  if not d:
    return None
  d = dict(d)
  shortcut = {k: d.pop(k) for k in SOURCE_SHORTCUT if k in d}
  if shortcut.get("paths"):
    paths = shortcut["paths"]
    shortcut["paths"] = paths.split(",") if isinstance(paths, str) else list(paths)
    d["sources"] = [shortcut]
  d["sources"] = [s for s in d.get("sources", []) if s.get("paths") or s.get("tfds_name")]
  if not d["sources"]:
    return None
  return typed(DataConfig, section, d, **shape)


def _eval_sets(d: dict | None, shape: dict) -> dict[str, DataConfig]:
  """`data.eval`: one data section (the set "") or a dict of named ones (`data.eval.<name>`)."""
  if not d:
    return {}
  if set(d) & (set(SOURCE_SHORTCUT) | {f.name for f in dataclasses.fields(DataConfig)}):
    one = _data_config("data.eval", d, shape)
    return {"": one} if one else {}
  sets = {}
  for name, section in d.items():
    if not isinstance(section, dict) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
      raise ConfigError(f"data.eval.{name}: data.eval is one data section (paths, sources, ...) or a "
                        "dict of them by name (letters, digits, _ . -), e.g. data.eval.ko.paths=...")
    one = _data_config(f"data.eval.{name}", section, shape)
    if one:
      sets[name] = one
  return sets


def eval_metric_name(set_name: str, metric: str, *, ema: bool = False) -> str:
  """The logged name of an eval set's metric (`metric` as `run_eval` returns it: eval_loss, ...);
  `ema`: of the EMA weights (train.eval_ema): eval_ema_loss, eval_ema/<set>/loss."""
  name = metric if not set_name else f"eval/{set_name}/{metric.removeprefix('eval_')}"
  return "eval_ema" + name.removeprefix("eval") if ema else name


def from_config(config, *, num_devices: int, num_slices: int = 1) -> Experiment:
  """The Experiment of `config` on `num_devices` devices in `num_slices` slices (`mesh.dcn` 0 or left
  out: one dcn group per slice; make_mesh checks it against the devices)."""
  c = _plain(config)
  unknown = sorted(set(c) - set(TOP_LEVEL))
  if unknown:
    raise ConfigError(f"unknown top-level config key {unknown[0]!r} (valid: {', '.join(TOP_LEVEL)})")
  missing = [k for k in ("model", "train", "data") if k not in c]
  if missing:
    raise ConfigError(f"config lacks the {missing[0]!r} section")
  model = typed(ModelConfig, "model", c["model"])
  train = typed(TrainConfig, "train", c["train"])
  optimizer = typed(OptimizerConfig, "optimizer", c.get("optimizer", {}))
  try:
    optimizer.check_param_dtype(model.param_dtype)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  ckpt = typed(CheckpointConfig, "checkpoint", c.get("checkpoint", {}))

  mesh_sizes = dict(c.get("mesh", {"fsdp": -1}))
  if not mesh_sizes.get("dcn"):
    mesh_sizes["dcn"] = num_slices
  bad_axes = sorted(set(mesh_sizes) - set(MESH_AXES))
  if bad_axes:
    raise ConfigError(f"unknown mesh axis {bad_axes[0]!r} (valid: {', '.join(MESH_AXES)})")
  try:
    mesh = resolve_mesh_shape(mesh_sizes, num_devices)
  except MeshError as e:
    raise ConfigError(str(e)) from None
  rules = normalize_rules(c.get("sharding_rules", DEFAULT_RULES))
  for name, axes in rules:
    for axis in (axes,) if isinstance(axes, str) else (axes or ()):
      if axis not in MESH_AXES:
        raise ConfigError(f"sharding rule {name!r} names unknown mesh axis {axis!r}")

  if train.global_batch % train.grad_accum_steps:
    raise ConfigError(f"train.global_batch={train.global_batch} is not divisible by "
                      f"train.grad_accum_steps={train.grad_accum_steps}")
  try:
    check_batch(train.global_batch // train.grad_accum_steps, mesh, rules,
                "the micro-batch (train.global_batch / train.grad_accum_steps)")
  except MeshError as e:
    raise ConfigError(str(e)) from None

  teacher, distill, offline_paths = _teacher_and_distill(c)

  data = c["data"]
  unknown = sorted(set(data) - {"tokenizer", "train", "eval"})
  if unknown:
    raise ConfigError(f"unknown key data.{unknown[0]} (valid keys: eval, tokenizer, train)")
  if not data.get("tokenizer"):
    raise ConfigError("data.tokenizer is not set: give the SentencePiece model path "
                      "(--config.data.tokenizer=/path/tokenizer.model)")
  shape = {"seq_len": train.seq_len, "global_batch": train.global_batch}
  data_train = _data_config("data.train", data.get("train"), shape)
  if data_train is None:
    raise ConfigError("data.train has no source: set data.train.paths (comma-separated globs) or "
                      "data.train.sources")
  data_eval = _eval_sets(data.get("eval"), shape)
  if distill is not None and distill.onpolicy_lambda > 0:
    _check_onpolicy(distill, teacher, data_train, train)
  if distill is not None and distill.anchor_kl_weight > 0:
    _check_anchor(teacher, train)
  init_from = str(c.get("init_from") or "")
  lora = _lora_config(c.get("lora"), model, init_from)
  return Experiment(model=model, mesh=mesh, rules=rules, optimizer=optimizer, train=train,
                    data_train=data_train, data_eval=data_eval, tokenizer=str(data["tokenizer"]),
                    init_from=init_from, checkpoint=ckpt, teacher=teacher,
                    distill=distill, offline_paths=offline_paths, lora=lora)


def _teacher_and_distill(c: dict) -> tuple[TeacherConfig | None, DistillConfig | None, str]:
  """(teacher, distill, offline_paths) of the config: online (a teacher checkpoint), offline (top-k
  records) or no distillation; a teacher alone is kept (e.g. for teacher_logits)."""
  if not c.get("distill"):
    if c.get("teacher") and c["teacher"].get("checkpoint"):
      return typed(TeacherConfig, "teacher", c["teacher"]), None, ""
    return None, None, ""
  d = dict(c["distill"])
  offline_paths = d.pop("offline_paths", "") or ""
  distill = typed(DistillConfig, "distill", d)
  teacher_cfg = c.get("teacher") or {}
  if teacher_cfg.get("checkpoint"):
    if offline_paths:
      raise ConfigError("set either teacher.checkpoint (online) or distill.offline_paths (offline "
                        "top-k records), not both")
    return typed(TeacherConfig, "teacher", teacher_cfg), distill, offline_paths
  if not offline_paths:
    raise ConfigError("distill is set but there is no teacher: set teacher.checkpoint (online) or "
                      "distill.offline_paths (records from python -m gemma2_jax.teacher_logits)")
  return None, distill, offline_paths


def _check_anchor(teacher, train: TrainConfig):
  """WARP's EMA KL anchor's requirements (distill.anchor_kl_weight > 0), each as one line."""
  if teacher is None:
    raise ConfigError("distill.anchor_kl_weight > 0 needs online distillation (teacher.checkpoint): "
                      "the EMA anchor's KL is taken beside the teacher's, inside the step")
  if not train.ema_decay:
    raise ConfigError("distill.anchor_kl_weight > 0 needs the student's EMA as its anchor: set "
                      "train.ema_decay > 0 (WARP: 0.99)")


def _lora_config(d: dict | None, model: ModelConfig, init_from: str) -> LoraConfig | None:
  """The `lora` section (absent or None: full training); its checks against the model."""
  if not d:
    return None
  lora = typed(LoraConfig, "lora", dict(d))
  if not init_from:
    raise ConfigError("lora is set but init_from is not: LoRA trains adapters on a frozen base model; "
                      "point init_from at it (an HF, Kaggle or native checkpoint, or a training workdir)")
  try:
    lora.check_model(model)
  except UserError as e:
    raise ConfigError(str(e)) from None
  return lora


def _check_onpolicy(distill: DistillConfig, teacher, data_train: DataConfig, train: TrainConfig):
  """On-policy distillation's requirements, each as one line saying what to set."""
  if teacher is None:
    raise ConfigError("distill.onpolicy_lambda > 0 needs an online teacher to score the student's "
                      "samples: set teacher.checkpoint (offline top-k records cannot)")
  if distill.alpha != 1.0 or distill.alpha_end is not None:
    raise ConfigError("distill.onpolicy_lambda > 0 needs distill.alpha = 1 (no hard-label CE: the "
                      "targets of a sampled response are the student's own tokens)")
  bad = [s for s in data_train.sources if not s.chat or s.pack]
  if bad:
    raise ConfigError(f"distill.onpolicy_lambda > 0 needs one conversation per row: data.train source "
                      f"{bad[0].label!r} must set chat=True and pack=False "
                      "(--config.data.train.chat=true --config.data.train.pack=false)")
  if distill.onpolicy_max_new_tokens >= train.seq_len:
    raise ConfigError(f"distill.onpolicy_max_new_tokens={distill.onpolicy_max_new_tokens} leaves no "
                      f"room for a prompt in train.seq_len={train.seq_len}: prompts get seq_len + 1 - "
                      "max_new_tokens slots")


def dataclass_defaults(cls, **kw) -> dict:
  """A config dataclass's defaults (fields without one only when given in kw) as a plain dict."""
  return {f.name: kw.get(f.name, f.default) for f in dataclasses.fields(cls)
          if f.default is not dataclasses.MISSING or f.name in kw}


def base_config(model: ModelConfig, **train):
  """A complete ConfigDict with every section at its defaults, for configs/*.py to adjust."""
  import ml_collections

  from gemma2_jax.data.config import SourceConfig

  data_defaults = dataclass_defaults(DataConfig, sources=[])
  for k in ("seq_len", "global_batch"):
    data_defaults.pop(k, None)
  source = dataclass_defaults(SourceConfig)
  source["paths"] = []
  data_defaults["sources"] = [source]
  data_defaults.update(paths="", format="auto", text_field="text", doc_per="line", chat=False,
                       pack=True)
  c = ml_collections.ConfigDict()
  c.model = model.to_dict()
  c.mesh = {"dcn": 0, "data": 1, "fsdp": -1, "tensor": 1}  # dcn 0: one per slice (TPU multislice)
  c.sharding_rules = [list(r) for r in DEFAULT_RULES]
  c.optimizer = dataclass_defaults(OptimizerConfig)
  c.train = {**dataclass_defaults(TrainConfig, **train), "benchmarks": ml_collections.ConfigDict(
    dataclass_defaults(BenchmarksConfig), type_safe=False)}
  c.data = ml_collections.ConfigDict({"tokenizer": "", "train": data_defaults, "eval": None},
                                     type_safe=False)
  c.init_from = ""
  c.checkpoint = dataclass_defaults(CheckpointConfig)
  return c


def set_corpus(c, *, tokenizer: str, train: str, fmt: str = "auto", eval: str = ""):
  """Points a config's data section at one train corpus (comma-separated globs) and an optional
  held-out eval corpus of the same format."""
  c.data.tokenizer = tokenizer
  c.data.train.paths = train
  c.data.train.format = fmt
  if eval:
    c.data.eval = dict(c.data.train)
    c.data.eval.paths = eval


def distill_config(student: ModelConfig, teacher_checkpoint: str = "", **train):
  """base_config plus the teacher and distill sections (online when teacher_checkpoint is set)."""
  import ml_collections

  c = base_config(student, **train)
  c.teacher = ml_collections.ConfigDict(
    dataclass_defaults(TeacherConfig), type_safe=False)
  c.teacher.checkpoint = teacher_checkpoint
  c.distill = ml_collections.ConfigDict(
    dataclass_defaults(DistillConfig), type_safe=False)
  c.distill.offline_paths = ""
  return c


def lora_config(model: ModelConfig, init_from: str, **train):
  """base_config plus the lora section at its defaults (rank 16, alpha 32, every projection)."""
  import ml_collections

  c = base_config(model, **train)
  c.init_from = init_from
  c.lora = ml_collections.ConfigDict(dataclass_defaults(LoraConfig), type_safe=False)
  c.lora.targets = list(c.lora.targets)
  return c


def load_config_file(path: str):
  """Runs `get_config()` of a configs/*.py file.

  Anything that fails while the file loads (a syntax error, an exception in get_config or in what it
  calls) is one ConfigError naming the file and the line of it that failed, not a traceback.
  """
  import importlib.util
  from pathlib import Path

  p = Path(path)
  if not p.is_file():
    raise ConfigError(f"config file {path} does not exist (see configs/ for the shipped ones)")
  spec = importlib.util.spec_from_file_location(f"gemma2_jax_config_{p.stem}", p)
  module = importlib.util.module_from_spec(spec)
  with _config_errors(path):
    spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} defines no get_config()")
  with _config_errors(path):
    return module.get_config()


@contextlib.contextmanager
def _config_errors(path: str):
  from pathlib import Path

  try:
    yield
  except SyntaxError as e:  # the file itself (or a module it imports) does not parse
    if e.filename and Path(e.filename).resolve() == Path(path).resolve():
      raise ConfigError(f"config file {path} line {e.lineno}: SyntaxError: {e.msg}") from None
    raise ConfigError(f"{_config_line(path, e)}: SyntaxError in {e.filename} line {e.lineno}: "
                      f"{e.msg}") from None
  except Exception as e:
    text = " ".join(str(e).split())[:300]
    what = text if isinstance(e, ConfigError) else type(e).__name__ + (f": {text}" if text else "")
    raise ConfigError(f"{_config_line(path, e)}: {what}") from None


def _config_line(path: str, e: BaseException) -> str:
  """`config file PATH line N`: the innermost line of the config file in e's traceback (the line to
  fix, also when the error itself is raised deeper, in a helper it calls)."""
  import traceback
  from pathlib import Path

  target = Path(path).resolve()
  line = None
  for frame in traceback.extract_tb(e.__traceback__):
    if frame.filename and Path(frame.filename).resolve() == target:
      line = frame.lineno
  return f"config file {path}" + (f" line {line}" if line is not None else "")


def _parse_value(key: str, text: str, current):
  import ast
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
  elif isinstance(current, int | float) or current is None:
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text if current is None else None
    if current is None or (isinstance(value, int | float) and not isinstance(value, bool) and (
        isinstance(current, float) or isinstance(value, int))):
      return float(value) if isinstance(current, float) else value
  elif isinstance(current, str):
    return text
  elif isinstance(current, list | tuple):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text.split(",")
    return list(value) if isinstance(value, list | tuple) else [value]
  raise ConfigError(f"--config.{key}={text}: cannot parse as {type(current).__name__}")


def apply_overrides(config, overrides: dict[str, str]):
  """`--config.a.b=v` overrides, parsed by the type of the value they replace."""
  import difflib

  for dotted, text in overrides.items():
    node, keys = config, dotted.split(".")
    for i, key in enumerate(keys):
      if not hasattr(node, "keys") or key not in node:
        options = list(node.keys()) if hasattr(node, "keys") else []
        hint = difflib.get_close_matches(key, options, n=1)
        where = ".".join(keys[:i]) or "the config"
        raise ConfigError(f"--config.{dotted}: {where} has no key {key!r}"
                          + (f" (did you mean {hint[0]!r}?)" if hint else ""))
      if i == len(keys) - 1:
        value = _parse_value(dotted, text, node[key])
        with node.ignore_type() if hasattr(node, "ignore_type") else contextlib.nullcontext():
          node[key] = value
      else:
        node = node[key]
  return config
