"""Vocabulary-sharded GSQ / VQ / IBQ against the unsharded quantizers on 8 simulated devices.

Indices must be identical (ties at shard boundaries included), losses and
gradients equal to float rounding, and the compiled per-device program must
hold no N x V buffer.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from gsq_jax import sharding
from gsq_jax.quantizers import (default_quantizer_config, gsq_quantize, ibq_indices, ibq_quantize,
                                make_quantizer, vq_quantize)
from gsq_jax.quantizers.modules import spherical_init
from gsq_jax.quantizers.sharded import (runs_per_device, sharded_codes_from_indices, sharded_gsq_quantize,
                                        sharded_ibq_indices, sharded_ibq_quantize,
                                        sharded_vq_quantize)

MESHES = {"vocab8": ((8,), ("vocab",)), "data2_vocab4": ((2, 4), ("data", "vocab"))}
V = 64  # 8 or 16 codes per shard


def _mesh(name):
  shape, axes = MESHES[name]
  return jax.make_mesh(shape, axes), ("data" if "data" in axes else None)


def _normal(seed, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.key(seed), shape)


def _objective(quantize, w, entropy_weight=0.0):
  """Decoder stand-in sum(q * w) + quantizer loss (+ IBQ entropy), with grads w.r.t. z and C."""
  def objective(z, codebook):
    out = quantize(z, codebook)
    value = jnp.sum(out.quantized * w) + out.loss
    if entropy_weight:
      value = value + entropy_weight * out.aux["entropy_loss"]
    return value, out
  return jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))


def _assert_same(reference, sharded, grad_tol=1e-6):
  (j1, o1), g1 = reference
  (j2, o2), g2 = sharded
  np.testing.assert_array_equal(o2.indices, o1.indices)
  np.testing.assert_allclose(o2.quantized, o1.quantized, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(j2, j1, rtol=1e-5)
  assert set(o2.aux) == set(o1.aux)
  for name in o1.aux:
    np.testing.assert_allclose(o2.aux[name], o1.aux[name], rtol=1e-5, atol=1e-6, err_msg=name)
  for a, b, name in zip(g1, g2, ("dz", "dC")):
    assert float(jnp.abs(a).max()) > 0, name
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=grad_tol, err_msg=name)


# --------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_gsq_and_vq_match_unsharded(mesh_name):
  mesh, data = _mesh(mesh_name)
  z = _normal(0, (4, 3, 3, 8))
  w = _normal(1, z.shape)
  gsq_cb = spherical_init(jax.random.key(2), (V, 4))
  vq_cb = _normal(3, (V, 8))
  opts = dict(tile_size=4)  # several tiles per shard
  cases = [
      (gsq_cb, lambda f, **kw: (lambda z, c: f(z, c, num_groups=2, **opts, **kw)),
       gsq_quantize, sharded_gsq_quantize),
      (vq_cb, lambda f, **kw: (lambda z, c: f(z, c, beta_placement="commitment", **opts, **kw)),
       vq_quantize, sharded_vq_quantize),
  ]
  for codebook, bind, unsharded, vocab_sharded in cases:
    reference = _objective(bind(unsharded), w)(z, codebook)
    with jax.set_mesh(mesh):
      result = _objective(bind(vocab_sharded, data_axis=data), w)(z, codebook)
    _assert_same(reference, result)
    if data:  # tokens stay sharded over the data axis
      assert result[0][1].indices.sharding.spec[0] == "data"


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_ibq_matches_unsharded_values_entropies_and_gradients(mesh_name):
  mesh, data = _mesh(mesh_name)
  z = _normal(4, (4, 3, 3, 8), scale=0.3)
  codebook = _normal(5, (V, 8))
  w = _normal(6, z.shape)
  reference = _objective(lambda z, c: ibq_quantize(z, c), w, 0.05)(z, codebook)
  with jax.set_mesh(mesh):
    # 36 or 18 tokens per device in chunks of 5: padded last chunk.
    sharded = _objective(lambda z, c: sharded_ibq_quantize(z, c, data_axis=data, chunk_size=5),
                         w, 0.05)(z, codebook)
  _assert_same(reference, sharded, grad_tol=1e-5)
  assert float(reference[0][1].aux["avg_entropy"]) > 1.0  # the batch term is non-trivial


# ------------------------------------------------------------------------ ties at shard boundaries


def _boundary_tie_codebook(d, anchors, seed, per_shard, scale=1.0):
  """Random rows of norm `scale`; `anchors[k]` at rows (s - 1, s) for s = per_shard * (k + 1)."""
  codebook = np.array(_normal(seed, (V, d)))
  codebook *= scale / np.linalg.norm(codebook, axis=-1, keepdims=True)
  pairs = []
  for k, anchor in enumerate(anchors):
    start = per_shard * (k + 1)
    codebook[start - 1] = codebook[start] = anchor
    pairs.append((start - 1, start))
  return jnp.asarray(codebook, jnp.float32), np.array(pairs)


# Unit vectors whose distances and inner products are exact in float32.
_ANCHORS = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [-1, 0, 0, 0],
                     [0.5, 0.5, 0.5, 0.5], [0.5, -0.5, 0.5, -0.5]], np.float32)


@pytest.mark.parametrize("name", ["gsq", "vq"])
def test_boundary_ties_first_and_random(name):
  """Duplicated rows straddle all 7 boundaries of 8 shards (and 3 of 4); queries are those rows."""
  codebook, pairs = _boundary_tie_codebook(4, _ANCHORS, 7, per_shard=V // 8)
  which = np.arange(7 * 48) % 7                      # the anchor of every lookup
  shape = (12, 7, 4) if name == "gsq" else (12, 28)  # GSQ: 4 groups of d = 4 per token
  z = jnp.asarray(_ANCHORS[which].reshape(*shape[:2], -1))
  which = which.reshape(shape)
  lower, upper = pairs[which, 0], pairs[which, 1]
  kwargs = dict(num_groups=4) if name == "gsq" else {}
  fn, sharded_fn = (gsq_quantize, sharded_gsq_quantize) if name == "gsq" else (vq_quantize,
                                                                              sharded_vq_quantize)

  def indices(quantize, **kw):
    rng = kw.pop("rng", None)
    return jax.jit(lambda z, c, rng: quantize(z, c, tile_size=4, rng=rng, **kwargs, **kw).indices)(
        z, codebook, rng)
  unsharded = functools.partial(indices, fn)
  sharded = functools.partial(indices, sharded_fn)

  first = np.asarray(unsharded())
  np.testing.assert_array_equal(first, lower)          # lower global index wins
  key = jax.random.key(8)
  rand = np.asarray(unsharded(tie_break="random", rng=key))
  assert set(np.unique(rand == upper)) == {True, False}  # random really picks both sides
  assert np.all((rand == lower) | (rand == upper))
  for mesh_name in sorted(MESHES):
    mesh, data = _mesh(mesh_name)
    with jax.set_mesh(mesh):
      np.testing.assert_array_equal(sharded(data_axis=data), first, err_msg=mesh_name)
      got = np.asarray(sharded(data_axis=data, tie_break="random", rng=key))
    # The batch's row seeds are sharded with the rows: the very same draw on any mesh.
    np.testing.assert_array_equal(got, rand, err_msg=mesh_name)


def test_ibq_boundary_ties_and_random_indices():
  per_shard = V // 8
  anchors = 3.0 * np.eye(8, dtype=np.float32)[:7]
  # Logits are 3 for the tied pair of a query's anchor and at most 0.1 elsewhere.
  codebook, pairs = _boundary_tie_codebook(8, anchors, 9, per_shard, scale=0.1)
  which = np.arange(7 * 16) % 7
  z = jnp.asarray(np.eye(8, dtype=np.float32)[which]).reshape(8, 14, 8)
  which = which.reshape(8, 14)
  lower, upper = pairs[which, 0], pairs[which, 1]
  reference = jax.jit(ibq_quantize)(z, codebook)
  np.testing.assert_array_equal(reference.indices, lower)
  key = jax.random.key(10)
  random_indices = lambda fn, **kw: jax.jit(lambda z, c, rng: fn(
      z, c, tie_break="random", rng=rng, tile_size=4, **kw))(z, codebook, key)
  rand = np.asarray(random_indices(ibq_indices))
  assert set(np.unique(rand == upper)) == {True, False}
  for mesh_name in sorted(MESHES):
    mesh, data = _mesh(mesh_name)
    with jax.set_mesh(mesh):
      out = jax.jit(functools.partial(sharded_ibq_quantize, data_axis=data))(z, codebook)
      got = random_indices(sharded_ibq_indices, data_axis=data)
    np.testing.assert_array_equal(out.indices, lower, err_msg=mesh_name)
    np.testing.assert_allclose(out.loss, reference.loss, rtol=1e-5)
    np.testing.assert_array_equal(got, rand, err_msg=mesh_name)


# --------------------------------------------------------------------------- no N x V buffer

_SHAPE = re.compile(r"\b(?:pred|bf16|[suf]\d+)\[([\d,]*)\]")


def _largest_buffer(compiled) -> int:
  """Elements of the largest array shape anywhere in the compiled (per-device) HLO."""
  sizes = [math.prod(int(s) for s in m.group(1).split(",") if s)
           for m in _SHAPE.finditer(compiled.as_text())]
  assert sizes, "no shapes parsed from the HLO text"
  return max(sizes)


def test_compiled_programs_hold_no_n_by_v_buffer():
  n, v, d = 256, 8192, 8     # N x V = 2M elements; per device at most chunk x V/8
  z = _normal(11, (16, 16, d), scale=0.3)
  codebook = _normal(12, (v, d))
  w = _normal(13, z.shape)

  def step(quantize):
    def loss(z, c, w):
      out = quantize(z, c)
      return jnp.sum(out.quantized * w) + out.loss + 0.05 * out.aux.get("entropy_loss", 0.0)
    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(z, codebook, w).compile()

  # Positive control: the unsharded IBQ in one chunk holds its N x V logits.
  assert _largest_buffer(step(ibq_quantize)) >= n * v
  mesh = jax.make_mesh((2, 4), ("data", "vocab"))
  with jax.set_mesh(mesh):
    z, w = (jax.device_put(x, P("data")) for x in (z, w))  # a data-parallel batch
    programs = {
        "ibq": step(lambda z, c: sharded_ibq_quantize(z, c, data_axis="data", chunk_size=32)),
        "gsq": step(lambda z, c: sharded_gsq_quantize(z, c, num_groups=1, data_axis="data")),
    }
  for name, compiled in programs.items():
    largest = _largest_buffer(compiled)
    assert largest < n * v, (name, largest)
    if name == "ibq":  # one chunk of this device's logits: 32 tokens x V/4 codes
      assert largest == 32 * v // 4, largest
    # Per device: its shards of z and w (tokens / 2) and of the codebook (V / 4) only.
    args = compiled.memory_analysis().argument_size_in_bytes
    assert args == 4 * (2 * n * d // 2 + v * d // 4), (name, args)


# --------------------------------------------------------------------------- modules and errors


@pytest.mark.parametrize("name", ["gsq", "vq", "ibq"])
def test_registry_vocab_axis_option_shards_the_codebook_and_matches(name):
  mesh = jax.make_mesh((2, 4), ("data", "vocab"))
  groups = 2 if name == "gsq" else 1
  z = _normal(14, (4, 2, 2, 8), scale=0.3)
  plain = make_quantizer(default_quantizer_config(name), latent_dim=8, num_groups=groups,
                         codebook_size=V, rngs=nnx.Rngs(0))
  cfg = default_quantizer_config(name)
  cfg.vocab_axis, cfg.data_axis = "vocab", ["data"]
  with jax.set_mesh(mesh):
    q = make_quantizer(cfg, latent_dim=8, num_groups=groups, codebook_size=V, rngs=nnx.Rngs(0))
    assert q.codebook[...].sharding.spec == P("vocab", None)
    out, decoded = nnx.jit(lambda q, z: (lambda o: (o, q.decode_indices(o.indices)))(q(z)))(q, z)
  ref = nnx.jit(lambda q, z: q(z))(plain, z)
  np.testing.assert_array_equal(out.indices, ref.indices)
  np.testing.assert_allclose(out.loss, ref.loss, rtol=1e-5)
  np.testing.assert_allclose(decoded, plain.decode_indices(ref.indices), rtol=1e-6)


def test_bad_layouts_raise_value_errors_naming_the_argument():
  z = _normal(15, (4, 8))
  codebook = _normal(16, (V, 8))
  with pytest.raises(ValueError, match="no mesh"):
    sharded_vq_quantize(z, codebook)
  mesh = jax.make_mesh((2, 4), ("data", "vocab"))
  with jax.set_mesh(mesh):
    with pytest.raises(ValueError, match="vocab_axis"):
      sharded_vq_quantize(z, codebook, vocab_axis="model")
    with pytest.raises(ValueError, match="data_axis"):
      sharded_vq_quantize(z, codebook, data_axis="vocab")
    with pytest.raises(ValueError, match="divisible by the 'vocab' axis"):
      sharded_ibq_quantize(z, codebook[:62])
    with pytest.raises(ValueError, match="leading batch axis"):
      sharded_gsq_quantize(z[:3], codebook[:, :4], num_groups=2, data_axis="data")
    with pytest.raises(ValueError, match="leading batch axis"):
      sharded_codes_from_indices(codebook, jnp.zeros((3, 1), jnp.int32), data_axis="data")


def test_mesh_argument_and_auto_axes_mesh():
  z = _normal(17, (4, 3, 8))
  codebook = _normal(18, (V, 8))
  ref = vq_quantize(z, codebook)
  explicit = jax.make_mesh((2, 4), ("data", "vocab"))
  auto = jax.make_mesh((2, 4), ("data", "vocab"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  run = lambda mesh: jax.jit(lambda z, c: sharded_vq_quantize(z, c, data_axis="data", mesh=mesh))
  outs = [run(explicit)(z, codebook)]   # a mesh passed in, none set
  with jax.set_mesh(auto):
    outs.append(run(None)(z, codebook))
  for out in outs:
    np.testing.assert_array_equal(out.indices, ref.indices)
    np.testing.assert_allclose(out.loss, ref.loss, rtol=1e-6)


# ------------------------------------------------- data-parallel quantizer (mesh.vocab = 1)

_WHILE = re.compile(r"= .*\bwhile\(.*\bbody=(%?[\w.\-]+).*\"known_trip_count\":\{\"n\":\"(\d+)\"")


def _float_loop_trips(hlo: str) -> set[int]:
  """Trip counts of the while loops in compiled HLO text that carry floats.

  That leaves out the threefry RNG's rounds (integers only), keeping the
  quantizers' chunk loops.
  """
  headers = {}
  for block in re.split(r"\n(?=\S)", hlo):  # computations start at column 0
    name = block.split("(", 1)[0].split()
    if name:
      headers[name[-1].lstrip("%")] = block.split("\n", 1)[0]
  trips = {int(n) for body, n in _WHILE.findall(hlo) if "f32[" in headers[body.lstrip("%")]}
  assert trips, "no float-carrying while loop with a known trip count in the HLO"
  return trips


def _trainer_quantizer(name, mesh=False, **options):
  """The quantizer as the trainer builds it (`mesh`: with its mesh options), or the plain one."""
  cfg = default_quantizer_config(name)
  cfg.update(options)
  if mesh:
    cfg.update(sharding.quantizer_axes(name))
  groups = 4 if name == "gsq" else 1
  return make_quantizer(cfg, latent_dim=16, num_groups=groups, codebook_size=V, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name,options,local_chunks", [
    # 8 x 32 x 32 tokens x 4 groups = 32768 rows, 4096 per device: 2 row chunks of 2048.
    ("gsq", dict(tie_break="random"), 2),
    # 8192 tokens, 1024 per device: 16 chunks of 64 (forward and rematerialised backward).
    ("ibq", dict(chunk_size=64), 16)])
def test_trainer_quantizer_loops_over_local_tokens_only(name, options, local_chunks):
  mesh = sharding.make_mesh({"data": 8})
  batch = sharding.data_sharding(mesh)
  z = jax.device_put(_normal(20, (8, 32, 32, 16), scale=0.3), batch)
  w = jax.device_put(_normal(21, z.shape), batch)
  codebook = _normal(23, (V, 4 if name == "gsq" else 16))
  if name == "gsq":  # every row has an exact tie (each code twice): random tie-break decides
    codebook = jnp.concatenate([codebook[: V // 2]] * 2)

  def objective(quantizer):
    graphdef, state = nnx.split(quantizer)
    def value(z, codebook):
      out = nnx.merge(graphdef, jax.tree.map(lambda _: codebook, state))(z, rng=jax.random.key(22))
      return jnp.sum(out.quantized * w) + out.loss, out
    return jax.jit(jax.value_and_grad(value, argnums=(0, 1), has_aux=True))

  # The plain quantizer under the same batch-sharded jit: the defect this path fixes.
  plain = objective(_trainer_quantizer(name, **options))
  plain_hlo = plain.lower(z, codebook).compile().as_text()
  assert "all-gather" in plain_hlo
  assert _float_loop_trips(plain_hlo) == {8 * local_chunks}
  reference = plain(z, codebook)
  with jax.set_mesh(mesh):
    step = objective(_trainer_quantizer(name, mesh=True, **options))
    hlo = step.lower(z, codebook).compile().as_text()
    result = step(z, codebook)
  _assert_same(reference, result, grad_tol=1e-5)
  if name == "gsq":
    lower = np.asarray(reference[0][1].indices) < V // 2
    assert lower.any() and not lower.all()  # ties went both ways
  # Local chunk counts, and no all-gather anywhere (so none of the latent in a loop).
  assert _float_loop_trips(hlo) == {local_chunks}
  assert "all-gather" not in hlo


def test_per_device_path_only_where_it_splits_the_work():
  data = ("data", "fsdp")
  assert not runs_per_device("vocab", data, 16)  # no mesh set: the plain function
  with jax.set_mesh(sharding.make_mesh({"data": 8})):
    assert runs_per_device("vocab", data, 16)
    assert not runs_per_device("vocab", data, 4)  # 4 rows on 8 devices: plain
    assert not runs_per_device("model", data, 16)
  with jax.set_mesh(sharding.make_mesh({"data": 2, "vocab": 4})):
    assert runs_per_device("vocab", data, 3)  # a split codebook always (its checks raise)
  with jax.set_mesh(sharding.make_mesh({"data": 1}, jax.devices()[:1])):
    assert not runs_per_device("vocab", data, 16)  # one device
  # The trainer's module on a batch that does not split: same values as the plain one.
  z = _normal(24, (4, 2, 2, 16), scale=0.3)
  plain = nnx.jit(lambda q, z: q(z))(_trainer_quantizer("ibq"), z)
  with jax.set_mesh(sharding.make_mesh({"data": 8})):
    out = nnx.jit(lambda q, z: q(z))(_trainer_quantizer("ibq", mesh=True), z)
  np.testing.assert_array_equal(out.indices, plain.indices)
  np.testing.assert_allclose(out.loss, plain.loss, rtol=1e-6)
