"""`gsq-tokenize`: the codes of a whole data set, as .npy shards.

  gsq-tokenize --workdir DIR --data SOURCE --out OUT [--num-images N]
               [--image-size S] [--crop center|crop_pct] [--batch-size B]
               [--shard-size N] [--ema/--no-ema] [--step S] [--overwrite]

Reads SOURCE (`folder:PATH`, `tfds:NAME[:SPLIT]`, `demo[:N]`) through the
evaluation pipeline (no shuffle, deterministic crop; default size and crop:
the run's evaluation settings), tokenizes it with `gsq_jax.load_tokenizer`
(first-index ties, batch split over all local devices) and writes into the
folder OUT

  codes-KKKKK-of-NNNNN.npy   (n, h, w, G) codes of the images with global index
                             in [K * shard_size, (K + 1) * shard_size); uint16
                             when V <= 65536, else int32
  index-KKKKK-of-NNNNN.npy   (n,) int64: the source index of each row (a
                             corrupt image is skipped, so rows can be fewer)
  tokens.json                what was tokenized, how, and the shard list

Each file is written atomically, tokens.json last, so a folder with
tokens.json is complete. Exit code 0 on success, 2 on bad arguments, 1 with
the reason on any other failure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import tempfile
from typing import Any, Sequence

import numpy as np

from gsq_jax.utils import cli_args

MANIFEST = "tokens.json"


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="gsq-tokenize", description="Write the code indices of a data set, tokenized by "
      "a gsq_jax run (trained or imported), as .npy shards plus tokens.json.")
  parser.add_argument("--workdir", required=True, help="run directory (config.json + checkpoints/)")
  parser.add_argument("--data", required=True, metavar="SOURCE",
                      help="folder:PATH, tfds:NAME[:SPLIT] or demo[:N]")
  parser.add_argument("--out", required=True, help="output folder for the shards")
  parser.add_argument("--num-images", type=cli_args.positive_int, default=None, metavar="N",
                      help="tokenize the first N images only (default: all)")
  parser.add_argument("--image-size", type=cli_args.positive_int, default=None, metavar="S",
                      help="square crop size (default: the run's train.image_size)")
  parser.add_argument("--crop", choices=("center", "crop_pct"), default=None,
                      help="center (resize shorter side to S) or crop_pct (timm 0.875); "
                      "default: the run's evaluation crop")
  parser.add_argument("--batch-size", type=cli_args.positive_int, default=None, metavar="B",
                      help="images per step (default: the run's eval.batch_size)")
  parser.add_argument("--shard-size", type=cli_args.positive_int, default=10_000, metavar="N",
                      help="images per output shard (default 10000)")
  parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                      help="EMA weights (default) or the raw training weights (--no-ema)")
  parser.add_argument("--step", type=cli_args.non_negative_int, default=None,
                      help="checkpoint step (default: latest)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace the shards of an earlier run in --out")
  return parser


def _save_npy(path: pathlib.Path, array: np.ndarray) -> None:
  """np.save via a temp file and os.replace (readers never see half a shard)."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, array)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _shard_name(kind: str, k: int, num_shards: int) -> str:
  return f"{kind}-{k:05d}-of-{num_shards:05d}.npy"


def _code_dtype(codebook_size: int) -> np.dtype:
  return np.dtype(np.uint16) if codebook_size <= 2 ** 16 else np.dtype(np.int32)


def _prepare_out(out: pathlib.Path, overwrite: bool) -> None:
  if out.exists() and not out.is_dir():
    raise ValueError(f"--out {out} is a file; pass a folder for the shards")
  old = sorted(out.glob("codes-*.npy")) + sorted(out.glob("index-*.npy")) + (
      [out / MANIFEST] if (out / MANIFEST).exists() else [])
  if old and not overwrite:
    raise ValueError(f"--out {out} already holds tokenized shards ({old[0].name}, ...); "
                     "pass --overwrite to replace them or choose another folder")
  for path in old:
    path.unlink()
  out.mkdir(parents=True, exist_ok=True)


