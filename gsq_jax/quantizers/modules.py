"""Flax NNX modules around the functional quantizers, and the registry.

Every module has the same interface, so the tokenizer and the sweeps switch
quantizer by name:

  q = make_quantizer(cfg, latent_dim=D, num_groups=G, codebook_size=V, rngs=rngs)
  out = q(z, rng=None)       # z (..., D) -> QuantizerOutput, indices (..., G)
  q.decode_indices(out.indices)   # (..., G) -> (..., D), the decoder input
  q.latent_dim, q.num_groups, q.codebook_size

Non-grouped quantizers report G = 1 and add that trailing group axis to their
indices. `out.loss` is what the model adds to its objective: for IBQ and LFQ
it already includes the configured entropy weight.

GSQ and VQ search with `tie_break` ("first" | "random") and `distance_dtype`;
`nnx.view(model, tie_break="first", raise_if_not_found=False)` returns a view
that searches deterministically (evaluation, tokenization) without copying
weights.

GSQ, VQ and IBQ take `vocab_axis` (a mesh axis name) to split the codebook
over devices (sharded.py), and `data_axis` (the mesh axis or axes the batch
is split along); the codebook Param then carries the sharding (vocab_axis,
None), applied at construction when built under `jax.set_mesh(mesh)`. With a
vocab axis of size 1 they run data-parallel per device (local token chunks),
and fall back to the plain function when the batch does not split evenly.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from gsq_jax.quantizers import base
from gsq_jax.quantizers import fsq
from gsq_jax.quantizers import ibq
from gsq_jax.quantizers import lfq
from gsq_jax.quantizers import sharded
from gsq_jax.quantizers import vector


def spherical_init(key, shape, dtype=jnp.float32):
  """Gaussian rows projected onto the unit sphere (GSQ eq. 4); d = 1 gives +-1."""
  rows = jax.random.normal(key, shape, jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(rows), axis=-1, keepdims=True))
  return (rows / jnp.maximum(norm, 1e-8)).astype(dtype)


def uniform_init(key, shape, dtype=jnp.float32):
  """U(-1/V, 1/V) (taming's VQ init; GSQ's 'VQ baseline'); U(-1, 1) when d = 1 as the reference."""
  bound = 1.0 if shape[-1] == 1 else 1.0 / shape[0]
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def normal_init(key, shape, dtype=jnp.float32):
  """N(0, 1) (torch nn.Embedding default; IBQ)."""
  return jax.random.normal(key, shape, dtype)


CODEBOOK_INITS: dict[str, Callable[..., jax.Array]] = {
    "spherical": spherical_init, "uniform": uniform_init, "normal": normal_init}


def _codebook(init: str, rngs: nnx.Rngs, shape, vocab_axis: str | None = None) -> nnx.Param:
  if init not in CODEBOOK_INITS:
    raise ValueError(f"quantizer.init must be one of {sorted(CODEBOOK_INITS)}, got {init!r}")
  value = CODEBOOK_INITS[init](rngs.params(), shape)
  if vocab_axis is None:
    return nnx.Param(value)
  # Shard now if the mesh is set; otherwise keep the annotation for the trainer.
  eager = vocab_axis in jax.sharding.get_abstract_mesh().axis_names
  return nnx.Param(value, out_sharding=(vocab_axis, None), eager_sharding=eager)


def _pick(unsharded: Callable, vocab_sharded: Callable, vocab_axis, data_axis, rows) -> Callable:
  """The quantizer function, or its per-device twin when the mesh splits the codebook or `rows`.

  `rows` is the input whose leading axis is the batch (see `sharded.runs_per_device`).
  """
  batch = rows.shape[0] if rows.ndim >= 2 else None
  if vocab_axis is None or not sharded.runs_per_device(vocab_axis, data_axis, batch):
    return unsharded
  return functools.partial(vocab_sharded, vocab_axis=vocab_axis, data_axis=data_axis)


def _with_group_axis(out: base.QuantizerOutput) -> base.QuantizerOutput:
  return out.replace(indices=out.indices[..., None])


TIE_BREAKS = ("first", "random")
DISTANCE_DTYPES = ("float32", "bfloat16", "float16")


def _set_search_view(module: nnx.Module, tie_break: str | None,
                     distance_dtype: str | None) -> None:
  """Overrides how a nearest-code quantizer searches (`nnx.view` hook; None keeps)."""
  if tie_break is not None:
    if tie_break not in TIE_BREAKS:
      raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")
    module.tie_break = tie_break
  if distance_dtype is not None:
    if distance_dtype not in DISTANCE_DTYPES:
      raise ValueError(f"distance_dtype must be one of {DISTANCE_DTYPES}, "
                       f"got {distance_dtype!r}")
    module.distance_dtype = distance_dtype


class GroupedSphericalQuantizer(nnx.Module):
  """GSQ: G groups of d = D / G channels looked up in one shared (V, d) codebook."""

  def __init__(self, *, latent_dim: int, num_groups: int, codebook_size: int, rngs: nnx.Rngs,
               l2_normalize: bool = True, init: str = "spherical", commitment_weight: float = 0.25,
               tie_break: str = "first", distance_dtype: str = "float32",
               tile_size: int | None = None, vocab_axis: str | None = None, data_axis=None):
    base.require(latent_dim % num_groups == 0, "GroupedSphericalQuantizer",
                 f"latent_dim D = {latent_dim} must be divisible by num_groups G = {num_groups}")
    base.require(codebook_size >= 2, "GroupedSphericalQuantizer",
                 f"codebook_size V must be >= 2, got {codebook_size}")
    self.latent_dim, self.num_groups, self.codebook_size = latent_dim, num_groups, codebook_size
    self.l2_normalize, self.commitment_weight = l2_normalize, commitment_weight
    self.tie_break, self.distance_dtype, self.tile_size = tie_break, distance_dtype, tile_size
    self.vocab_axis, self.data_axis = vocab_axis, sharded.as_axes(data_axis)
    self.codebook = _codebook(init, rngs, (codebook_size, latent_dim // num_groups), vocab_axis)

  def set_view(self, tie_break: str | None = None, distance_dtype: str | None = None):
    """`nnx.view(model, tie_break="first")`: evaluation's deterministic lookup."""
    _set_search_view(self, tie_break, distance_dtype)

  def __call__(self, z, *, rng=None) -> base.QuantizerOutput:
    quantize = _pick(vector.gsq_quantize, sharded.sharded_gsq_quantize, self.vocab_axis,
                     self.data_axis, z)
    return quantize(
        z, self.codebook[...], num_groups=self.num_groups, l2_normalize=self.l2_normalize,
        commitment_weight=self.commitment_weight, tie_break=self.tie_break, rng=rng,
        distance_dtype=jnp.dtype(self.distance_dtype), tile_size=self.tile_size)

  def decode_indices(self, indices):
    decode = _pick(vector.codes_from_indices, sharded.sharded_codes_from_indices, self.vocab_axis,
                   self.data_axis, indices)
    return decode(self.codebook[...], indices)


