"""`python -m gemma2_jax.merge` against mergekit itself: the same YAML on the same small random HF
Gemma 2 checkpoints gives the same tensors (fp32, max |ours - mergekit| <= 1e-6 max |mergekit| per
tensor) for every deterministic method, read whole and in small row blocks; DARE's random drops match
mergekit's statistics; WARP's SLERP and LITI match a direct numpy implementation, near-collinear task
vectors included; bad input is one `error:` line and leaves nothing behind.

mergekit (pip install mergekit, the test extra) runs once, in one subprocess, for all its configs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from gemma2_jax.checkpoint.safetensors_io import SafetensorsReader
from gemma2_jax.merging import MergeError, liti, merge, merge_arrays, parse_config
from gemma2_jax.merging.config import METHODS, Param, evaluate
from gemma2_jax.model.config import tiny
from tests.cli import assert_one_error, cli

CFG = tiny(vocab_size=128, d_model=32, ffn_dim=48, num_heads=4, num_kv_heads=2, head_dim=8, num_layers=4)
HAS_MERGEKIT = importlib.util.find_spec("mergekit") is not None
NO_MERGEKIT = "mergekit is not installed (pip install -e '.[test]' installs it)"

# The same YAML for mergekit and for us; gradients, filters, per-model and top-level parameters.
CONFIGS = {
  "linear": """
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: [0.2, 1.0]}}
  - model: {b}
    parameters: {{weight: [{{filter: mlp, value: 0.7}}, {{value: 0.4}}]}}
  - model: {c}
    parameters: {{weight: 0.3}}
""",
  "task_arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: [0.2, 0.8]}}
  - model: {b}
    parameters: {{weight: 0.5}}
parameters: {{lambda: 0.9}}
""",
  "slerp": """
merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {a}
parameters:
  t: [{{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}}, {{filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}},
      {{value: 0.5}}]
""",
  "nuslerp": """
merge_method: nuslerp
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.3}}
  - model: {b}
    parameters: {{weight: [0.7, 0.2]}}
""",
  "nuslerp_row_wise": """
merge_method: nuslerp
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.3}}
  - model: {b}
    parameters: {{weight: 0.7}}
parameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}
""",
  "nuslerp_rows_no_base": """
merge_method: nuslerp
models:
  - model: {a}
    parameters: {{weight: 0.3}}
  - model: {b}
    parameters: {{weight: 0.7}}
parameters: {{nuslerp_flatten: false}}
""",
  "ties": """
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: [0.2, 0.8], density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5, density: [0.3, 0.9]}}
  - model: {c}
    parameters: {{weight: 0.4, density: 0.7}}
parameters: {{normalize: true}}
""",
  "ties_rescale": """
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.6, density: 0.4}}
  - model: {b}
    parameters: {{weight: 0.5, density: 0.6}}
parameters: {{rescale: true, normalize: false, lambda: 1.5}}
""",
  "model_stock": """
merge_method: model_stock
base_model: {base}
models:
  - model: {a}
  - model: {b}
  - model: {c}
""",
  "model_stock_filter_wise": """
merge_method: model_stock
base_model: {base}
models:
  - model: {a}
  - model: {b}
parameters: {{filter_wise: true}}
""",
  "dare_linear": """
merge_method: dare_linear
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 1.0, density: 0.3}}
""",
  "dare_ties": """
merge_method: dare_ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.4, density: 0.5}}
""",
}
DETERMINISTIC = [name for name in CONFIGS if not name.startswith("dare")]

MERGEKIT = """
import os, sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for config, out in zip(sys.argv[1::2], sys.argv[2::2]):
  with open(config) as f:
    merge_config = MergeConfiguration.model_validate(yaml.safe_load(f))
  run_merge(merge_config, out, MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True,
                                            random_seed=0,
                                            lora_merge_cache=os.environ.get("LORA_MERGE_CACHE")))
"""


