"""Codebook-lookup quantizers: GSQ (grouped, spherical) and plain VQ.

Both find the nearest codebook row with the tiled search of `search.py` and
differ only in what they normalise, where the straight-through estimator
attaches, and where beta sits in the loss:

  GSQ (GSQ.md §1.4)  n = l2(z_g); idx = argmin ||n - l2(C_k)||^2; c = C[idx] (raw row)
                     out = n + sg(c - n)
                     loss = mse(c, sg(n)) + beta * mse(sg(c), n)
  VQ (taming)        idx = argmin over optionally l2-normalised z, C; c = C[idx]
                     out = z + sg(c - z)
                     loss, beta on the codebook term (taming legacy=True):
                       mse(sg(c), z) + beta * mse(c, sg(z))
                     or on the commitment term (VQ-VAE paper):
                       mse(c, sg(z)) + beta * mse(sg(c), z)
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from gsq_jax.quantizers import base
from gsq_jax.quantizers import search

BetaPlacement = Literal["codebook", "commitment"]


def lookup(queries, codebook, *, l2_normalize: bool, tie_break="first", rng=None,
           distance_dtype=jnp.float32, tile_size=None, row_chunk=None):
  """Nearest codebook row of every query row (..., d) -> indices (...) int32."""
  flat = queries.reshape(-1, queries.shape[-1])
  codes = base.l2_normalize(codebook) if l2_normalize else codebook
  if l2_normalize:
    flat = base.l2_normalize(flat)
  idx = search.nearest_code(flat, codes, metric="l2", tie_break=tie_break, rng=rng,
                            distance_dtype=distance_dtype, tile_size=tile_size,
                            row_chunk=row_chunk)
  return idx.reshape(queries.shape[:-1])


def codebook_loss(code, latent, beta: float, placement: BetaPlacement):
  """The two-term VQ loss between selected codes and latents.

  "codebook": mse(sg(c), z) + beta * mse(c, sg(z)) -- beta scales the term that
  trains the codebook (taming's legacy placement, also IBQ's code).
  "commitment": mse(c, sg(z)) + beta * mse(sg(c), z) -- beta scales the
  commitment term (VQ-VAE paper; GSQ's form).
  """
  to_code = base.mse(code, base.sg(latent))
  to_latent = base.mse(base.sg(code), latent)
  if placement == "codebook":
    return to_latent + beta * to_code, to_code, to_latent
  if placement == "commitment":
    return to_code + beta * to_latent, to_code, to_latent
  raise ValueError(f"`beta_placement` must be 'codebook' or 'commitment', got {placement!r}")


def straight_through(latent, code):
  """Value of `code`, gradient of `latent` (identity Jacobian)."""
  return latent + base.sg(code - latent)


# Jitted with the settings static: one compiled program per configuration
# (inlined when called inside a jitted step), instead of op-by-op dispatch.
@functools.partial(jax.jit, static_argnames=(
    "num_groups", "l2_normalize", "commitment_weight", "tie_break", "distance_dtype", "tile_size",
    "row_chunk"))
def gsq_quantize(z, codebook, *, num_groups: int, l2_normalize: bool = True,
                 commitment_weight: float = 0.25, tie_break: search.TieBreak = "first",
                 rng=None, distance_dtype=jnp.float32, tile_size: int | None = None,
                 row_chunk: int | None = None) -> base.QuantizerOutput:
  """Grouped Spherical Quantization (arXiv 2412.02632), as the reference codes it.

  Args:
    z: latent (..., D), channels last. Group g is channels [g*d, (g+1)*d).
    codebook: (V, d) with d = D / num_groups, shared by all groups.
    num_groups: G.
    l2_normalize: normalise latent groups and codebook rows for the lookup and
      the latent side of the loss (the paper's setting; off = raw vectors).
    commitment_weight: beta of the commitment term.
    tie_break: "first" (argmin) or "random" (uniform among exact distance
      ties, the reference default `argmin_func='random'`; needs `rng`).
    rng: PRNG key for random tie-breaking.
    distance_dtype: float32, or bfloat16 to emulate the reference's autocast.
    tile_size, row_chunk: search tiling (memory bound), see `search_best`.

  Returns:
    QuantizerOutput: quantized (..., D) whose value is the raw codebook rows;
    indices (..., G) int32; loss; aux with the two loss terms.
  """
  fn = "gsq_quantize"
  base.require(isinstance(num_groups, int) and num_groups >= 1, fn,
               f"`num_groups` must be a positive int, got {num_groups!r}")
  base.check_latent(fn, z)
  dim = z.shape[-1]
  base.require(dim % num_groups == 0, fn,
               f"latent dimension D = z.shape[-1] = {dim} must be divisible by "
               f"`num_groups` = {num_groups}")
  base.check_codebook(fn, codebook, dim // num_groups, f"D / num_groups = {dim}/{num_groups}")

  groups = z.reshape(*z.shape[:-1], num_groups, dim // num_groups)
  latent = base.l2_normalize(groups) if l2_normalize else groups
  indices = lookup(latent, codebook, l2_normalize=l2_normalize, tie_break=tie_break, rng=rng,
                   distance_dtype=distance_dtype, tile_size=tile_size, row_chunk=row_chunk)
  code = jnp.take(codebook, indices, axis=0).astype(latent.dtype)
  loss, to_code, to_latent = codebook_loss(code, latent, commitment_weight, "commitment")
  quantized = straight_through(latent, code).reshape(z.shape)
  return base.QuantizerOutput(quantized=quantized, indices=indices.astype(jnp.int32), loss=loss,
                              aux={"codebook_loss": to_code, "commitment_loss": to_latent})


@functools.partial(jax.jit, static_argnames=(
    "l2_normalize", "beta", "beta_placement", "tie_break", "distance_dtype", "tile_size",
    "row_chunk"))
def vq_quantize(z, codebook, *, l2_normalize: bool = False, beta: float = 0.25,
                beta_placement: BetaPlacement = "codebook", tie_break: search.TieBreak = "first",
                rng=None, distance_dtype=jnp.float32, tile_size: int | None = None,
                row_chunk: int | None = None) -> base.QuantizerOutput:
  """Plain VQ (VQ-VAE / taming VectorQuantizer2) with a straight-through estimator.

  Args:
    z: latent (..., d).
    codebook: (V, d).
    l2_normalize: normalise z and C for the index search only; the output and
      the loss use the raw vectors (taming's `l2_normalize` quirk).
    beta: weight of the term named by `beta_placement`.
    beta_placement: "codebook" (taming legacy, the default there) or
      "commitment" (the VQ-VAE paper).
    tie_break, rng, distance_dtype, tile_size, row_chunk: as `gsq_quantize`.

  Returns:
    QuantizerOutput with indices (...) int32.
  """
  fn = "vq_quantize"
  base.check_latent(fn, z)
  base.check_codebook(fn, codebook, z.shape[-1], "z.shape[-1]")
  indices = lookup(z, codebook, l2_normalize=l2_normalize, tie_break=tie_break, rng=rng,
                   distance_dtype=distance_dtype, tile_size=tile_size, row_chunk=row_chunk)
  code = jnp.take(codebook, indices, axis=0).astype(z.dtype)
  loss, to_code, to_latent = codebook_loss(code, z, beta, beta_placement)
  return base.QuantizerOutput(quantized=straight_through(z, code), indices=indices.astype(jnp.int32),
                              loss=loss, aux={"codebook_loss": to_code, "commitment_loss": to_latent})


def codes_from_indices(codebook, indices):
  """Raw codebook rows for (..., G) indices, concatenated to (..., G * d)."""
  rows = jnp.take(codebook, indices, axis=0)
  return rows.reshape(*indices.shape[:-1], indices.shape[-1] * codebook.shape[-1])

