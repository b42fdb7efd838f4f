"""Lookup-Free Quantization (LFQ, MAGVIT-v2 / Open-MAGVIT2) and the GSQ reference's variant.

Each of the D channels is one bit; the implicit codebook is {-v, +v}^D with
V = 2^D entries and index = sum_j [bit j set] 2^j (little-endian, as
Open-MAGVIT2).

variant="paper" (default, Open-MAGVIT2's `lookup_free_quantize.py`):
  q = where(z > 0, v, -v), out = z + sg(q - z)
  loss = commitment_weight * mse(z, sg(q)) + entropy_weight * (w_s H_sample - w_b H_avg)
  with the entropies of softmax(2 z.c_k / T) over all 2^D codes.

variant="flex_gen" (the GSQ paper's LFQ baseline, `LookUpFreeQuantizer`):
  a = l2(z) if use_norm else z, bit j = a_j > 0, q = where(bit, v, -v) (the
  reference's default v = -1 maps positive latents to -1)
  out = a + sg(q - a)
  loss = commitment_weight * mse(sg(out), a) + entropy_weight * S, where S is
  the per-sample entropy of softmax(+dist_k) (the reference feeds the squared
  distance itself, not its negative) and there is no codebook-level term.

Neither entropy materialises 2^D logits per token. The code distribution of a
token factorises over bits, because the logit 2 z.c / T (or the distance) is
a sum of per-bit terms, so the per-sample entropy is the sum of D binary
entropies. The codebook-level H_avg needs the average distribution
pbar(c) = mean_n prod_j p_nj(c_j), which does not factorise; it is computed
exactly over code tiles (a (N, D) x (D, tile) product of bit log-probabilities
per tile), rematerialised in the backward pass, so memory is O(N x tile).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from gsq_jax.quantizers import base

Variant = Literal["paper", "flex_gen"]
_ENTROPY_EPS = 1e-5
_TILE_ELEMENTS = 1 << 22


def _bit_log_probs(bit_logit):
  """log p(bit = 1), log p(bit = 0) of per-bit logit differences."""
  return jax.nn.log_sigmoid(bit_logit), jax.nn.log_sigmoid(-bit_logit)


def _sample_entropy(log_p1, log_p0):
  """Mean over tokens of the entropy of the factorised code distribution."""
  h_bits = -(jnp.exp(log_p1) * log_p1 + jnp.exp(log_p0) * log_p0)
  return jnp.mean(jnp.sum(h_bits, axis=-1))


def _codebook_entropy(log_p1, log_p0, tile_size: int | None):
  """H(mean_n p_n) over all 2^D codes, exactly, in code tiles."""
  n, bits = log_p1.shape
  num_codes = 1 << bits
  tile = max(1, min(num_codes, tile_size or max(64, _TILE_ELEMENTS // n)))
  num_tiles = -(-num_codes // tile)
  base_lp = jnp.sum(log_p0, axis=-1, keepdims=True)   # log p of the all-zero code
  delta = log_p1 - log_p0                              # change when a bit is set

  def tile_entropy(t):
    codes = t * tile + jnp.arange(tile, dtype=jnp.int32)
    code_bits = ((codes[:, None] >> jnp.arange(bits, dtype=jnp.int32)) & 1).astype(delta.dtype)
    log_p = base_lp + jnp.dot(delta, code_bits.T, precision=jax.lax.Precision.HIGHEST)
    p_bar = jnp.mean(jnp.exp(log_p), axis=0)
    terms = -p_bar * jnp.log(p_bar + _ENTROPY_EPS)
    return jnp.sum(jnp.where(codes < num_codes, terms, 0.0))

  tile_entropy = jax.checkpoint(tile_entropy)
  if num_tiles == 1:
    return tile_entropy(0)
  return jnp.sum(jax.lax.map(tile_entropy, jnp.arange(num_tiles)))


@functools.partial(jax.jit, static_argnames=(
    "variant", "codebook_value", "commitment_weight", "entropy_weight", "entropy_temperature",
    "sample_entropy_weight", "batch_entropy_weight", "use_norm", "code_tile"))
def lfq_quantize(z, *, variant: Variant = "paper", codebook_value: float | None = None,
                 commitment_weight: float = 0.25, entropy_weight: float = 0.1,
                 entropy_temperature: float = 0.01, sample_entropy_weight: float = 1.0,
                 batch_entropy_weight: float = 1.0, use_norm: bool = False,
                 code_tile: int | None = None) -> base.QuantizerOutput:
  """Binary quantisation of each channel with the LFQ entropy loss.

  Args:
    z: latent (..., D) with D <= 30 bits.
    variant: "paper" (Open-MAGVIT2) or "flex_gen" (GSQ reference baseline).
    codebook_value: v; default 1.0 for "paper", -1.0 for "flex_gen" (that
      module's default).
    commitment_weight, entropy_weight: loss weights.
    entropy_temperature: T of the paper variant's softmax (flex_gen uses 1).
    sample_entropy_weight, batch_entropy_weight: paper variant's H weights.
    use_norm: flex_gen only; l2-normalise z over all D channels first.
    code_tile: codes per tile for the exact codebook entropy.

  Returns:
    QuantizerOutput with indices (...) int32 and aux: commitment_loss,
    sample_entropy, avg_entropy (paper variant), entropy_loss.
  """
  fn = "lfq_quantize"
  base.check_latent(fn, z)
  bits = z.shape[-1]
  base.require(1 <= bits <= 30, fn, f"z.shape[-1] (bits) must be in [1, 30] for int32 indices, got {bits}")
  base.require(variant in ("paper", "flex_gen"), fn, f"`variant` must be 'paper' or 'flex_gen', got {variant!r}")
  base.require(entropy_temperature > 0, fn, f"`entropy_temperature` must be > 0, got {entropy_temperature}")
  value = codebook_value if codebook_value is not None else (1.0 if variant == "paper" else -1.0)
  base.require(value != 0, fn, "`codebook_value` must be non-zero")

  a = base.l2_normalize(z) if (variant == "flex_gen" and use_norm) else z
  bit_set = a > 0
  code = jnp.where(bit_set, value, -value).astype(a.dtype)
  indices = jnp.sum(bit_set.astype(jnp.int32) << jnp.arange(bits, dtype=jnp.int32), axis=-1)
  quantized = a + base.sg(code - a)
  flat = a.reshape(-1, bits)

  if variant == "paper":
    commitment = base.mse(a, base.sg(code))
    # logit(c) = 2 z.c / T = sum_j 2 z_j c_j / T: bit j contributes +-2 v z_j / T.
    log_p1, log_p0 = _bit_log_probs(4.0 * value * flat / entropy_temperature)
    sample_entropy = _sample_entropy(log_p1, log_p0)
    avg_entropy = _codebook_entropy(log_p1, log_p0, code_tile)
    entropy = sample_entropy_weight * sample_entropy - batch_entropy_weight * avg_entropy
    aux = {"avg_entropy": avg_entropy}
  else:
    commitment = base.mse(base.sg(quantized), a)
    # dist_k = ||a||^2 + ||c_k||^2 - 2 a.c_k; softmax(+dist) keeps only -2 a_j c_j per bit.
    log_p1, log_p0 = _bit_log_probs(-4.0 * value * flat)
    sample_entropy = _sample_entropy(log_p1, log_p0)
    entropy = sample_entropy
    aux = {}
  loss = commitment_weight * commitment + entropy_weight * entropy
  aux.update(commitment_loss=commitment, sample_entropy=sample_entropy, entropy_loss=entropy)
  return base.QuantizerOutput(quantized=quantized, indices=indices, loss=loss, aux=aux)


def lfq_codes_from_indices(indices, num_bits: int, codebook_value: float = 1.0):
  """(...) int indices -> (..., num_bits) codes in {-v, +v}."""
  bit_set = (jnp.asarray(indices)[..., None] >> jnp.arange(num_bits, dtype=jnp.int32)) & 1
  return jnp.where(bit_set == 1, codebook_value, -codebook_value).astype(jnp.float32)