def yaml_text(name: str, models: dict) -> str:
  return "dtype: float32\n" + CONFIGS[name].format(**{k: str(v) for k, v in models.items()})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """Three fine-tuned models and a base: random tiny HF Gemma 2 checkpoints (transformers)."""
  from tests.hf_utils import random_hf_model

  root = tmp_path_factory.mktemp("models")
  out = {}
  for seed, name in enumerate(("base", "a", "b", "c")):
    random_hf_model(CFG, seed=seed).save_pretrained(root / name)
    out[name] = root / name
  (root / "base" / "tokenizer.model").write_bytes(b"the base's tokenizer")  # copied to the merge
  return out


@pytest.fixture(scope="module")
def mergekit_out(models, tmp_path_factory):
  """mergekit's output directory for each config (fp32, CPU, --random-seed 0)."""
  if not HAS_MERGEKIT:
    pytest.skip(NO_MERGEKIT)
  root = tmp_path_factory.mktemp("mergekit")
  args, outs = [], {}
  for name in CONFIGS:
    (root / f"{name}.yml").write_text(yaml_text(name, models))
    outs[name] = root / name
    args += [root / f"{name}.yml", outs[name]]
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  proc = subprocess.run([sys.executable, "-c", MERGEKIT, *map(str, args)], capture_output=True,
                        text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return outs


def tensors(path) -> dict[str, np.ndarray]:
  return load_file(str(path / "model.safetensors"))


def ours(name, models, tmp_path, **kwargs):
  out = tmp_path / f"{name}-{kwargs.get('chunk_elements', 'whole')}"
  merge(parse_config(yaml_text(name, models)), out, **kwargs)
  return tensors(out)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_matches_mergekit(name, models, mergekit_out, tmp_path):
  theirs = tensors(mergekit_out[name])
  # Whole tensors, and rows 3 at a time (every statistic gathered over several blocks).
  for got in (ours(name, models, tmp_path), ours(name, models, tmp_path, chunk_elements=96)):
    assert sorted(got) == sorted(theirs)
    for key, want in theirs.items():
      assert got[key].dtype == want.dtype == np.float32 and got[key].shape == want.shape, key
      err = float(np.abs(got[key] - want).max() / np.abs(want).max())
      assert err <= 1e-6, f"{name} {key}: max |ours - mergekit| = {err:.2e} x max |mergekit|"


def test_dare_statistics_match_mergekit(models, mergekit_out, tmp_path):
  """DARE keeps each delta with probability `density` and rescales the kept ones to the tensor's L1
  norm (mergekit's rescale), ours with our own seed: the same statistics, not the same draws."""
  base, a = tensors(models["base"]), tensors(models["a"])
  density, n = 0.3, sum(x.size for x in base.values())
  for source in (ours("dare_linear", models, tmp_path), tensors(mergekit_out["dare_linear"])):
    kept = 0
    for key, out in source.items():
      d, o = a[key] - base[key], out - base[key]
      mask = o != 0  # a dropped delta leaves the base exactly
      kept += int(mask.sum())
      ratio = np.abs(d).sum(dtype=np.float64) / np.abs(d[mask]).sum(dtype=np.float64)
      np.testing.assert_allclose(o, ratio * d * mask, atol=2e-6 * np.abs(base[key]).max(), err_msg=key)
    assert abs(kept / n - density) < 5 * math.sqrt(density * (1 - density) / n), kept / n
  # dare_ties: the fraction of weights the merge moves (kept and in the majority's sign) agrees.
  moved = [sum(int((out != base[k]).sum()) for k, out in src.items()) / n
           for src in (ours("dare_ties", models, tmp_path), tensors(mergekit_out["dare_ties"]))]
  assert abs(moved[0] - moved[1]) < 5 * math.sqrt(2 * 0.25 / n), moved
  again = ours("dare_ties", models, tmp_path / "again")
  other = ours("dare_ties", models, tmp_path / "seed1", seed=1)
  first = ours("dare_ties", models, tmp_path / "first")
  assert all(np.array_equal(first[k], again[k]) for k in first)
  assert not all(np.array_equal(first[k], other[k]) for k in first)


def warp_slerp(init, t1, t2, lam):
  """WARP (Rame et al. 2024), in float64: init + sin((1-lam) Omega)/sin(Omega) delta_1
  + sin(lam Omega)/sin(Omega) delta_2, Omega the angle between the task vectors (its limit at 0)."""
  d1, d2 = (np.asarray(t, np.float64) - init for t in (t1, t2))
  cos = np.clip(d1.ravel() @ d2.ravel() / (np.linalg.norm(d1) * np.linalg.norm(d2)), -1, 1)
  omega = math.acos(cos)
  if omega < 1e-12:
    return init + (1 - lam) * d1 + lam * d2
  s = math.sin(omega)
  return init + math.sin((1 - lam) * omega) / s * d1 + math.sin(lam * omega) / s * d2


@pytest.mark.parametrize("eps", [1.0, 1e-2, 1e-4, 1e-6, 0.0])
def test_warp_slerp_and_liti_against_numpy(eps):
  """nuslerp with a base is WARP's SLERP of task vectors with lambda = w_2 / (w_1 + w_2), down to
  collinear task vectors (eps -> 0: the linear interpolation of the deltas); LITI is (1 - eta) init
  + eta merged."""
  rng = np.random.default_rng(0)
  init = rng.standard_normal((40, 24)).astype(np.float32)
  d1 = rng.standard_normal((40, 24)).astype(np.float32) * np.float32(0.1)
  d2 = np.float32(1.7) * d1 + np.float32(0.1 * eps) * rng.standard_normal((40, 24)).astype(np.float32)
  models = [init + d1, init + d2, init]
  for lam in (0.0, 0.3, 0.5, 1.0):
    got = merge_arrays(METHODS["nuslerp"], models, 2, {"nuslerp_flatten": True, "nuslerp_row_wise": False},
                       [{"weight": 1 - lam}, {"weight": lam}, {}], chunk_elements=100)
    want = warp_slerp(init.astype(np.float64), *(m.astype(np.float64) for m in models[:2]), lam)
    scale = np.abs(want - init).max()
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max() + 1e-5 * scale, (lam, eps)
    if eps == 0:  # collinear: exactly the linear interpolation of the task vectors
      np.testing.assert_allclose(got, init + np.float32(1 - lam) * d1 + np.float32(lam) * d2,
                                 atol=1e-6 * np.abs(want).max())
  merged = models[0]
  for eta in (0.0, 0.25, 1.0, 1.5):
    np.testing.assert_allclose(liti(init, merged, eta), (1 - eta) * init.astype(np.float64) + eta * merged,
                               atol=1e-6 * np.abs(merged).max())
  assert np.array_equal(liti(init, merged, 0.0), init) and np.array_equal(liti(init, merged, 1.0), merged)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "slerp", "nuslerp",
                                    "model_stock"])
