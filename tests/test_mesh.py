"""The mesh a job runs on: `dcn` spans the slices (derived when the config leaves it out, refused when
it disagrees), and a layout the builder cannot make is an error naming the mesh, never device order."""

from __future__ import annotations

import types

import pytest


def devices(slices: int, per_slice: int, processes_per_slice: int = 1):
  """Device stand-ins with TPU multislice attributes (`slice_index`, `process_index`)."""
  out = []
  for s in range(slices):
    for i in range(per_slice):
      out.append(types.SimpleNamespace(id=len(out), slice_index=s, device_kind="TPU v5p",
                                       process_index=s * processes_per_slice
                                       + i * processes_per_slice // per_slice))
  return out


def test_dcn_that_disagrees_with_the_slices_is_refused():
  from gemma2_jax.parallel.sharding import MeshError, check_slices

  two = devices(2, 8, processes_per_slice=2)
  check_slices({"dcn": 2, "data": 1, "fsdp": 8, "tensor": 1}, two)
  with pytest.raises(MeshError, match=r"span 2 slices, so mesh.dcn must be 2.*got 1"):
    check_slices({"dcn": 1, "data": 1, "fsdp": 16, "tensor": 1}, two)


def test_dcn_without_slices_groups_whole_processes():
  from gemma2_jax.parallel.sharding import MeshError, check_slices

  hosts = [types.SimpleNamespace(id=i, process_index=i // 4, device_kind="NVIDIA H100")
           for i in range(12)]  # 3 GPU hosts of 4
  check_slices({"dcn": 3, "data": 1, "fsdp": 4, "tensor": 1}, hosts)
  with pytest.raises(MeshError, match=r"dcn=2 groups whole processes .* there are 3"):
    check_slices({"dcn": 2, "data": 1, "fsdp": 6, "tensor": 1}, hosts)


def test_a_config_without_dcn_gets_one_group_per_slice():
  from gemma2_jax.training.experiment import from_config
  from tests.tiny import experiment_from, tiny_experiment

  c = tiny_experiment(global_batch=16)
  c.data.tokenizer = "unused"
  assert from_config(c, num_devices=16, num_slices=2).mesh == {"dcn": 2, "data": 1, "fsdp": 8,
                                                               "tensor": 1}
  assert experiment_from(c, 16).mesh["dcn"] == 1  # one slice


def test_a_layout_the_builder_cannot_make_is_an_error_naming_the_mesh(monkeypatch):
  import jax
  from jax.experimental import mesh_utils

  from gemma2_jax.parallel.sharding import MeshError, make_mesh

  def refuse(*args, **kwargs):
    raise ValueError("cannot map this mesh onto the physical topology")

  monkeypatch.setattr(mesh_utils, "create_device_mesh", refuse)
  with pytest.raises(MeshError, match=r"mesh fsdp=4,tensor=2 cannot be laid out on the 8 .*physical"):
    make_mesh({"fsdp": 4, "tensor": 2}, jax.devices()[:8])
