"""Vocabulary-sharded GSQ, VQ and IBQ: the codebook split along a mesh axis.

Past ~2^20 codes (or IBQ's 2^18 x 256, whose codebook plus AdamW moments is
768 MiB and whose N x V logits dominate activation memory) one device should
hold only a slice of the vocabulary. Here the codebook is sharded along a
`vocab` mesh axis (S shards of V/S rows) and the tokens, optionally, along
data axes; the per-device code runs under `jax.shard_map`:

* Search (GSQ, VQ, IBQ indices): each device searches its shard with the tiled
  `search_best` (`index_offset` = shard start, so random tie priorities hash
  the GLOBAL code index) and the per-shard (value, index, priority) triples
  are reduced over the vocab axis with three row-sized collectives: pmin of
  the value; pmax of the priority among shards that reach it; pmin of the
  index among those. That is `merge_best` folded over the shards in order:
  exact ties go to the lowest global index ("first") or to the highest
  priority ("random").
* Selected rows are gathered by a masked local take plus a psum over the
  vocab axis (R x d values); its transpose scatters the cotangent into the
  owning shard, so the codebook gradient stays sharded.
* IBQ's softmax at T = 1 and T = tau uses a sharded log-sum-exp: the global
  max by pmax (stop-gradient: it is only a shift) and a psum of the local sums
  of exponentials. The sample entropy -sum_v q_v log q_v is summed over the
  local codes and psum'd. The batch-average probability of a code lives on the
  device that owns the code, so H_avg is a sum over the owned codes plus a
  scalar psum. Tokens are processed in rematerialised chunks as in `ibq.py`.
  Gradients come from AD through shard_map (a psum transposes to a
  broadcast). No gathered codebook and no N x V array is built: IBQ's
  largest per-device buffers are chunk x V/S, the search's are those of
  `search_best` on V/S codes.

Losses are means over all tokens of the call (psum over the data axes), i.e.
exactly what the unsharded quantizers return for the whole global batch.

Random tie-breaking: the row seeds of the whole batch are drawn once and
sharded like the rows, and tie priorities hash the global code index, so the
random choices are identical to the unsharded call's on any mesh.

Inputs are resharded to these layouts when they arrive otherwise (ideally
the codebook lives as P(vocab_axis, None) and tokens as P(data_axis));
mesh axes named neither vocab nor data see replicated work.

A vocab axis of size 1 makes this the data-parallel form of the plain
quantizers (the trainer's default): the search's row chunks and IBQ's token
chunks loop over each device's own tokens, with no gathered latent.

Usage:

  mesh = jax.make_mesh((2, 4), ("data", "vocab"))
  with jax.set_mesh(mesh):
    out = sharded_gsq_quantize(z, codebook, num_groups=G, data_axis="data")
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from gsq_jax.quantizers import base
from gsq_jax.quantizers import ibq
from gsq_jax.quantizers import search
from gsq_jax.quantizers import vector

AxisNames = str | Sequence[str] | None
_INT_MAX = jnp.iinfo(jnp.int32).max
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where the codebook (vocab axis) and the tokens (data axes, leading dim) live."""

  mesh: Any  # a concrete Mesh, or the AbstractMesh of `jax.set_mesh`
  vocab: str
  data: tuple[str, ...]

  @property
  def num_shards(self) -> int:
    return self.mesh.shape[self.vocab]

  @property
  def data_size(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.data)

  @property
  def tokens(self) -> P:
    """Spec of a token array: leading (batch) axis over the data axes."""
    return P(self.data) if self.data else P()

  @property
  def codebook(self) -> P:
    return P(self.vocab, None)

  def run(self, body, args, in_specs, out_specs, check_vma: bool = True):
    """Reshards `args` to `in_specs` (no-op when they match) and maps `body` per device.

    Explicit mesh axes need the reshard (shard_map checks the sharding type);
    with Auto axes shard_map itself moves the data.
    """
    concrete = isinstance(self.mesh, jax.sharding.Mesh)
    explicit = all(t == jax.sharding.AxisType.Explicit for t in self.mesh.axis_types)

    def place(x, spec):
      if not explicit:
        return x
      return jax.reshard(x, NamedSharding(self.mesh, spec) if concrete else spec)

    args = tuple(place(x, s) for x, s in zip(args, in_specs))
    return jax.shard_map(body, mesh=self.mesh, in_specs=tuple(in_specs), out_specs=out_specs,
                         check_vma=check_vma)(*args)

  # -- per-device helpers (only valid inside `run`) ---------------------------------------------

  def shard_start(self, v_local: int):
    return jax.lax.axis_index(self.vocab) * v_local

  def data_mean(self, x):
    """Mean over the data shards of a per-shard mean (shards hold equal token counts)."""
    return jax.lax.pmean(x, self.data) if self.data else x

  def data_sum(self, x):
    return jax.lax.psum(x, self.data) if self.data else x


