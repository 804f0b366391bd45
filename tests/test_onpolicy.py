"""On-policy distillation (GKD): which tokens count, lambda = 0 is off-policy KD, no gradient through
sampling, and on a trained tiny teacher it lowers the student's reverse KL more than off-policy KD."""

import dataclasses
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma2_jax import save_model
from gemma2_jax.data import DataConfig, SourceConfig, make_train_iterator, train_tokenizer
from gemma2_jax.data.tokenizer import END_OF_TURN_ID, EOS_ID, PAD_ID
from gemma2_jax.distill import onpolicy
from gemma2_jax.distill.config import DistillConfig, TeacherConfig
from gemma2_jax.inference.sampler import SamplingConfig
from gemma2_jax.model import Transformer
from gemma2_jax.model.transformer import init_params
from gemma2_jax.parallel.sharding import DEFAULT_RULES, make_mesh
from gemma2_jax.training import modes, preflight, programs
from gemma2_jax.training.experiment import ConfigError, from_config
from gemma2_jax.training.state import init_state, to_global
from tests.tiny import experiment_from, tiny_experiment

DATA = pathlib.Path(__file__).parent / "data"
T = 48


def test_prompt_is_everything_before_the_final_model_turn():
  # targets' weights: two model turns (t = 3..4 and t = 8..10), then padding.
  mask = np.zeros((2, 12), np.float32)
  mask[0, 3:5] = 1
  mask[0, 8:11] = 1
  mask[1, 0:2] = 1
  np.testing.assert_array_equal(onpolicy.prompt_lengths(jnp.asarray(mask)), [9, 1])
  assert int(onpolicy.prompt_lengths(jnp.zeros((1, 12)))[0]) == 0