class VectorQuantizer(nnx.Module):
  """Plain VQ (taming VectorQuantizer2): one group, optional l2 lookup, STE."""

  def __init__(self, *, latent_dim: int, codebook_size: int, rngs: nnx.Rngs,
               l2_normalize: bool = False, init: str = "uniform", beta: float = 0.25,
               beta_placement: str = "codebook", tie_break: str = "first",
               distance_dtype: str = "float32", tile_size: int | None = None,
               vocab_axis: str | None = None, data_axis=None):
    base.require(codebook_size >= 2, "VectorQuantizer", f"codebook_size V must be >= 2, got {codebook_size}")
    self.latent_dim, self.num_groups, self.codebook_size = latent_dim, 1, codebook_size
    self.l2_normalize, self.beta, self.beta_placement = l2_normalize, beta, beta_placement
    self.tie_break, self.distance_dtype, self.tile_size = tie_break, distance_dtype, tile_size
    self.vocab_axis, self.data_axis = vocab_axis, sharded.as_axes(data_axis)
    self.codebook = _codebook(init, rngs, (codebook_size, latent_dim), vocab_axis)

  def set_view(self, tie_break: str | None = None, distance_dtype: str | None = None):
    """As `GroupedSphericalQuantizer.set_view`."""
    _set_search_view(self, tie_break, distance_dtype)

  def __call__(self, z, *, rng=None) -> base.QuantizerOutput:
    quantize = _pick(vector.vq_quantize, sharded.sharded_vq_quantize, self.vocab_axis,
                     self.data_axis, z)
    return _with_group_axis(quantize(
        z, self.codebook[...], l2_normalize=self.l2_normalize, beta=self.beta,
        beta_placement=self.beta_placement, tie_break=self.tie_break, rng=rng,
        distance_dtype=jnp.dtype(self.distance_dtype), tile_size=self.tile_size))

  def decode_indices(self, indices):
    decode = _pick(vector.codes_from_indices, sharded.sharded_codes_from_indices, self.vocab_axis,
                   self.data_axis, indices)
    return decode(self.codebook[...], indices)


