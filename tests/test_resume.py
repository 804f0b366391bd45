"""Exact resume: a run killed (SIGKILL / SIGTERM) and re-run equals an uninterrupted run bit for bit."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.resume import COMMON, ROOT, STEPS, assert_same_state, env, final_state, killed, losses, train


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  train(workdir)
  return workdir, losses(workdir), final_state(workdir)


@pytest.mark.parametrize("mode,step", [("after_step", 5), ("during_save", 3), ("after_step", 1)])
def test_sigkill_and_rerun_is_bit_identical(reference, tmp_path, mode, step):
  _, ref_losses, ref_state = reference
  killed(tmp_path, mode, step)
  ckpts = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  if mode == "during_save":
    assert step not in ckpts, "a save killed before finalization must not look complete"
  train(tmp_path)
  assert losses(tmp_path) == ref_losses
  assert_same_state(final_state(tmp_path), ref_state)


def test_sigterm_saves_current_step_and_resume_continues(reference, tmp_path):
  _, ref_losses, ref_state = reference
  cmd = [sys.executable, "-m", "gemma2_jax.train", f"--workdir={tmp_path}", *COMMON,
         f"--config.train.steps={STEPS * 50}", "--config.checkpoint.save_every=0"]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env())
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics.exists() and len(losses(tmp_path)) >= 3):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  saved = json.loads((tmp_path / "summary.json").read_text())["preempted_at_step"]
  assert saved >= 3 and (tmp_path / "checkpoints" / str(saved)).is_dir()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [str(saved)]
  r = train(tmp_path, f"--config.train.steps={saved + 2}", "--config.checkpoint.save_every=0")
  assert json.loads((tmp_path / "summary.json").read_text())["start_step"] == saved, r.stdout


def test_restore_8_device_checkpoint_on_4_devices(tmp_path):
  batch = "--config.train.global_batch=8"
  train(tmp_path, "--config.train.steps=3", "--config.mesh.fsdp=-1", batch, devices=8)
  r = train(tmp_path, "--config.train.steps=5", "--config.mesh.fsdp=-1", batch, devices=4)
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["start_step"] == 3 and np.isfinite(summary["loss"]), r.stdout
  state = final_state(tmp_path, 5)
  assert state["params"]["layers"]["attn"]["q_einsum"].shape[0] == 2


def test_workdir_of_another_model_is_refused_untouched(reference, tmp_path):
  train(tmp_path, "--config.train.steps=3")
  before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
  r = train(tmp_path, "--config.model.d_model=48", check=False)
  assert r.returncode == 1
  assert r.stderr.strip().splitlines() == [r.stderr.strip()]
  assert "different model (model.d_model: 32 there, 48 now)" in r.stderr
  assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_workdir_is_a_weights_source_for_export_and_init_from(reference, tmp_path):
  """`convert --src WORKDIR` exports the newest checkpoint's params (export on demand)."""
  workdir, _, ref_state = reference
  r = subprocess.run([sys.executable, "-m", "gemma2_jax.convert", f"--src={workdir}",
                      f"--dst={tmp_path / 'hf'}", "--to=hf"], cwd=ROOT, capture_output=True,
                     text=True, env=env(), timeout=300)
  assert r.returncode == 0, r.stderr
  from gemma2_jax.checkpoint import load_params
  _, exported = load_params(tmp_path / "hf")
  assert_same_state(exported, ref_state["params"])


@pytest.mark.slow  # three on-policy runs (~2 min alone); the kill / resume path itself runs above
def test_onpolicy_distillation_sigkill_and_rerun_is_bit_identical(tmp_path):
  """The student's samples are drawn from keys of (seed, step, row): a killed on-policy run resumes
  to the same samples, losses and state."""
  from gemma2_jax import save_model
  from gemma2_jax.model import Transformer
  from gemma2_jax.model.config import tiny
  from gemma2_jax.model.transformer import init_params

  teacher_cfg = tiny(vocab_size=1024, num_layers=2, d_model=48, num_heads=4, num_kv_heads=2,
                     head_dim=8, ffn_dim=96, query_pre_attn_scalar=8, sliding_window=16)
  teacher = save_model(Transformer.from_params(teacher_cfg, init_params(teacher_cfg, seed=1)),
                       tmp_path / "teacher", format="hf")
  common = [a for a in COMMON if not a.startswith(("--config=", "--config.train.seq_len",
                                                   "--config.train.global_batch"))]
  common = ["--config=configs/onpolicy_distill_tiny.py", f"--config.teacher.checkpoint={teacher}",
            "--config.train.seq_len=128", "--config.train.global_batch=4",
            "--config.distill.onpolicy_max_new_tokens=16", "--config.distill.onpolicy_lambda=0.5",
            *common]
  train(tmp_path / "ref", common=common)
  killed(tmp_path / "run", "after_step", 4, common=common)
  train(tmp_path / "run", common=common)
  ref = losses(tmp_path / "ref")
  assert losses(tmp_path / "run") == ref and len(ref) == STEPS
  rows = [json.loads(ln) for ln in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
  fractions = {r["onpolicy_fraction"] for r in rows if "onpolicy_fraction" in r}
  assert 0.0 in fractions and max(fractions) > 0.5  # lambda 0.5: both kinds of steps ran
  assert_same_state(final_state(tmp_path / "run"), final_state(tmp_path / "ref"))
