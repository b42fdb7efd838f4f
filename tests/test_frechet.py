"""Fréchet distance, KID and streaming feature statistics (host numpy, float64)."""

import numpy as np
import pytest
import scipy.linalg

from gsq_jax.evaluation import frechet


def _features(seed: int, n: int, dim: int, power: float = 1.0, shift: float = 0.0):
  # Non-negative, skewed and correlated, like post-ReLU pooled features.
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
  return np.abs(rng.normal(size=(n, dim)) @ mix) ** power + shift


def _fd_reference(x, y, sqrt_trace) -> float:
  mu1, mu2 = x.mean(0), y.mean(0)
  c1, c2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2)
               - 2.0 * sqrt_trace(c1, c2))


def _sqrtm_trace(c1, c2):
  """pytorch-fid's recipe: scipy.linalg.sqrtm(S1 S2), real part."""
  return np.trace(scipy.linalg.sqrtm(c1 @ c2)).real


def _fd_stats(x, y):
  return frechet.frechet_distance_from_stats(
      frechet.FeatureStats(x.shape[1]).update(x), frechet.FeatureStats(y.shape[1]).update(y))


@pytest.mark.parametrize("dim", [64, 256])
def test_fd_matches_scipy_sqrtm(dim):
  x = _features(0, 500, dim)
  y = _features(1, 500, dim, power=1.3, shift=0.05)
  ref = _fd_reference(x, y, _sqrtm_trace)
  fd = _fd_stats(x, y)
  assert ref > 0.1
  np.testing.assert_allclose(fd, ref, rtol=1e-6)


def test_fd_2048_rank_deficient_matches_sample_space_sqrtm():
  # 2048-d with N = 300 < dim: both covariances are singular, so the eigh route
  # must clip round-off negatives. scipy.sqrtm on 2048 x 2048 costs 15-45 s on
  # this machine, so the reference takes the same trace in sample space: with
  # centred X1, X2 (N x d), S1 S2 = X1' (X1 X2')(X2 X1') X1 / (N-1)^2 has the
  # nonzero spectrum of A A' with A = X1 X2' (N x N), hence
  # tr sqrt(S1 S2) = tr scipy.linalg.sqrtm(A A') / (N - 1).
  n = 300
  x = _features(2, n, 2048)
  y = _features(3, n, 2048, power=1.3, shift=0.05)

  def sample_space_trace(c1, c2):
    del c1, c2
    a = (x - x.mean(0)) @ (y - y.mean(0)).T
    return np.trace(scipy.linalg.sqrtm(a @ a.T)).real / (n - 1)

  ref = _fd_reference(x, y, sample_space_trace)
  np.testing.assert_allclose(_fd_stats(x, y), ref, rtol=1e-6)


def test_fd_of_identical_sets_is_zero_and_symmetric():
  x = _features(4, 400, 32)
  y = _features(5, 400, 32, shift=0.2)
  fd_xx = _fd_stats(x, x)
  assert abs(fd_xx) < 1e-9
  fd_xy, fd_yx = _fd_stats(x, y), _fd_stats(y, x)
  np.testing.assert_allclose(fd_xy, fd_yx, rtol=1e-9)
  # A pure mean shift adds exactly |shift|^2 per dimension.
  np.testing.assert_allclose(_fd_stats(x, x + 0.5), 32 * 0.25, rtol=1e-9)