def as_axes(names: AxisNames) -> tuple[str, ...] | None:
  """Mesh axis name(s) as a hashable tuple (config lists included), or None."""
  if names is None:
    return None
  return (names,) if isinstance(names, str) else tuple(names)


def runs_per_device(vocab_axis: str, data_axis: AxisNames, batch: int | None, mesh=None) -> bool:
  """Whether the modules take this per-device path for a leading axis of `batch` rows.

  A codebook split over `vocab_axis` (size > 1) always does (the layout
  checks raise if the batch does not fit). With a vocab axis of size 1 the
  path only changes where the work runs, so it is taken when the rows split
  evenly over more than one device of the data axes; otherwise (no such mesh
  set, a batch of 4 on 8 devices) the plain quantizer computes the same values.
  """
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  shape = dict(mesh.shape)
  if vocab_axis not in shape:
    return False
  if shape[vocab_axis] > 1:
    return True
  data = as_axes(data_axis) or ()
  if not data or any(a not in shape for a in data):
    return False
  size = math.prod(shape[a] for a in data)
  return size > 1 and batch is not None and batch % size == 0


def _layout(fn: str, mesh, vocab_axis: str, data_axis: AxisNames, z, codebook) -> _Layout:
  """Validates the mesh axes and the divisibility of V and of the token batch."""
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  names = tuple(mesh.axis_names)
  base.require(bool(names), fn, "no mesh: pass `mesh=` or call inside `with jax.set_mesh(mesh):`")
  base.require(isinstance(vocab_axis, str) and vocab_axis in names, fn,
               f"`vocab_axis` must name a mesh axis, one of {list(names)}; got {vocab_axis!r}")
  data = as_axes(data_axis) or ()
  for axis in data:
    base.require(axis in names and axis != vocab_axis, fn,
                 f"`data_axis` entries must be mesh axes other than the vocab axis "
                 f"{vocab_axis!r}, one of {list(names)}; got {data_axis!r}")
  layout = _Layout(mesh, vocab_axis, data)
  v = codebook.shape[0]
  base.require(v % layout.num_shards == 0, fn,
               f"codebook size V = {v} must be divisible by the {vocab_axis!r} axis size "
               f"{layout.num_shards}")
  if data:
    base.require(z.ndim >= 2 and z.shape[0] % layout.data_size == 0, fn,
                 f"`z` must have a leading batch axis divisible by the data axes {list(data)} "
                 f"(size {layout.data_size}); got shape {z.shape}")
  return layout


def _reduce_best(layout: _Layout, value, index, priority):
  """Global best index from per-shard triples: `merge_best` folded over the shards in order."""
  best = jax.lax.pmin(value, layout.vocab)
  priority = jnp.where(value == best, priority, jnp.uint32(0))
  top = jax.lax.pmax(priority, layout.vocab)
  candidate = jnp.where((value == best) & (priority == top), index, _INT_MAX)
  return jax.lax.pmin(candidate, layout.vocab)


def _global_indices(layout: _Layout, queries, codebook, *, l2_normalize: bool, metric, rng=None,
                    **search_kwargs):
  """Global best index (...) of every query row (..., d) against the sharded codebook.

  Its own shard_map, outside any differentiation (indices are integers; the
  inputs are stop-gradient). `check_vma=False` because `search_best`'s scan
  carries are not typed as varying over the vocab axis; the result is made
  identical on all vocab shards by the reduction, as the out spec states.
  """
  def body(queries, codes, *seeds):
    flat = queries.reshape(-1, queries.shape[-1])
    if l2_normalize:  # as `vector.lookup` (which normalises the GSQ latent a second time)
      flat, codes = base.l2_normalize(flat), base.l2_normalize(codes)
    value, index, priority = search.search_best(
        flat, codes, metric=metric, row_seeds=seeds[0].reshape(-1) if seeds else None,
        index_offset=layout.shard_start(codes.shape[0]), **search_kwargs)
    return _reduce_best(layout, value, index, priority).reshape(queries.shape[:-1])

  # Seeds of the whole batch, sharded like the rows: every data shard draws
  # exactly the seeds the unsharded call gives its rows.
  seeds = () if rng is None else (
      jax.random.bits(rng, (math.prod(queries.shape[:-1]),), jnp.uint32).reshape(queries.shape[:-1]),)
  return layout.run(body, (base.sg(queries), base.sg(codebook), *seeds),
                    (layout.tokens, layout.codebook) + (layout.tokens,) * len(seeds), layout.tokens,
                    check_vma=False)


