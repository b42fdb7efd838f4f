"""`gsq-eval`: evaluate the latest checkpoint of one or several run directories.

  gsq-eval --workdir DIR [--workdir DIR2 ...] [--data SOURCE] [--num-images N]
           [--image-size S] [--crop center|crop_pct] [--ema/--no-ema] [--step S] [--out-dir OUT]
           [--table DIR] [--distributed auto|on|off] [--compilation-cache DIR|off] [--verbose]

Restores the tokenizer of DIR with `gsq_jax.training.checkpointing.restore_tokenizer`
(EMA weights unless --no-ema; the default is the run's eval.use_ema, True),
evaluates it with the run's `config.eval` settings
(`gsq_jax.evaluation.evaluator.run_evaluation`) and writes OUT/eval.json and
OUT/eval_grid.png (OUT defaults to DIR). Prints the flat metrics as one JSON
line on stdout and the files written on stderr; library logs (orbax, grain)
only with --verbose.

Several --workdir (e.g. released GSQ and IBQ tokenizers after gsq-import):
each run is evaluated on the same images (the settings are checked first,
`compare.check_same_images`), its eval.json goes to its workdir (or
OUT/<run name>), and one table of PSNR / SSIM / LPIPS / rFID / usage /
perplexity / bits per image is printed (Markdown) and, with --table DIR,
written as DIR/compare.csv and DIR/compare.md. Exit code 0 on success; bad
arguments exit 2; runs that cannot be compared exit 1 with the reason.
"""

from __future__ import annotations

import argparse
import json
import logging as logging_std
import os
import sys
from typing import Any, Sequence

from absl import logging

from gsq_jax.utils import cli_args


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="gsq-eval", description="Evaluate the latest checkpoint of a gsq_jax run "
      "(reconstruction metrics, LPIPS, rFID when the Inception weights are available, "
      "FD-VGG16, KID, codebook usage) and write eval.json plus a PNG grid.")
  parser.add_argument("--workdir", required=True, action="append",
                      help="run directory (config.json + checkpoints/); repeat it to "
                      "evaluate several runs on the same images into one table")
  parser.add_argument("--data", default=None, metavar="SOURCE",
                      help="eval data source, e.g. folder:PATH or tfds:imagenet2012:validation "
                      "(default: config.eval.source, then config.data.eval_source)")
  parser.add_argument("--num-images", type=cli_args.positive_int, default=None, metavar="N",
                      help="evaluate the first N images only (default: config.eval.num_images)")
  parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                      help="evaluate the EMA weights (as the GSQ reference) or the raw "
                      "generator weights (--no-ema); default: config eval.use_ema (True)")
  parser.add_argument("--image-size", type=cli_args.positive_int, default=None, metavar="S",
                      help="evaluation resolution (default: the run's train.image_size)")
  parser.add_argument("--crop", choices=("center", "crop_pct"), default=None,
                      help="evaluation crop: center (resize shorter side to S) or crop_pct "
                      "(resize S / 0.875, center crop S); default: the run's eval.crop")
  parser.add_argument("--table", default=None, metavar="DIR",
                      help="also write the side-by-side table as DIR/compare.csv and .md")
  parser.add_argument("--step", type=cli_args.non_negative_int, default=None,
                      help="checkpoint step to evaluate (default: the latest)")
  parser.add_argument("--out-dir", default=None,
                      help="where eval.json and eval_grid.png go (default: --workdir; with several "
                      "workdirs OUT/<run name>)")
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


