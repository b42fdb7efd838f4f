"""3x3 convolutions by Winograd's minimal filtering, F(m x m, 3 x 3), in plain jax.

Why: on CPU the training step is bound by 3x3 convolutions that XLA:CPU already
runs at a large fraction of the machine's matmul rate, so a faster step needs
fewer FLOPs. F(m x m, 3 x 3) (Lavin & Gray, 2016) computes each m x m output
tile from an (m+2) x (m+2) input tile with (m+2)^2 products instead of 9 m^2:
4x fewer for m = 4, the size used here. It costs extra elementwise work (the
tile transforms), so it pays off only for large enough feature maps;
`cpu_conv.py` decides where it is used (benchmarks/RESULTS.md has the numbers).

The layout follows the model: x (B, H, W, Cin) NHWC, w (3, 3, Cin, Cout) HWIO,
SAME padding, stride 1, H and W multiples of m. The (m+2)^2 products are
ordinary matmuls over all B*H*W/m^2 tiles. The backward pass is Winograd as
well (custom VJP): dx through the transposed transforms, dw as (m+2)^2 matmuls
contracting over the tiles. Results equal `lax.conv_general_dilated` to float32
rounding (relative error ~2e-6 for m = 4, tests/test_steps.py).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# (B^T input transform, G kernel transform, A^T output transform) per tile size m.
TRANSFORMS = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}


def _matrices(m: int):
  return tuple(np.array(t, np.float64) for t in TRANSFORMS[m])


def _combine(coefs, parts):
  """sum_i coefs[i] * parts[i], skipping zeros and multiplies by +-1."""
  total = None
  for c, part in zip(coefs, parts):
    if c == 0:
      continue
    term = part if c == 1 else -part if c == -1 else part * float(c)
    total = term if total is None else total + term
  return total


def _tile_rows(x, m: int, axis: int):
  """The m+2 overlapping rows of every tile along `axis` (a tile starts every m rows).

  Reshaped slices of the padded input rather than strided gathers: XLA:CPU
  turns these into contiguous copies.
  """
  tiles = x.shape[axis] // m
  pad = [(0, 0)] * x.ndim
  pad[axis] = (1, m - 1)
  shape = list(x.shape)
  shape[axis] = tiles + 1
  shape.insert(axis + 1, m)
  blocks = jnp.pad(x, pad).reshape(shape)
  return [lax.index_in_dim(lax.slice_in_dim(blocks, r // m, r // m + tiles, axis=axis),
                           r % m, axis=axis + 1, keepdims=False) for r in range(m + 2)]


def _overlap_add(parts, m: int, axis: int, size: int):
  """Adjoint of `_tile_rows`: sums the m+2 tile rows back into `size` rows."""
  tiles = parts[0].shape[axis]
  head = jnp.stack(parts[:m], axis=axis + 1)
  tail = jnp.stack(parts[m:] + [jnp.zeros_like(parts[0])] * (m - 2), axis=axis + 1)
  pad_head, pad_tail = [(0, 0)] * head.ndim, [(0, 0)] * head.ndim
  pad_head[axis], pad_tail[axis] = (0, 1), (1, 0)
  summed = jnp.pad(head, pad_head) + jnp.pad(tail, pad_tail)
  shape = list(summed.shape)
  shape[axis:axis + 2] = [(tiles + 1) * m]
  return lax.slice_in_dim(summed.reshape(shape), 1, 1 + size, axis=axis)


def _input_transform(x, m: int):
  """B^T d B of every input tile: (m+2)^2 arrays (B, H/m, W/m, Cin), row-major."""
  bt, _, _ = _matrices(m)
  rows = [_combine(bt[p], _tile_rows(x, m, 1)) for p in range(m + 2)]
  return [_combine(bt[q], cols) for row in rows for cols in [_tile_rows(row, m, 2)]
          for q in range(m + 2)]


def _output_transform(products, m: int):
  """A^T M A of every tile, interleaved back into (B, H, W, Cout)."""
  _, _, at = _matrices(m)
  a = m + 2
  rows = [[_combine(at[r], products[q::a]) for q in range(a)] for r in range(m)]
  y = jnp.stack([jnp.stack([_combine(at[s], row) for s in range(m)], axis=3) for row in rows],
                axis=2)  # (B, H/m, m, W/m, m, Cout)
  b, th, _, tw, _, c = y.shape
  return y.reshape(b, th * m, tw * m, c)


def _kernel_transform(w, m: int):
  """G g G^T of the kernel: ((m+2)^2, Cin, Cout)."""
  _, g, _ = _matrices(m)
  g = g.astype(np.float32)
  return jnp.einsum("pi,ijco,qj->pqco", g, w, g).reshape((m + 2) ** 2, *w.shape[2:])


def _products(tiles, u, precision):
  return [jnp.dot(t.reshape(-1, t.shape[-1]), u[p], precision=precision).reshape(
      *t.shape[:-1], u.shape[-1]) for p, t in enumerate(tiles)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv3x3(x: jax.Array, w: jax.Array, m: int = 4, precision=None) -> jax.Array:
  """SAME, stride-1 3x3 convolution of NHWC `x` with HWIO `w`; H, W multiples of m."""
  return _conv3x3_fwd(x, w, m, precision)[0]


def _conv3x3_fwd(x, w, m, precision):
  tiles, u = _input_transform(x, m), _kernel_transform(w, m)
  return _output_transform(_products(tiles, u, precision), m), (tiles, u)


def _conv3x3_bwd(m, precision, residuals, dy):
  tiles, u = residuals
  bt, g, at = _matrices(m)
  a = m + 2
  b, h, w, c = dy.shape
  d = dy.reshape(b, h // m, m, w // m, m, c)
  # Adjoint of the output transform: A dY A^T per tile.
  cols = [[_combine(at[:, q], [d[:, :, r, :, s] for s in range(m)]) for q in range(a)]
          for r in range(m)]
  dproducts = [_combine(at[:, p], [cols[r][q] for r in range(m)])
               for p in range(a) for q in range(a)]
  # dx: through the products, then the adjoint of the input transform.
  dtiles = _products(dproducts, jnp.swapaxes(u, 1, 2), precision)
  rows = [_overlap_add([_combine(bt[:, s], dtiles[p * a:(p + 1) * a]) for s in range(a)],
                       m, 2, w) for p in range(a)]
  dx = _overlap_add([_combine(bt[:, r], rows) for r in range(a)], m, 1, h)
  # dw: per product, tiles^T @ dproducts (contracting over all tiles), then G^T . G.
  du = jnp.stack([jnp.dot(t.reshape(-1, t.shape[-1]).T, dp.reshape(-1, dp.shape[-1]),
                          precision=precision)
                  for t, dp in zip(tiles, dproducts)]).reshape(a, a, *u.shape[1:])
  g = g.astype(np.float32)
  return dx, jnp.einsum("pi,pqco,qj->ijco", g, du, g).astype(u.dtype)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)
