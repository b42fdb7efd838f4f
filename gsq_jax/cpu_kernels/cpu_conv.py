"""A drop-in `lax.conv_general_dilated` that is faster on XLA:CPU.

Two measured changes (benchmarks/RESULTS.md, the project's 2-core Xeon):

1. Large 3x3 convolutions (stride 1, SAME, float32, H and W multiples of 4, at
   least WINOGRAD_MIN_PIXELS and WINOGRAD_MIN_FLOPS) run as Winograd F(4x4, 3x3)
   (`winograd_conv.py`): 4x fewer multiplies for some extra elementwise work,
   which pays off from 32x32 maps and 1 GFLOP per convolution up (+13-15 % for
   the reference small model's train step at 64x64 and 128x128).
2. Every other convolution keeps XLA's forward pass and input gradient, but its
   weight gradient is split into cache-sized pieces. XLA:CPU runs the weight
   gradient of a 3x3 convolution over a large batch x image (the contraction
   runs over B*H*W positions) several times slower than the forward pass:
   135 GFLOP/s forward vs 35 GFLOP/s for the weight gradient at 64x64x64
   channels. Split into pieces of about 0.5 MB of output gradient each, each
   piece its own small convolution and the pieces summed, it runs at
   70-110 GFLOP/s. (A loop over the pieces would keep the program small, but
   XLA:CPU runs a convolution inside a loop body ~50x slower, so the pieces are
   unrolled.) The forward pass and input gradient are exactly XLA's; the weight
   gradient is the same sum in another order (equal to float rounding).

Cases neither covers (dilation, feature groups, layouts other than NHWC/HWIO,
a preferred element type) fall back to the lax function.

`use_fast_cpu_convs(model)` switches every `nnx.Conv` in a model to it. The
trainer does that on CPU only (`train.fast_cpu_convs`); accelerators keep
XLA's own kernels.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
from jax import lax
import jax.numpy as jnp
from flax import nnx

from gsq_jax.cpu_kernels import winograd_conv

_DIMS = ("NHWC", "HWIO", "NHWC")
# Bytes of output gradient (or input, if wider) per piece: a quarter of the
# per-core L2 cache of the machine it was tuned on; 256 KB to 1 MB were alike.
PIECE_BYTES = 1 << 19
# Winograd from 32x32 output pixels and 1 GFLOP (forward) up: below either its
# many small ops cost more run and compile time than the multiplies they save.
WINOGRAD_MIN_PIXELS = 32 * 32
WINOGRAD_MIN_FLOPS = 1e9
WINOGRAD_TILE = 4


def _pieces(batch: int, rows: int, cols: int, channels: int, itemsize: int,
            piece_bytes: int) -> tuple[int, int]:
  """(images, output rows) per piece: the largest divisors keeping it <= piece_bytes."""
  per_row = cols * channels * itemsize
  if rows * per_row <= piece_bytes:
    images = max(1, piece_bytes // (rows * per_row))
    while batch % images:
      images -= 1
    return images, rows
  row_count = max(1, piece_bytes // per_row)
  while rows % row_count:
    row_count -= 1
  return 1, row_count


def _conv(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DIMS,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _fast_conv(x, w, strides, padding, precision):
  return _conv(x, w, strides, padding, precision)


def _fast_conv_fwd(x, w, strides, padding, precision):
  return _conv(x, w, strides, padding, precision), (x, w)


def _fast_conv_bwd(strides, padding, precision, residuals, dy):
  x, w = residuals
  _, x_vjp = jax.vjp(lambda x_: _conv(x_, w, strides, padding, precision), x)
  (dx,) = x_vjp(dy)
  return dx, weight_grad(x, dy, w, strides, padding, precision)


_fast_conv.defvjp(_fast_conv_fwd, _fast_conv_bwd)


def weight_grad(x, dy, w, strides: Sequence[int], padding, precision=None, *,
                piece_bytes: int | None = None) -> jax.Array:
  """d(sum(dy * conv(x, w)))/dw, as a sum over pieces of the batch and rows.

  Args:
    x: the convolution input (B, H, W, Cin); dy: the output gradient
      (B, H', W', Cout); w: the kernel (kh, kw, Cin, Cout), for its shape.
    strides, padding, precision: of the forward convolution.
    piece_bytes: bytes of output gradient per piece (default PIECE_BYTES).
  """
  kh, kw = w.shape[:2]
  sh, sw = strides
  b, rows, cols, channels = dy.shape
  images, row_count = _pieces(b, rows, cols, max(channels, x.shape[-1]),
                              jnp.dtype(dy.dtype).itemsize, piece_bytes or PIECE_BYTES)
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  zero = jnp.zeros_like(w)
  total = None
  for i in range(0, b, images):
    for r in range(0, rows, row_count):
      # Output rows r .. r + row_count read input rows r * sh .. (r + row_count - 1) * sh + kh.
      x_piece = xp[i:i + images, r * sh:(r + row_count - 1) * sh + kh,
                   :(cols - 1) * sw + kw]
      dy_piece = dy[i:i + images, r:r + row_count]
      _, w_vjp = jax.vjp(lambda w_: _conv(x_piece, w_, strides, ((0, 0), (0, 0)), precision),
                         zero)
      (piece,) = w_vjp(dy_piece)
      total = piece if total is None else total + piece
  return total


def _winograd_fits(lhs, rhs, strides, padding) -> bool:
  b, h, w, cin = lhs.shape
  return (rhs.shape[:2] == (3, 3) and strides == (1, 1) and padding == ((1, 1), (1, 1))
          and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
          and h % WINOGRAD_TILE == 0 and w % WINOGRAD_TILE == 0
          and h * w >= WINOGRAD_MIN_PIXELS
          and 2 * 9 * b * h * w * cin * rhs.shape[-1] >= WINOGRAD_MIN_FLOPS)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs) -> jax.Array:
  """`jax.lax.conv_general_dilated`, faster on XLA:CPU (see module doc)."""
  plain = functools.partial(lax.conv_general_dilated, lhs, rhs, window_strides, padding,
                            lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                            dimension_numbers=dimension_numbers,
                            feature_group_count=feature_group_count, precision=precision,
                            **kwargs)
  nhwc = lhs.ndim == 4 and dimension_numbers is not None and (
      lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMS))
  unit = lambda d: d is None or all(v == 1 for v in d)
  extra = {k: v for k, v in kwargs.items() if v is not None}  # e.g. out_sharding=None
  if (extra or not nhwc or feature_group_count != 1
      or not unit(lhs_dilation) or not unit(rhs_dilation) or isinstance(padding, str)):
    return plain()
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  strides = tuple(int(s) for s in window_strides)
  if _winograd_fits(lhs, rhs, strides, padding):
    return winograd_conv.conv3x3(lhs, rhs, WINOGRAD_TILE, precision)
  return _fast_conv(lhs, rhs, strides, padding, precision)


def use_fast_cpu_convs(model: Any) -> int:
  """Points every nnx.Conv of `model` at `conv_general_dilated`; returns how many."""
  count = 0
  for _, module in nnx.iter_graph(model):
    if isinstance(module, nnx.Conv):
      module.conv_general_dilated = conv_general_dilated
      count += 1
  return count
