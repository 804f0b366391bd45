"""LoRA / QLoRA (the `lora` config section): the forward, PEFT interop both ways (checked against the
installed peft on HF transformers' Gemma2ForCausalLM), the merged export, the quantized base, and
training: only the adapters train and have optimizer state, resume, sharding, accumulation, a LoRA
student distilled online."""

import dataclasses
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gemma2_jax.checkpoint import load_params
from gemma2_jax.checkpoint.safetensors_io import SafetensorsReader
from gemma2_jax.model import lora, quant
from gemma2_jax.model.config import ModelConfig
from gemma2_jax.model.transformer import forward_hidden, logits_from_hidden
from gemma2_jax.parallel.sharding import activation_sharding, logical_to_sharding, make_mesh
from gemma2_jax.training import lora as lora_training
from gemma2_jax.training import modes, programs
from gemma2_jax.training.experiment import apply_overrides, dataclass_defaults, from_config, load_config_file
from gemma2_jax.training.loop import Trainer
from gemma2_jax.training.state import init_state, to_global
from tests.hf_utils import hf_logits, random_hf_model
from tests.tiny import ROOT, SMALL_MODEL, experiment_from, synthetic_batches, tiny_experiment

ONE_DEVICE = {"dcn": 1, "data": 1, "fsdp": 1, "tensor": 1}


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def logits(cfg, lcfg, base, trainable, tokens, dropout_key=None):
  """Our fp32 logits of the base with the adapters in (their inputs dropped out with a key)."""
  @jax.jit
  def run(base, trainable):
    p = lora.effective_params(cfg, lcfg, base, trainable, dropout_key)
    return logits_from_hidden(cfg, p["embedder"]["input_embedding"], forward_hidden(cfg, p, tokens))
  return np.asarray(run(base, trainable))


def adam_close(x, y):
  """Trainable leaves after 3 AdamW steps at lr 1e-2 from runs that differ only in fp32 rounding
  order: within 5e-5 (0.5% of a step; Adam's normalisation magnifies rounding where a gradient is
  near zero), 1e-4 relative."""
  np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=5e-5, rtol=1e-4)


def lora_experiment(num_devices=1, mesh=None, train=None, **section):
  """tests/tiny.py's experiment (SMALL_MODEL, vocab 256, 8 x 16 tokens) with a rank-4 LoRA section."""
  c = tiny_experiment(**(train or {}))
  c.init_from = "unused"
  c.lora = {**dataclass_defaults(lora.LoraConfig), "targets": ["all"], "rank": 4, "alpha": 8.0,
            "base_dtype": "float32", **section}
  exp = experiment_from(c, num_devices)
  return dataclasses.replace(exp, mesh={**ONE_DEVICE, **(mesh or {})})


def fresh_trainable(cfg, lcfg, seed=0):
  """A fresh trainable tree (A random, B zero), jitted: op-by-op it would compile every op."""
  return jax.jit(lambda: lora.init_trainable(cfg, lcfg, jax.random.key(seed)))()


def random_trainable(cfg, lcfg, seed):
  """A trainable tree with every leaf random (B non-zero)."""
  shapes = jax.eval_shape(lambda: lora.init_trainable(cfg, lcfg, jax.random.key(0)))
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.randn(*s.shape).astype(np.float32) * 0.1), shapes)


@pytest.fixture(scope="module")
def small():
  """SMALL_MODEL at vocab 256 with random base params (host) and a batch."""
  from tests.tiny import random_params

  exp = lora_experiment()
  return exp, random_params(exp.model, seed=0), synthetic_batches(3)


@pytest.mark.parametrize("section,message", [
  ({"rank": 0}, "lora: rank must be >= 1, got 0"),
  ({"targets": ["q", "qq"]}, "lora: targets: 'qq' matches no projection"),
  ({"quantize": "nf4", "quant_block": 48}, "quant_block=48 does not divide the last axis"),
  ({"quantize": "nf4", "quant_block": 0}, "quantize=nf4 needs quant_block > 0"),
  ({"init_from": ""}, "lora is set but init_from is not"),
])
def test_bad_lora_config_is_one_clear_error(section, message):
  from gemma2_jax.training.experiment import ConfigError

  init_from = section.pop("init_from", "unused")
  c = tiny_experiment()
  c.init_from = init_from
  c.lora = {**dataclass_defaults(lora.LoraConfig), "targets": ["all"], **section}
  with pytest.raises(ConfigError, match=message):
    experiment_from(c, 1)


