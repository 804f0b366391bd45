"""Several named eval sets (`data.eval` as a dict): each logged as eval/<name>/..., its iterator (and
so its index of the data) built once and rewound at every eval."""

from __future__ import annotations

import json

import pytest

from tests.tiny import DATA, SMALL_MODEL, pretrain_tiny

EVAL_FILES = {"held_out": DATA / "ko" / "1809899.txt", "seen": DATA / "ko" / "1809890.txt"}


def config():
  c = pretrain_tiny()
  c.model.update(dict(SMALL_MODEL, num_layers=2))
  c.train.update(dict(steps=3, global_batch=8, seq_len=32, loss_chunk=32, log_every=1, eval_every=1,
                      eval_batches=2, progress_bar=False))
  c.checkpoint.save_every = 1
  c.checkpoint.export_hf = False
  c.optimizer.warmup_steps = 1
  c.data.eval = {name: {"paths": str(path), "format": "text"} for name, path in EVAL_FILES.items()}
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory, monkeypatch_module):
  import jax

  from gemma2_jax.data import pipeline
  from gemma2_jax.training.experiment import from_config
  from gemma2_jax.training.loop import Trainer

  built = []
  make = pipeline.make_eval_iterator
  monkeypatch_module.setattr(pipeline, "make_eval_iterator",
                             lambda cfg, **kw: built.append(cfg.sources[0].paths) or make(cfg, **kw))
  workdir = tmp_path_factory.mktemp("eval_sets")
  exp = from_config(config(), num_devices=jax.device_count())
  trainer = Trainer(exp, str(workdir))
  summary = trainer.run()
  return trainer, summary, workdir, built


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as mp:
    yield mp


def test_every_set_is_logged_at_every_eval(run):
  _, summary, workdir, _ = run
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  for name in EVAL_FILES:
    steps = [r["step"] for r in rows if f"eval/{name}/loss" in r]
    assert steps == [1, 2, 3], rows
    for metric in ("loss", "perplexity", "bits_per_byte", "accuracy", "tokens"):
      assert f"eval/{name}/{metric}" in summary
  assert "eval_loss" not in summary  # named sets only
  assert summary["eval/held_out/loss"] != summary["eval/seen/loss"]


def test_eval_iterators_are_built_once_and_rewound(run):
  trainer, summary, _, built = run
  assert sorted(built) == sorted((str(p),) for p in EVAL_FILES.values())  # 3 evals, 2 builds
  again = trainer.evaluate(trainer.state.params)  # the rewound iterators: the same batches
  assert again == {k: v for k, v in summary.items() if k.startswith("eval/")}


def test_an_eval_is_labelled_with_the_updates_its_params_hold(run):
  """The eval logged at step 1 used the params after exactly one update (checkpoint 1's)."""
  from gemma2_jax.checkpoint.manager import TrainCheckpointer
  from gemma2_jax.training.state import abstract_state

  trainer, _, workdir, _ = run
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  logged = next(r for r in rows if r["step"] == 1 and "eval/seen/loss" in r)
  ckpt = TrainCheckpointer(str(workdir), trainer.exp.checkpoint)
  try:
    state = ckpt.restore(1, abstract_state(trainer.exp, trainer.tx, trainer.sh), trainer.train_iter)
  finally:
    ckpt.close()
  again = trainer.evaluate(state.params)
  assert again["eval/seen/loss"] == logged["eval/seen/loss"]
  assert again["eval/held_out/loss"] == logged["eval/held_out/loss"]


def test_a_bad_set_name_is_one_line():
  from gemma2_jax.training.experiment import ConfigError, from_config

  c = config()
  c.data.eval = {"ko eval": {"paths": "x.txt"}}
  with pytest.raises(ConfigError, match=r"data.eval.ko eval: data.eval is one data section"):
    from_config(c, num_devices=1)
