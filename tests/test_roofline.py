"""The pre-flight's roofline: collective bytes per chip from the compiled program equal a hand count
(ring cost over the op's group, loop bodies times their trip count)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gemma2_jax.training.roofline import analyze


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()[:8]).reshape(8), ("x",))


def compiled_text(fn, *args) -> str:
  return jax.jit(fn).lower(*args).compile().as_text()


def sharded(shape, mesh, spec):
  return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))


def test_all_gather_in_a_scanned_loop_counts_every_trip(mesh):
  def layers(ws, x):  # FSDP-style: each layer's weight gathered inside the scan over 3 layers
    def body(h, w):
      return jnp.tanh(h @ jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))), None
    return jax.lax.scan(body, x, ws)[0].sum()

  r = analyze(compiled_text(layers, sharded((3, 64, 64), mesh, P(None, "x")), sharded((16, 64), mesh, P())),
              0.0)
  assert r.collective_bytes["all-gather"] == 3 * 64 * 64 * 4 * 7 / 8  # a ring of 8 chips, 3 trips
  assert r.hbm_bytes > 3 * 64 * 64 * 4  # at least every gathered weight written once


def test_all_gather_and_all_reduce_by_hand(mesh):
  gather = analyze(compiled_text(lambda a: jax.lax.with_sharding_constraint(a * 2, NamedSharding(mesh, P())),
                                 sharded((64, 32), mesh, P("x"))), 0.0)
  assert gather.collective_bytes["all-gather"] == 64 * 32 * 4 * 7 / 8
  reduce = analyze(compiled_text(lambda a: a.sum(0), sharded((64, 32), mesh, P("x"))), 0.0)
  assert reduce.collective_bytes["all-reduce"] == 2 * 32 * 4 * 7 / 8
  assert sum(reduce.collective_bytes.values()) == reduce.collective_bytes["all-reduce"]


def test_bounds_and_mfu_ceiling():
  from gemma2_jax.training.flops import CHIPS
  from gemma2_jax.training.roofline import Roofline

  chip = CHIPS["TPU v5p"]
  r = Roofline(flops=459e12, hbm_bytes=2765e9 * 2, collective_bytes={"all-gather": 600e9 * 0.5})
  assert r.times(chip) == pytest.approx({"compute": 1.0, "hbm": 2.0, "collectives": 0.5})
  lines = r.lines(chip, model_flops=459e12 * 0.8)
  assert "step >= 2000.0 ms (hbm-bound): MFU at most 40%" in lines[1]