def test_sampled_rows_weigh_the_samples_up_to_and_including_the_stop_token():
  tokens = jnp.asarray([[2, 10, 11, 12, 0, 0], [2, 20, 21, 22, 23, 24]], jnp.int32)
  prompt_BW, pad_B, fits_B = onpolicy.left_aligned_prompts(tokens, jnp.asarray([3, 6]), 4)
  np.testing.assert_array_equal(prompt_BW, [[0, 2, 10, 11], [0, 0, 0, 2]])
  np.testing.assert_array_equal(pad_B, [1, 3])
  np.testing.assert_array_equal(fits_B, [True, False])  # 6 tokens do not fit in 4 slots
  # Row 0 stops after 2 tokens (the second is the stop token); row 1 never stops (3 of 3).
  samples = jnp.asarray([[30, 107, PAD_ID], [40, 41, 42]], jnp.int32)
  rows = onpolicy.sampled_rows(prompt_BW, pad_B, samples, jnp.asarray([2, 3]))
  np.testing.assert_array_equal(rows["tokens"][0], [0, 2, 10, 11, 30, 107])
  np.testing.assert_array_equal(rows["targets"][0], [2, 10, 11, 30, 107, PAD_ID])
  np.testing.assert_array_equal(rows["loss_mask"][0], [0, 0, 0, 1, 1, 0])
  np.testing.assert_array_equal(rows["segment_ids"][0], [0, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(rows["positions"][0], [0, 0, 1, 2, 3, 4])
  np.testing.assert_array_equal(rows["loss_mask"][1], [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(rows["positions"][1, 3:], [0, 1, 2])


# ----------------------------------------------------------------------------------------------------
# The train step on single-conversation chat rows


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory):
  """A chat tokenizer, a chat JSONL of prompt/response pairs, one-conversation rows, a teacher."""
  tmp = tmp_path_factory.mktemp("onpolicy")
  tok = train_tokenizer([str(p) for p in sorted((DATA / "ko").glob("*.txt"))], str(tmp / "sp"),
                        vocab_size=800, num_threads=1)
  lines = [ln.strip() for ln in (DATA / "ko" / "constitution.txt").read_text().splitlines()
           if len(ln.strip()) > 20]
  path = tmp / "chat.jsonl"
  path.write_text("".join(json.dumps({"prompt": ln[:8], "response": ln[8:20]}, ensure_ascii=False)
                          + "\n" for ln in lines))
  exp = experiment_from(tiny_experiment(seq_len=T), 8)
  model = exp.model.replace(vocab_size=800)
  teacher_cfg = model.replace(num_layers=4, d_model=48, ffn_dim=96)
  teacher = save_model(Transformer.from_params(teacher_cfg, init_params(teacher_cfg, seed=3)),
                       tmp / "teacher", format="native")
  data = DataConfig(sources=[SourceConfig(paths=str(path), chat=True, pack=False)], seq_len=T,
                    global_batch=8, seed=0)
  batches = []
  it = make_train_iterator(data, tokenizer_path=tok, vocab_size=800)
  for _ in range(2):
    batches.append({k: v for k, v in next(it).items() if k in modes.TEXT_BATCH.keys})
  it.close()
  exp = dataclasses.replace(exp, model=model, data_train=data, tokenizer=tok,
                            teacher=TeacherConfig(checkpoint=str(teacher), dtype="float32"))
  return exp, batches


def test_one_conversation_per_row_from_position_zero(chat_setup):
  _, batches = chat_setup
  b = batches[0]
  for r in range(len(b["tokens"])):
    n = int(b["segment_ids"][r].sum())
    assert set(np.unique(b["segment_ids"][r])) <= {0, 1} and b["segment_ids"][r, :n].all()
    np.testing.assert_array_equal(b["positions"][r, :n], np.arange(n))
    assert b["tokens"][r, 0] == 2 and not b["tokens"][r, n:].any()


def _run(exp, batch, n_devices=1, lam=1.0, **distill):
  exp = dataclasses.replace(exp, mesh={"dcn": 1, "data": 1, "fsdp": n_devices, "tensor": 1},
                            distill=DistillConfig(loss="reverse_kl", onpolicy_lambda=lam,
                                                  onpolicy_max_new_tokens=12, **distill))
  mesh = make_mesh(exp.mesh, jax.devices()[:n_devices])
  mode = modes.for_experiment(exp)
  step = programs.train_program(exp, mode, mesh)
  sh = step.shardings
  teacher_params = mode.load_teacher(mesh)
  state = init_state(exp, step.tx, sh)
  before = jax.tree.map(jnp.copy, state)  # the step donates its state
  return exp, before, step(state, to_global(batch, sh), teacher_params), mode, teacher_params


def test_lambda_zero_is_off_policy_kd(chat_setup):
  """lambda = 0 and a step whose coin says 'off' (the cond's other branch) both equal plain KD."""
  exp, batches = chat_setup
  ref = _run(exp, batches[0], lam=0.0)[2]
  # lambda = 1e-9: the coin (uniform < 1e-9) is off at step 0; the step traces the sampling branch.
  off = _run(exp, batches[0], lam=1e-9)[2]
  for a, b in zip(jax.tree.leaves(ref[0].params), jax.tree.leaves(off[0].params), strict=True):
    np.testing.assert_array_equal(a, b)
  assert float(ref[1]["loss"]) == float(off[1]["loss"])
  assert float(off[1]["gen_rows"]) == 0.0 and float(off[1]["rows"]) == 8.0


def test_onpolicy_step_is_kd_on_the_students_samples_with_no_gradient_through_sampling(chat_setup):
  exp, batches = chat_setup
  exp1, state, (new, m), mode, teacher_params = _run(exp, batches[0], lam=1.0)
  assert float(m["gen_rows"]) == 8.0 and 8 <= float(m["gen_tokens"]) <= 8 * 12
  # The same loss and gradient from the objective on the sampled batch built outside the step: the
  # samples enter the loss as constants.
  sampling = onpolicy.sampling_config(exp1.distill, onpolicy.stop_tokens_for(exp.tokenizer),
                                      exp1.model.dtype)
  _, row_key = onpolicy.step_keys(exp1.train.seed, 0)
  keys = jax.vmap(lambda r: jax.random.fold_in(row_key, r))(jnp.arange(8, dtype=jnp.uint32))
  sampled, sums = onpolicy.onpolicy_batch(exp1.model, state.params,
                                          {k: jnp.asarray(v) for k, v in batches[0].items()}, keys,
                                          sampling)
  assert float(sums["gen_tokens"]) == float(m["gen_tokens"])
  (_, s), g = jax.value_and_grad(mode.objective, has_aux=True)(state.params, sampled, teacher_params, 0)
  np.testing.assert_allclose(float(m["loss"]), float(s["loss"] / s["weight"]), rtol=1e-5)
  g_norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(x / s["weight"])) for x in jax.tree.leaves(g))))
  np.testing.assert_allclose(float(m["grad_norm"]), g_norm, rtol=1e-4)
  # Weight only on sampled tokens: every weighted target of a sampled row is in the sample slots.
  W = T + 1 - 12
  assert not np.asarray(sampled["loss_mask"])[:, :W - 1].any()
  assert float(s["weight"]) == float(m["gen_tokens"])
  stops = {EOS_ID, END_OF_TURN_ID, *sampling.stop_tokens}
  for r in range(8):
    targets = np.asarray(sampled["targets"][r])[np.asarray(sampled["loss_mask"][r]) > 0]
    assert not set(targets[:-1].tolist()) & set(sampling.stop_tokens), "weight after a stop token"
    assert len(targets) == 12 or targets[-1] in stops


