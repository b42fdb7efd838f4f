"""Orbax checkpoints of a training run, and loading a trained tokenizer.

A checkpoint (WORKDIR/checkpoints/<step>/) holds four orbax items:

  params     generator parameters (float32 master weights)
  ema        their EMA (what evaluation and release use)
  train      the rest of the train state: step, RNG key, both optimiser
             states, discriminator parameters and BatchNorm statistics,
             LeCam EMAs, the codebook-usage counter
  data_iter  the grain iterator position of every process

A weights-only checkpoint (params + ema, written by `save_weights`, e.g. by
gsq-import) is a starting point, not a run to resume: gsq-train loads its
weights into a fresh train state (new optimiser, step 0) and fine-tunes.

Frozen pretrained weights (LPIPS, the DINO backbone) are never saved: they are
read from their files at start-up. Saving is asynchronous (the arrays are
copied off the devices, then written by a background thread), atomic (orbax
writes into a temporary folder and renames it when complete, so a killed run
never leaves a half checkpoint that looks finished), checked (a failed save is
retried once, then stops the run) and keeps the newest `keep` checkpoints.
Resuming takes the newest checkpoint that restores, setting damaged ones aside.

Restoring needs target arrays with concrete shardings: build them from a
freshly initialised state with `abstract_like` (an `nnx.eval_shape` target
carries an AbstractMesh, which orbax cannot place).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import threading
from typing import Any

from absl import logging
import grain
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
from flax import nnx
import orbax.checkpoint as ocp

from gsq_jax.models import Tokenizer

MODEL_ITEMS = ("params", "ema")
ENVIRONMENT_KEY = "environment"  # config.json: versions, backend, device kind of the run
CHECKPOINT_DIR = "checkpoints"
UNRESTORABLE_DIR = "checkpoints_unrestorable"
TMP_MARKER = ".orbax-checkpoint-tmp"
JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding")


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs carrying each array's concrete sharding (a restore target)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _split(state: dict[str, Any]) -> dict[str, Any]:
  train = {k: v for k, v in state.items() if k not in MODEL_ITEMS}
  return {"params": state["params"], "ema": state["ema"], "train": train}


def _join(items: Any) -> dict[str, Any]:
  return {"params": items["params"], "ema": items["ema"], **items["train"]}


class CheckpointError(Exception):
  """A checkpoint could not be written (after one retry), or none of them restores."""


def _all_processes_agree(ok: bool) -> bool:
  """True only if `ok` on every process (they must take the same branch of a collective)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _invalid_json(folder: pathlib.Path) -> str | None:
  """Names the first metadata file of a checkpoint that is not valid JSON.

  orbax reports a damaged metadata file as a bare JSONDecodeError; this
  says which file it is.
  """
  for path in sorted(folder.rglob("*")):
    if path.is_file() and (path.name in JSON_FILES or path.suffix == ".json"):
      try:
        json.loads(path.read_bytes())
      except (ValueError, UnicodeDecodeError) as e:
        return f"{path} is not valid JSON ({e})"
  return None