def _take(layout: _Layout, codes, index):
  """Rows `codes[index]` of the sharded codebook: owned rows locally, psum over the vocab axis."""
  v_local = codes.shape[0]
  local = index - layout.shard_start(v_local)
  owned = (local >= 0) & (local < v_local)
  rows = jnp.take(codes, jnp.clip(local, 0, v_local - 1), axis=0)
  return jax.lax.psum(jnp.where(owned[..., None], rows, 0.0), layout.vocab)


# ------------------------------------------------------------------------------------ GSQ / VQ


def sharded_gsq_quantize(z, codebook, *, num_groups: int, l2_normalize: bool = True,
                         commitment_weight: float = 0.25, tie_break: search.TieBreak = "first",
                         rng=None, distance_dtype=jnp.float32, tile_size: int | None = None,
                         row_chunk: int | None = None, vocab_axis: str = "vocab",
                         data_axis: AxisNames = None, mesh=None) -> base.QuantizerOutput:
  """`vector.gsq_quantize` with the codebook sharded along `vocab_axis`.

  Args are those of `gsq_quantize`, plus:
    vocab_axis: mesh axis the codebook rows are split along (V divisible by it).
    data_axis: mesh axis name(s) the leading (batch) axis of `z` is split
      along, or None (tokens replicated over the mesh).
    mesh: a concrete mesh; default the one set with `jax.set_mesh`.

  Returns:
    The QuantizerOutput of `gsq_quantize` for the whole batch (quantized and
    indices sharded like `z`, scalar losses replicated).
  """
  fn = "sharded_gsq_quantize"
  base.require(isinstance(num_groups, int) and num_groups >= 1, fn,
               f"`num_groups` must be a positive int, got {num_groups!r}")
  base.check_latent(fn, z)
  base.require(z.shape[-1] % num_groups == 0, fn,
               f"latent dimension D = z.shape[-1] = {z.shape[-1]} must be divisible by "
               f"`num_groups` = {num_groups}")
  d = z.shape[-1] // num_groups
  base.check_codebook(fn, codebook, d, f"D / num_groups = {z.shape[-1]}/{num_groups}")
  layout = _layout(fn, mesh, vocab_axis, data_axis, z, codebook)
  search_kwargs = dict(tie_break=tie_break, distance_dtype=jnp.dtype(distance_dtype),
                       tile_size=tile_size, row_chunk=row_chunk)

  groups = z.reshape(*z.shape[:-1], num_groups, d)
  latent = base.l2_normalize(groups) if l2_normalize else groups
  idx = _global_indices(layout, latent, codebook, l2_normalize=l2_normalize, metric="l2", rng=rng,
                        **search_kwargs)

  quantized, loss, aux = _quantize_to_codes(layout, latent, codebook, idx, commitment_weight,
                                            "commitment")
  return base.QuantizerOutput(quantized=quantized.reshape(z.shape), indices=idx, loss=loss, aux=aux)


def _quantize_to_codes(layout, latent, codebook, idx, beta: float,
                       beta_placement: vector.BetaPlacement):
  """The chosen codes gathered from their shards: straight-through output, loss and its terms."""

  def body(latent, codes, idx):
    code = _take(layout, codes, idx).astype(latent.dtype)
    terms = vector.codebook_loss(code, latent, beta, beta_placement)
    loss, to_code, to_latent = (layout.data_mean(t) for t in terms)
    return (vector.straight_through(latent, code), loss,
            {"codebook_loss": to_code, "commitment_loss": to_latent})

  return layout.run(body, (latent, codebook, idx), (layout.tokens, layout.codebook, layout.tokens),
                    (layout.tokens, P(), P()))