def test_blocks_do_not_change_the_result(method):
  """Streaming in row blocks (two passes where a whole-tensor statistic is needed) gives exactly the
  result of the whole tensor, TIES' cut-off among tied magnitudes and DARE's masks included."""
  rng = np.random.default_rng(1)
  shape = (37, 11)
  base = rng.standard_normal(shape).astype(np.float32)
  # Deltas on a coarse grid, none zero: many equal magnitudes at TIES' cut-off.
  xs = [base + (np.round(rng.standard_normal(shape) * 4) + 0.5).astype(np.float32) / 8 for _ in range(3)]
  m = METHODS[method]
  shared = {p.name: p.default for p in m.params if p.scope == "shared"}
  shared.update({"t": 0.35} if method == "slerp" else {})
  arrays, base_i = ([xs[0], xs[1]], 1) if method in ("slerp", "nuslerp") else (xs + [base], 3)
  if method == "nuslerp":
    arrays, base_i = xs[:2] + [base], 2
  per = [{"weight": 0.2 + 0.3 * i, "density": 0.45} for i in range(len(arrays))]
  whole = merge_arrays(m, arrays, None if method == "linear" else base_i, shared, per, seed=3)
  for chunk in (11, 5 * 11, 23):
    got = merge_arrays(m, arrays, None if method == "linear" else base_i, shared, per, seed=3,
                       chunk_elements=chunk)
    assert np.array_equal(got, whole), (method, chunk)
  if method == "ties":  # k = int(density * numel) deltas kept per model, ties included
    single = merge_arrays(m, [xs[0], base], 1, {**shared, "normalize": False},
                          [{"weight": 1.0, "density": 0.45}, {}], chunk_elements=22)
    assert int((single != base).sum()) == int(0.45 * base.size)


