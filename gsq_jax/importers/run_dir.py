"""Writing an imported model as a gsq_jax run directory.

  WORKDIR/config.json          the run config with the derived `model` block
  WORKDIR/checkpoints/0/       orbax, the trainer's format: `params` and `ema`
                               (both the imported weights), no train state
  WORKDIR/imported_from.json   provenance: source kind, file name, SHA-256, details

gsq-eval reads it like any run (restore_tokenizer), and gsq-train started on
it fine-tunes the weights from a fresh optimiser state
(Checkpointer.has_train_state). The config runs in float32 (model.dtype and
train.compute_dtype), the precision the imported numbers are checked in;
override both for bf16 fine-tuning.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import ml_collections
from flax import nnx

from gsq_jax.importers import reader
from gsq_jax.training import checkpointing
from gsq_jax.utils.files import atomic_write_json, atomic_write_text

PROVENANCE_FILE = "imported_from.json"
IMPORT_STEP = 0


def run_config(base: ml_collections.ConfigDict, imported: reader.ImportedModel
               ) -> ml_collections.ConfigDict:
  """`base` (train/data/loss/eval/... settings) with the imported model block."""
  config = ml_collections.ConfigDict(base.to_dict())  # resolves field references
  config.model = imported.model_config
  config.train.compute_dtype = "float32"
  config.model.dtype = "float32"
  loss = imported.details.get("loss", {})
  for key, value in loss.items():
    if key in config.get("loss", {}):
      config.loss[key] = value
  return config


def write_run_dir(workdir: str | os.PathLike, imported: reader.ImportedModel,
                  config: ml_collections.ConfigDict, provenance: dict[str, Any]) -> pathlib.Path:
  """Writes config.json, the weights-only checkpoint and imported_from.json."""
  workdir = pathlib.Path(workdir).absolute()
  if (workdir / checkpointing.CHECKPOINT_DIR).exists() or (workdir / "config.json").exists():
    raise FileExistsError(f"{workdir} already holds a run (config.json or checkpoints/); "
                          "import into a new --workdir")
  workdir.mkdir(parents=True, exist_ok=True)
  params = nnx.state(imported.tokenizer, nnx.Param)
  ckpt = checkpointing.Checkpointer(workdir, keep=1, async_save=False)
  try:
    ckpt.save_weights(IMPORT_STEP, params, params)  # EMA = the imported weights
  finally:
    ckpt.close()
  atomic_write_text(workdir / "config.json", config.to_json_best_effort(indent=2, sort_keys=True))
  atomic_write_json(workdir / PROVENANCE_FILE, provenance)
  return workdir
