"""Checks of a whole run config before anything compiles, and the paper symbols it records.

`validate_config` raises ValueError (FileNotFoundError for missing weight
files) naming the field and the fix: a bad sweep point or command-line
override fails in milliseconds, not after minutes of compilation.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from gsq_jax.training import optim
from gsq_jax import sharding as sharding_lib
from gsq_jax.training import steps
from gsq_jax.models import weights as weights_lib
from gsq_jax.models import dino as dino_lib
from gsq_jax.models import remat
from gsq_jax.models import parameter_counts_from_config
from gsq_jax.models import validate_model_config
from gsq_jax.models.tokenizer import COMPUTE_DTYPES

BLOCKS = ("model", "data", "train", "optim", "loss", "disc", "eval", "mesh")


def _positive_int(cfg, block: str, field: str, minimum: int = 1) -> int:
  value = cfg[field]
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{block}.{field} must be an integer >= {minimum}, got {value!r}")
  return value


MEMORY_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"


def validate_memory_fraction(value: Any) -> float | None:
  """train.gpu_memory_fraction: None (JAX's default) or a number in (0, 1]."""
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
    raise ValueError(f"train.gpu_memory_fraction must be a number in (0, 1] (the share of "
                     f"each GPU's memory JAX preallocates; gsq-plan recommends one) or None, "
                     f"got {value!r}")
  return float(value)


def apply_memory_fraction(config: ml_collections.ConfigDict) -> float | None:
  """Sets $XLA_PYTHON_CLIENT_MEM_FRACTION from train.gpu_memory_fraction.

  Must run before JAX initialises its backends (the GPU allocator reads the
  variable once); raises RuntimeError when it is too late to take effect.
  """
  fraction = validate_memory_fraction(config.train.get("gpu_memory_fraction"))
  if fraction is None:
    return None
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if xla_bridge.backends_are_initialized():
    raise RuntimeError("train.gpu_memory_fraction must be applied before JAX initialises its "
                       "backends; set $XLA_PYTHON_CLIENT_MEM_FRACTION instead")
  os.environ[MEMORY_FRACTION_ENV] = f"{fraction:g}"
  return fraction


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int,
                    process_count: int, need_weights: bool = True) -> None:
  """Raises ValueError (FileNotFoundError for weight files) naming the field and the fix.

  `need_weights=False` (planning: shapes only) skips the weight-file checks.
  """
  for block in BLOCKS:
    if block not in config:
      raise ValueError(f"config.{block} is missing; start from configs/gsq.py:get_config()")
  validate_model_config(config.model)
  parameter_counts_from_config(config.model)  # quantizer options vs D, G, V
  t, m = config.train, config.model
  for field in ("total_steps", "global_batch_size", "image_size", "log_every_steps",
                "checkpoint_every_steps", "keep_checkpoints", "num_image_samples",
                "preemption_check_every_steps", "dead_code_steps"):
    _positive_int(t, "train", field)
  for field in ("image_every_steps", "eval_every_steps", "seed"):
    _positive_int(t, "train", field, minimum=0)
  if not isinstance(t.inject_nan_at_step, int) or t.inject_nan_at_step < -1:
    raise ValueError(f"train.inject_nan_at_step must be -1 (off) or a step number, "
                     f"got {t.inject_nan_at_step!r}")
  for field in ("final_eval", "fast_cpu_convs"):
    if not isinstance(t[field], bool):
      raise ValueError(f"train.{field} must be True or False, got {t[field]!r}")
  if t.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"train.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, "
                     f"got {t.compute_dtype!r}")
  if m.dtype != t.compute_dtype:
    raise ValueError(f"model.dtype = {m.dtype!r} differs from train.compute_dtype = "
                     f"{t.compute_dtype!r}; set train.compute_dtype (the model follows it)")
  f = m.downsample_factor
  if t.image_size % f:
    raise ValueError(f"train.image_size = {t.image_size} must be divisible by "
                     f"model.downsample_factor f = {f}; use e.g. "
                     f"{max(f, t.image_size // f * f)} or {(t.image_size // f + 1) * f}")
  if m.use_adaptive_norm and (t.image_size // f) ** 2 < 2:
    raise ValueError(f"train.image_size = {t.image_size} with f = {f} gives a 1x1 latent, but "
                     "model.use_adaptive_norm needs >= 2 latent pixels; use image_size >= "
                     f"{2 * f} or model.use_adaptive_norm=False")
  sharding_lib.validate_mesh(config.mesh, num_devices=num_devices,
                             global_batch_size=t.global_batch_size,
                             quantizer=m.quantizer.name, codebook_size=m.codebook_size)
  if t.global_batch_size % process_count:
    raise ValueError(f"train.global_batch_size = {t.global_batch_size} must be divisible by "
                     f"the number of processes ({process_count})")
  optim.validate_config(config.optim, t.total_steps)
  steps.validate_config(config)
  if t.num_image_samples > t.global_batch_size:
    raise ValueError(f"train.num_image_samples = {t.num_image_samples} must be <= "
                     f"train.global_batch_size = {t.global_batch_size}")
  validate_memory_fraction(t.get("gpu_memory_fraction"))
  if t.get("remat", "none") not in remat.REMAT_CHOICES:
    raise ValueError(f"train.remat must be one of {tuple(remat.REMAT_CHOICES)} (which blocks "
                     f"to recompute in the backward pass), got {t.remat!r}")
  if t.get("remat", "none") == "blocks" and m.dropout > 0:
    raise ValueError(f"train.remat = 'blocks' recomputes the ResBlocks, whose dropout masks "
                     f"would not be replayed: set model.dropout = 0 (now {m.dropout}) or "
                     f"train.remat to 'none' or 'dino'")
  if not need_weights:
    return
  if config.loss.perceptual_weight > 0:
    weights_lib.find_weights("lpips_vgg16", config.loss.lpips_weights)
  if config.disc.name == "dino":
    # Refuse to start (and to compile anything) without the DINOv2 file.
    dino_lib.check_dino_checkpoint(config.disc.dino_weights)


def paper_symbols(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """D, G, V, f (+ d, quantizer) as recorded in the first metrics line."""
  m = config.model
  return {"D": m.latent_dim, "G": m.num_groups, "V": m.codebook_size, "f": m.downsample_factor,
          "d": m.latent_dim // m.num_groups, "quantizer": m.quantizer.name}