def test_parameter_settings_follow_mergekit():
  """A list is a gradient over layers (t = i / (L-1)), piecewise linear; booleans pick a point;
  conditions apply in order, by substring of the HF tensor name."""
  w, flag = Param("weight", float, "input"), Param("normalize", bool, "shared", True)
  assert evaluate(w, [0.0, 1.0], "model.layers.1.mlp.up_proj.weight", 0.5) == 0.5
  assert evaluate(w, [0.0, 1.0, 0.5], "x", 0.75) == pytest.approx(0.75)
  assert evaluate(w, "1e-3", "x", 0) == 0.001
  assert evaluate(flag, [True, False], "x", 0.9) is True and evaluate(flag, [True, False], "x", 1.0) is False
  cond = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}]
  assert evaluate(w, cond, "model.layers.3.mlp.down_proj.weight", 1.0) == 1.0
  assert evaluate(w, cond, "model.norm.weight", 0.0) is None  # falls through to the next scope


@pytest.mark.parametrize("text, fragment", [
  ("merge_method: ties\nmodels: [{model: a}]\n", "ties needs a base_model"),
  ("merge_method: linear\nmodels: [{model: a, parameters: {wieght: 1}}]\n", "'wieght' is not a parameter"),
  ("merge_method: slerp\nbase_model: b\nmodels: [{model: a, parameters: {t: 0.5}}]\n",
   "t is one value for all models"),
  ("merge_method: slerp\nbase_model: b\nmodels: [{model: a}, {model: c}]\nparameters: {t: 0.5}\n",
   "takes exactly 2 models"),
  ("merge_method: linear\nmodels: [{model: a}]\nslices: []\n", "slices"),
  ("merge_method: linear\nmodels: [{model: a}]\ntokenizer_source: union\n", "union"),
  ("merge_method: linear\nmodels: [{model: a, parameters: {weight: yes}}]\n", "expected a number"),
  ("merge_method: linear\nmodels: [{model: a}, {model: ./a}]\n", "listed twice"),
])
def test_config_errors_name_the_problem(text, fragment):
  with pytest.raises(MergeError, match=None) as e:
    parse_config(text)
  assert fragment in str(e.value)


