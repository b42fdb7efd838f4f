"""Codebook usage and perplexity, one-shot and streaming.

Definitions follow the GSQ reference metric (`CodeBookMetric`, GSQ.md §1.8),
natural log, with counts_g[k] = #{n : indices[n, g] = k}:

  usage             100 * #{k : sum_g counts_g[k] > 0} / V      one histogram shared by all groups
  perplexity        exp(-sum_k p_k log(p_k + 1e-10)), p = sum_g counts_g / total
  group_usage       100 * #{k : counts_g[k] > 0} / V            per group, shape (G,)
  group_perplexity  per-group perplexity, shape (G,)
  mean_group_perplexity  mean of group_perplexity (the reference's `prod_perplexity`)
  product_usage     100 * prod_g group_usage_g / 100            (the reference's `prod_used_codebook`)
  effective_bits    log2(perplexity): the bits per lookup the histogram carries (max log2 V)

Codebook health over training (`CodebookCounter`): besides the windowed
histogram it keeps, per code, the update at which any group last picked it,
so `dead_codes(K)` counts the codes no lookup has chosen in the last K
updates (K = train.dead_code_steps). `codebook_norm_stats` measures the
spread of the raw row norms: with l2 lookup every row is compared on the
sphere, without it a few long rows win most lookups (GSQ.md Table 1).

Coverage depends on how many tokens were looked at: with T lookups spread
uniformly over V codes the expected coverage is 1 - exp(-T / V). Every result
therefore carries the counts it was measured on (`tokens` = latent positions
N, `lookups` = N * G) and that uniform expectation, so usage numbers from
different sample sizes are never compared blindly.

The counter is a (G, V) int32 histogram updated by a scatter-add (segment sum); inside a
jitted function over data-sharded indices XLA sums the per-device partial
histograms itself, and inside `shard_map` pass `axis_name` to psum them.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

_LOG_EPS = 1e-10


def _as_groups(indices):
  """(..., G) -> (N, G); a 1-D input is one group."""
  indices = jnp.asarray(indices)
  if indices.ndim == 1:
    return indices[:, None]
  return indices.reshape(-1, indices.shape[-1])


def code_counts(indices, codebook_size: int, *, mask=None, axis_name=None):
  """(G, V) int32 histogram of (..., G) indices; `mask` (...) drops padded positions."""
  idx = _as_groups(indices).astype(jnp.int32)
  n, groups = idx.shape
  weights = jnp.ones((n, groups), jnp.int32)
  if mask is not None:
    weights = weights * jnp.asarray(mask).reshape(n, 1).astype(jnp.int32)
  segments = idx + jnp.arange(groups, dtype=jnp.int32)[None, :] * codebook_size
  # Under an explicit-axes mesh the scatter needs its output sharding spelled
  # out: replicated, so XLA adds the per-device partial histograms.
  mesh = jax.sharding.get_abstract_mesh()
  replicated = {"out_sharding": P()} if mesh.axis_names else {}
  counts = jnp.zeros((groups * codebook_size,), jnp.int32).at[segments.reshape(-1)].add(
      weights.reshape(-1), **replicated)
  counts = counts.reshape(groups, codebook_size)
  if axis_name is not None:
    counts = jax.lax.psum(counts, axis_name)
  return counts


def _perplexity(counts):
  total = jnp.sum(counts, axis=-1, keepdims=True)
  p = counts / jnp.maximum(total, 1)
  return jnp.exp(-jnp.sum(p * jnp.log(p + _LOG_EPS), axis=-1))


def stats_from_counts(counts) -> dict[str, jax.Array]:
  """Usage/perplexity metrics of a (G, V) histogram (see the module docstring)."""
  counts = jnp.asarray(counts).astype(jnp.float32)
  groups, v = counts.shape
  shared = jnp.sum(counts, axis=0)
  tokens = jnp.sum(counts[0])
  lookups = jnp.sum(shared)
  group_fraction = jnp.sum(counts > 0, axis=-1) / v
  group_perplexity = _perplexity(counts)
  return {
      "tokens": tokens,
      "lookups": lookups,
      "usage": 100.0 * jnp.sum(shared > 0) / v,
      "perplexity": _perplexity(shared),
      "group_usage": 100.0 * group_fraction,
      "group_perplexity": group_perplexity,
      "mean_group_perplexity": jnp.mean(group_perplexity),
      "product_usage": 100.0 * jnp.prod(group_fraction),
      "effective_bits": jnp.log2(_perplexity(shared)),
      "uniform_usage": 100.0 * -jnp.expm1(-lookups / v),
      "group_uniform_usage": 100.0 * -jnp.expm1(-tokens / v),
  }


def codebook_stats(indices, codebook_size: int, *, mask=None) -> dict[str, jax.Array]:
  """Usage and perplexity of (..., G) indices into a codebook of `codebook_size`."""
  if codebook_size < 2:
    raise ValueError(f"codebook_stats: `codebook_size` must be >= 2, got {codebook_size}")
  return _codebook_stats(jnp.asarray(indices), codebook_size, mask)


@functools.partial(jax.jit, static_argnums=1)
def _codebook_stats(indices, codebook_size, mask):
  return stats_from_counts(code_counts(indices, codebook_size, mask=mask))


@flax.struct.dataclass
class CodebookCounter:
  """Streaming histogram for usage tracking inside jitted, sharded steps.

  A pytree: keep it in the train state, `update` it in the step, read
  `stats()` whenever metrics are written. No host round trip per step.
  """

  counts: jax.Array  # (G, V) int32, since the last reset
  updates: jax.Array  # () int32, updates since creation (never reset)
  last_used: jax.Array  # (V,) int32, value of `updates` when a group last picked the code

  @classmethod
  def create(cls, num_groups: int, codebook_size: int) -> "CodebookCounter":
    if num_groups < 1 or codebook_size < 2:
      raise ValueError(f"CodebookCounter: need num_groups >= 1 and codebook_size >= 2, "
                       f"got num_groups={num_groups}, codebook_size={codebook_size}")
    return cls(counts=jnp.zeros((num_groups, codebook_size), jnp.int32),
               updates=jnp.zeros((), jnp.int32),
               last_used=jnp.zeros((codebook_size,), jnp.int32))

  def update(self, indices, *, mask=None, axis_name=None) -> "CodebookCounter":
    batch = code_counts(indices, self.counts.shape[1], mask=mask, axis_name=axis_name)
    updates = self.updates + 1
    picked = jnp.sum(batch, axis=0) > 0
    return self.replace(counts=self.counts + batch, updates=updates,
                        last_used=jnp.where(picked, updates, self.last_used))

  def reset(self) -> "CodebookCounter":
    """Starts a new usage window; the dead-code clock keeps running."""
    return self.replace(counts=jnp.zeros_like(self.counts))

  def stats(self) -> dict[str, jax.Array]:
    return stats_from_counts(self.counts)

  def dead_codes(self, unused_for: int) -> jax.Array:
    """Codes no group has picked in the last `unused_for` (>= 1) updates (0 before that many)."""
    return jnp.sum(self.updates - self.last_used >= unused_for).astype(jnp.int32)


def codebook_norm_stats(codebook) -> dict[str, jax.Array]:
  """Spread of the codebook's row norms: mean, coefficient of variation, min, max."""
  norms = jnp.sqrt(jnp.sum(jnp.square(jnp.asarray(codebook, jnp.float32)), axis=-1))
  mean = jnp.mean(norms)
  return {"codebook_norm_mean": mean, "codebook_norm_cv": jnp.std(norms) / mean,
          "codebook_norm_min": jnp.min(norms), "codebook_norm_max": jnp.max(norms)}


def find_codebook(params) -> jax.Array | None:
  """The quantizer's (V, d) codebook in a parameter tree; None for FSQ/LFQ."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if "quantizer" in names and names[-1] in ("codebook", "value") and "codebook" in names:
      return leaf
  return None