class Checkpointer:
  """The run's orbax CheckpointManager: save/restore of state + data iterator.

  Saves are checked, not assumed: a save counts once its folder has been
  renamed to its step (orbax's atomic commit). A failed save (e.g. a full
  disk) is retried once, synchronously, with the state at hand; a second
  failure raises CheckpointError and the run stops. Unfinished folders
  (`*.orbax-checkpoint-tmp*`) of failed or killed saves are removed, and old
  checkpoints are deleted only after a newer one is confirmed (orbax's own
  `max_to_keep` also deletes them when the newer save failed).
  """

  def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"train.keep_checkpoints must be an integer >= 1, got {keep!r}")
    self.directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
    self.keep = keep
    self._read_only = read_only
    self._pending: tuple | None = None  # (step, watcher thread, outcome) of an unconfirmed save
    if not read_only:
      self.remove_partial()
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save, read_only=read_only, create=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def remove_partial(self) -> list[str]:
    """Deletes unfinished checkpoint folders left by failed or killed saves (process 0)."""
    removed = []
    if jax.process_index() == 0 and self.directory.is_dir():
      for path in self.directory.glob(f"*{TMP_MARKER}*"):
        try:
          shutil.rmtree(path)
          removed.append(path.name)
        except OSError as e:
          logging.error("Could not remove the unfinished checkpoint folder %s: %s", path, e)
    if removed:
      logging.warning("Removed unfinished checkpoint folders: %s", ", ".join(sorted(removed)))
    return removed

  def save(self, step: int, state: dict[str, Any],
           data_iter: grain.DatasetIterator | None = None, *, wait: bool = False) -> None:
    """Saves `state` and the iterator position at `step` (async unless `wait`).

    First confirms the previous async save; if that or this save fails, both
    are replaced by one synchronous retry of this step.
    """
    for attempt in (1, 2):
      try:
        self._confirm()
        if int(step) not in self.all_steps():
          self._start(step, state, data_iter)
        if wait or attempt == 2:
          self._confirm()
        return
      except Exception as e:  # pylint: disable=broad-except
        self._pending = None
        self.remove_partial()
        self.manager.reload()
        if attempt == 2:
          raise CheckpointError(f"could not save the checkpoint of step {step} in "
                                f"{self.directory} (after one retry)") from e
        logging.warning("Checkpoint save failed (%s: %s); retrying once at step %d",
                        type(e).__name__, e, step)

  def _start(self, step, state, data_iter) -> None:
    items = _split(state)
    args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(int(step), args=ocp.args.Composite(**args), force=True)
    # A watcher thread records the outcome of the async write as soon as it
    # is known, so `pending_failed` can stop the run at the next step.
    outcome: dict[str, Any] = {}
    watcher = threading.Thread(target=self._watch, args=(int(step), outcome), daemon=True,
                               name=f"checkpoint-{step}-watch")
    watcher.start()
    self._pending = (int(step), watcher, outcome)
    logging.info("Checkpoint of step %d started in %s", step, self.directory)

  def _watch(self, step: int, outcome: dict[str, Any]) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      outcome["error"] = e
    outcome["committed"] = (self.directory / str(step)).is_dir()

  def pending_failed(self) -> bool:
    """Whether the pending async save has already failed (no waiting; every process must call)."""
    failed = False
    if self._pending is not None:
      _, watcher, outcome = self._pending
      failed = not watcher.is_alive() and ("error" in outcome or not outcome["committed"])
    return not _all_processes_agree(not failed)

  def _confirm(self) -> None:
    """Waits for the pending save; raises unless its folder was committed; prunes old ones."""
    if self._pending is None:
      return
    (step, watcher, outcome), self._pending = self._pending, None
    watcher.join()
    with contextlib.suppress(Exception):
      self.manager.wait_until_finished()  # orbax re-raises a failure once per thread: absorb it
    error = outcome.get("error")
    if not _all_processes_agree(error is None and outcome["committed"]):
      if error is not None:
        raise error
      raise CheckpointError(f"the save of step {step} did not commit: {self.directory / str(step)} "
                            "is missing (see the orbax error logged above)")
    for old in sorted(self.all_steps())[:-self.keep]:
      self.manager.delete(old)

  def save_weights(self, step: int, params: Any, ema: Any) -> None:
    """Saves only the model items (a checkpoint to fine-tune or evaluate, not to resume)."""
    args = {"params": ocp.args.StandardSave(params), "ema": ocp.args.StandardSave(ema)}
    self.manager.save(int(step), args=ocp.args.Composite(**args), force=True)

  def has_train_state(self, step: int) -> bool:
    """False for a weights-only checkpoint (no optimiser state / data position to resume)."""
    return (self.directory / str(int(step)) / "train").is_dir()

  def restore_weights(self, step: int, target: dict[str, Any]) -> dict[str, Any]:
    """`target` with its params and EMA replaced by those saved at `step`."""
    args = {k: ocp.args.StandardRestore(abstract_like(target[k])) for k in MODEL_ITEMS}
    restored = self.manager.restore(int(step), args=ocp.args.Composite(**args))
    return {**target, **{k: restored[k] for k in MODEL_ITEMS}}

  def restore(self, step: int, target: dict[str, Any],
              data_iter: grain.DatasetIterator | None = None) -> dict[str, Any]:
    """The state saved at `step`, laid out like `target`; moves `data_iter` there too."""
    args = {k: ocp.args.StandardRestore(abstract_like(v)) for k, v in _split(target).items()}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(int(step), args=ocp.args.Composite(**args))
    return _join(restored)

  def restore_latest(self, target: dict[str, Any], data_iter: grain.DatasetIterator | None = None
                     ) -> tuple[dict[str, Any], int | None, list[str]]:
    """(state, step, skipped) of the newest checkpoint that restores; (target, None, []) if none.

    Newer checkpoints that do not restore are named with their error in
    `skipped` and moved to WORKDIR/checkpoints_unrestorable/ (kept for
    inspection, out of the way of new saves and of gsq-eval). When none
    restores, nothing is moved and CheckpointError lists every error.
    """
    skipped, failed = [], []
    for step in sorted(self.all_steps(), reverse=True):
      error = None
      try:
        bad = _invalid_json(self.directory / str(step))
        if bad:
          raise CheckpointError(bad)
        if self.has_train_state(step):
          state = self.restore(step, target, data_iter)
        else:  # weights only (gsq-import): a fresh train state around them
          state = self.restore_weights(step, target)
      except Exception as e:  # pylint: disable=broad-except
        error = e
      if _all_processes_agree(error is None):
        for bad_step, reason in failed:
          where = self._set_aside(bad_step)
          logging.warning("Checkpoint of step %d does not restore (%s); resumed from step %d "
                          "instead and moved it to %s", bad_step, reason, step, where)
          skipped.append(f"step {bad_step} ({reason})")
        return state, step, skipped
      reason = f"{type(error).__name__}: {error}" if error else "failed on another process"
      logging.warning("Checkpoint of step %d does not restore (%s); trying the previous one",
                      step, reason)
      failed.append((step, reason))
    if failed:
      raise CheckpointError(f"no checkpoint in {self.directory} restores: " + "; ".join(
          f"step {s} ({r})" for s, r in failed))
    return target, None, skipped

  def _set_aside(self, step: int) -> pathlib.Path:
    folder = self.directory.parent / UNRESTORABLE_DIR
    target = folder / str(step)
    if jax.process_index() == 0:
      folder.mkdir(exist_ok=True)
      n = 1
      while target.exists():
        target, n = folder / f"{step}-{n}", n + 1
      shutil.move(str(self.directory / str(step)), str(target))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"gsq_set_aside_{step}")
    self.manager.reload()
    return target

  def restore_item(self, step: int, name: str, target: Any) -> Any:
    """One item ("params", "ema", "train") of the checkpoint at `step`."""
    restored = self.manager.restore(
        int(step), args=ocp.args.Composite(**{name: ocp.args.StandardRestore(
            abstract_like(target))}))
    return restored[name]

  def wait_until_finished(self) -> None:
    """Blocks until the pending save is committed (raises if it failed)."""
    self._confirm()

  def close(self) -> None:
    """Waits for a pending save and closes; an error is logged, not raised (the caller may
    be unwinding from another one, which must stay the reported cause)."""
    try:
      self.manager.wait_until_finished()
      self.manager.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.error("Closing the checkpoint manager: %s: %s", type(e).__name__, e)
    if not self._read_only:
      self.remove_partial()  # the background threads are done: nothing writes there now