def sharded_vq_quantize(z, codebook, *, l2_normalize: bool = False, beta: float = 0.25,
                        beta_placement: vector.BetaPlacement = "codebook",
                        tie_break: search.TieBreak = "first", rng=None, distance_dtype=jnp.float32,
                        tile_size: int | None = None, row_chunk: int | None = None,
                        vocab_axis: str = "vocab", data_axis: AxisNames = None,
                        mesh=None) -> base.QuantizerOutput:
  """`vector.vq_quantize`, codebook sharded along `vocab_axis` (see `sharded_gsq_quantize`)."""
  fn = "sharded_vq_quantize"
  base.check_latent(fn, z)
  base.check_codebook(fn, codebook, z.shape[-1], "z.shape[-1]")
  base.require(beta_placement in ("codebook", "commitment"), fn,
               f"`beta_placement` must be 'codebook' or 'commitment', got {beta_placement!r}")
  layout = _layout(fn, mesh, vocab_axis, data_axis, z, codebook)
  search_kwargs = dict(tie_break=tie_break, distance_dtype=jnp.dtype(distance_dtype),
                       tile_size=tile_size, row_chunk=row_chunk)

  idx = _global_indices(layout, z, codebook, l2_normalize=l2_normalize, metric="l2", rng=rng,
                        **search_kwargs)

  quantized, loss, aux = _quantize_to_codes(layout, z, codebook, idx, beta, beta_placement)
  return base.QuantizerOutput(quantized=quantized, indices=idx, loss=loss, aux=aux)


def sharded_codes_from_indices(codebook, indices, *, vocab_axis: str = "vocab",
                               data_axis: AxisNames = None, mesh=None):
  """`vector.codes_from_indices` for a sharded codebook: (..., G) -> (..., G * d)."""
  layout = _layout("sharded_codes_from_indices", mesh, vocab_axis, data_axis, indices, codebook)

  def body(idx, codes):
    rows = _take(layout, codes, idx)
    return rows.reshape(*idx.shape[:-1], idx.shape[-1] * codes.shape[-1])

  return layout.run(body, (indices, codebook), (layout.tokens, layout.codebook), layout.tokens)


# ------------------------------------------------------------------------------------ IBQ


def _varying(tree, axes: tuple[str, ...]):
  return jax.tree.map(lambda x: jax.lax.pcast(x, axes, to="varying"), tree) if axes else tree


def _sharded_logsumexp(layout: _Layout, x, shift):
  """log sum_v exp(x) over the whole sharded vocabulary; `shift` (rows,) is a constant."""
  local = jnp.sum(jnp.exp(x - shift[:, None]), axis=-1)
  return shift + jnp.log(jax.lax.psum(local, layout.vocab))


def _ibq_chunk(layout: _Layout, z_c, valid, codes, inv_temperature):
  """Per-device `ibq._chunk_terms`: a chunk of rows against the local codes, global normalisers."""
  logits = jnp.dot(z_c, codes.T, precision=_HIGHEST)                  # (chunk, V/S)
  local_max = jnp.max(logits, axis=-1)
  top = jax.lax.pmax(base.sg(local_max), layout.vocab)                 # global max logit
  local_arg = jnp.argmax(logits, axis=-1).astype(jnp.int32) + layout.shard_start(codes.shape[0])
  idx = jax.lax.pmin(jnp.where(local_max == top, local_arg, _INT_MAX), layout.vocab)

  lse = _sharded_logsumexp(layout, logits, top)
  probs = jnp.exp(logits - lse[:, None])
  code = _take(layout, codes, idx)
  soft = jnp.dot(probs - base.sg(probs), base.sg(codes), precision=_HIGHEST)
  z_q = code + jax.lax.psum(soft, layout.vocab)

  w = valid[:, None].astype(z_c.dtype)
  sums = {
      "sq_zq_z": jnp.sum(w * jnp.square(z_q - z_c)),
      "sq_sgcode_z": jnp.sum(w * jnp.square(base.sg(code) - z_c)),
      "sq_code_sgz": jnp.sum(w * jnp.square(code - base.sg(z_c))),
      "max_prob": jnp.sum(valid * base.sg(jnp.exp(top - lse))),
  }
  scaled = logits * inv_temperature
  log_q = scaled - _sharded_logsumexp(layout, scaled, top * inv_temperature)[:, None]
  q = jnp.exp(log_q)
  row_entropy = -jax.lax.psum(jnp.sum(q * log_q, axis=-1), layout.vocab)
  sums["sample_entropy"] = jnp.sum(valid * row_entropy)
  return z_q, idx, sums, jnp.sum(valid[:, None] * q, axis=0)