def test_streaming_stats_equal_one_shot_and_masks_and_merge():
  x = _features(6, 250, 48)
  one_shot = frechet.FeatureStats(48).update(x)
  np.testing.assert_allclose(one_shot.mean, x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(one_shot.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)

  # Batches of 64, the last padded with garbage rows that the mask removes.
  streamed = frechet.FeatureStats(48)
  for start in range(0, 250, 64):
    batch = x[start:start + 64]
    pad = 64 - batch.shape[0]
    padded = np.concatenate([batch, np.full((pad, 48), 1e6)])
    mask = np.arange(64) < batch.shape[0]
    streamed.update(padded, mask)
  assert streamed.count == 250
  np.testing.assert_allclose(streamed.mean, one_shot.mean, rtol=1e-12)
  np.testing.assert_allclose(streamed.cov, one_shot.cov, rtol=1e-9, atol=1e-12)
  # float32 batches (as from the device) are accepted and promoted to float64.
  f32 = frechet.FeatureStats(48).update(x.astype(np.float32))
  assert f32.gram.dtype == np.float64
  np.testing.assert_allclose(f32.cov, one_shot.cov, rtol=1e-5, atol=1e-6)

  # Two "hosts" each see half; merging gives the whole.
  a = frechet.FeatureStats(48).update(x[:100])
  b = frechet.FeatureStats(48).update(x[100:])
  merged = a.merge(b)
  assert merged.count == 250
  np.testing.assert_allclose(merged.cov, one_shot.cov, rtol=1e-9, atol=1e-12)
  assert a.count == 100  # merge does not modify its inputs


def test_stats_save_load_roundtrip(tmp_path):
  stats = frechet.FeatureStats(8).update(_features(7, 20, 8))
  stats.save(tmp_path / "ref.npz")
  loaded = frechet.FeatureStats.load(tmp_path / "ref.npz")
  assert loaded.count == 20
  np.testing.assert_array_equal(loaded.gram, stats.gram)
  np.testing.assert_array_equal(loaded.total, stats.total)


def test_kid_identical_near_zero_shifted_positive():
  x = _features(8, 300, 32)
  same = frechet.kernel_inception_distance(x, x, num_subsets=20, subset_size=100, seed=0)
  shifted = frechet.kernel_inception_distance(x, x + 0.3, num_subsets=20, subset_size=100,
                                              seed=0)
  other = frechet.kernel_inception_distance(x, _features(9, 300, 32), num_subsets=20,
                                            subset_size=100, seed=0)
  assert same["subset_size"] == 100
  assert abs(same["kid_mean"]) < 3 * same["kid_std"] + 1e-6
  assert shifted["kid_mean"] > 10 * (abs(other["kid_mean"]) + other["kid_std"])
  assert shifted["kid_mean"] > 0
  # Default subset size 1000 shrinks to the smaller set; results are seeded.
  small = frechet.kernel_inception_distance(x[:50], x[:80] + 0.3, num_subsets=5)
  assert small["subset_size"] == 50
  assert small == frechet.kernel_inception_distance(x[:50], x[:80] + 0.3, num_subsets=5)


def test_kid_matches_direct_unbiased_mmd():
  # With one subset covering both whole sets, KID is the plain unbiased MMD^2.
  x, y = _features(10, 40, 6), _features(11, 40, 6, shift=0.1)
  kern = lambda a, b: (a @ b.T / 6 + 1.0) ** 3
  m = 40
  kxx, kyy, kxy = kern(x, x), kern(y, y), kern(x, y)
  expected = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
              + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
  kid = frechet.kernel_inception_distance(x, y, num_subsets=1, subset_size=40)
  np.testing.assert_allclose(kid["kid_mean"], expected, rtol=1e-10)
  assert kid["kid_std"] == 0.0


def test_fd_vgg16_from_feature_fn():
  rng = np.random.default_rng(12)
  proj = rng.normal(size=(12, 512))
  feature_fn = lambda images: np.maximum(images.reshape(images.shape[0], -1) @ proj, 0)
  originals = rng.random((3, 8, 2, 2, 3))  # 3 batches of 8 tiny "images"
  recons = originals + 0.05 * rng.normal(size=originals.shape)
  mask = np.array([True] * 6 + [False] * 2)
  batches = [(originals[0], recons[0]), (originals[1], recons[1]),
             (originals[2], recons[2], mask)]
  fd = frechet.fd_vgg16(feature_fn, batches)
  real = np.concatenate([feature_fn(originals[i]) for i in range(3)])[:22]
  fake = np.concatenate([feature_fn(recons[i]) for i in range(3)])[:22]
  ref = frechet.frechet_distance(real.mean(0), np.cov(real, rowvar=False),
                                 fake.mean(0), np.cov(fake, rowvar=False))
  np.testing.assert_allclose(fd, ref, rtol=1e-6)
  assert fd > 0
  with pytest.raises(ValueError, match="dim 512"):
    frechet.fd_vgg16(lambda images: np.zeros((images.shape[0], 64)), batches)


def test_bad_inputs_raise_value_errors():
  with pytest.raises(ValueError, match="dim"):
    frechet.FeatureStats(4).update(np.zeros((3, 5)))
  with pytest.raises(ValueError, match="mask"):
    frechet.FeatureStats(4).update(np.zeros((3, 4)), np.ones(2, bool))
  with pytest.raises(ValueError, match="count >= 2"):
    _ = frechet.FeatureStats(4).update(np.zeros((1, 4))).cov
  with pytest.raises(ValueError, match="non-finite"):
    frechet.FeatureStats(2).update(np.array([[np.nan, 0.0]]))
  with pytest.raises(ValueError, match="cov2"):
    frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
