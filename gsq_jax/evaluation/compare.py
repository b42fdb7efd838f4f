"""Several runs on the same images: one side-by-side table.

`gsq-eval --workdir A --workdir B ...` evaluates every run (trained or
imported, e.g. the released GSQ and IBQ tokenizers) and prints one table of
PSNR / SSIM / LPIPS / rFID / usage / perplexity / bits per image. A table only
compares if every run saw the same images at the same size and crop, so the
settings are checked before anything is evaluated, and a difference names the
field and the gsq-eval flag that makes them equal.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping, Sequence

import pandas as pd

from gsq_jax.data import input_pipeline
from gsq_jax.evaluation import eval_config

COLUMNS = ("run", "quantizer", "f", "D", "G", "V", "step", "ema", "images", "resolution",
           "psnr", "ssim", "lpips_alex", "lpips_vgg", "rfid", "usage", "perplexity",
           "bits_per_image", "tie_break", "distance_dtype", "workdir")
# field -> the gsq-eval flag that sets it for every run
_FIXES = {"source": "--data SOURCE", "num_images": "--num-images N",
          "image_size": "--image-size S", "crop": "--crop center|crop_pct",
          "crop_pct": "data.crop_pct in each config.json"}


def image_settings(config: Any, *, source: str | None = None,
                   num_images: int | None = None) -> dict[str, Any]:
  """Which images an evaluation of `config` reads: source, count, size, crop."""
  cfg = eval_config.resolve_eval_config(config.get("eval"))
  data = {**input_pipeline.default_config().to_dict(),
          **eval_config.eval_data_config(config, cfg, source=source, num_images=num_images)}
  return {"source": data["eval_source"] or data["source"], "num_images": data["eval_num_images"],
          "image_size": config.get("train", {}).get("image_size"), "crop": data["eval_crop"],
          "crop_pct": data["crop_pct"] if data["eval_crop"] == "crop_pct" else None}


def check_same_images(settings: Mapping[str, Mapping[str, Any]]) -> None:
  """Raises ValueError naming the first setting that differs between runs."""
  (first_run, first), *rest = settings.items()
  for run, values in rest:
    for field, value in values.items():
      if value != first[field]:
        raise ValueError(
            f"runs would be evaluated on different images: {field} is {first[field]!r} for "
            f"{first_run} but {value!r} for {run}; set it for all runs with "
            f"{_FIXES[field]}")


def run_names(workdirs: Sequence[str]) -> list[str]:
  """Folder names, or the whole paths where two folders share a name."""
  names = [pathlib.Path(w).resolve().name for w in workdirs]
  if len(set(names)) == len(names):
    return names
  return [os.fspath(pathlib.Path(w).resolve()) for w in workdirs]


def table_row(name: str, workdir: str, config: Any, result: Mapping[str, Any]) -> dict[str, Any]:
  model, protocol = config.get("model", {}), result.get("protocol", {})
  row = {"run": name, "quantizer": model.get("quantizer", {}).get("name"),
         "f": model.get("downsample_factor"), "D": model.get("latent_dim"),
         "G": model.get("num_groups"), "V": model.get("codebook_size"),
         "step": protocol.get("step"), "ema": protocol.get("ema"),
         "images": protocol.get("num_images"), "resolution": protocol.get("resolution"),
         "tie_break": protocol.get("tie_break"),
         "distance_dtype": protocol.get("distance_dtype"), "workdir": workdir}
  for key in COLUMNS:
    if key not in row and key in result:
      row[key] = result[key]
  return row


def comparison_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
  """The rows in COLUMNS order (metrics a run lacks, e.g. rfid, stay empty)."""
  df = pd.DataFrame(list(rows))
  return df[[c for c in COLUMNS if c in df.columns]]
