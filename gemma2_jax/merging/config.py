"""A mergekit-style merge YAML: its keys, the methods and their parameters, and how a parameter's
value is found for one tensor of one model (filters, per-layer gradients, precedence).

The keys mean what they mean in mergekit (https://github.com/arcee-ai/mergekit, read at 0.1.5), so a
mergekit config runs here unchanged as long as it uses what is listed in KEYS and METHODS. What
mergekit would silently ignore (a misspelt parameter, a per-layer parameter given under a model when
only the top level counts) is refused here, naming it: a typo must not produce a different model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

from gemma2_jax.errors import UserError
from gemma2_jax.model.config import float_dtype


class MergeError(UserError):
  pass


REQUIRED = object()  # a parameter without a default


@dataclasses.dataclass(frozen=True)
class Param:
  """`scope`: "shared" (one value per tensor, from the top-level `parameters`), "input" (one per
  model, the base included) or "non_base" (one per model other than the base)."""
  name: str
  kind: type  # float or bool
  scope: str
  default: Any = REQUIRED


@dataclasses.dataclass(frozen=True)
class Method:
  """A merge method's inputs (mergekit's InputContract) and parameters.

  `base`: "required", "optional" or "ignored" (an ignored base_model is merged as one more model).
  `sparsify` / `consensus`: the generalized task arithmetic family (TIES, DARE), else None.
  """
  name: str
  params: tuple[Param, ...]
  base: str = "ignored"
  min_inputs: int = 1
  max_inputs: int | None = None
  min_non_base: int | None = None
  max_non_base: int | None = None
  sparsify: str | None = None  # "magnitude" (TIES) or "random" (DARE)
  consensus: bool = False  # TIES' majority sign

  def param(self, name: str) -> Param | None:
    return next((p for p in self.params if p.name == name), None)


def _task_arithmetic(name, sparsify, consensus, normalize, rescale) -> Method:
  return Method(name, (
    Param("int8_mask", bool, "shared", False), Param("normalize", bool, "shared", normalize),
    Param("rescale", bool, "shared", rescale), Param("lambda", float, "shared", 1.0),
    Param("weight", float, "non_base"), Param("density", float, "non_base", 1.0),
  ), base="required", sparsify=sparsify, consensus=consensus)


METHODS = {m.name: m for m in (
  Method("linear", (Param("weight", float, "input"), Param("normalize", bool, "shared", True))),
  Method("slerp", (Param("t", float, "shared"),), base="required", min_inputs=2, max_inputs=2),
  Method("nuslerp", (Param("weight", float, "non_base"), Param("nuslerp_row_wise", bool, "shared", False),
                     Param("nuslerp_flatten", bool, "shared", True)),
         base="optional", min_non_base=2, max_non_base=2),
  Method("model_stock", (Param("filter_wise", bool, "shared", False),), base="required", min_inputs=3),
  _task_arithmetic("task_arithmetic", None, False, normalize=False, rescale=False),
  _task_arithmetic("ties", "magnitude", True, normalize=True, rescale=False),
  _task_arithmetic("dare_linear", "random", False, normalize=False, rescale=True),
  _task_arithmetic("dare_ties", "random", True, normalize=False, rescale=True),
)}

KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source")
# mergekit keys that select what this command does not do: named in the error rather than "unknown".
UNSUPPORTED = {
  "slices": "layer slices (frankenmerges) are not supported: list whole models under models",
  "modules": "modules are not supported: list whole models under models",
  "tokenizer": "a tokenizer block (vocabulary surgery) is not supported: the models must share one "
               "vocabulary; use tokenizer_source to say whose tokenizer files to copy",
  "chat_template": "chat_template is not supported: edit the copied tokenizer_config.json",
}


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  path: str
  params: dict


@dataclasses.dataclass(frozen=True)
class MergeConfig:
  """A parsed merge YAML. `inputs` are the models in mergekit's order: `models` as listed, then the
  base model if it is not among them; `base` indexes it (None without a base_model)."""
  method: Method
  inputs: tuple[ModelEntry, ...]
  base: int | None
  params: dict
  dtype: str | None
  out_dtype: str | None
  tokenizer_source: str | None
  text: str = ""  # the YAML as given, copied next to the merged weights
  source: str = "<merge config>"


def same_path(a: str, b: str) -> bool:
  return _norm(a) == _norm(b)


def _norm(path: str) -> str:
  return path if "://" in path else os.path.normpath(os.path.abspath(os.path.expanduser(path)))


def load_config(path: str | os.PathLike) -> MergeConfig:
  """Reads and checks a merge YAML (structure, method, parameters' names and types); the models are
  opened later."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    raise MergeError(f"merge config {path} does not exist") from None
  except (IsADirectoryError, UnicodeDecodeError) as e:
    raise MergeError(f"merge config {path} cannot be read as text ({e})") from None
  return parse_config(text, source=str(path))


def parse_config(text: str, source: str = "<merge config>") -> MergeConfig:
  import yaml

  try:
    d = yaml.safe_load(text)
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
    what = getattr(e, "problem", None) or str(e)
    raise MergeError(f"{source}:{where}: not valid YAML ({what})") from None
  if not isinstance(d, dict):
    raise MergeError(f"{source}: expected a mapping of keys (merge_method, models, ...), got "
                     f"{type(d).__name__}")
  for key in d:
    if key in UNSUPPORTED:
      raise MergeError(f"{source}: {key}: {UNSUPPORTED[key]}")
    if key not in KEYS:
      raise MergeError(f"{source}: unknown key {key!r}; the keys are {', '.join(KEYS)}")
  name = d.get("merge_method")
  if name is None:
    raise MergeError(f"{source}: merge_method is missing; one of {', '.join(METHODS)}")
  if name not in METHODS:
    raise MergeError(f"{source}: unknown merge_method {name!r}; one of {', '.join(METHODS)}")
  method = METHODS[name]
  base = d.get("base_model")
  if base is not None and not isinstance(base, str):
    raise MergeError(f"{source}: base_model must be a path, got {base!r}")
  models = d.get("models")
  if not isinstance(models, list) or not models:
    raise MergeError(f"{source}: models must be a non-empty list of `- model: PATH` entries")
  entries = []
  for i, m in enumerate(models):
    if isinstance(m, str):
      m = {"model": m}
    if not isinstance(m, dict) or not isinstance(m.get("model"), str):
      raise MergeError(f"{source}: models[{i}] must be a mapping with `model: PATH`, got {m!r}")
    extra = sorted(set(m) - {"model", "parameters"})
    if extra:
      raise MergeError(f"{source}: models[{i}] has unknown key {extra[0]!r} (model, parameters)")
    params = m.get("parameters") or {}
    _check_params(method, params, f"{source}: models[{i}] ({m['model']}) parameters", per_model=True)
    entries.append(ModelEntry(m["model"], params))
  params = d.get("parameters") or {}
  _check_params(method, params, f"{source}: parameters", per_model=False)
  base_index = None
  if base is not None:
    base_index = next((i for i, e in enumerate(entries) if same_path(e.path, base)), None)
    if base_index is None:  # mergekit adds the base model, without parameters, after the others
      entries.append(ModelEntry(base, {}))
      base_index = len(entries) - 1
  for i, a in enumerate(entries):
    for b in entries[:i]:
      if same_path(a.path, b.path):
        raise MergeError(f"{source}: model {a.path} is listed twice")
  cfg = MergeConfig(method, tuple(entries), base_index, params,
                    _dtype(d, "dtype", source), _dtype(d, "out_dtype", source),
                    d.get("tokenizer_source"), text, source)
  _check_inputs(cfg)
  tok = cfg.tokenizer_source
  if tok is not None and not isinstance(tok, str):
    raise MergeError(f"{source}: tokenizer_source must be base or a model path, got {tok!r}")
  if tok == "union":
    raise MergeError(f"{source}: tokenizer_source: union (a merged vocabulary) is not supported: the "
                     "models must share one vocabulary; use base or a model path")
  if tok == "base" and base is None:
    raise MergeError(f"{source}: tokenizer_source: base needs a base_model")
  return cfg


def _dtype(d: dict, key: str, source: str) -> str | None:
  if d.get(key) is None:
    return None
  try:
    return float_dtype(d[key])
  except UserError as e:
    raise MergeError(f"{source}: {key}: {e}") from None


def _check_inputs(cfg: MergeConfig):
  """mergekit's InputContract: a base where the method needs one, and the number of models."""
  m, where = cfg.method, f"{cfg.source}: merge_method {cfg.method.name}"
  has_base = cfg.base is not None and m.base != "ignored"
  if m.base == "required" and not has_base:
    raise MergeError(f"{where} needs a base_model")
  n = len(cfg.inputs)
  non_base = n - int(has_base)
  for what, count, lo, hi in (("models (base included)", n, m.min_inputs, m.max_inputs),
                              ("models besides the base", non_base, m.min_non_base, m.max_non_base)):
    if lo is not None and count < lo or hi is not None and count > hi:
      want = f"exactly {lo}" if lo == hi else f"at least {lo}" if count < (lo or 0) else f"at most {hi}"
      raise MergeError(f"{where} takes {want} {what}; the config gives {count}")


def _check_params(method: Method, params, where: str, per_model: bool):
  if not isinstance(params, dict):
    raise MergeError(f"{where}: expected a mapping of parameter names to values, got {params!r}")
  for name, setting in params.items():
    p = method.param(name)
    if p is None:
      names = ", ".join(q.name for q in method.params)
      raise MergeError(f"{where}: {name!r} is not a parameter of merge_method {method.name} ({names})")
    if per_model and p.scope == "shared":
      raise MergeError(f"{where}: {name} is one value for all models: set it under the top-level "
                       "parameters")
    _check_setting(p, setting, f"{where}: {name}")


def _check_setting(p: Param, setting, where: str):
  """The shapes mergekit takes: a scalar, a list of scalars (a gradient over the layers), or one or
  a list of {value, filter} conditions. Each scalar is validated here, before any model is read."""
  if isinstance(setting, dict):
    setting = [setting]
  if isinstance(setting, list):
    if all(isinstance(s, dict) for s in setting):
      for s in setting:
        extra = sorted(set(s) - {"value", "filter"})
        if extra or "value" not in s:
          raise MergeError(f"{where}: a condition is {{value: ..., filter: ...}}, got {s!r}")
        if s.get("filter") is not None and not isinstance(s["filter"], str):
          raise MergeError(f"{where}: filter must be a string (part of a tensor name), got "
                           f"{s['filter']!r}")
        if isinstance(s["value"], (dict, list)) and not _scalars(s["value"]):
          raise MergeError(f"{where}: a condition's value is a scalar or a list of scalars")
        _check_setting(p, s["value"], where)
      return
    if not _scalars(setting):
      raise MergeError(f"{where}: a list must hold only scalars (a gradient) or only {{value, filter}} "
                       f"conditions, got {setting!r}")
    for s in setting:
      validate(p, s, where)
    return
  validate(p, setting, where)


def _scalars(values) -> bool:
  return isinstance(values, list) and all(isinstance(v, (bool, int, float, str)) for v in values)


_TRUE, _FALSE = ("true", "yes", "on", "1", "y", "t"), ("false", "no", "off", "0", "n", "f")


def validate(p: Param, value, where: str = ""):
  """`value` as the parameter's type, as pydantic's lax mode reads it in mergekit (a YAML string
  "1e-3" is a float; 0 / 1 / "yes" are booleans)."""
  if p.kind is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, int) and value in (0, 1):
      return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
      return value.strip().lower() in _TRUE
    raise MergeError(f"{where or p.name}: expected true or false, got {value!r}")
  if isinstance(value, bool):
    raise MergeError(f"{where or p.name}: expected a number, got {value!r}")
  if isinstance(value, str):
    try:
      value = float(value.strip())
    except ValueError:
      raise MergeError(f"{where or p.name}: expected a number, got {value!r}") from None
  if not isinstance(value, (int, float)) or not math.isfinite(value):
    raise MergeError(f"{where or p.name}: expected a finite number, got {value!r}")
  return float(value)


