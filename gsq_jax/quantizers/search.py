"""Memory-bounded code search: nearest neighbour (L2) and max inner product.

A codebook of V = 2^18 entries makes an N x V distance matrix the largest
buffer of a whole training step (4096 tokens -> 4 GiB in float32). The search
here never builds it: rows are processed in chunks of `row_chunk`, and for each
chunk the codebook is scanned in tiles of `tile_size` entries while a running
best is carried, so peak memory is O(row_chunk x tile_size x d) whatever V is.

Semantics are exactly those of `argmin` over the full matrix:

* L2 distances use the expanded form ||x||^2 + ||c||^2 - 2 x.c in float32, as
  the GSQ reference does, so near-ties resolve the same way.
* `tie_break="first"` returns the lowest index among exact ties (tiles are
  visited in order and only a strictly better tile replaces the carry).
* `tie_break="random"` picks uniformly among exact ties: every (row, code)
  pair gets a pseudo-random 32-bit priority from a counter-based hash of a
  per-row seed and the code index, and ties go to the highest priority. This
  is the reference's "sample uniformly from the mask dist == min", without
  generating an N x V random tensor.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

Metric = Literal["l2", "dot"]
TieBreak = Literal["first", "random"]

# Default tiling: 512 codes per tile, and row chunks such that phase 2's
# per-row gather of one tile (rows x tile x d) stays near 2^23 elements
# (32 MiB). Measured on a 2-core CPU, these are within noise of the best
# settings for d = 8 at V = 2^18 (benchmarks/RESULTS.md).
_TILE = 512
_GATHER_ELEMENTS = 1 << 23


def _mix32(h):
  """murmur3's 32-bit finaliser: a cheap, well-mixed counter-based hash."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def tie_priorities(row_seeds, code_ids):
  """Pseudo-random uint32 priority of each (row, code) pair, shape (R, T)."""
  return _mix32(row_seeds[:, None] ^ (code_ids[None, :].astype(jnp.uint32) * jnp.uint32(0x9E3779B9)))


def _dots(x, codes, distance_dtype):
  """x (R, d) against codes (T, d) -> (R, T), or against per-row codes (R, T, d)."""
  spec = "rd,td->rt" if codes.ndim == 2 else "rd,rtd->rt"
  if distance_dtype == jnp.float32:
    return jnp.einsum(spec, x, codes, precision=jax.lax.Precision.HIGHEST)
  # Emulates torch autocast: the matmul result itself is rounded to bf16, the
  # norms stay in float32.
  return jnp.einsum(spec, x.astype(distance_dtype), codes.astype(distance_dtype),
                    preferred_element_type=jnp.float32).astype(distance_dtype).astype(jnp.float32)


def _scores(x, x_sq, codes, codes_sq, valid, metric: Metric, distance_dtype):
  """Values to minimise for a block: L2 distance, or the negated inner product."""
  dots = _dots(x, codes, distance_dtype)
  scores = x_sq[:, None] + codes_sq - 2.0 * dots if metric == "l2" else -dots
  return jnp.where(valid, scores, jnp.inf)


def _block_best_random(scores, code_ids, seeds):
  """Best (value, index, priority) per row of a block; exact ties by priority."""
  best = jnp.min(scores, axis=1)
  prios = jnp.where(scores == best[:, None], tie_priorities(seeds, code_ids) | jnp.uint32(1), jnp.uint32(0))
  arg = jnp.argmax(prios, axis=1)
  return best, code_ids[arg], jnp.take_along_axis(prios, arg[:, None], axis=1)[:, 0]


def merge_best(a, b):
  """Combines two (value, index, priority) triples; `a` covers lower indices.

  `b` wins only if strictly better, or equal with a higher tie priority (the
  priority is zero for first-index tie-breaking, so `a` keeps ties).
  """
  av, ai, ap = a
  bv, bi, bp = b
  take_b = (bv < av) | ((bv == av) & (bp > ap))
  return jnp.where(take_b, bv, av), jnp.where(take_b, bi, ai), jnp.where(take_b, bp, ap)