def test_onpolicy_sharded_equals_one_device(chat_setup):
  exp, batches = chat_setup
  one = _run(exp, batches[1], 1, lam=1.0, onpolicy_temperature=1.0)[2]
  four = _run(exp, batches[1], 4, lam=1.0, onpolicy_temperature=1.0)[2]
  assert float(one[1]["gen_tokens"]) == float(four[1]["gen_tokens"])
  np.testing.assert_allclose(float(one[1]["loss"]), float(four[1]["loss"]), rtol=1e-5)


def test_onpolicy_config_errors(chat_setup):
  c = tiny_experiment()
  c.unlock()
  c.teacher = {"checkpoint": "/t"}
  c.distill = {"loss": "reverse_kl", "onpolicy_lambda": 1.0}
  c.data.tokenizer = "x"
  with pytest.raises(ConfigError, match="chat=True and pack=False"):
    from_config(c, num_devices=1)
  c.distill = {"loss": "reverse_kl", "onpolicy_lambda": 1.0, "alpha": 0.5}
  with pytest.raises(ConfigError, match="alpha = 1"):
    from_config(c, num_devices=1)
  c.distill = {"onpolicy_lambda": 1.0, "offline_paths": "/r"}
  c.teacher = {"checkpoint": ""}
  with pytest.raises(ConfigError, match="online teacher"):
    from_config(c, num_devices=1)


def _train(exp, batches, teacher=None):
  """Params after one optimizer step per batch (CE, or distillation from `teacher` = (cfg, params))."""
  mesh = make_mesh(exp.mesh, jax.devices()[:1])
  mode = modes.OnlineKD(exp, teacher_cfg=teacher[0]) if teacher else modes.Mode(exp)
  step = programs.train_program(exp, mode, mesh)
  sh = step.shardings
  state = init_state(exp, step.tx, sh)
  for b in batches:
    state, _ = step(state, to_global(b, sh), teacher and teacher[1])
  return state.params


def test_onpolicy_lowers_reverse_kl_on_own_samples_more_than_off_policy(chat_setup):
  """A tiny teacher SFT-trained on the prompt -> response pairs; two students from the same init with
  the same batches, steps and divergence (reverse KL): lambda = 1 vs lambda = 0. Measured on fresh
  samples of prompts neither saw (in this setup, about 1.14 at init, 0.49 on-policy, 0.52
  off-policy)."""
  exp, _ = chat_setup
  it = make_train_iterator(exp.data_train, tokenizer_path=exp.tokenizer, vocab_size=800)
  batches = [{k: v for k, v in next(it).items() if k in modes.TEXT_BATCH.keys} for _ in range(40)]
  it.close()
  base = dataclasses.replace(exp, mesh={"dcn": 1, "data": 1, "fsdp": 1, "tensor": 1}, teacher=None,
                             optimizer=dataclasses.replace(exp.optimizer, learning_rate=1e-2,
                                                           warmup_steps=3))
  teacher_cfg = exp.model.replace(num_layers=4, d_model=48, ffn_dim=96)
  teacher_params = _train(dataclasses.replace(base, model=teacher_cfg), batches)
  teacher_cfg = teacher_cfg.replace(remat="none")
  students = {}
  for name, lam in (("on-policy", 1.0), ("off-policy", 0.0)):
    sexp = dataclasses.replace(
      base, distill=DistillConfig(loss="reverse_kl", onpolicy_lambda=lam, onpolicy_max_new_tokens=12),
      optimizer=dataclasses.replace(base.optimizer, learning_rate=3e-2))
    students[name] = _train(sexp, batches[:16], (teacher_cfg, teacher_params))
  held_out = batches[16:24]  # the teacher saw them, the students did not
  prompts = []
  for b in held_out:
    for r, n in enumerate(np.asarray(onpolicy.prompt_lengths(jnp.asarray(b["loss_mask"])))):
      prompts.append(b["tokens"][r, :n].tolist())
  sampling = onpolicy.sampling_config(DistillConfig(onpolicy_max_new_tokens=12),
                                      onpolicy.stop_tokens_for(exp.tokenizer))
  kl = {name: onpolicy.reverse_kl_on_samples(exp.model, p, teacher_cfg, teacher_params, prompts,
                                             sampling, seed=123)
        for name, p in students.items()}
  msg = (f"reverse KL to the teacher on own samples: on-policy {kl['on-policy']:.4f}, "
         f"off-policy {kl['off-policy']:.4f}")
  print(msg)
  assert kl["on-policy"] < kl["off-policy"], msg


