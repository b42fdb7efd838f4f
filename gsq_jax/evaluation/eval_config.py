"""The `config.eval` block: defaults, validation, and the eval data config it implies.

Kept apart from the evaluator so configs can build it without importing the
metric networks' machinery.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import ml_collections

from gsq_jax.data import input_pipeline
from gsq_jax.evaluation import inception as inception_lib

INCEPTION_PREPROCESS = inception_lib.PREPROCESS_MODES


def default_eval_config() -> ml_collections.ConfigDict:
  """The `eval` config block with its defaults.

  Fields:
    source: eval data source ('folder:PATH', 'tfds:NAME[:SPLIT]', 'demo');
      None = `data.eval_source` (else `data.source`).
    num_images: evaluate the first N images; None = all.
    crop: 'center' (resize shorter side to S, center crop) or 'crop_pct'
      (GSQ/timm: resize to S / data.crop_pct = 292, center crop 256);
      None = `data.eval_crop`.
    batch_size: global eval batch (divisible by the batch shards).
    use_ema: evaluate the EMA weights (the reference does).
    lpips: report LPIPS (AlexNet, the GSQ eval metric, and VGG16).
    inception_weights: path of the FID Inception file (or a folder with it).
    inception_preprocess: 'torch_fidelity' (TF1 bilinear resize, GSQ §4.3)
      or 'pytorch_fid'.
    kid, kid_subset_size, kid_num_subsets: KID and its subsets.
    fd_vgg16: report FD on LPIPS-VGG16 features (not rFID).
    grid_images: how many originals/reconstructions the PNG grid shows.
    seed: key for random code tie-breaking (folded with the batch index).
  """
  return ml_collections.ConfigDict(dict(
      source=ml_collections.FieldReference(None, field_type=str),
      num_images=ml_collections.FieldReference(None, field_type=int),
      crop=ml_collections.FieldReference(None, field_type=str),
      batch_size=32,
      use_ema=True,
      lpips=True,
      inception_weights=ml_collections.FieldReference(None, field_type=str),
      inception_preprocess="torch_fidelity",
      kid=True,
      kid_subset_size=1000,
      kid_num_subsets=100,
      fd_vgg16=True,
      grid_images=8,
      seed=0,
  ))


def resolve_eval_config(eval_cfg: Mapping[str, Any] | None) -> ml_collections.ConfigDict:
  """Defaults overlaid with `eval_cfg`; unknown or bad fields raise ValueError."""
  cfg = default_eval_config()
  for key in (eval_cfg or {}).keys():
    if key not in cfg:
      raise ValueError(f"eval.{key}: unknown field; known fields are {sorted(cfg.keys())}")
    value = eval_cfg[key]
    try:
      cfg[key] = os.fspath(value) if key == "inception_weights" and value is not None else value
    except TypeError as e:  # ConfigDict keeps each field's type.
      raise ValueError(f"eval.{key}: {e}") from None
  if cfg.crop is not None and cfg.crop not in input_pipeline.EVAL_CROPS:
    raise ValueError(f"eval.crop must be one of {input_pipeline.EVAL_CROPS} or None "
                     f"(= data.eval_crop), got {cfg.crop!r}")
  if cfg.inception_preprocess not in INCEPTION_PREPROCESS:
    raise ValueError(f"eval.inception_preprocess must be one of {INCEPTION_PREPROCESS}, "
                     f"got {cfg.inception_preprocess!r}")
  for key, low in (("batch_size", 1), ("kid_subset_size", 2), ("kid_num_subsets", 1),
                   ("grid_images", 0)):
    if not isinstance(cfg[key], int) or cfg[key] < low:
      raise ValueError(f"eval.{key} must be an integer >= {low}, got {cfg[key]!r}")
  if cfg.num_images is not None and cfg.num_images < 1:
    raise ValueError(f"eval.num_images must be a positive integer or None, got {cfg.num_images}")
  for key in ("use_ema", "lpips", "kid", "fd_vgg16"):
    if not isinstance(cfg[key], bool):
      raise ValueError(f"eval.{key} must be True or False, got {cfg[key]!r}")
  return cfg


def _block(config: Any, name: str) -> Any:
  """`config.<name>` of a ConfigDict or a plain mapping; None when absent."""
  if config is None:
    return None
  getter = getattr(config, "get", None)
  return getter(name) if getter is not None else getattr(config, name, None)


def eval_data_config(config: Any, eval_cfg: ml_collections.ConfigDict, *,
                     source: str | None = None,
                     num_images: int | None = None) -> dict[str, Any]:
  """The `data` block for `make_eval_iterator`: eval source, crop and count applied.

  Precedence: explicit arguments, then `eval.*`, then `data.eval_*`.
  """
  data = dict(_block(config, "data") or {})
  source = source or eval_cfg.source
  if source is not None:
    data["eval_source"] = source
  if eval_cfg.crop is not None:
    data["eval_crop"] = eval_cfg.crop
  if num_images is not None:
    if not isinstance(num_images, int) or num_images < 1:
      raise ValueError(f"num_images must be a positive integer or None, got {num_images!r}")
    data["eval_num_images"] = num_images
  elif eval_cfg.num_images is not None:
    data["eval_num_images"] = eval_cfg.num_images
  return data


def _image_size(config: Any) -> int:
  size = _block(_block(config, "train"), "image_size")
  if not isinstance(size, int) or size < 1:
    raise ValueError(f"config.train.image_size must be a positive integer (the eval "
                     f"resolution), got {size!r}")
  return size