# ----------------------------------------------------------------------------
# Loading a trained tokenizer (evaluation, export).
# ----------------------------------------------------------------------------
def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The resolved config a run wrote to WORKDIR/config.json."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: `workdir` must be a gsq-train run directory "
                            "(it writes config.json at start-up)")
  with open(path, encoding="utf-8") as f:
    record = json.load(f)
  record.pop(ENVIRONMENT_KEY, None)  # what the run ran on, not part of its config
  return ml_collections.ConfigDict(record)


def restore_tokenizer(workdir: str | os.PathLike, *, ema: bool = True,
                      step: int | None = None) -> tuple[Tokenizer, ml_collections.ConfigDict, int]:
  """Builds the run's Tokenizer and loads its (EMA) weights.

  Args:
    workdir: a gsq-train run directory (config.json + checkpoints/).
    ema: load the EMA weights (default, what the paper evaluates) or the raw
      training weights.
    step: checkpoint step; default the latest.

  Returns:
    (tokenizer, config, step). The weights are replicated over all devices.
    No optimiser state is read.
  """
  config = load_config(workdir)
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    available = ckpt.all_steps()
    if not available:
      raise FileNotFoundError(f"no checkpoint in {ckpt.directory}; train first (gsq-train)")
    if step is None:
      step = max(available)
    elif step not in available:
      raise ValueError(f"restore_tokenizer: `step`={step} is not saved in {ckpt.directory}; "
                       f"available steps: {sorted(available)}")
    tokenizer = Tokenizer.from_config(config.model, rngs=nnx.Rngs(0))
    params = nnx.state(tokenizer, nnx.Param)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("devices",))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    restored = ckpt.restore_item(step, "ema" if ema else "params", params)
  finally:
    ckpt.close()
  nnx.update(tokenizer, restored)
  return tokenizer, config, int(step)