def _reachable_collective_bytes(hlo: str, op: str = "all-gather") -> tuple[int, int]:
  """(bytes `op` produces inside while-loop bodies (and what they call), elsewhere) of HLO text."""
  import re

  comps, name = {}, None
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m:
      name = m[1]
      comps[name] = []
    elif name is not None:
      comps[name].append(line)
  sizes = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "f16": 2, "pred": 1, "s8": 1, "u8": 1}

  def gathered(lines):
    total = 0
    for ln in lines:
      m = re.search(rf"= (\w+)\[([\d,]*)\][^ ]* {op}(?:-start)?\(", ln)
      if m:
        total += sizes.get(m[1], 4) * int(np.prod([int(d) for d in m[2].split(",") if d]))
    return total

  def called(lines):
    out = set()
    for ln in lines:
      for m in re.finditer(r"(?:body|condition|calls|to_apply|branch_computations)=\{?%?([\w.\-, %]+)\}?",
                           ln):
        out.update(x.strip().lstrip("%") for x in m[1].split(","))
    return out

  bodies = set()
  for lines in comps.values():
    for ln in lines:
      m = re.search(r"body=%?([\w.\-]+)", ln)
      if m:
        bodies.add(m[1])
  seen, todo = set(), list(bodies)
  while todo:
    c = todo.pop()
    if c in seen or c not in comps:
      continue
    seen.add(c)
    todo.extend(called(comps[c]))
  inside = sum(gathered(comps[c]) for c in seen)
  return inside, sum(gathered(v) for v in comps.values()) - inside


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="the TPU compiler's choice needs libtpu (pip install -e '.[tpu]')")
def test_decode_loop_gathers_no_weights_under_fsdp():
  """With params FSDP-sharded (as in an on-policy train step), the TPU compiler all-gathers every
  layer's weights inside the decode loop, at every token, unless the sampler gathers them once per
  call, outside the loop (XLA:CPU hoists them either way, so only a TPU compile shows it)."""
  from jax.experimental import topologies

  from gemma2_jax.model.config import gemma2_2b

  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
  cfg = gemma2_2b(dtype="bfloat16", param_dtype="float32").replace(num_layers=2)
  mesh = make_mesh({"dcn": 1, "data": 1, "fsdp": 4, "tensor": 1}, devices)
  compiled = preflight.compile_sampler(cfg, mesh, DEFAULT_RULES, batch_size=8, prompt_len=64,
                                       sampling=SamplingConfig(max_new_tokens=16))
  inside, outside = _reachable_collective_bytes(compiled.decode.as_text())
  assert inside == 0 and outside >= compiled.param_bytes_per_chip, (inside, outside)


def _loops(jaxpr, inside_scan=False, found=None):
  """(while loops outside any scan, while loops inside a scan's body) of a closed jaxpr, recursively."""
  found = found if found is not None else [0, 0]
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "while":
      found[inside_scan] += 1
    for param in eqn.params.values():
      for j in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(j, "jaxpr", j)  # a ClosedJaxpr's jaxpr, or a Jaxpr
        if hasattr(inner, "eqns"):
          _loops(inner, inside_scan or eqn.primitive.name == "scan", found)
  return found


def test_onpolicy_samples_once_per_step_before_the_micro_batches(chat_setup):
  """Sampling runs once for all rows, outside the micro-batch loop (decoding reads the weights once
  per token for the whole batch): in the traced step, no while loop sits inside the micro-batch scan,
  whatever grad_accum_steps is. (Row keys are by global row index, so the samples do not depend on
  it either: test_onpolicy_step_is_kd_on_the_students_samples_... checks them.)"""
  exp, batches = chat_setup
  exp = dataclasses.replace(exp, mesh={"dcn": 1, "data": 1, "fsdp": 1, "tensor": 1},
                            distill=DistillConfig(loss="reverse_kl", onpolicy_lambda=1.0,
                                                  onpolicy_max_new_tokens=12))
  mesh = make_mesh(exp.mesh, jax.devices()[:1])
  for k in (1, 4):
    e = dataclasses.replace(exp, train=dataclasses.replace(exp.train, grad_accum_steps=k))
    mode = modes.for_experiment(e)
    step = programs.train_program(e, mode, mesh)  # its args: the step's abstract inputs
    outside, inside = _loops(jax.make_jaxpr(step.fn)(*step.args).jaxpr)
    assert outside >= 1 and inside == 0, (k, outside, inside)