def _load_configs(args) -> dict[str, Any]:
  """config.json of every workdir, with --image-size applied."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from gsq_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  configs = {}
  for workdir in args.workdir:
    config = checkpointing.load_config(workdir)
    if args.image_size is not None:
      config.train.image_size = args.image_size
    if args.crop is not None:
      if config.get("eval") is None:
        config.eval = ml_collections.ConfigDict()
      config.eval.crop = args.crop
    configs[workdir] = config
  return configs


def _evaluate_runs(args, configs, names) -> list[dict]:
  """Evaluates each workdir (metric networks loaded once per eval setting)."""
  # Imported here so `--help` and argument errors need no JAX start-up.
  from gsq_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from gsq_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  metric_models = {}
  results = []
  for (workdir, config), name in zip(configs.items(), names):
    ema = _config_use_ema(workdir) if args.ema is None else args.ema
    if args.out_dir is None:
      out_dir = workdir
    else:
      out_dir = args.out_dir if len(configs) == 1 else os.path.join(args.out_dir, name)
    tokenizer, _, step = checkpointing.restore_tokenizer(workdir, ema=ema, step=args.step)
    eval_cfg = evaluator.resolve_eval_config(config.get("eval"))
    key = json.dumps({k: eval_cfg[k] for k in ("lpips", "inception_weights", "kid",
                                               "fd_vgg16", "inception_preprocess")})
    if key not in metric_models:
      metric_models[key] = evaluator.load_metric_models(eval_cfg)
    result = evaluator.run_evaluation(
        tokenizer, config, out_dir=out_dir, source=args.data, num_images=args.num_images,
        use_ema_note=ema, step=step, metric_models=metric_models[key])
    print(f"gsq-eval: {name}: step {step}; wrote "
          f"{os.path.join(out_dir, evaluator.EVAL_FILENAME)}", file=sys.stderr)
    results.append(result)
  return results


def main(argv: Sequence[str] | None = None) -> int:
  """Console entry point (`gsq-eval=gsq_jax.evaluation.cli:main`)."""
  parser = build_parser()
  args = parser.parse_args(argv)
  for workdir in args.workdir:
    if not os.path.isdir(workdir):
      parser.error(f"--workdir {workdir!r} is not a directory")
  import jax  # pylint: disable=g-import-not-at-top
  from gsq_jax import sharding  # pylint: disable=g-import-not-at-top
  from gsq_jax.evaluation import compare  # pylint: disable=g-import-not-at-top
  from gsq_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  from gsq_jax.sweeps import collect  # pylint: disable=g-import-not-at-top
  from gsq_jax.utils import compilation_cache  # pylint: disable=g-import-not-at-top
  from gsq_jax.utils import quiet_logs  # pylint: disable=g-import-not-at-top

  if args.verbose:
    logging.set_verbosity(logging.INFO)
  else:  # what a user reads: the JSON line or table below, warnings and errors
    logging.set_verbosity(logging.WARNING)
    quiet_logs.install(min_level=logging_std.ERROR)  # orbax: "read only" restore warnings
  compilation_cache.enable(args.compilation_cache)
  names = compare.run_names(args.workdir)
  if len(set(names)) != len(names):
    parser.error("--workdir: the same run directory is given twice")
  try:
    configs = _load_configs(args)
    if len(configs) > 1:
      compare.check_same_images({n: compare.image_settings(c, source=args.data,
                                                           num_images=args.num_images)
                                 for n, c in zip(names, configs.values())})
  except (ValueError, FileNotFoundError) as e:
    print(f"gsq-eval: error: {e}", file=sys.stderr)
    return 1
  # A multi-host allocation evaluates with every host feeding its share, as training does.
  sharding.initialize_distributed(mode=args.distributed)
  results = _evaluate_runs(args, configs, names)
  rows = [compare.table_row(n, w, c, r)
          for n, (w, c), r in zip(names, configs.items(), results)]
  table = compare.comparison_table(rows)
  if args.table is not None and jax.process_index() == 0:
    collect.write_tables(table, args.table, "compare")
  if len(results) == 1:
    result = results[0]
    print(json.dumps(evaluator.json_safe(evaluator.scalar_metrics(
        {**result, "step": result["protocol"]["step"],
         "num_images": result["protocol"]["num_images"]}))))
  else:
    print(collect.to_markdown(table), end="")
  return 0


if __name__ == "__main__":
  sys.exit(main())