def _search_rows(x, codes_t, codes_sq_t, seeds, *, num_codes, metric, distance_dtype, index_offset):
  """Searches the tiled codebook (num_tiles, T, d) for one chunk of rows.

  First-index ties take two phases, because one masked reduction per tile is
  much cheaper than an argmin (a variadic reduce, slow on CPU): phase 1 scans
  the tiles keeping only the running minimum and the first tile that reached
  it; phase 2 recomputes that single tile per row and takes its argmin. Random
  ties need every tied candidate's priority, so they take the argmin per tile.
  """
  num_tiles, tile_size, _ = codes_t.shape
  x_sq = jnp.sum(jnp.square(x), axis=-1)
  lane = jnp.arange(tile_size, dtype=jnp.int32)
  rows = x.shape[0]

  if seeds is not None:
    def tile_best(t, c, c_sq):
      local = t * tile_size + lane
      scores = _scores(x, x_sq, c, c_sq[None, :], (local < num_codes)[None, :], metric, distance_dtype)
      return _block_best_random(scores, local + index_offset, seeds)

    if num_tiles == 1:
      return tile_best(0, codes_t[0], codes_sq_t[0])
    init = (jnp.full((rows,), jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.int32),
            jnp.zeros((rows,), jnp.uint32))
    best, _ = jax.lax.scan(lambda carry, inp: (merge_best(carry, tile_best(*inp)), None), init,
                           (jnp.arange(num_tiles), codes_t, codes_sq_t))
    return best

  def phase1(carry, inputs):
    t, c, c_sq = inputs
    valid = (t * tile_size + lane < num_codes)[None, :]
    tile_min = jnp.min(_scores(x, x_sq, c, c_sq[None, :], valid, metric, distance_dtype), axis=1)
    best, best_tile = carry
    better = tile_min < best
    return (jnp.where(better, tile_min, best), jnp.where(better, t, best_tile)), None

  if num_tiles == 1:
    best_tile = jnp.zeros((rows,), jnp.int32)
  else:
    init = (jnp.full((rows,), jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.int32))
    (_, best_tile), _ = jax.lax.scan(phase1, init, (jnp.arange(num_tiles), codes_t, codes_sq_t))
  local = best_tile[:, None] * tile_size + lane[None, :]
  scores = _scores(x, x_sq, codes_t[best_tile], codes_sq_t[best_tile], local < num_codes, metric,
                   distance_dtype)
  arg = jnp.argmin(scores, axis=1)
  best = jnp.take_along_axis(scores, arg[:, None], axis=1)[:, 0]
  return best, best_tile * tile_size + arg.astype(jnp.int32) + index_offset, jnp.zeros((rows,), jnp.uint32)


@functools.partial(jax.jit, static_argnames=(
    "metric", "tie_break", "tile_size", "row_chunk", "distance_dtype"))