def test_zero_b_adapters_leave_the_forward_bit_for_bit(small):
  """A fresh adapter (A random, B = 0), with or without dropout, gives the base's logits exactly."""
  exp, base, _ = small
  cfg = exp.model
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 16))
  fresh = fresh_trainable(cfg, exp.lora)
  assert all(np.abs(np.asarray(ad["a"])).max() > 0 for ad in fresh["adapters"].values())
  plain = jax.jit(lambda p: logits_from_hidden(cfg, p["embedder"]["input_embedding"],
                                               forward_hidden(cfg, p, tokens)))(base)
  np.testing.assert_array_equal(logits(cfg, exp.lora, base, fresh, tokens), np.asarray(plain))
  dropout = dataclasses.replace(exp.lora, dropout=0.5)  # dropped-out inputs of zero adapters: still 0
  np.testing.assert_array_equal(logits(cfg, dropout, base, fresh, tokens, jax.random.key(1)),
                                np.asarray(plain))


def test_dequantized_weights_are_within_the_format_bound():
  """NF4 (QLoRA's code book, block 64): every weight dequantizes to its block's nearest code, so the
  error is at most absmax x half the widest code gap (0.152); int8: at most half a step (scale / 2),
  per channel and per block. Storage: 4 + 32/64 bits per weight for NF4."""
  w = np.random.RandomState(0).standard_t(4, (3, 8, 256)).astype(np.float32)  # heavy tails
  q = quant.quantize(w, "nf4", 64, (-2,))
  assert q.codes.dtype == jnp.uint8 and q.codes.shape == (3, 8, 128) and q.scales.shape == (3, 8, 4)
  bits = (q.codes.size * 8 + q.scales.size * 32) / w.size
  assert bits == 4.5
  dq = np.asarray(quant.dequantize(q))
  absmax = np.abs(w.reshape(3, 8, 4, 64)).max(-1, keepdims=True)
  err = np.abs(dq - w).reshape(3, 8, 4, 64)
  assert (err <= absmax * quant.NF4_MAX_ERROR * (1 + 1e-6)).all()
  # nearest code: no other code of the book is closer (up to rounding)
  norm = (w.reshape(3, 8, 4, 64) / absmax)[..., None]
  best = np.min(np.abs(norm - quant.NF4_CODE), axis=-1) * absmax
  np.testing.assert_allclose(err, best, atol=1e-6)
  for block, scales_shape in ((0, (3, 1, 256)), (32, (3, 8, 8))):
    q = quant.quantize(w, "int8", block, (-2,))
    assert q.codes.dtype == jnp.int8 and q.scales.shape == scales_shape
    step = np.asarray(q.scales)
    err = np.abs(np.asarray(quant.dequantize(q)) - w)
    bound = step[..., None].repeat(block, -1).reshape(w.shape) if block else step
    assert (err <= bound / 2 * (1 + 1e-5)).all()


def place_base(exp, base, mesh):
  """Host base params onto `mesh` as load_base lays them out (quantized if the config says so)."""
  plain = logical_to_sharding(lora.LOGICAL_AXES, mesh, exp.rules)
  params = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x, exp.lora.base_dtype), s), base, plain)
  if exp.lora.quantize == "none":
    return params
  return quant.quantize_tree(params, exp.lora.quantize, exp.lora.quant_block,
                             lora_training.base_shardings(exp, mesh))


def lora_steps(exp, base, batches, devices, placed=None):
  """Runs the train program on `batches` (`placed`: the base already on the devices): (final state,
  [(loss, grad_norm)] per step, the base as placed)."""
  mesh = make_mesh(exp.mesh, devices)
  step = programs.train_program(exp, modes.for_experiment(exp), mesh)
  sh = step.shardings
  inputs = {"base": placed or place_base(exp, base, mesh), "teacher": None}
  with activation_sharding(mesh, exp.rules):
    state = init_state(exp, step.tx, sh)
    metrics = []
    for b in batches:
      state, m = step(state, to_global(b, sh), inputs)
      metrics.append((float(m["loss"]), float(m["grad_norm"])))
  return state, np.array(metrics), inputs["base"]


@pytest.fixture(scope="module")
def one_device_qlora(small):
  exp, base, batches = small
  exp = lora_experiment(quantize="nf4", quant_block=8, train_norms=True, train_embeddings=True)
  return exp, lora_steps(exp, base, batches, jax.devices()[:1])


