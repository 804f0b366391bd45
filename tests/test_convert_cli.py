"""`python -m gemma2_jax.convert` as a user runs it: exit codes, outputs, one-line errors."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from gemma2_jax.checkpoint import save_params
from gemma2_jax.checkpoint.safetensors_io import SafetensorsReader
from gemma2_jax.model.config import tiny
from gemma2_jax.model.transformer import param_shapes


def _convert(*args):
  return subprocess.run([sys.executable, "-m", "gemma2_jax.convert", *map(str, args)],
                        capture_output=True, text=True, timeout=120)


def _assert_one_error_line(proc):
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if "error: " in line]
  assert len(errors) == 1, proc.stderr
  return errors[0]


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
  cfg = tiny()
  rng = np.random.default_rng(0)
  # Random norms too, so a dropped or swapped tensor shows up in the comparison.
  params = _map(param_shapes(cfg), lambda shape: rng.standard_normal(shape).astype(np.float32))
  return save_params(params, cfg, tmp_path_factory.mktemp("cli") / "hf", format="hf")


def _map(tree, fn):
  return {k: _map(v, fn) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


def test_hf_native_hf(hf_src, tmp_path):
  proc = _convert("--src", hf_src, "--dst", tmp_path / "native", "--to", "native")
  assert proc.returncode == 0, proc.stderr
  proc = _convert("--src", tmp_path / "native", "--dst", tmp_path / "hf", "--to", "hf")
  assert proc.returncode == 0, proc.stderr
  assert "wrote hf checkpoint" in proc.stdout
  a, b = SafetensorsReader(hf_src), SafetensorsReader(tmp_path / "hf")
  assert sorted(a.keys()) == sorted(b.keys())
  for k in a.keys():
    x, y = a.get(k), b.get(k)
    assert x.dtype == y.dtype and x.shape == y.shape, k
    np.testing.assert_array_equal(x, y, err_msg=k)
  assert (hf_src / "config.json").read_text() == (tmp_path / "hf" / "config.json").read_text()


def test_missing_src(tmp_path):
  line = _assert_one_error_line(_convert("--dst", tmp_path / "out", "--to", "hf"))
  assert "--src" in line
  assert not (tmp_path / "out").exists()


def test_existing_dst_is_refused_and_unchanged(hf_src, tmp_path):
  dst = tmp_path / "dst"
  shutil.copytree(hf_src, dst)
  before = {p.name: p.read_bytes() for p in dst.iterdir()}
  line = _assert_one_error_line(_convert("--src", hf_src, "--dst", dst, "--to", "native"))
  assert line.startswith("error: ") and "already exists and is not empty" in line
  assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_truncated_file(hf_src, tmp_path):
  src = tmp_path / "src"
  shutil.copytree(hf_src, src)
  f = src / "model.safetensors"
  f.write_bytes(f.read_bytes()[:-1000])
  proc = _convert("--src", src, "--dst", tmp_path / "out", "--to", "native")
  line = _assert_one_error_line(proc)
  assert proc.stderr.strip() == line  # nothing else: no progress bar, no warning
  assert line.startswith("error: ") and "truncated" in line and "model.safetensors" in line
  assert not (tmp_path / "out").exists()
