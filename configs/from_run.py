r"""The config a run directory recorded (its config.json), e.g. to fine-tune an imported model.

  gsq-import flex_gen checkpoint.pt --workdir runs/gsq_f8 && \
  gsq-train --config configs/from_run.py:runs/gsq_f8 --workdir runs/gsq_f8 \
      --config.train.total_steps=1000

The arg is the run directory; `--config.KEY=VALUE` flags override fields as
for any config file. gsq-train on a directory whose checkpoint holds weights
only (gsq-import) fine-tunes them from a fresh optimiser state.
"""

from __future__ import annotations

import json
import pathlib

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if not arg:
    raise ValueError("configs/from_run.py needs the run directory: configs/from_run.py:DIR")
  path = pathlib.Path(arg) / "config.json"
  if not path.is_file():
    raise ValueError(f"configs/from_run.py: {path} not found; pass a gsq-train or gsq-import "
                     "run directory")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))
