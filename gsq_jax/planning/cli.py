r"""`gsq-plan`: compile a run for a TPU/GPU target on this CPU host and report what it needs.

  gsq-plan --config configs/gsq_gan_256.py:D=64,G=4,V=256k,f=16 --target gpu:h100:8 \
      [--target tpu:v5p:2x2x1] [--batch 256 --batch 512] [--out DIR] \
      [--compiler-option xla_gpu_enable_triton_gemm=false] [--set mesh.fsdp=8 ...]

Prints one table row per (target, batch): per-device memory need vs what the
runtime hands out, fit, the GPU memory fraction to set, XLA's rematerialised
fusions, model FLOPs per step and per image, a roofline step time, images/s
and device-hours for train.total_steps; a point that does not fit gets the
smallest change that does (compiled too). `--out DIR` writes plan.csv and
plan.json. Needs the target's compiler: pip install 'gsq_jax[plan-gpu]' or
'gsq_jax[plan-tpu]'. Exit status: 0 planned (fitting or not), 2 bad
arguments or a missing toolchain.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from gsq_jax.planning import targets as targets_lib


def parse_compiler_options(items: Sequence[str]) -> dict[str, Any]:
  """NAME=VALUE strings -> compile() options (true/false, ints and floats converted)."""
  options = {}
  for item in items:
    name, sep, value = item.partition("=")
    if not sep or not name:
      raise ValueError(f"--compiler-option {item!r}: expected NAME=VALUE")
    lowered = value.lower()
    if lowered in ("true", "false"):
      options[name] = lowered == "true"
      continue
    for cast in (int, float):
      try:
        options[name] = cast(value)
        break
      except ValueError:
        pass
    else:
      options[name] = value
  return options


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
  """The options gsq-plan and `gsq-sweep --plan` share."""
  parser.add_argument("--target", action="append", default=[],
                      help="gpu:KIND:N[xHOSTS] or tpu:GEN:TOPOLOGY, e.g. gpu:h100:8, "
                      "gpu:h100:8x4, tpu:v5e:2x2 (repeatable)")
  parser.add_argument("--compiler-option", action="append", default=[], metavar="NAME=VALUE",
                      help="XLA option for compile(), e.g. xla_gpu_enable_triton_gemm=false")
  parser.add_argument("--no-eval", action="store_true", help="skip the eval step (faster)")
  parser.add_argument("--no-fixes", action="store_true",
                      help="do not search a change for runs that do not fit")
  parser.add_argument("--flops-only", action="store_true",
                      help="trace and count FLOPs without compiling (no memory figures)")
  parser.add_argument("--mfu", type=float, default=0.4,
                      help="assumed model-FLOPs utilisation for device-hours (default 0.4)")


def check_plan_arguments(args: argparse.Namespace) -> list[targets_lib.Target]:
  """The parsed --target list; ValueError / ToolchainMissing before anything is built."""
  if not args.target:
    raise ValueError("at least one --target is required (e.g. --target gpu:h100:8)")
  if not 0 < args.mfu <= 1:
    raise ValueError(f"--mfu must be in (0, 1], got {args.mfu}")
  parse_compiler_options(args.compiler_option)
  targets = [targets_lib.parse_target(s) for s in args.target]
  for target in targets:
    targets_lib.check_toolchain(target.platform)
  return targets


def plan_configs(labelled_configs, args: argparse.Namespace, *, on_plan=None) -> list:
  """Plans every (label, config) on every --target; `on_plan(plan)` after each."""
  targets = check_plan_arguments(args)
  options = parse_compiler_options(args.compiler_option)
  targets_lib.configure_host_for_deviceless()
  from gsq_jax.planning import plan as plan_lib  # pylint: disable=import-outside-toplevel
  plans = []
  for target in targets:
    devices = target.devices()
    for label, config in labelled_configs:
      plan = plan_lib.plan_run(config, target, label=label, devices=devices,
                               compiler_options=options, include_eval=not args.no_eval,
                               try_fixes=not args.no_fixes, mfu=args.mfu,
                               compile=not args.flops_only)
      plans.append(plan)
      if on_plan is not None:
        on_plan(plan)
  return plans


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="gsq-plan", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="config spec FILE:ARG")
  parser.add_argument("--set", action="append", default=[], metavar="BLOCK.FIELD=VALUE",
                      help="config override, as --config.BLOCK.FIELD=VALUE of gsq-train")
  parser.add_argument("--batch", action="append", type=int, default=[],
                      help="global batch size to plan (repeatable; default the config's)")
  parser.add_argument("--out", default=None, help="folder for plan.csv and plan.json")
  add_plan_arguments(parser)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """`gsq-plan` (the console script exits with the returned status)."""
  args = build_parser().parse_args(argv)
  from gsq_jax.planning import report  # pylint: disable=import-outside-toplevel
  from gsq_jax.sweeps import grid  # pylint: disable=import-outside-toplevel
  try:
    check_plan_arguments(args)
    targets_lib.configure_host_for_deviceless()  # before the config file imports JAX's backends
    overrides = [f"--config.{k}={v}" for k, v in grid.parse_set(args.set).items()]
    config = grid.parse_config_spec(args.config, overrides)
    configs = []
    name = os.path.basename(args.config)
    for batch in args.batch or [config.train.global_batch_size]:
      c = config.copy_and_resolve_references()
      c.train.global_batch_size = batch
      configs.append((f"{name} B{batch}", c))
    plans = plan_configs(configs, args,
                         on_plan=lambda p: print(report.format_table([p]) + "\n", flush=True))
  except (ValueError, FileNotFoundError, targets_lib.ToolchainMissing) as e:
    print(f"gsq-plan: {e}", file=sys.stderr)
    return 2
  print(report.format_table(plans))
  if args.out:
    for path in report.write(plans, args.out):
      print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