def search_best(x, codes, *, metric: Metric = "l2", tie_break: TieBreak = "first", rng=None,
                tile_size: int | None = None, row_chunk: int | None = None,
                distance_dtype=jnp.float32, index_offset=0, row_seeds=None):
  """Best code per row as (value, index, tie priority), without an N x V buffer.

  This is the building block of `nearest_code`; it is exposed so that a
  codebook sharded over devices can search its shard (with `index_offset` the
  shard's first global index) and reduce the triples with `merge_best`.

  Args:
    x: (N, d) queries (already normalised if the lookup is spherical).
    codes: (V, d) codebook (likewise).
    metric: "l2" minimises ||x - c||^2; "dot" maximises x.c.
    tie_break: "first" (lowest index among exact ties) or "random" (uniform
      among exact ties; needs `rng`).
    rng: PRNG key, only for `tie_break="random"`.
    tile_size: codes per tile (default 512).
    row_chunk: rows per chunk; default keeps a (rows x tile x d) block near
      2^23 elements (2048 rows at d = 8), which bounds phase 2's gather.
    distance_dtype: float32, or bfloat16 to round the inner products as torch
      autocast does (more exact ties, as in the reference's bf16 training).
    index_offset: added to the returned indices (for codebook shards).
    row_seeds: (N,) uint32 tie-break seeds, instead of drawing them from
      `rng`; lets a caller that splits the rows (data-sharded tokens) use the
      seeds of the whole batch, so its random choices equal the unsplit call's.

  Returns:
    (value, index int32, priority uint32), each of shape (N,). For "dot" the
    value is the negated inner product.
  """
  x = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
  codes = jax.lax.stop_gradient(jnp.asarray(codes, jnp.float32))
  n, v = x.shape[0], codes.shape[0]
  distance_dtype = jnp.dtype(distance_dtype)
  if tie_break not in ("first", "random"):
    raise ValueError(f"search_best: `tie_break` must be 'first' or 'random', got {tie_break!r}")
  if metric not in ("l2", "dot"):
    raise ValueError(f"search_best: `metric` must be 'l2' or 'dot', got {metric!r}")
  if tie_break == "random" and rng is None and row_seeds is None:
    raise ValueError("search_best: tie_break='random' needs `rng` (a jax.random key)")
  tile_size = max(1, min(v, tile_size or _TILE))
  row_chunk = max(1, min(n, row_chunk or min(2048, max(8, _GATHER_ELEMENTS // (tile_size * x.shape[1])))))
  codes_sq = jnp.sum(jnp.square(codes), axis=-1) if metric == "l2" else jnp.zeros((v,), jnp.float32)
  num_tiles = -(-v // tile_size)
  codes_t = jnp.pad(codes, ((0, num_tiles * tile_size - v), (0, 0))).reshape(num_tiles, tile_size, -1)
  codes_sq_t = jnp.pad(codes_sq, (0, num_tiles * tile_size - v)).reshape(num_tiles, tile_size)

  num_chunks = -(-n // row_chunk)
  pad = num_chunks * row_chunk - n
  xs = jnp.pad(x, ((0, pad), (0, 0))).reshape(num_chunks, row_chunk, -1)
  if tie_break == "random":
    if row_seeds is None:
      row_seeds = jax.random.bits(rng, (n,), jnp.uint32)
    seeds = jnp.pad(jnp.asarray(row_seeds, jnp.uint32), (0, pad)).reshape(num_chunks, row_chunk)
  else:
    seeds = None

  search = functools.partial(_search_rows, codes_t=codes_t, codes_sq_t=codes_sq_t, num_codes=v,
                             metric=metric, distance_dtype=distance_dtype, index_offset=index_offset)
  if num_chunks == 1:
    best = search(xs[0], seeds=None if seeds is None else seeds[0])
  elif seeds is None:
    best = jax.lax.map(lambda xc: search(xc, seeds=None), xs)
  else:
    best = jax.lax.map(lambda a: search(a[0], seeds=a[1]), (xs, seeds))
  return tuple(b.reshape(-1)[:n] for b in best)


def nearest_code(x, codes, **kwargs):
  """Index (N,) int32 of the best code per row; see `search_best` for the arguments."""
  return search_best(x, codes, **kwargs)[1]


def nearest_code_dense(x, codes, *, metric: Metric = "l2"):
  """The materialise-everything search (N x V matrix): for tests and benchmarks only."""
  x = jnp.asarray(x, jnp.float32)
  codes = jnp.asarray(codes, jnp.float32)
  dots = jnp.dot(x, codes.T, precision=jax.lax.Precision.HIGHEST)
  if metric == "l2":
    scores = jnp.sum(x * x, -1)[:, None] + jnp.sum(codes * codes, -1)[None, :] - 2.0 * dots
  else:
    scores = -dots
  return jnp.argmin(scores, axis=1).astype(jnp.int32)