class IndexBackpropQuantizer(nnx.Module):
  """IBQ: dot-product logits, softmax straight-through on the index, entropy loss."""

  def __init__(self, *, latent_dim: int, codebook_size: int, rngs: nnx.Rngs,
               init: str = "normal", beta: float = 0.25, beta_placement: str = "codebook",
               entropy_temperature: float = 0.01, sample_entropy_weight: float = 1.0,
               batch_entropy_weight: float = 1.0, entropy_loss_weight: float = 0.05,
               chunk_size: int | None = None, vocab_axis: str | None = None, data_axis=None):
    base.require(codebook_size >= 2, "IndexBackpropQuantizer", f"codebook_size V must be >= 2, got {codebook_size}")
    self.latent_dim, self.num_groups, self.codebook_size = latent_dim, 1, codebook_size
    # A tuple, not a dict: module attributes must hash (nnx graph defs are
    # static arguments of jitted evaluation steps).
    self.options = tuple(dict(
        beta=beta, beta_placement=beta_placement, entropy_temperature=entropy_temperature,
        sample_entropy_weight=sample_entropy_weight, batch_entropy_weight=batch_entropy_weight,
        chunk_size=chunk_size).items())
    self.entropy_loss_weight = entropy_loss_weight
    self.vocab_axis, self.data_axis = vocab_axis, sharded.as_axes(data_axis)
    self.codebook = _codebook(init, rngs, (codebook_size, latent_dim), vocab_axis)

  def __call__(self, z, *, rng=None) -> base.QuantizerOutput:
    del rng  # IBQ's argmax is deterministic.
    quantize = _pick(ibq.ibq_quantize, sharded.sharded_ibq_quantize, self.vocab_axis,
                     self.data_axis, z)
    out = quantize(z, self.codebook[...], **dict(self.options))
    loss = out.loss + self.entropy_loss_weight * out.aux["entropy_loss"]
    return _with_group_axis(out.replace(loss=loss))

  def decode_indices(self, indices):
    decode = _pick(vector.codes_from_indices, sharded.sharded_codes_from_indices, self.vocab_axis,
                   self.data_axis, indices)
    return decode(self.codebook[...], indices)


class FiniteScalarQuantizer(nnx.Module):
  """FSQ: no parameters; V = prod(levels), D = len(levels)."""

  def __init__(self, *, levels, variant: str = "paper", rngs: nnx.Rngs | None = None):
    del rngs
    self.levels = tuple(int(l) for l in levels)
    self.variant = variant
    self.latent_dim, self.num_groups, self.codebook_size = len(self.levels), 1, math.prod(self.levels)

  def __call__(self, z, *, rng=None) -> base.QuantizerOutput:
    del rng
    return _with_group_axis(fsq.fsq_quantize(z, self.levels, variant=self.variant))

  def decode_indices(self, indices):
    return fsq.fsq_codes_from_indices(indices[..., 0], self.levels, variant=self.variant)


class LookupFreeQuantizer(nnx.Module):
  """LFQ: no parameters; each of the D channels is a bit, V = 2^D."""

  def __init__(self, *, latent_dim: int, rngs: nnx.Rngs | None = None, **options: Any):
    del rngs
    self.latent_dim, self.num_groups, self.codebook_size = latent_dim, 1, 2 ** latent_dim
    self.options = tuple(sorted(options.items()))  # hashable, see IndexBackpropQuantizer

  def __call__(self, z, *, rng=None) -> base.QuantizerOutput:
    del rng
    return _with_group_axis(lfq.lfq_quantize(z, **dict(self.options)))

  def decode_indices(self, indices):
    options = dict(self.options)
    value = options.get("codebook_value")
    if value is None:
      value = 1.0 if options.get("variant", "paper") == "paper" else -1.0
    return lfq.lfq_codes_from_indices(indices[..., 0], self.latent_dim, value)


