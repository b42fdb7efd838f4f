r"""The config a run directory recorded (its config.json), e.g. to fine-tune an imported model.

  gsq-import flex_gen checkpoint.pt --workdir runs/gsq_f8 && \
  gsq-train --config configs/from_run.py:runs/gsq_f8 --workdir runs/gsq_f8 \
      --config.train.total_steps=1000

The arg is the run directory; `--config.KEY=VALUE` flags override fields as
for any config file. gsq-train on a directory whose checkpoint holds weights
only (gsq-import) fine-tunes them from a fresh optimiser state.
"""

from __future__ import annotations

import ml_collections

from gsq_jax.training import checkpointing


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if not arg:
    raise ValueError("configs/from_run.py needs the run directory: configs/from_run.py:DIR")
  return checkpointing.load_config(arg)
