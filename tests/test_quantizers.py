"""Invariants of the quantizers: norms, index ranges, estimators, round trips, tiling, ties, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from gsq_jax.quantizers import (CodebookCounter, codebook_norm_stats, codebook_stats,
                                codes_from_indices, find_codebook,
                                default_quantizer_config, fsq_codes_from_indices, fsq_quantize,
                                gsq_quantize, ibq_indices, ibq_quantize, lfq_codes_from_indices,
                                lfq_quantize, make_quantizer, nearest_code, search_best,
                                vq_quantize)
from gsq_jax.quantizers.base import l2_normalize
from gsq_jax.quantizers.modules import spherical_init
from gsq_jax.quantizers.search import nearest_code_dense


def _normal(seed, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.key(seed), shape)


# --------------------------------------------------------------------------- GSQ / VQ


def test_gsq_lookup_is_spherical_and_output_is_raw_code():
  z = _normal(0, (2, 3, 3, 12))
  codebook = _normal(1, (50, 4), scale=3.0)  # deliberately not unit-norm
  out = gsq_quantize(z, codebook, num_groups=3)
  assert out.indices.shape == (2, 3, 3, 3) and out.indices.dtype == jnp.int32
  assert int(out.indices.min()) >= 0 and int(out.indices.max()) < 50
  # The lookup compares unit vectors: same indices as cosine similarity argmax.
  groups = z.reshape(-1, 4)
  cosine = l2_normalize(groups) @ l2_normalize(codebook).T
  np.testing.assert_array_equal(np.asarray(out.indices).reshape(-1), np.argmax(cosine, axis=1))
  # The value handed to the decoder is the raw (un-normalised) codebook row.
  np.testing.assert_allclose(out.quantized, codes_from_indices(codebook, out.indices), rtol=1e-6, atol=1e-6)


def test_spherical_init_has_unit_rows_and_pm_one_for_d1():
  rows = spherical_init(jax.random.key(0), (1000, 8))
  np.testing.assert_allclose(jnp.linalg.norm(rows, axis=-1), 1.0, rtol=1e-6)
  assert set(np.unique(np.asarray(spherical_init(jax.random.key(1), (64, 1))))) == {-1.0, 1.0}


def test_gsq_straight_through_gradient_is_the_l2_jacobian():
  z = _normal(2, (4, 8))
  codebook = spherical_init(jax.random.key(3), (32, 4))
  w = _normal(4, (4, 8))
  grad = jax.grad(lambda z: jnp.sum(gsq_quantize(z, codebook, num_groups=2).quantized * w))(z)
  expected = jax.grad(lambda z: jnp.sum(l2_normalize(z.reshape(4, 2, 4)).reshape(4, 8) * w))(z)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
  # Without l2 the estimator is the identity.
  grad = jax.grad(lambda z: jnp.sum(gsq_quantize(z, codebook, num_groups=2, l2_normalize=False).quantized * w))(z)
  np.testing.assert_allclose(grad, w, rtol=1e-6)


def test_gsq_codebook_gradient_only_on_selected_rows():
  z = _normal(5, (16, 4))
  codebook = spherical_init(jax.random.key(6), (64, 4))
  grad = jax.grad(lambda c: gsq_quantize(z, c, num_groups=1).loss)(codebook)
  used = np.unique(np.asarray(gsq_quantize(z, codebook, num_groups=1).indices))
  nonzero = np.flatnonzero(np.abs(np.asarray(grad)).sum(-1))
  assert set(nonzero) <= set(used) and len(nonzero) > 0


@pytest.mark.parametrize("placement,codebook_scale,latent_scale", [("codebook", 0.25, 1.0),
                                                                 ("commitment", 1.0, 0.25)])
def test_vq_beta_placement(placement, codebook_scale, latent_scale):
  z = _normal(7, (8, 4))
  codebook = _normal(8, (16, 4))
  out = vq_quantize(z, codebook, beta=0.25, beta_placement=placement)
  code = codebook[out.indices]
  m = z.size
  grad_c = jax.grad(lambda c: vq_quantize(z, c, beta=0.25, beta_placement=placement).loss)(codebook)
  np.testing.assert_allclose(grad_c[out.indices[0]],
                             codebook_scale * 2 * jnp.sum(jnp.where((out.indices == out.indices[0])[:, None],
                                                                    code - z, 0.0), 0) / m, rtol=1e-5)
  grad_z = jax.grad(lambda z: vq_quantize(z, codebook, beta=0.25, beta_placement=placement).loss)(z)
  np.testing.assert_allclose(grad_z, latent_scale * 2 * (z - code) / m, rtol=1e-5, atol=1e-7)


def test_vq_l2_lookup_uses_normalised_search_but_raw_output():
  z = _normal(9, (32, 4))
  codebook = _normal(10, (40, 4), scale=5.0)
  out = vq_quantize(z, codebook, l2_normalize=True)
  np.testing.assert_array_equal(out.indices, jnp.argmax(l2_normalize(z) @ l2_normalize(codebook).T, -1))
  np.testing.assert_allclose(out.quantized, codebook[out.indices], rtol=1e-6, atol=1e-6)


def test_gsq_index_code_index_round_trip():
  codebook = spherical_init(jax.random.key(11), (256, 4))
  indices = jax.random.randint(jax.random.key(12), (3, 5, 4), 0, 256)
  codes = codes_from_indices(codebook, indices)
  again = gsq_quantize(codes, codebook, num_groups=4).indices
  np.testing.assert_array_equal(again, indices)


# --------------------------------------------------------------------------- tiled search


@pytest.mark.parametrize("metric", ["l2", "dot"])
@pytest.mark.parametrize("tile_size,row_chunk", [(7, 5), (64, 1000), (1000, 3)])
def test_tiled_search_equals_dense(metric, tile_size, row_chunk):
  x = _normal(13, (37, 6))
  codes = _normal(14, (301, 6))  # V not a multiple of the tile
  tiled = nearest_code(x, codes, metric=metric, tile_size=tile_size, row_chunk=row_chunk)
  np.testing.assert_array_equal(tiled, nearest_code_dense(x, codes, metric=metric))


def test_first_tie_break_keeps_lowest_index_across_tiles():
  codes = jnp.tile(jnp.eye(3), (5, 1))  # every row appears 5 times, 3 apart
  x = jnp.eye(3)
  for tile in (1, 2, 4, 15):
    np.testing.assert_array_equal(nearest_code(x, codes, tile_size=tile), [0, 1, 2])


def test_random_tie_break_is_uniform_among_ties_and_changes_nothing_else():
  # d = 1 with l2: every code is +-1 and every lookup is an exact tie (reference README §1).
  codebook = spherical_init(jax.random.key(15), (64, 1))
  z = _normal(16, (4000, 4))
  first = gsq_quantize(z, codebook, num_groups=4).indices
  rand = gsq_quantize(z, codebook, num_groups=4, tie_break="random", rng=jax.random.key(17)).indices
  sign = np.sign(np.asarray(z)).reshape(-1)
  chosen = np.asarray(codebook)[np.asarray(rand).reshape(-1), 0]
  np.testing.assert_array_equal(chosen, sign)   # always a tied (= nearest) code
  assert len(np.unique(first)) == 2            # first-index rule: 2 codes only
  positive = np.flatnonzero(np.asarray(codebook)[:, 0] > 0)
  counts = np.bincount(np.asarray(rand).reshape(-1), minlength=64)[positive]
  expected = counts.sum() / len(positive)
  chi2 = np.sum((counts - expected) ** 2 / expected)
  assert chi2 < 2.0 * len(positive), f"ties not broken uniformly: chi2={chi2:.1f}"
  # Without ties, random and first tie-breaking agree.
  codebook = spherical_init(jax.random.key(18), (512, 4))
  z = _normal(19, (64, 8))
  a = gsq_quantize(z, codebook, num_groups=2).indices
  b = gsq_quantize(z, codebook, num_groups=2, tie_break="random", rng=jax.random.key(20), tile_size=33).indices
  np.testing.assert_array_equal(a, b)


def test_random_tie_break_is_the_same_for_any_tiling_and_shard_split():
  codebook = jnp.tile(jnp.eye(2), (100, 1))
  x = jnp.tile(jnp.eye(2), (50, 1))
  key = jax.random.key(21)
  whole = search_best(x, codebook, tie_break="random", rng=key, row_chunk=100)
  tiled = search_best(x, codebook, tie_break="random", rng=key, row_chunk=100, tile_size=7)
  np.testing.assert_array_equal(whole[1], tiled[1])


# bf16 distances (flex_gen's autocast): the inputs of the inner product are
# rounded to bf16 (relative error <= 2^-9 each) and so is its result, so for
# unit vectors each dot is off by at most 3 * 2^-9 and each squared distance
# 2 - 2 dot by 6 * 2^-9. A code can then only win over the true nearest one if
# their true distances differ by less than 2 * 6 * 2^-9 = 0.0234 (on a scale
# of ||zn||^2 + ||c||^2 = 2). Measured here (d = 4, V = 1024, 2048 lookups):
# 10 % of the indices change, the largest true-distance gap of a changed
# index is 0.0122.
BF16_NEAR_TIE_GAP = 12 * 2.0 ** -9


def test_bfloat16_distances_agree_with_fp32_except_at_near_ties():
  d, num_codes, groups = 4, 1024, 4
  z = _normal(22, (512, groups * d))
  codebook = spherical_init(jax.random.key(23), (num_codes, d))
  f32 = np.asarray(gsq_quantize(z, codebook, num_groups=groups).indices).reshape(-1)
  bf16 = np.asarray(gsq_quantize(z, codebook, num_groups=groups,
                                 distance_dtype=jnp.bfloat16).indices).reshape(-1)
  zn = np.asarray(z, np.float64).reshape(-1, d)
  zn /= np.linalg.norm(zn, axis=1, keepdims=True)
  c = np.asarray(codebook, np.float64)
  c /= np.linalg.norm(c, axis=1, keepdims=True)
  dist = np.sum((zn[:, None, :] - c[None]) ** 2, axis=-1)  # float64 truth
  nearest = np.sort(dist, axis=1)
  rows = np.arange(len(f32))
  np.testing.assert_array_equal(dist[rows, f32], nearest[:, 0])  # fp32 finds the true nearest
  changed = f32 != bf16
  assert 0.02 < changed.mean() < 0.3, changed.mean()  # bf16 does change indices
  gap = dist[rows, bf16] - nearest[:, 0]
  assert gap.max() <= BF16_NEAR_TIE_GAP, gap.max()  # ... only to near-tied codes
  clear = nearest[:, 1] - nearest[:, 0] > BF16_NEAR_TIE_GAP
  assert clear.mean() > 0.2  # (25 % here: V = 1024 crowds the d = 4 sphere)
  np.testing.assert_array_equal(bf16[clear], f32[clear])


def test_quantizer_view_switches_tie_break_without_copying_the_codebook():
  q = make_quantizer(dict(default_quantizer_config("gsq"), tie_break="random",
                          distance_dtype="bfloat16"),
                     latent_dim=4, num_groups=4, codebook_size=64, rngs=nnx.Rngs(0))
  view = nnx.view(q, tie_break="first")
  assert (view.tie_break, view.distance_dtype) == ("first", "bfloat16")
  assert q.tie_break == "random" and view.codebook is q.codebook
  # d = 1: every lookup is an exact tie; the view needs no key and keeps the lowest index.
  first = gsq_quantize(_normal(24, (64, 4)), q.codebook[...], num_groups=4,
                       distance_dtype=jnp.bfloat16).indices
  np.testing.assert_array_equal(view(_normal(24, (64, 4))).indices, first)
  with pytest.raises(ValueError, match="tie_break must be one of"):
    nnx.view(q, tie_break="last")


# --------------------------------------------------------------------------- IBQ


def test_ibq_chunked_equals_unchunked_values_and_gradients():
  z = _normal(24, (2, 5, 5, 16), scale=0.05)
  codebook = _normal(25, (300, 16))
  w = _normal(26, z.shape)

  def objective(z, c, chunk):
    out = ibq_quantize(z, c, chunk_size=chunk)
    return jnp.sum(out.quantized * w) + out.loss + 0.05 * out.aux["entropy_loss"], out

  grad = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
  (j1, o1), g1 = grad(z, codebook, None)
  (j2, o2), g2 = grad(z, codebook, 7)   # 50 tokens: 7 full chunks + a padded one
  np.testing.assert_array_equal(o1.indices, o2.indices)
  np.testing.assert_allclose(j1, j2, rtol=1e-5)
  for name in o1.aux:
    np.testing.assert_allclose(o1.aux[name], o2.aux[name], rtol=1e-5, atol=1e-6, err_msg=name)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(ibq_indices(z, codebook, tile_size=64), o1.indices)


def test_ibq_beta_placement_switch():
  z = _normal(27, (10, 8))
  codebook = _normal(28, (20, 8))
  code_side = ibq_quantize(z, codebook, beta_placement="codebook")
  paper = ibq_quantize(z, codebook, beta_placement="commitment")
  # Both contain mse(z_q, z) + (1 + beta) * mse(c, z) in value; they differ in gradients only.
  np.testing.assert_allclose(code_side.loss, paper.loss, rtol=1e-6)
  g_code = jax.grad(lambda c: ibq_quantize(z, c, beta_placement="codebook").loss)(codebook)
  g_paper = jax.grad(lambda c: ibq_quantize(z, c, beta_placement="commitment").loss)(codebook)
  assert float(jnp.abs(g_code - g_paper).max()) > 1e-4


# --------------------------------------------------------------------------- FSQ / LFQ


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (7, 5, 5, 5, 5), (3, 4)])
def test_fsq_paper_codes_indices_round_trip(levels):
  z = _normal(29, (500, len(levels)), scale=3.0)
  out = fsq_quantize(z, levels)
  assert float(jnp.abs(out.quantized).max()) <= 1.0
  for i, level in enumerate(levels):
    assert len(np.unique(np.asarray(out.quantized[:, i]))) <= level
  np.testing.assert_allclose(fsq_codes_from_indices(out.indices, levels), out.quantized, atol=1e-6)
  all_idx = jnp.arange(math.prod(levels))
  codes = fsq_codes_from_indices(all_idx, levels)
  assert len(np.unique(np.asarray(codes), axis=0)) == math.prod(levels)
  grad = jax.grad(lambda z: jnp.sum(fsq_quantize(z, levels).quantized))(z)
  assert float(jnp.abs(grad).min()) >= 0.0 and float(jnp.abs(grad).max()) > 0.0


def test_fsq_flex_gen_round_trip():
  levels = (8, 5, 5, 5)
  out = fsq_quantize(_normal(30, (100, 4), scale=2.0), levels, variant="flex_gen")
  assert float(out.quantized.min()) >= 0.0 and float(out.quantized.max()) <= 1.0
  np.testing.assert_allclose(fsq_codes_from_indices(out.indices, levels, variant="flex_gen"), out.quantized,
                             atol=1e-6)


def _lfq_entropies_brute_force(z, temperature, value=1.0):
  bits = z.shape[-1]
  codes = lfq_codes_from_indices(jnp.arange(2 ** bits), bits, value)
  logits = 2.0 * z @ codes.T / temperature
  p = jax.nn.softmax(logits, -1)
  sample = -jnp.mean(jnp.sum(p * jax.nn.log_softmax(logits, -1), -1))
  avg = jnp.mean(p, 0)
  return sample, -jnp.sum(avg * jnp.log(avg + 1e-5))


def test_lfq_factorised_entropy_equals_the_full_softmax():
  z = _normal(31, (40, 6), scale=0.02)
  out = lfq_quantize(z, code_tile=5)
  sample, avg = _lfq_entropies_brute_force(z, 0.01)
  np.testing.assert_allclose(out.aux["sample_entropy"], sample, rtol=1e-5)
  np.testing.assert_allclose(out.aux["avg_entropy"], avg, rtol=1e-5)
  g_tiled = jax.grad(lambda z: lfq_quantize(z, code_tile=5).loss)(z)
  g_full = jax.grad(lambda z: 0.25 * jnp.mean((z - jnp.sign(z)) ** 2)
                    + 0.1 * jnp.subtract(*_lfq_entropies_brute_force(z, 0.01)))(z)
  np.testing.assert_allclose(g_tiled, g_full, rtol=1e-3, atol=1e-5)


def test_lfq_round_trip_and_index_order():
  z = _normal(32, (3, 4, 10))
  out = lfq_quantize(z)
  np.testing.assert_allclose(lfq_codes_from_indices(out.indices, 10), out.quantized, atol=1e-6)
  one_hot_bit = jnp.array([[-1.0, -1.0, 1.0]])
  assert int(lfq_quantize(one_hot_bit).indices[0]) == 4  # little-endian: channel j is bit 2^j


# --------------------------------------------------------------------------- statistics


def test_codebook_stats_on_hand_made_histograms():
  # Group 0 uses codes {0, 1} equally; group 1 uses only code 2.
  indices = jnp.array([[0, 2], [1, 2], [0, 2], [1, 2]])
  s = codebook_stats(indices, 4)
  assert float(s["usage"]) == 75.0 and int(s["tokens"]) == 4 and int(s["lookups"]) == 8
  np.testing.assert_allclose(s["group_usage"], [50.0, 25.0])
  np.testing.assert_allclose(s["product_usage"], 100 * 0.5 * 0.25)
  np.testing.assert_allclose(s["group_perplexity"], [2.0, 1.0], rtol=1e-6)
  # Shared histogram: p = (1/4, 1/4, 1/2, 0).
  np.testing.assert_allclose(s["perplexity"], math.exp(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))),
                             rtol=1e-6)
  np.testing.assert_allclose(s["uniform_usage"], 100 * (1 - math.exp(-8 / 4)), rtol=1e-6)
  masked = codebook_stats(indices, 4, mask=jnp.array([1, 1, 0, 0]))
  assert int(masked["tokens"]) == 2


def test_streaming_counter_in_sharded_jit_equals_one_shot():
  mesh = jax.make_mesh((8,), ("data",))
  indices = jax.random.randint(jax.random.key(33), (64, 3, 3, 2), 0, 100)

  @jax.jit
  def step(counter, batch):
    return counter.update(batch)

  with jax.set_mesh(mesh):
    sharded = jax.device_put(indices, NamedSharding(mesh, P("data")))
    counter = CodebookCounter.create(2, 100)
    for _ in range(2):
      counter = step(counter, sharded)
  assert counter.counts.sharding.is_fully_replicated
  expected = codebook_stats(jnp.concatenate([indices, indices]), 100)
  got = counter.stats()
  for name in expected:
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, err_msg=name)


def test_counter_dead_codes_survive_window_resets():
  counter = CodebookCounter.create(2, 6)
  counter = counter.update(jnp.array([[0, 1], [0, 2]]))  # update 1: codes 0, 1, 2
  counter = counter.reset().update(jnp.array([[3, 3]]))  # update 2: code 3
  counter = counter.update(jnp.array([[0, 3]]))  # update 3: codes 0, 3
  assert int(counter.updates) == 3 and counter.last_used.tolist() == [3, 1, 1, 3, 0, 0]
  assert int(counter.dead_codes(1)) == 4  # 1, 2, 4, 5 not picked in update 3
  assert int(counter.dead_codes(2)) == 4  # 1, 2 last picked 2 updates ago; 4, 5 never
  assert int(counter.dead_codes(3)) == 2  # only the never-picked 4, 5
  assert int(counter.dead_codes(4)) == 0  # not that many updates yet
  assert int(counter.stats()["lookups"]) == 4  # the window since the reset


def test_codebook_norm_stats_and_find_codebook():
  q = make_quantizer(default_quantizer_config("vq"), latent_dim=4, codebook_size=32,
                     rngs=nnx.Rngs(0))
  codebook = find_codebook({"quantizer": nnx.state(q, nnx.Param)})
  assert codebook.shape == (32, 4)
  stats = codebook_norm_stats(jnp.array([[3.0, 4.0], [0.0, 1.0]]))
  np.testing.assert_allclose([stats["codebook_norm_mean"], stats["codebook_norm_cv"],
                              stats["codebook_norm_min"], stats["codebook_norm_max"]],
                             [3.0, 2.0 / 3.0, 1.0, 5.0], rtol=1e-6)
  assert find_codebook({"quantizer": nnx.state(make_quantizer(
      default_quantizer_config("lfq"), latent_dim=4, rngs=nnx.Rngs(0)), nnx.Param)}) is None


# --------------------------------------------------------------------------- modules / registry


@pytest.mark.parametrize("name,dims", [("gsq", (16, 4, 64)), ("vq", (8, 1, 64)), ("ibq", (8, 1, 64)),
                                       ("fsq", (4, 1, 1000)), ("lfq", (6, 1, 64))])
def test_registry_builds_every_quantizer(name, dims):
  d_lat, groups, v = dims
  q = make_quantizer(default_quantizer_config(name), latent_dim=d_lat, num_groups=groups,
                     codebook_size=v, rngs=nnx.Rngs(0))
  assert (q.latent_dim, q.num_groups, q.codebook_size) == dims
  z = _normal(34, (2, 3, 3, d_lat))
  out = q(z)
  assert out.quantized.shape == z.shape and out.indices.shape == (2, 3, 3, groups)
  assert int(out.indices.min()) >= 0 and int(out.indices.max()) < v and out.loss.shape == ()
  np.testing.assert_allclose(q.decode_indices(out.indices), out.quantized, rtol=1e-5, atol=1e-5)


def test_module_initialisations():
  rngs = nnx.Rngs(0)
  gsq = make_quantizer(default_quantizer_config("gsq"), latent_dim=32, num_groups=4, codebook_size=4096, rngs=rngs)
  np.testing.assert_allclose(jnp.linalg.norm(gsq.codebook[...], axis=-1), 1.0, rtol=1e-5)
  cfg = default_quantizer_config("gsq")
  cfg.init = "uniform"
  uni = make_quantizer(cfg, latent_dim=32, num_groups=4, codebook_size=4096, rngs=rngs)
  assert float(jnp.abs(uni.codebook[...]).max()) <= 1 / 4096
  ibq = make_quantizer(default_quantizer_config("ibq"), latent_dim=64, codebook_size=4096, rngs=rngs)
  assert abs(float(jnp.std(ibq.codebook[...])) - 1.0) < 0.02


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call,fragment", [
    (lambda: gsq_quantize(jnp.zeros((2, 16)), jnp.zeros((8, 5)), num_groups=4), "codebook.shape[1]"),
    (lambda: gsq_quantize(jnp.zeros((2, 15)), jnp.zeros((8, 5)), num_groups=4), "divisible by `num_groups` = 4"),
    (lambda: gsq_quantize(jnp.zeros((2, 16)), jnp.zeros((1, 4)), num_groups=4), "V >= 2"),
    (lambda: gsq_quantize(jnp.zeros((2, 16)), jnp.zeros((8, 4, 1)), num_groups=4), "rank 2"),
    (lambda: gsq_quantize(jnp.zeros(()), jnp.zeros((8, 4)), num_groups=4), "rank >= 1"),
    (lambda: gsq_quantize(jnp.zeros((2, 16)), jnp.zeros((8, 4)), num_groups=4, tie_break="random"), "`rng`"),
    (lambda: vq_quantize(jnp.zeros((2, 16)), jnp.zeros((8, 4))), "z.shape[-1] = 16"),
    (lambda: ibq_quantize(jnp.zeros((2, 16)), jnp.zeros((8, 4))), "codebook.shape[1]"),
    (lambda: fsq_quantize(jnp.zeros((2, 3)), [8, 1, 5]), "levels"),
    (lambda: fsq_quantize(jnp.zeros((2, 3)), [8, 5]), "z.shape[-1]"),
    (lambda: fsq_quantize(jnp.zeros((2, 2)), [2, 5]), ">= 3 for variant='paper'"),
    (lambda: lfq_quantize(jnp.zeros((2, 40))), "bits"),
    (lambda: make_quantizer(default_quantizer_config("vq"), latent_dim=8, num_groups=2, codebook_size=16,
                            rngs=nnx.Rngs(0)), "model.num_groups"),
    (lambda: make_quantizer(default_quantizer_config("fsq"), latent_dim=4, codebook_size=999,
                            rngs=nnx.Rngs(0)), "prod(quantizer.levels)"),
    (lambda: make_quantizer({"name": "gsq", "beta": 1.0}, latent_dim=8, codebook_size=16,
                            rngs=nnx.Rngs(0)), "quantizer.beta"),
    (lambda: make_quantizer({"name": "nope"}, latent_dim=8, rngs=nnx.Rngs(0)), "quantizer.name"),
    (lambda: codebook_stats(jnp.zeros((4, 1), jnp.int32), 1), "codebook_size"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, fragment):
  with pytest.raises(ValueError) as info:
    call()
  assert fragment in str(info.value)
