"""Finite Scalar Quantization (FSQ, arXiv 2309.15505) and the GSQ reference's variant.

variant="paper" (default; the official FSQ notebook with atanh as the intended
inverse of tanh): channel i is bounded to L_i levels and rounded,
  half_l = (L - 1)(1 - eps) / 2,  offset = 0.5 if L even else 0,
  shift  = atanh(offset / half_l),
  q      = round_ste(tanh(z + shift) * half_l - offset),   codes = q / (L // 2)
so codes lie in [-1, 1]; index = sum_i (q_i + L_i // 2) * basis_i.

variant="flex_gen" (the GSQ paper's FSQ baseline, `FiniteScalarQuantizer`):
  number = round_ste(sigmoid(z) * (L - 1)),  out = number / (L - 1) in [0, 1],
  index  = sum_i number_i * basis_i.

In both, basis = cumprod([1, L_0, ..., L_{d-2}]) (channel 0 least significant),
rounding is half-to-even with a straight-through gradient, and the loss is 0.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gsq_jax.quantizers import base

Variant = Literal["paper", "flex_gen"]
_EPS = 1e-3


def _levels(fn: str, levels: Sequence[int]) -> np.ndarray:
  levels = np.asarray(levels)
  base.require(levels.ndim == 1 and levels.size >= 1, fn,
               f"`levels` must be a non-empty sequence of ints, got {levels!r}")
  base.require(np.all(levels >= 2), fn, f"every entry of `levels` must be >= 2, got {levels.tolist()}")
  base.require(math.prod(levels.tolist()) < 2**31, fn,
               f"prod(levels) = {math.prod(levels.tolist())} must be < 2^31 (int32 indices)")
  return levels.astype(np.int64)


def _basis(levels: np.ndarray) -> np.ndarray:
  return np.concatenate([[1], np.cumprod(levels[:-1])]).astype(np.int32)


def round_ste(x):
  """Round half to even; the gradient is the identity."""
  return x + base.sg(jnp.round(x) - x)


def fsq_quantize(z, levels: Sequence[int], *, variant: Variant = "paper") -> base.QuantizerOutput:
  """Quantises each channel of z (..., len(levels)) to its own number of levels."""
  return _fsq_quantize(z, tuple(int(l) for l in np.asarray(levels).reshape(-1)), variant)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _fsq_quantize(z, levels: tuple[int, ...], variant: Variant) -> base.QuantizerOutput:
  fn = "fsq_quantize"
  lv = _levels(fn, levels)
  base.check_latent(fn, z, last_dim=lv.size)
  base.require(variant in ("paper", "flex_gen"), fn, f"`variant` must be 'paper' or 'flex_gen', got {variant!r}")
  L = jnp.asarray(lv, z.dtype)
  if variant == "paper":
    # atanh(offset / half_l) needs half_l > 0.5, i.e. L >= 3: the tanh bound
    # cannot centre two levels (the official notebook's tan() hides this).
    base.require(bool(np.all(lv >= 3)), fn,
                 f"every entry of `levels` must be >= 3 for variant='paper', got {lv.tolist()}; "
                 "use LFQ for binary channels, or variant='flex_gen'")
    half_l = (L - 1) * (1 - _EPS) / 2
    offset = jnp.where(lv % 2 == 0, 0.5, 0.0).astype(z.dtype)
    shift = jnp.arctanh(offset / half_l)
    q = round_ste(jnp.tanh(z + shift) * half_l - offset)
    quantized = q / jnp.asarray(lv // 2, z.dtype)
    digits = q + jnp.asarray(lv // 2, z.dtype)
  else:
    digits = round_ste(jax.nn.sigmoid(z) * (L - 1))
    quantized = digits / (L - 1)
  indices = jnp.sum(base.sg(digits).astype(jnp.int32) * _basis(lv), axis=-1)
  return base.QuantizerOutput(quantized=quantized, indices=indices,
                              loss=jnp.zeros((), z.dtype), aux={})


def fsq_codes_from_indices(indices, levels: Sequence[int], *, variant: Variant = "paper"):
  """Inverse of the index map: (...) int -> (..., len(levels)) codes."""
  lv = _levels("fsq_codes_from_indices", levels)
  digits = (jnp.asarray(indices)[..., None] // _basis(lv)) % lv.astype(np.int32)
  digits = digits.astype(jnp.float32)
  if variant == "paper":
    half = jnp.asarray(lv // 2, jnp.float32)
    return (digits - half) / half
  return digits / jnp.asarray(lv - 1, jnp.float32)
