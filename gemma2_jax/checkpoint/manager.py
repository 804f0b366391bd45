"""Training checkpoints in the workdir: Orbax CheckpointManager over the train state, every process's
data-iterator state, and the resolved config (JSON).

Layout: WORKDIR/checkpoints/<step>/{state, data, config}; WORKDIR may be local or gs://. Locally,
Orbax writes each step into a temporary directory and renames it only when the (async) save is
finalized; on GCS (no atomic rename) it writes the step directory in place and marks it finalized
with a last `commit_success.txt`. Either way a save killed midway is never picked up on resume.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from gemma2_jax.checkpoint.errors import CheckpointError, cause_line
from gemma2_jax.errors import UserError
from gemma2_jax.parallel.deadline import DEFAULT_TIMEOUT_S, deadline, watch
from gemma2_jax.paths import as_path


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
  save_every: int = 1000  # steps between saves (0 = only at the end and on SIGTERM)
  # Also save once this many minutes of wall time passed since the last save (or the start); 0 = off.
  # Either cadence triggers a save; process 0's clock decides for every process (training.hooks).
  save_every_minutes: float = 0.0
  keep_last: int = 3  # most recent checkpoints kept
  keep_every: int = 0  # also keep every step that is a multiple of this, forever (0 = none)
  async_save: bool = True
  export_hf: bool = True  # write the final params as HF safetensors to WORKDIR/hf at the end
  restore_data: bool = True  # restore the data iterators; False starts them afresh (explicit)
  # The longest one storage operation of the run may take (a checkpoint save with its finalize, a
  # restore, one file's upload) before the run stops with one error line: see parallel.deadline.
  storage_timeout_s: float = DEFAULT_TIMEOUT_S

  def __post_init__(self):
    if self.save_every < 0 or self.keep_last < 1 or self.keep_every < 0:
      raise ValueError("checkpoint.save_every and keep_every must be >= 0, keep_last >= 1")
    if not self.save_every_minutes >= 0:
      raise ValueError("checkpoint.save_every_minutes must be >= 0 (0 = off)")
    if not self.storage_timeout_s > 0:
      raise ValueError("checkpoint.storage_timeout_s must be > 0 (seconds)")


class _IteratorState:
  """Adapts our data iterator to grain's Orbax handler (one JSON file per process). `peers` reads
  every process's file: what a data iterator needs when its data group count changed."""

  def __init__(self, iterator, peers=None):
    self.iterator = iterator
    self.peers = peers

  def get_state(self) -> bytes:
    return json.dumps(self.iterator.get_state()).encode()

  def set_state(self, state: bytes):
    if self.peers is None:
      self.iterator.set_state(json.loads(state))
    else:
      self.iterator.set_state(json.loads(state), peers=self.peers)

  def start_prefetch(self):
    pass


def _remove_unfinished_saves(directory: epath.Path):
  """Deletes the saves that were killed before Orbax finalized them: local `<step>.orbax-checkpoint-
  tmp-*` directories, or on GCS step directories without commit_success.txt (re-saving that step
  would otherwise write into the leftovers)."""
  if jax.process_index() != 0 or not directory.is_dir():
    return
  for path in directory.iterdir():
    step_like = path.name.isdigit() or ocp.path.step.TMP_DIR_SUFFIX in path.name
    if step_like and ocp.path.step.is_path_temporary(path):
      path.rmtree(missing_ok=True)


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  return as_path(workdir) / "checkpoints"


