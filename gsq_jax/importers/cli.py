"""`gsq-import`: a released PyTorch tokenizer checkpoint -> a gsq_jax run directory.

  gsq-import flex_gen PATH/checkpoint.pt --workdir DIR      # GSQ (HelmholtzAI-FZJ/flex_gen)
  gsq-import ibq PATH/model.ckpt --workdir DIR [--no-ema]   # IBQ (TencentARC/SEED-Voken)

then `gsq-eval --workdir DIR`, or fine-tune with
`gsq-train --config configs/from_run.py:DIR --workdir DIR`. No network: the
file is local. `--config FILE[:ARG]` (plus `--config.KEY=VALUE`) gives the
run settings around the imported model (default configs/gsq.py for flex_gen,
configs/ibq_262144.py for IBQ); the `model` block always comes from the file.
Exits 1 with the reason on any bad input.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Sequence

DEFAULT_CONFIGS = {"flex_gen": "configs/gsq.py", "ibq": "configs/ibq_262144.py"}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="gsq-import", description=__doc__.split("\n\n")[0])
  parser.add_argument("kind", choices=sorted(DEFAULT_CONFIGS),
                      help="flex_gen (GSQ checkpoint.pt) or ibq (SEED-Voken Lightning .ckpt)")
  parser.add_argument("path", help="the local checkpoint file")
  parser.add_argument("--workdir", required=True, help="new run directory to write")
  parser.add_argument("--no-ema", dest="ema", action="store_false",
                      help="ibq: import the raw weights instead of the EMA shadows that "
                      "official inference uses")
  parser.add_argument("--resolution", type=int, default=256,
                      help="ibq: the nominal resolution that names the attention levels "
                      "(the released models: 256)")
  parser.add_argument("--config", default=None,
                      help="run settings FILE[:ARG] (default: configs/gsq.py for flex_gen, "
                      "configs/ibq_262144.py for ibq)")
  return parser


def _config_spec(kind: str, given: str | None) -> str:
  if given:
    return given
  relative = DEFAULT_CONFIGS[kind]
  for root in (pathlib.Path.cwd(), pathlib.Path(__file__).resolve().parents[2]):
    if (root / relative).is_file():
      return str(root / relative)
  raise ValueError(f"--config not given and {relative} not found in the current directory or "
                   "the gsq_jax checkout; pass --config FILE[:ARG]")


def main(argv: Sequence[str] | None = None) -> int:
  """Console entry point (`gsq-import=gsq_jax.importers.cli:main`)."""
  parser = build_parser()
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
  # Imported here so `--help` and argument errors need no JAX start-up.
  # pylint: disable=import-outside-toplevel
  from absl import logging
  from gsq_jax import __version__
  from gsq_jax.importers import flex_gen, ibq, run_dir
  from gsq_jax.models import parameter_counts
  from gsq_jax.sweeps.grid import parse_config_spec
  from gsq_jax.utils.files import file_sha256

  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  try:
    spec = _config_spec(args.kind, args.config)
    base = parse_config_spec(spec, overrides)
    if args.kind == "flex_gen":
      if not args.ema:
        raise ValueError("--no-ema applies to ibq only: a flex_gen checkpoint.pt holds one "
                         "weight set (the trainer saves its EMA model)")
      imported = flex_gen.import_flex_gen(args.path)
      weights = "as stored (flex_gen saves its EMA model)"
    else:
      imported = ibq.import_ibq(args.path, ema=args.ema, resolution=args.resolution)
      weights = "ema" if args.ema else "raw"
    config = run_dir.run_config(base, imported)
    provenance = {
        "source_kind": imported.source_kind,
        "file": os.path.basename(args.path),
        "path": os.path.abspath(args.path),
        "sha256": file_sha256(args.path),
        "weights": weights,
        "run_config": spec,
        "parameter_counts": parameter_counts(imported.tokenizer),
        "details": imported.details,
        "gsq_jax_version": __version__,
    }
    workdir = run_dir.write_run_dir(args.workdir, imported, config, provenance)
  except (ValueError, FileExistsError, FileNotFoundError) as e:
    print(f"gsq-import: error: {e}", file=sys.stderr)
    return 1
  print(f"gsq-import: wrote {workdir} ({imported.source_kind}, "
        f"{provenance['parameter_counts']['total']:,} parameters); evaluate with "
        f"`gsq-eval --workdir {workdir}`")
  return 0


if __name__ == "__main__":
  sys.exit(main())
