"""Codebook usage and perplexity, one-shot and streaming.

Definitions follow the GSQ reference metric (`CodeBookMetric`, GSQ.md §1.8),
natural log, with counts_g[k] = #{n : indices[n, g] = k}:

  usage             100 * #{k : sum_g counts_g[k] > 0} / V      one histogram shared by all groups
  perplexity        exp(-sum_k p_k log(p_k + 1e-10)), p = sum_g counts_g / total
  group_usage       100 * #{k : counts_g[k] > 0} / V            per group, shape (G,)
  group_perplexity  per-group perplexity, shape (G,)
  mean_group_perplexity  mean of group_perplexity (the reference's `prod_perplexity`)
  product_usage     100 * prod_g group_usage_g / 100            (the reference's `prod_used_codebook`)

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

  counts: jax.Array  # (G, V) int32

  @classmethod
  def create(cls, num_groups: int, codebook_size: int) -> "CodebookCounter":
    if num_groups < 1 or codebook_size < 2:
      raise ValueError(f"CodebookCounter: need num_groups >= 1 and codebook_size >= 2, "
                       f"got num_groups={num_groups}, codebook_size={codebook_size}")
    return cls(counts=jnp.zeros((num_groups, codebook_size), jnp.int32))

  def update(self, indices, *, mask=None, axis_name=None) -> "CodebookCounter":
    return self.replace(counts=self.counts + code_counts(
        indices, self.counts.shape[1], mask=mask, axis_name=axis_name))

  def reset(self) -> "CodebookCounter":
    return self.replace(counts=jnp.zeros_like(self.counts))

  def stats(self) -> dict[str, jax.Array]:
    return stats_from_counts(self.counts)