def test_only_the_trainable_tree_trains_and_has_optimizer_state(small, one_device_qlora):
  exp, (state, metrics, placed) = one_device_qlora
  _, base, _ = small
  assert metrics[-1, 0] < metrics[0, 0]
  assert set(state.params) == {"adapters", "deltas"}
  assert set(state.params["adapters"]) == set(lora.TARGETS)
  assert set(state.params["deltas"]) == {"embedder", "final_norm", "layers"}
  trainable = jax.tree.leaves(state.params)
  moments = [x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
  # AdamW's mu and nu for each trainable leaf, nothing else: no state for the 1.5x larger base
  assert sorted(x.shape for x in moments) == sorted([x.shape for x in trainable] * 2)
  n_trainable = sum(x.size for x in trainable)
  assert n_trainable < exp.model.num_params()
  for ad in state.params["adapters"].values():  # both A and B moved off their init
    assert np.abs(np.asarray(ad["b"])).max() > 0
  # the frozen base (an input, not state) is untouched
  again = place_base(exp, base, make_mesh(ONE_DEVICE, jax.devices()[:1]))
  for x, y in zip(jax.tree.leaves(placed), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sharded_equals_one_device(small, one_device_qlora):
  """QLoRA (NF4 base, adapters, embedding and norm deltas) on fsdp=2 x tensor=2 equals one device."""
  _, base, batches = small
  ref_exp, (ref_state, ref_metrics, _) = one_device_qlora
  exp = dataclasses.replace(lora_experiment(4, quantize="nf4", quant_block=8, train_norms=True,
                                            train_embeddings=True),
                            mesh={**ONE_DEVICE, "fsdp": 2, "tensor": 2})
  state, metrics, placed = lora_steps(exp, base, batches, jax.devices()[:4])
  codes = placed["layers"]["attn"]["q_einsum"].codes
  assert codes.sharding.mesh.size == 4 and not codes.sharding.is_fully_replicated
  a = state.params["adapters"]["q"]["b"]
  assert a.sharding.spec[2] == "tensor"  # b's heads follow q's tensor sharding
  np.testing.assert_allclose(metrics, ref_metrics, rtol=1e-5)
  jax.tree.map(adam_close, state.params, ref_state.params)


def test_qlora_steps_equal_lora_on_the_dequantized_base(small, one_device_qlora):
  """A QLoRA step (NF4 base, dequantized inside each layer) equals a LoRA step on a dense base that
  holds the dequantized weights: its loss and the adapters' gradient norm to fp32 rounding (rel
  <= 1e-5), the adapters after 3 steps within adam_close. The LoRA run takes its batch in 2
  micro-batches, so this also shows gradient accumulation equal to one batch (either broken would
  break the equality; one compiled program less on 2 cores)."""
  _, base, batches = small
  qexp, (ref, ref_metrics, qbase) = one_device_qlora
  exp = lora_experiment(train={"grad_accum_steps": 2}, train_norms=True, train_embeddings=True)
  dense = jax.jit(lambda q: jax.tree.map(lambda x: quant.dequantize(x) if quant.is_quantized(x) else x, q,
                                         is_leaf=quant.is_quantized))(qbase)
  assert rel(dense["layers"]["attn"]["q_einsum"], base["layers"]["attn"]["q_einsum"]) > 1e-3  # really 4-bit
  state, metrics, _ = lora_steps(exp, None, batches, jax.devices()[:1], placed=dense)
  np.testing.assert_allclose(metrics, ref_metrics, rtol=1e-5)
  jax.tree.map(adam_close, state.params, ref.params)


def test_distillation_objectives_take_a_lora_student(small):
  """A LoRA student in online KD (the frozen teacher rides beside the frozen base in the step's
  inputs) and offline KD (stored top-k): with B = 0 its objective is the plain student's, exactly;
  with trained adapters it differs."""
  from gemma2_jax.distill.config import DistillConfig
  from tests.tiny import random_params

  exp, base, batches = small
  base = jax.tree.map(jnp.asarray, base)
  kd = dataclasses.replace(exp, distill=DistillConfig(loss="forward_kl", alpha=0.5))
  teacher = jax.tree.map(jnp.asarray, random_params(exp.model, seed=5))
  rng = np.random.RandomState(0)
  batch = {k: jnp.asarray(v) for k, v in batches[0].items()}
  topk = {"topk_ids": jnp.asarray(rng.randint(0, 256, (8, 16, 4)), jnp.int32),
          "topk_logprobs": jnp.asarray(np.log(np.full((8, 16, 4), 0.25)), jnp.float32)}
  fresh = fresh_trainable(exp.model, exp.lora)
  trained = random_trainable(exp.model, exp.lora, 1)
  inner = {"online": modes.OnlineKD(kd, teacher_cfg=exp.model), "offline": modes.OfflineKD(kd, k=4)}
  for name, mode in inner.items():
    wrapped = modes.LoraMode(kd, mode)
    b = batch if name == "online" else {**batch, **topk}
    t = teacher if name == "online" else None

    @jax.jit
    def losses(base, fresh, trained, b=b, t=t, mode=mode, wrapped=wrapped):
      plain = mode.objective(base, b, t, 0)[0]
      return (plain, wrapped.objective(fresh, b, {"base": base, "teacher": t}, 0)[0],
              wrapped.objective(trained, b, {"base": base, "teacher": t}, 0)[0])

    plain, zero_b, adapted = losses(base, fresh, trained)
    assert float(plain) == float(zero_b) and np.isfinite(float(adapted)) and float(adapted) != float(plain)


# --- PEFT interop and a LoRA run of configs/lora_tiny.py -------------------------------------------

CFG_OVERRIDES = {"train.steps": "4", "train.seq_len": "64", "train.loss_chunk": "32", "train.eval_every": "0",
                 "train.eval_batches": "1", "train.progress_bar": "False", "train.log_every": "1",
                 "optimizer.decay_steps": "4"}


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
  """A random HF Gemma2ForCausalLM of configs/lora_tiny.py's model shrunk to SMALL_MODEL (vocab 1024),
  saved as safetensors: the LoRA runs' init_from."""
  c = load_config_file(str(ROOT / "configs" / "lora_tiny.py"))
  c.model.update(SMALL_MODEL)
  cfg = ModelConfig(**c.model.to_dict())
  path = tmp_path_factory.mktemp("base") / "hf"
  random_hf_model(cfg, seed=0).save_pretrained(path)
  return cfg, path


def tiny_run(hf_base, workdir, evaluate=False, like=None, **overrides):
  """configs/lora_tiny.py on the small base (4 steps of 8 x 64 tokens over the 8 devices; its
  held-out eval at the end if `evaluate`): its Trainer, run. `like`: a Trainer whose compiled train
  step to reuse, the same program (train.steps enters the step only through the learning-rate
  schedule, whose horizon optimizer.decay_steps fixes here)."""
  cfg, path = hf_base
  c = load_config_file(str(ROOT / "configs" / "lora_tiny.py"))
  c.model.update(SMALL_MODEL)
  c = apply_overrides(c, {**CFG_OVERRIDES, "init_from": str(path), **overrides})
  if not evaluate:
    c.data.eval = None
  exp = from_config(c, num_devices=jax.device_count())
  trainer = Trainer(exp, workdir)
  if like is not None:
    trainer.train_step, trainer.tx, trainer.sh = like.train_step, like.tx, like.sh
  trainer.summary = trainer.run()
  return trainer


@pytest.fixture(scope="module")
def trained(hf_base, tmp_path_factory):
  """The uninterrupted run, with its final eval and exports."""
  workdir = tmp_path_factory.mktemp("lora") / "run"
  return tiny_run(hf_base, workdir, evaluate=True), workdir


def test_a_trained_adapter_loads_in_peft_with_the_same_logits(hf_base, trained):
  cfg, base_path = hf_base
  trainer, workdir = trained
  assert trainer.summary["peft_export"] == str(workdir / "peft_step4")
  assert np.isfinite(trainer.summary["eval_loss"])
  lcfg = trainer.exp.lora
  tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 24))
  ours = logits(cfg, lcfg, trainer.teacher_params["base"], trainer.state.params, tokens)
  model = peft_model(cfg, workdir / "peft_step4")
  theirs = hf_logits(model, tokens)
  assert rel(ours, theirs) <= 1e-5
  base_only = hf_logits(random_hf_model(cfg, seed=0), tokens)
  assert rel(ours, base_only) > 1e-4  # the adapter changed the model
  config = json.loads((workdir / "peft_step4" / "adapter_config.json").read_text())
  assert config["r"] == 8 and config["base_model_name_or_path"] == str(base_path)
  keys = set(SafetensorsReader(workdir / "peft_step4").keys())
  assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
  assert len(keys) == 2 * len(lora.TARGETS) * cfg.num_layers


