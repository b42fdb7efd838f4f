"""The trainer: `gsq-train` and everything one training run is made of.

Read in this order:

* `train.py`: the loop and the CLI (`gsq-train` / `python -m gsq_jax.training.train`):
  build the state, restore or start, step, log, checkpoint, evaluate, DONE.
* `construction.py`: networks, optimisers, train state and jitted functions of a run (the
  one construction path, also gsq-plan's: `build(config, mesh, shapes_only=True)`).
* `cli_help.py`: `gsq-train --help` (flags and config arg keys) and one-line flag errors.
* `steps.py`: the pure, jitted generator and discriminator steps and the usage report.
* `losses.py`: reconstruction, perceptual, GAN and quantizer loss terms as pure functions.
* `optim.py`: AdamW for G and D, LR schedules, gradient clipping, the EMA.
* `checkpointing.py`: orbax checkpoints (atomic, exact resume) and loading a trained tokenizer.
* `run_config.py`: checks of a whole run config before anything compiles.
* `run_guards.py`: preemption signals, NaN watch, corrupt-input counter, DONE/FAILED files
  and the one-line failure reasons.
* `workdir.py`: the workdir lock and the config a started run may not change.
* `writers.py`: metrics.jsonl, TensorBoard, PNG grids and progress lines.
"""
