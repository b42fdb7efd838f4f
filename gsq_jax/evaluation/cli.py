"""`gsq-eval`: evaluate the latest checkpoint of a run directory.

  gsq-eval --workdir DIR [--data SOURCE] [--num-images N] [--ema/--no-ema]
           [--step S] [--out-dir OUT] [--distributed auto|on|off] [--compilation-cache DIR|off]
           [--verbose]

Restores the tokenizer of DIR with `gsq_jax.training.checkpointing.restore_tokenizer`
(EMA weights unless --no-ema; the default is the run's eval.use_ema, True),
evaluates it with the run's `config.eval` settings
(`gsq_jax.evaluation.evaluator.run_evaluation`) and writes OUT/eval.json and
OUT/eval_grid.png (OUT defaults to DIR). Prints the flat metrics as one JSON
line on stdout and the files written on stderr; library logs (orbax, grain)
only with --verbose. Exit code 0 on success; bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging as logging_std
import os
import sys
from typing import Sequence

from absl import logging


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
  return value


def _non_negative_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = -1
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
  return value


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="gsq-eval", description="Evaluate the latest checkpoint of a gsq_jax run "
      "(reconstruction metrics, LPIPS, rFID when the Inception weights are available, "
      "FD-VGG16, KID, codebook usage) and write eval.json plus a PNG grid.")
  parser.add_argument("--workdir", required=True,
                      help="run directory (config.json + checkpoints/)")
  parser.add_argument("--data", default=None, metavar="SOURCE",
                      help="eval data source, e.g. folder:PATH or tfds:imagenet2012:validation "
                      "(default: config.eval.source, then config.data.eval_source)")
  parser.add_argument("--num-images", type=_positive_int, default=None, metavar="N",
                      help="evaluate the first N images only (default: config.eval.num_images)")
  parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                      help="evaluate the EMA weights (as the GSQ reference) or the raw "
                      "generator weights (--no-ema); default: config eval.use_ema (True)")
  parser.add_argument("--step", type=_non_negative_int, default=None,
                      help="checkpoint step to evaluate (default: the latest)")
  parser.add_argument("--out-dir", default=None,
                      help="where eval.json and eval_grid.png go (default: --workdir)")
  parser.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                      help="call jax.distributed.initialize(): auto = under SLURM/TPU/MPI or "
                      "when JAX_COORDINATOR_ADDRESS etc. are set (as gsq-train)")
  parser.add_argument("--compilation-cache", default=None, metavar="DIR|off",
                      help="persistent XLA compilation cache (default: as gsq-train)")
  parser.add_argument("--verbose", action="store_true",
                      help="also print INFO logs (checkpoint restore, data pipeline)")
  return parser


def _config_use_ema(workdir: str) -> bool:
  """`eval.use_ema` of DIR/config.json (True when absent, as the reference)."""
  try:
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
      use_ema = (json.load(f).get("eval") or {}).get("use_ema", True)
  except (OSError, ValueError, AttributeError):
    return True  # restore_tokenizer reports a missing or broken config.json.
  return bool(use_ema)


def main(argv: Sequence[str] | None = None) -> int:
  """Console entry point (`gsq-eval=gsq_jax.evaluation.cli:main`)."""
  parser = build_parser()
  args = parser.parse_args(argv)
  if not os.path.isdir(args.workdir):
    parser.error(f"--workdir {args.workdir!r} is not a directory")
  # Imported here so `--help` and argument errors need no JAX start-up.
  from gsq_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from gsq_jax import sharding  # pylint: disable=g-import-not-at-top
  from gsq_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  from gsq_jax.utils import compilation_cache  # pylint: disable=g-import-not-at-top
  from gsq_jax.utils import quiet_logs  # pylint: disable=g-import-not-at-top

  if args.verbose:
    logging.set_verbosity(logging.INFO)
  else:  # what a user reads: the JSON line below, warnings and errors
    logging.set_verbosity(logging.WARNING)
    quiet_logs.install(min_level=logging_std.ERROR)  # orbax: "read only" restore warnings
  compilation_cache.enable(args.compilation_cache)
  # A multi-host allocation evaluates with every host feeding its share, as training does.
  sharding.initialize_distributed(mode=args.distributed)
  ema = _config_use_ema(args.workdir) if args.ema is None else args.ema
  out_dir = args.out_dir or args.workdir
  tokenizer, config, step = checkpointing.restore_tokenizer(args.workdir, ema=ema,
                                                            step=args.step)
  result = evaluator.run_evaluation(
      tokenizer, config, out_dir=out_dir, source=args.data, num_images=args.num_images,
      use_ema_note=ema, step=step)
  written = [os.path.join(out_dir, evaluator.EVAL_FILENAME)]
  if result["protocol"].get("grid"):
    written.append(os.path.join(out_dir, evaluator.GRID_FILENAME))
  print(f"gsq-eval: step {step}, {result['protocol']['num_images']} images; wrote "
        f"{' and '.join(written)}", file=sys.stderr)
  print(json.dumps(evaluator.json_safe(evaluator.scalar_metrics(
      {**result, "step": step, "num_images": result["protocol"]["num_images"]}))))
  return 0


if __name__ == "__main__":
  sys.exit(main())