def tokenize_dataset(args: argparse.Namespace) -> dict[str, Any]:
  """Runs the tokenization described by parsed arguments; returns tokens.json."""
  # pylint: disable=import-outside-toplevel
  from gsq_jax.data import input_pipeline
  from gsq_jax.evaluation import eval_config
  from gsq_jax.inference import api
  import jax
  import tqdm

  if jax.process_count() > 1:
    raise ValueError("gsq-tokenize runs in one process (it splits batches over the local "
                     "devices); start it without jax.distributed")
  out = pathlib.Path(args.out)
  _prepare_out(out, args.overwrite)
  tok = api.load_tokenizer(args.workdir, ema=args.ema, step=args.step)
  eval_cfg = eval_config.resolve_eval_config(tok.config.get("eval"))
  if args.crop is not None:
    eval_cfg.crop = args.crop
  data_cfg = eval_config.eval_data_config(tok.config, eval_cfg, source=args.data,
                                          num_images=args.num_images)
  # The whole data set unless --num-images: the run's eval.num_images is an eval budget.
  data_cfg = {**input_pipeline.default_config().to_dict(), **data_cfg,
              "eval_num_images": args.num_images}
  image_size = args.image_size or tok.config.get("train", {}).get("image_size")
  if not isinstance(image_size, int):
    raise ValueError(f"{args.workdir}/config.json has no train.image_size; pass --image-size")
  if image_size % tok.downsample_factor:
    raise ValueError(f"--image-size {image_size} must be divisible by the run's down-sampling "
                     f"factor f = {tok.downsample_factor}")
  batch_size = args.batch_size or eval_cfg.batch_size
  data = input_pipeline.make_eval_iterator(data_cfg, global_batch_size=batch_size,
                                           image_size=image_size)
  num_shards = max(1, math.ceil(data.num_images / args.shard_size))
  dtype = _code_dtype(tok.codebook_size)
  pending: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
  shards = []

  def flush(k: int) -> None:
    parts = pending.pop(k, [])
    h = image_size // tok.downsample_factor
    codes = (np.concatenate([c for c, _ in parts]) if parts
             else np.zeros((0, h, h, tok.num_groups), dtype))
    index = np.concatenate([i for _, i in parts]) if parts else np.zeros((0,), np.int64)
    names = (_shard_name("codes", k, num_shards), _shard_name("index", k, num_shards))
    _save_npy(out / names[0], codes)
    _save_npy(out / names[1], index)
    shards.append({"codes": names[0], "index": names[1], "num_images": int(len(index))})

  next_shard = 0
  with tqdm.tqdm(total=data.num_images, unit="img", desc="gsq-tokenize",
                 disable=None) as progress:
    for batch in data:
      mask = np.asarray(batch["mask"], bool)
      if not mask.any():
        continue
      codes = np.asarray(tok.tokenize(batch["image"]))[mask].astype(dtype)
      index = np.asarray(batch["index"])[mask].astype(np.int64)
      for k in np.unique(index // args.shard_size):
        rows = index // args.shard_size == k
        pending.setdefault(int(k), []).append((codes[rows], index[rows]))
      progress.update(int(mask.sum()))
      # Eval batches come in index order: every shard below the batch's last image is done.
      while next_shard < index[-1] // args.shard_size:
        flush(next_shard)
        next_shard += 1
  while next_shard < num_shards:
    flush(next_shard)
    next_shard += 1

  manifest = {
      "workdir": os.path.abspath(args.workdir),
      "step": tok.step,
      "ema": tok.ema,
      "source": data_cfg["eval_source"],
      "image_size": image_size,
      "crop": data_cfg["eval_crop"],
      "requested_num_images": data.num_images,
      "num_images": sum(s["num_images"] for s in shards),
      "corrupt_images_skipped": data.corrupt_counter.count,
      "codes_shape": ["n", image_size // tok.downsample_factor,
                      image_size // tok.downsample_factor, tok.num_groups],
      "codes_dtype": dtype.name,
      "D": tok.latent_dim, "G": tok.num_groups, "V": tok.codebook_size,
      "f": tok.downsample_factor,
      "tie_break": tok.tie_break,
      "distance_dtype": tok.distance_dtype,
      "shard_size": args.shard_size,
      "shards": shards,
  }
  from gsq_jax.utils.files import atomic_write_json  # pylint: disable=import-outside-toplevel
  atomic_write_json(out / MANIFEST, manifest)
  return manifest


def load_codes(out: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """(codes, index) of a gsq-tokenize folder, all shards concatenated."""
  out = pathlib.Path(out)
  manifest_path = out / MANIFEST
  if not manifest_path.is_file():
    raise FileNotFoundError(f"{manifest_path} not found: not a finished gsq-tokenize folder")
  manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
  codes = [np.load(out / s["codes"]) for s in manifest["shards"]]
  index = [np.load(out / s["index"]) for s in manifest["shards"]]
  return np.concatenate(codes), np.concatenate(index)


def main(argv: Sequence[str] | None = None) -> int:
  """Console entry point (`gsq-tokenize=gsq_jax.inference.tokenize_cli:main`)."""
  parser = build_parser()
  args = parser.parse_args(argv)
  if not os.path.isdir(args.workdir):
    parser.error(f"--workdir {args.workdir!r} is not a directory")
  try:
    manifest = tokenize_dataset(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"gsq-tokenize: error: {e}", file=sys.stderr)
    return 1
  print(json.dumps({k: manifest[k] for k in ("num_images", "codes_shape", "codes_dtype")}
                   | {"out": os.path.abspath(args.out), "shards": len(manifest["shards"])}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
