"""Every config file parses into a valid experiment; bad configs fail with one clear line."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from gemma2_jax.training.experiment import ConfigError, from_config
from tests.tiny import pretrain_tiny

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


def load(path: Path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_and_documents_its_command(path):
  module = load(path)
  assert f"--config=configs/{path.name}" in module.__doc__
  # A config sized for a number of devices says so (NUM_DEVICES: lora_ko_9b's one accelerator).
  exp = from_config(module.get_config(),
                    num_devices=getattr(module, "NUM_DEVICES", 8 if "tiny" in path.stem else 32))
  assert exp.train.global_batch % exp.train.grad_accum_steps == 0
  assert exp.data_train.sources


def test_every_shipped_config_is_tested():
  assert {p.stem for p in CONFIGS} >= {"pretrain_2b", "pretrain_9b", "pretrain_27b",
                                       "continue_pretrain_ko_9b", "pretrain_tiny"}


def test_ko_config_is_the_gemma_ko_recipe():
  exp = from_config(load(ROOT / "configs" / "continue_pretrain_ko_9b.py").get_config(),
                    num_devices=32)
  o = exp.optimizer
  assert (o.learning_rate, o.end_learning_rate, o.weight_decay) == (5e-5, 1e-6, 0.1)
  assert exp.train.seq_len == 8192 and exp.train.grad_accum_steps > 1 and exp.init_from
  assert [s.weight for s in exp.data_train.sources] == [0.7, 0.3]


@pytest.mark.parametrize("edit,num_devices,message", [
  (lambda c: c.train.__setitem__("global_batch", 6), 4, "not divisible by the 4 batch shards"),
  (lambda c: c.mesh.update(dict(data=3, fsdp=1)), 8, "hold 3 devices but 8 are present"),
  (lambda c: c.train.__setitem__("grad_accum_steps", 3), 1, "not divisible by train.grad_accum"),
  (lambda c: c.optimizer.__setitem__("schedule", "exp"), 1, "optimizer.schedule"),
  (lambda c: c.model.__setitem__("num_layers", 5), 1, "even"),
  (lambda c: c.data.__setitem__("tokenizer", ""), 1, "data.tokenizer is not set"),
  (lambda c: c.data.train.__setitem__("paths", ""), 1, "data.train has no source"),
])
def test_bad_config_is_one_clear_error(edit, num_devices, message):
  c = pretrain_tiny()
  c.unlock()
  edit(c)
  with pytest.raises(ConfigError, match=message):
    from_config(c, num_devices=num_devices)


def test_unknown_and_mistyped_keys():
  c = pretrain_tiny()
  c.unlock()
  c.train.stepz = 3
  with pytest.raises(ConfigError, match="unknown key train.stepz"):
    from_config(c, num_devices=1)
  d = pretrain_tiny().to_dict()
  d["train"]["steps"] = "ten"
  with pytest.raises(ConfigError, match="train.steps = 'ten' has type str"):
    from_config(d, num_devices=1)


def _train_cli(*args, tmp_path):
  return subprocess.run([sys.executable, "-m", "gemma2_jax.train", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,message", [
  (["--config=configs/pretrain_tiny.py", "--config.train.stepz=3"], "stepz"),
  (["--config=configs/pretrain_tiny.py", "--config.train.steps=abc"], "steps"),
  (["--config=configs/pretrain_tiny.py", "--config.data.train.paths=/nonexistent/*.txt"],
   "/nonexistent"),
  (["--config=configs/pretrain_tiny.py", "--config.mesh.fsdp=3"], "mesh"),
  (["--config=configs/missing.py"], "missing.py"),
  (["--config=configs/pretrain_tiny.py", "--config.init_from=/nonexistent/ckpt"], "/nonexistent/ckpt"),
  (["--config=configs/pretrain_tiny.py", "--config.data.tokenizer=/nonexistent/sp.model"],
   "/nonexistent/sp.model"),
])
def test_train_cli_bad_input_is_one_line(args, message, tmp_path):
  result = _train_cli(*args, f"--workdir={tmp_path / 'w'}", tmp_path=tmp_path)
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr
  assert message in lines[0]


def test_train_cli_unusable_workdir_is_one_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  result = subprocess.run([sys.executable, "-m", "gemma2_jax.train", "--config=configs/pretrain_tiny.py",
                           f"--workdir={blocker / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 1
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
  assert blocker.read_text() == "not a directory"