def test_other_formats_and_refusals(models, tmp_path):
  """A native base, a native output; models of another architecture or vocabulary refused by field; a
  failure midway leaves nothing at --output."""
  from gemma2_jax.checkpoint import load_params
  from gemma2_jax.checkpoint.convert import convert
  from tests.hf_utils import random_hf_model

  convert(models["base"], tmp_path / "base_native", "native")
  want = ours("ties", models, tmp_path)
  out = tmp_path / "native_out"
  merge(parse_config(yaml_text("ties", {**models, "base": tmp_path / "base_native"})), out, to="native",
        chunk_elements=64)
  _, params = load_params(out)
  convert(out, tmp_path / "native_out_hf", "hf")
  got = tensors(tmp_path / "native_out_hf")
  assert params["layers"]["attn"]["q_einsum"].shape[0] == CFG.num_layers
  assert all(np.array_equal(got[k], want[k]) for k in want)
  # Orbax's default, compressed chunks (a training workdir's): restored one stored array at a time.
  import orbax.checkpoint as ocp

  from gemma2_jax.merging.sources import open_source

  zstd = tmp_path / "base_zstd"
  zstd.mkdir()
  (zstd / "gemma2_jax.json").write_text((tmp_path / "base_native" / "gemma2_jax.json").read_text())
  ocp.PyTreeCheckpointer().save((zstd / "params").absolute(), load_params(tmp_path / "base_native")[1])
  assert open_source(zstd).arrays.metadata("layers.attn.q_einsum") is None
  assert open_source(tmp_path / "base_native").arrays.metadata("layers.attn.q_einsum") is not None
  merge(parse_config(yaml_text("ties", {**models, "base": zstd})), tmp_path / "from_zstd", chunk_elements=64)
  got = tensors(tmp_path / "from_zstd")
  assert all(np.array_equal(got[k], want[k]) for k in want)
  # Shards past max_shard_bytes, with HF's index.
  merge(parse_config(yaml_text("ties", models)), tmp_path / "sharded", max_shard_bytes=20_000)
  reader = SafetensorsReader(tmp_path / "sharded")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  assert all(np.array_equal(reader.get(k), want[k]) for k in want)
  for field, cfg in (("sliding_window", CFG.replace(sliding_window=4)),
                     ("vocab_size", CFG.replace(vocab_size=96))):
    random_hf_model(cfg, seed=9).save_pretrained(tmp_path / field)
    with pytest.raises(MergeError, match=f"has {field}="):
      merge(parse_config(yaml_text("ties", {**models, "c": tmp_path / field})), tmp_path / f"out_{field}")
    assert not (tmp_path / f"out_{field}").exists()

  from gemma2_jax.merging import sources
  calls = []

  def failing(self, name, r0, r1):
    calls.append(name)
    if len(calls) > 20:
      raise OSError(28, "No space left on device")
    return real(self, name, r0, r1)

  real = sources.HFSource._read
  sources.HFSource._read = failing
  try:
    with pytest.raises(OSError):
      merge(parse_config(yaml_text("ties", models)), tmp_path / "failed")
  finally:
    sources.HFSource._read = real
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".failed", "failed"))) == []