class TrainCheckpointer:
  def __init__(self, workdir: str | os.PathLike, cfg: CheckpointConfig):
    self.directory = checkpoint_dir(workdir)
    self.cfg = cfg
    with deadline("removing unfinished checkpoint saves", self.directory):
      _remove_unfinished_saves(self.directory)  # process 0; the others wait, then list the steps
    from gemma2_jax.parallel import distributed

    distributed.barrier("unfinished_saves_removed", timeout_s=3600)
    # Orbax's own cleanup of unfinished saves runs on a background thread that can outlive an early
    # error (a traceback at interpreter exit); ours above is synchronous.
    options = ocp.CheckpointManagerOptions(
      max_to_keep=cfg.keep_last, keep_period=cfg.keep_every or None,
      enable_async_checkpointing=cfg.async_save, create=True, cleanup_tmp_directories=False)
    with deadline("listing checkpoints", self.directory):
      self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, config: dict, *, force: bool = False):
    import grain.checkpoint

    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(_IteratorState(data_iterator)),
      config=ocp.args.JsonSave(config))
    where = self.directory / str(step)
    # Also waits for the previous save's finalize (bounded by its own watch, which started first).
    with deadline(f"saving checkpoint step {step}", where):
      saving = self.manager.save(step, args=args, force=force)
    if saving and self.cfg.async_save:  # the writes go on in the background until finalized
      watch(f"finalizing checkpoint step {step}", where, lambda: not self.manager.is_saving_in_progress())

  def saved_process_count(self, step: int) -> int:
    with deadline(f"listing checkpoint step {step}", self.directory / str(step)):
      files = list((self.directory / str(step) / "data").glob("process_*-of-*.json"))
    return int(files[0].stem.rsplit("-of-", 1)[1]) if files else 0

  def saved_state_keys(self, step: int) -> set[str]:
    """The top-level keys of the train state saved at `step` (e.g. whether it holds an EMA)."""
    from gemma2_jax.checkpoint import orbax_io

    state = self.directory / str(step) / "state"
    with deadline(f"reading the metadata of checkpoint step {step}", state):
      try:
        return set(orbax_io.metadata(state))
      except CheckpointError as e:
        raise CheckpointError(self._unreadable(step, e)) from None

  def restore(self, step: int, abstract_state, data_iterator) -> Any:
    """Restores the state onto the shardings carried by `abstract_state` (any mesh).

    A step that does not read back (a truncated or corrupt file) is refused with one CheckpointError
    naming the step, the array and file that failed, and how to set the step aside; it is never
    skipped or deleted here (see `_unreadable`).
    """
    import grain.checkpoint

    items = {"state": ocp.args.StandardRestore(abstract_state)}
    peers = regroup = None
    if self.cfg.restore_data:
      saved = self.saved_process_count(step)
      if "peers" in inspect.signature(data_iterator.set_state).parameters:
        peers = self._data_states(step)  # read only if the iterator needs them
      regroup = saved != jax.process_count()
      if regroup and (peers is None or saved == 0):
        raise CheckpointError(
          f"checkpoint step {step} holds data-iterator state of {saved} processes but this run has "
          f"{jax.process_count()}; the data order cannot be re-mapped. Resume with {saved} "
          "processes, or set checkpoint.restore_data=False to restart the data stream (documents "
          "already seen may be seen again)")
      if not regroup:
        items["data"] = grain.checkpoint.CheckpointRestore(_IteratorState(data_iterator, peers))
    try:
      with deadline(f"restoring checkpoint step {step}", self.directory / str(step)):
        state = self.manager.restore(step, args=ocp.args.Composite(**items)).state
    except UserError:  # already the one line (e.g. the data iterator's state does not fit)
      raise
    except Exception as e:  # orbax / tensorstore / json: a truncated or corrupt file of this step
      raise CheckpointError(self._unreadable(step, e)) from None
    if regroup:  # another process count: each process continues from every old process's state
      states = peers()
      data_iterator.set_state(states[0], peers=lambda: states)
    return state

  def _data_states(self, step: int):
    """A callable that reads (once) every process's data-iterator state of `step`."""
    where = self.directory / str(step) / "data"

    @functools.cache
    def read() -> list[dict]:
      try:
        with deadline(f"reading the data-iterator states of checkpoint step {step}", where):
          return [json.loads(f.read_text()) for f in sorted(where.glob("process_*-of-*.json"))]
      except (OSError, ValueError) as e:  # a truncated or corrupt file (JSONDecodeError included)
        raise CheckpointError(self._unreadable(step, e)) from None

    return read

  def _unreadable(self, step: int, e: Exception) -> str:
    """The one line for a step that does not read back. Nothing is deleted or skipped on its own:
    falling back silently would retrain steps (and on several hosts every process would have to
    agree on the fallback); moving the step away is the user's explicit choice."""
    step_dir = self.directory / str(step)
    older = [s for s in self.manager.all_steps() if s < step]
    then = (f"re-run: training resumes from step {max(older)}" if older else
            "re-run: training starts from scratch (no older checkpoint)")
    return (f"checkpoint step {step} in {self.directory} cannot be read ({cause_line(e)}); nothing "
            f"was changed. To skip it, move that step's directory out of the checkpoints (e.g. mv {step_dir} "
            f"{self.directory.parent / f'unreadable_step_{step}'}) and {then}")

  def restore_config(self, step: int) -> dict:
    with deadline(f"reading the config of checkpoint step {step}", self.directory / str(step)):
      return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self):
    with deadline("finalizing checkpoint writes", self.directory):
      self.manager.wait_until_finished()

  def close(self):
    with deadline("closing the checkpoint manager", self.directory):
      self.manager.close()