# Quantizer-specific defaults; D, G and V come from the model block.
DEFAULTS: dict[str, dict[str, Any]] = {
    "gsq": dict(l2_normalize=True, init="spherical", commitment_weight=0.25, tie_break="first",
                distance_dtype="float32", tile_size=None, vocab_axis=None, data_axis=None),
    "vq": dict(l2_normalize=False, init="uniform", beta=0.25, beta_placement="codebook",
               tie_break="first", distance_dtype="float32", tile_size=None, vocab_axis=None,
               data_axis=None),
    "ibq": dict(init="normal", beta=0.25, beta_placement="codebook", entropy_temperature=0.01,
                sample_entropy_weight=1.0, batch_entropy_weight=1.0, entropy_loss_weight=0.05,
                chunk_size=None, vocab_axis=None, data_axis=None),
    "fsq": dict(levels=(8, 5, 5, 5), variant="paper"),
    "lfq": dict(variant="paper", codebook_value=None, commitment_weight=0.25, entropy_weight=0.1,
                entropy_temperature=0.01, sample_entropy_weight=1.0, batch_entropy_weight=1.0,
                use_norm=False, code_tile=None),
}


# data_axis is one mesh axis name or a sequence of them.
_OPTIONAL_TYPES = dict(tile_size=int, chunk_size=int, code_tile=int, vocab_axis=str,
                       data_axis=object, codebook_value=float)


def default_quantizer_config(name: str) -> ml_collections.ConfigDict:
  """The config block of quantizer `name` with its reference defaults."""
  if name not in DEFAULTS:
    raise ValueError(f"quantizer.name must be one of {sorted(DEFAULTS)}, got {name!r}")
  options = {k: ml_collections.FieldReference(None, field_type=_OPTIONAL_TYPES[k]) if v is None
             else v for k, v in DEFAULTS[name].items()}
  # Options that default to None are typed references: `--config.model.quantizer.tile_size=4096`
  # can then set them from the command line.
  return ml_collections.ConfigDict({"name": name, **options})


def make_quantizer(cfg, *, latent_dim: int, num_groups: int = 1, codebook_size: int | None = None,
                   rngs: nnx.Rngs) -> nnx.Module:
  """Builds the quantizer named by `cfg.name` for latent dimension D, G groups, V codes.

  Raises ValueError naming the field when D, G, V don't fit the quantizer
  (e.g. G > 1 for a single-group quantizer, V != prod(levels) for FSQ).
  """
  cfg = dict(cfg)
  name = cfg.pop("name", None)
  if name not in DEFAULTS:
    raise ValueError(f"quantizer.name must be one of {sorted(DEFAULTS)}, got {name!r}")
  unknown = set(cfg) - set(DEFAULTS[name])
  if unknown:
    raise ValueError(f"quantizer.{sorted(unknown)[0]} is not an option of the {name!r} quantizer; "
                     f"valid options: {sorted(DEFAULTS[name])}")
  options = {**DEFAULTS[name], **cfg}
  if name != "gsq" and num_groups != 1:
    raise ValueError(f"model.num_groups (G) must be 1 for the {name!r} quantizer, got {num_groups}; "
                     f"grouping is GSQ's (quantizer.name='gsq')")
  if name in ("gsq", "vq", "ibq"):
    if codebook_size is None:
      raise ValueError(f"model.codebook_size (V) is required for the {name!r} quantizer")
    if name == "gsq":
      return GroupedSphericalQuantizer(latent_dim=latent_dim, num_groups=num_groups,
                                       codebook_size=codebook_size, rngs=rngs, **options)
    cls = VectorQuantizer if name == "vq" else IndexBackpropQuantizer
    return cls(latent_dim=latent_dim, codebook_size=codebook_size, rngs=rngs, **options)
  if name == "fsq":
    levels = tuple(options["levels"])
    if len(levels) != latent_dim:
      raise ValueError(f"quantizer.levels has {len(levels)} entries but model.latent_dim (D) is "
                       f"{latent_dim}; FSQ needs one level count per channel")
    if any(l < 2 for l in levels):
      raise ValueError(f"quantizer.levels entries must be >= 2, got {list(levels)}")
    if codebook_size is not None and codebook_size != math.prod(levels):
      raise ValueError(f"model.codebook_size (V) = {codebook_size} must equal prod(quantizer.levels) "
                       f"= {math.prod(levels)} for FSQ")
    return FiniteScalarQuantizer(levels=levels, variant=options["variant"])
  if codebook_size is not None and codebook_size != 2 ** latent_dim:
    raise ValueError(f"model.codebook_size (V) = {codebook_size} must equal 2^latent_dim = "
                     f"{2 ** latent_dim} for LFQ")
  return LookupFreeQuantizer(latent_dim=latent_dim, **options)
