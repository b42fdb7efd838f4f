"""`gsq-plan`: compile a run for a TPU/GPU target on a CPU host and report what it needs.

Deviceless ahead-of-time compilation (spec/AOT.md) of exactly the programs
the trainer runs, built by the trainer's own construction path
(`training.construction.build(..., shapes_only=True)`): per-device memory against the
target, fit and the memory fraction to set, model FLOPs, a roofline estimate
of step time and device-hours, for one config or every point of a sweep
(`gsq-sweep SWEEP --plan --target T`). Needs the extra `[plan-gpu]` or
`[plan-tpu]`.

Files, in reading order:
  targets.py   target strings (gpu:h100:8, tpu:v5e:2x2), device figures, deviceless devices
  flops.py     model FLOPs of a traced program, loops times trip counts
  programs.py  the trainer's programs traced and compiled for a mesh; memory per device
  plan.py      one run on one target: fit, fixes tried by compiling, roofline, device-hours
  report.py    the stdout table, plan.csv and plan.json
  cli.py       the `gsq-plan` command
  gpu_targets/ XLA GPU target descriptions (H100, A100 80GB, B200)
"""