def test_cli_liti(models, tmp_path):
  """--liti writes (1 - eta) base + eta merge for each eta, the merge itself at eta 1."""
  (tmp_path / "m.yml").write_text(yaml_text("task_arithmetic", models))
  proc = cli("merge", "--config", tmp_path / "m.yml", "--output", tmp_path / "out", "--liti", "0,0.5,1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("wrote hf checkpoint") == 3
  merged = ours("task_arithmetic", models, tmp_path)
  base = tensors(models["base"])
  for eta in (0, 0.5, 1):
    got = tensors(tmp_path / "out" / f"eta_{eta:g}")
    for k, m in merged.items():
      np.testing.assert_array_equal(got[k], np.float32(1 - eta) * base[k] + np.float32(eta) * m)
  assert "LITI eta=0.5" in (tmp_path / "out" / "eta_0.5" / "merge.yaml").read_text()
  assert (tmp_path / "out" / "eta_0" / "tokenizer.model").read_bytes() == b"the base's tokenizer"
  hf_config = json.loads((tmp_path / "out" / "eta_1" / "config.json").read_text())
  assert hf_config["num_hidden_layers"] == CFG.num_layers and hf_config["dtype"] == "float32"


@pytest.mark.parametrize("case", ["missing_model", "unknown_method", "bad_yaml"])
def test_cli_bad_input(case, models, tmp_path, capsys):
  """One `error:` line, exit 1, nothing written; as a user runs it (a subprocess) for a missing model,
  the same `main` in this process for the others."""
  from gemma2_jax.cli.merge import main

  text = {"unknown_method": yaml_text("linear", models).replace("linear", "frankenmerge"),
          "missing_model": yaml_text("linear", {**models, "b": tmp_path / "nope"}),
          "bad_yaml": "merge_method: linear\nmodels: [{model: a}\n"}[case]
  (tmp_path / "m.yml").write_text(text)
  args = ["--config", tmp_path / "m.yml", "--output", tmp_path / "out"]
  if case == "missing_model":
    proc = cli("merge", *args)
  else:
    rc = main(list(map(str, args)))
    proc = subprocess.CompletedProcess(args, rc, *capsys.readouterr())
  line = assert_one_error(proc, {"unknown_method": "unknown merge_method 'frankenmerge'",
                                 "missing_model": f"{tmp_path / 'nope'} does not exist",
                                 "bad_yaml": "not valid YAML"}[case])
  assert case != "bad_yaml" or "line 3" in line
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yml"]


@pytest.fixture(scope="module")
def adapter(models, tmp_path_factory):
  """A PEFT LoRA adapter of model `a` (random non-zero A and B on every projection, and a
  modules_to_save final norm), saved by peft."""
  import torch
  from peft import LoraConfig, get_peft_model

  from tests.hf_utils import random_hf_model

  torch.manual_seed(0)
  model = get_peft_model(random_hf_model(CFG, seed=1), LoraConfig(
    r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                       "down_proj"], modules_to_save=["norm"], init_lora_weights=False))
  with torch.no_grad():  # a trained norm, not a copy of the base's
    for name, p in model.named_parameters():
      if "modules_to_save" in name:
        p.add_(0.5)
  path = tmp_path_factory.mktemp("adapter") / "lora"
  model.save_pretrained(path)
  return path


LORA_YAML = """dtype: float32
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}+{adapter}
    parameters: {{weight: 0.7}}
  - model: {b}
    parameters: {{weight: 0.5}}
"""


def test_lora_input_matches_mergekit(models, adapter, tmp_path):
  """mergekit's MODEL+ADAPTER input (peft's merge_and_unload of the adapter into the model, then
  merged): the same YAML gives the same tensors, the adapter merged as each tensor is read."""
  if not HAS_MERGEKIT:
    pytest.skip(NO_MERGEKIT)
  text = LORA_YAML.format(**{k: str(v) for k, v in models.items()}, adapter=adapter)
  (tmp_path / "lora.yml").write_text(text)
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             LORA_MERGE_CACHE=str(tmp_path / "cache"))
  proc = subprocess.run([sys.executable, "-c", MERGEKIT, str(tmp_path / "lora.yml"), str(tmp_path / "mk")],
                        capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  theirs = tensors(tmp_path / "mk")
  merge(parse_config(text), tmp_path / "ours", chunk_elements=96)
  got = tensors(tmp_path / "ours")
  assert sorted(got) == sorted(theirs)
  base, a = tensors(models["base"]), tensors(models["a"])
  moved = [k for k in theirs if not np.allclose(theirs[k], base[k] + 0.7 * (a[k] - base[k])
                                                + 0.5 * (tensors(models["b"])[k] - base[k]), atol=1e-6)]
  assert "model.norm.weight" in moved and any("q_proj" in k for k in moved)  # the adapter counted
  for key, want in theirs.items():
    err = float(np.abs(got[key] - want).max() / np.abs(want).max())
    assert err <= 1e-6, f"{key}: max |ours - mergekit| = {err:.2e} x max |mergekit|"


def test_a_lora_reference_without_an_adapter_is_one_error(models, tmp_path):
  text = LORA_YAML.format(**{k: str(v) for k, v in models.items()}, adapter=tmp_path / "nothing")
  with pytest.raises(MergeError, match=r"neither a checkpoint nor MODEL\+ADAPTER"):
    merge(parse_config(text), tmp_path / "out")
  assert not (tmp_path / "out").exists()
