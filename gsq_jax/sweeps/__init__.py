"""Sweeps: grid files, the `gsq-sweep` launcher and the `gsq-collect` tables.

A sweep file (`sweeps/NAME.py`, the big_vision / Flax convention) defines

  CONFIG = "configs/gsq_gan_256.py"   # config of the paper-scale runs
  TINY_CONFIG = "configs/gsq.py:tiny" # config of `--tiny` runs (the default)
  OVERRIDES = {"train.total_steps": 50_000}   # optional, every run
  TINY_OVERRIDES = {"train.total_steps": 20}  # optional, every `--tiny` run

  def sweep(add, tiny=False):
    for D in (8, 16):
      add(D=D, G=1, V=8192, f=8)

Each point's `get_config` arg is `D=..,G=..,V=..,f=..` (plus `quantizer=`,
`res=` when given) followed by any arg after the `:` of the config spec.
The modules here turn the file into runs:

  grid      load the file, expand `sweep(add)`, validate every point
  manifest  run names, workdirs, config hashes, the ROOT/sweep.json manifest
  runner    one attempt of one run: lock, status file, exit-code meaning
  sites     site profiles (sweeps/sites/*.yaml)
  slurm     the job-array script and sbatch/squeue calls
  launch    the `gsq-sweep` CLI (local and SLURM job-array back ends)
  collect   the `gsq-collect` CLI (tidy scaling tables)
"""