def peft_model(cfg, adapter_dir):
  from peft import PeftModel

  return PeftModel.from_pretrained(random_hf_model(cfg, seed=0), str(adapter_dir)).eval()


def test_merged_exports_equal_peft_merge(hf_base, trained, tmp_path):
  """The run's hf_step<N> and `convert --merge_lora` of its PEFT adapter both equal peft's own
  merge_and_unload of that adapter into the HF base."""
  from gemma2_jax.cli.convert import main as convert_main

  cfg, base_path = hf_base
  _, workdir = trained
  reference = {k: v.float().numpy() for k, v in
               peft_model(cfg, workdir / "peft_step4").merge_and_unload().state_dict().items()}
  out = tmp_path / "merged"
  assert convert_main(["--src", str(base_path), "--merge_lora", str(workdir / "peft_step4"),
                       "--dst", str(out), "--to", "hf", "--dtype", "float32"]) == 0
  for path in (workdir / "hf_step4", out):
    reader = SafetensorsReader(path)
    for key in reader.keys():
      ref = reference["lm_head.weight" if key == "lm_head.weight" else key]
      if "proj" in key:
        assert rel(reader.get(key), ref) <= 1e-6, (path, key)
      else:
        np.testing.assert_array_equal(reader.get(key), ref)


def test_resume_equals_the_uninterrupted_run(hf_base, trained, tmp_path):
  """2 steps, then the same command with train.steps=4 on the workdir: the adapters and their
  optimizer state equal the uninterrupted 4-step run's, bit for bit. The checkpoint holds only those
  (and the config pointing at the base)."""
  from gemma2_jax.checkpoint import orbax_io

  whole, _ = trained
  tiny_run(hf_base, tmp_path / "w", like=whole, **{"train.steps": "2", "checkpoint.export_hf": "False"})
  resumed = tiny_run(hf_base, tmp_path / "w", like=whole, **{"checkpoint.export_hf": "False"})
  assert resumed.summary["start_step"] == 2
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               resumed.state, whole.state)
  stored = orbax_io.metadata(tmp_path / "w" / "checkpoints" / "2" / "state")
  assert set(stored["params"]) == {"adapters"}
  saved = json.loads((tmp_path / "w" / "config.json").read_text())
  assert saved["init_from"] == str(hf_base[1]) and saved["lora"]["rank"] == 8
  from gemma2_jax.checkpoint import CheckpointError, read_config

  with pytest.raises(CheckpointError, match="is a LoRA run: its checkpoints hold adapters"):
    read_config(tmp_path / "w")  # not a weights source (convert, init_from, merge): the exports are
  other = dataclasses.replace(resumed.exp, lora=dataclasses.replace(resumed.exp.lora, rank=4))
  with pytest.raises(CheckpointError, match="holds adapters with lora.rank=8, this config has 4"):
    Trainer._check_or_write_config(SimpleNamespace(exp=other, workdir=tmp_path / "w"))