def sharded_ibq_quantize(z, codebook, *, beta: float = 0.25, entropy_temperature: float = 0.01,
                         sample_entropy_weight: float = 1.0, batch_entropy_weight: float = 1.0,
                         beta_placement: Literal["codebook", "commitment"] = "codebook",
                         chunk_size: int | None = None, vocab_axis: str = "vocab",
                         data_axis: AxisNames = None, mesh=None) -> base.QuantizerOutput:
  """`ibq.ibq_quantize` with the codebook sharded along `vocab_axis`.

  Same arguments and outputs as `ibq_quantize` (H_avg over all tokens of the
  call, psum'd over the data axes), plus `vocab_axis`, `data_axis` and `mesh`
  as in `sharded_gsq_quantize`. `chunk_size` counts this device's tokens; the
  default keeps a chunk x V/S block near 2^26 elements.
  """
  fn = "sharded_ibq_quantize"
  ibq.check_arguments(fn, z, codebook, beta_placement, entropy_temperature)
  layout = _layout(fn, mesh, vocab_axis, data_axis, z, codebook)
  inv_t = 1.0 / entropy_temperature

  def body(z, codes):
    d = z.shape[-1]
    flat = z.reshape(-1, d)
    n = flat.shape[0]
    chunk = max(1, min(n, chunk_size or max(8, ibq._CHUNK_ELEMENTS // codes.shape[0])))
    num_chunks = -(-n // chunk)
    zs = jnp.pad(flat, ((0, num_chunks * chunk - n), (0, 0))).reshape(num_chunks, chunk, d)
    valid = (jnp.arange(num_chunks * chunk) < n).astype(flat.dtype).reshape(num_chunks, chunk)
    chunk_terms = jax.checkpoint(functools.partial(_ibq_chunk, layout, inv_temperature=inv_t))

    def step(carry, inputs):
      acc, q_acc = carry
      z_q, idx, sums, q_sum = chunk_terms(inputs[0], inputs[1], codes)
      return (jax.tree.map(jnp.add, acc, sums), q_acc + q_sum), (z_q, idx)

    zero = {k: jnp.zeros((), flat.dtype)
            for k in ("sq_zq_z", "sq_sgcode_z", "sq_code_sgz", "max_prob", "sample_entropy")}
    # Scan carries must be typed as varying over the axes their updates vary over.
    init = (_varying(zero, layout.data),
            _varying(jnp.zeros((codes.shape[0],), flat.dtype), (*layout.data, layout.vocab)))
    (sums, q_sum), (z_q, idx) = jax.lax.scan(step, init, (zs, valid))

    # Global means: every data shard holds n tokens.
    sums = jax.tree.map(layout.data_sum, sums)
    tokens = n * layout.data_size
    avg_probs = layout.data_sum(q_sum) / tokens                          # owned codes only
    avg_entropy = jax.lax.psum(ibq.avg_probs_entropy(avg_probs), layout.vocab)
    quant_loss, aux = ibq.assemble_losses(
        sums, tokens=tokens, dim=d, avg_entropy=avg_entropy, beta=beta,
        beta_placement=beta_placement, sample_entropy_weight=sample_entropy_weight,
        batch_entropy_weight=batch_entropy_weight)
    quantized = z_q.reshape(-1, d)[:n].reshape(z.shape)
    return quantized, idx.reshape(-1)[:n].reshape(z.shape[:-1]), quant_loss, aux

  quantized, idx, loss, aux = layout.run(
      body, (z, codebook), (layout.tokens, layout.codebook),
      (layout.tokens, layout.tokens, P(), P()))
  return base.QuantizerOutput(quantized=quantized, indices=idx, loss=loss, aux=aux)


def sharded_ibq_indices(z, codebook, *, vocab_axis: str = "vocab", data_axis: AxisNames = None,
                        mesh=None, rng=None, **search_kwargs):
  """`ibq.ibq_indices` for a sharded codebook: tiled max-inner-product search per shard."""
  fn = "sharded_ibq_indices"
  base.check_latent(fn, z)
  base.check_codebook(fn, codebook, z.shape[-1], "z.shape[-1]")
  layout = _layout(fn, mesh, vocab_axis, data_axis, z, codebook)

  return _global_indices(layout, z, codebook, l2_normalize=False, metric="dot", rng=rng,
                         **search_kwargs)