def evaluate(p: Param, setting, tensor: str, t: float):
  """One setting's value for `tensor` at layer position `t` in [0, 1] (mergekit's evaluate_setting):
  a list of numbers is a gradient, piecewise linear over evenly spaced points; a list of booleans
  picks the point at or below t; conditions are tried in order and the first whose filter is absent,
  "*" or a substring of the tensor's name decides (None: it gives no value here)."""
  if isinstance(setting, dict):
    setting = [setting]
  if not isinstance(setting, list):
    return validate(p, setting)
  if not setting:
    return None
  if _scalars(setting):
    values = [validate(p, v) for v in setting]
    if p.kind is bool:
      return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return validate(p, (1 - frac) * values[i0] + frac * values[i1])
  for cond in setting:
    f = cond.get("filter")
    if f is None or f == "*" or (tensor and f in tensor):
      return evaluate(p, cond["value"], tensor, t)
  return None


def resolve(cfg: MergeConfig, tensor: str, t: float) -> tuple[dict, list[dict]]:
  """(shared parameters, per-input parameters) for one tensor: a model's own setting first, then the
  top-level one, then the default (mergekit's resolve_parameters; the base gets only "input"-scoped
  parameters). A required parameter found nowhere is an error naming the model and tensor."""
  m = cfg.method

  def find(p: Param, scopes, who: str):
    for scope in scopes:
      if p.name in scope:
        value = evaluate(p, scope[p.name], tensor, t)
        if value is not None:
          return value
    if p.default is REQUIRED:
      raise MergeError(f"{cfg.source}: merge_method {m.name} needs parameter {p.name}{who} (tensor "
                       f"{tensor}): set it under that model's parameters or the top-level parameters")
    return p.default

  shared = {p.name: find(p, [cfg.params], "") for p in m.params if p.scope == "shared"}
  per_input = []
  for i, entry in enumerate(cfg.inputs):
    is_base = i == cfg.base and m.base != "ignored"
    per_input.append({p.name: find(p, [entry.params, cfg.params], f" for model {entry.path}")
                      for p in m.params if p.scope == "input" or p.scope == "non_base" and not is_base})
  return shared, per_input


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_position(tensor: str, num_layers: int) -> float:
  """mergekit's t of a tensor: i / (L - 1) in layer i, 0 for the embedding and the final norm."""
  match = _LAYER.search(tensor)
  if not match:
    return 0.0
  return int(match.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0
