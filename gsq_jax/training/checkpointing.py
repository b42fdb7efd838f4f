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
never leaves a half checkpoint that looks finished) and keeps the newest
`keep` checkpoints.

Restoring needs target arrays with concrete shardings: build them from a
freshly initialised state with `abstract_like` (an `nnx.eval_shape` target
carries an AbstractMesh, which orbax cannot place).
"""

from __future__ import annotations

import json
import os
import pathlib
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
CHECKPOINT_DIR = "checkpoints"


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs carrying each array's concrete sharding (a restore target)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _split(state: dict[str, Any]) -> dict[str, Any]:
  train = {k: v for k, v in state.items() if k not in MODEL_ITEMS}
  return {"params": state["params"], "ema": state["ema"], "train": train}


def _join(items: Any) -> dict[str, Any]:
  return {"params": items["params"], "ema": items["ema"], **items["train"]}


class Checkpointer:
  """The run's orbax CheckpointManager: save/restore of state + data iterator."""

  def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"train.keep_checkpoints must be an integer >= 1, got {keep!r}")
    self.directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, read_only=read_only,
        create=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: dict[str, Any],
           data_iter: grain.DatasetIterator | None = None) -> bool:
    """Starts an (async) save of `state` and the iterator position at `step`."""
    items = _split(state)
    args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self.manager.save(int(step), args=ocp.args.Composite(**args), force=True)
    if saved:
      logging.info("Checkpoint of step %d started in %s", step, self.directory)
    return saved

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

  def restore_item(self, step: int, name: str, target: Any) -> Any:
    """One item ("params", "ema", "train") of the checkpoint at `step`."""
    restored = self.manager.restore(
        int(step), args=ocp.args.Composite(**{name: ocp.args.StandardRestore(
            abstract_like(target))}))
    return restored[name]

  def wait_until_finished(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


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
    return ml_collections.ConfigDict(json.load(f))


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