def test_a_peft_made_adapter_imports_with_the_same_logits(hf_base, tmp_path):
  """get_peft_model with random (non-zero) A and B on every projection, saved by peft: read by
  lora.init_adapter into a run's first trainable tree, our forward gives peft's logits."""
  from peft import LoraConfig, get_peft_model

  cfg, base_path = hf_base
  torch.manual_seed(0)
  model = get_peft_model(random_hf_model(cfg, seed=0), LoraConfig(
    r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                       "down_proj"], init_lora_weights=False)).eval()
  model.save_pretrained(tmp_path / "adapter")
  tokens = np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 24))
  theirs = hf_logits(model, tokens)
  c = load_config_file(str(ROOT / "configs" / "lora_tiny.py"))
  c.model.update(SMALL_MODEL)
  c = apply_overrides(c, {"init_from": str(base_path), "lora.rank": "4", "lora.alpha": "8.0",
                          "lora.init_adapter": str(tmp_path / "adapter")})
  exp = from_config(c, num_devices=1)
  mesh = make_mesh(ONE_DEVICE, jax.devices()[:1])
  trainable = lora_training.init_trainable(exp, lora_training.trainable_shardings(exp, mesh))
  _, base = load_params(base_path, "float32", config=cfg)
  ours = logits(cfg, exp.lora, jax.tree.map(jnp.asarray, base), trainable, tokens)
  assert rel(ours, theirs) <= 1e-5
  with pytest.raises(Exception, match="r=4, the run lora.rank=8"):
    lora_training.init_trainable(dataclasses.replace(exp, lora=dataclasses.replace(exp.lora, rank=8)),
                                 None)
