"""Ahead-of-time compilation of the real train step (the machinery behind `python -m gemma2_jax.aot`)."""

import dataclasses
import importlib.util
import subprocess
import sys

import jax
import pytest

from gemma2_jax.aot import compile_step
from gemma2_jax.experiment import TeacherConfig
from gemma2_jax.losses import DistillConfig
from tests.test_trainer import ROOT, _experiment, tiny_experiment


@pytest.mark.parametrize("mode", ["ce", "online", "offline"])
def test_step_compiles_from_shapes_alone_on_a_mesh(mode):
  exp = _experiment(tiny_experiment(), 8)
  exp = dataclasses.replace(exp, mesh={"dcn": 1, "data": 2, "fsdp": 2, "tensor": 2})
  if mode != "ce":
    exp = dataclasses.replace(exp, distill=DistillConfig(loss="forward_kl"))
  if mode == "online":  # no checkpoint anywhere: the teacher is shapes from a preset
    exp = dataclasses.replace(exp, teacher=TeacherConfig(checkpoint="/nowhere", preset="tiny"))
  if mode == "offline":
    exp = dataclasses.replace(exp, offline_paths="/nowhere")
  compiled = compile_step(exp, jax.devices()[:8])
  m = compiled.memory_analysis()
  assert m.argument_size_in_bytes > 0 and m.temp_size_in_bytes > 0


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed")
def test_cli_without_libtpu_says_how_to_get_it():
  r = subprocess.run([sys.executable, "-m", "gemma2_jax.aot", "--config=configs/distill_tiny.py",
                      "--topology=v5p:2x2x1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 1
  lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "pip install -e '.[tpu]'" in lines[0]
