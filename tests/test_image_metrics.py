"""PSNR / SSIM / MSE sums: agreement with scikit-image, masking, sharding."""

from clu import metrics as clu_metrics
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest
import scipy.ndimage
from skimage import metrics as skm

from gsq_jax.evaluation import image_metrics as im

_NUM = 8


@pytest.fixture(scope="module")
def pairs(shared_dir):
  """8 real 256x256 images; 4 with Gaussian noise (σ 0.05), 4 Gaussian-blurred (σ 1.5)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder = shared_dir / "data" / "imagenet-samples-256"
  files = sorted(folder.glob("*.jpg"))[::97][:_NUM]
  if len(files) < _NUM:
    pytest.skip(f"need {_NUM} images in {folder}")
  originals = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) / 255.0
                        for f in files])
  rng = np.random.default_rng(0)
  noisy = np.clip(originals[:4] + rng.normal(0, 0.05, originals[:4].shape), 0, 1)
  blurred = scipy.ndimage.gaussian_filter(originals[4:], sigma=(0, 1.5, 1.5, 0))
  return originals, np.concatenate([noisy, blurred]).astype(np.float32)


_batch_sums = jax.jit(im.batch_sums)


def _padded(originals, recons, total):
  """Pads with identical all-zero pairs (PSNR = inf) that the mask must drop."""
  pad = total - originals.shape[0]
  zeros = np.zeros((pad,) + originals.shape[1:], np.float32)
  mask = np.arange(total) < originals.shape[0]
  return np.concatenate([originals, zeros]), np.concatenate([recons, zeros]), mask


def test_per_image_values_match_skimage(pairs):
  originals, recons = pairs
  out = jax.jit(im.reconstruction_outputs)(originals, recons)
  ref_psnr = [skm.peak_signal_noise_ratio(o, r, data_range=1.0)
              for o, r in zip(originals, recons)]
  ref_ssim = [skm.structural_similarity(o, r, data_range=1.0, channel_axis=-1,
                                        gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False)
              for o, r in zip(originals, recons)]
  np.testing.assert_allclose(out["psnr"], ref_psnr, atol=1e-4)
  np.testing.assert_allclose(out["ssim"], ref_ssim, atol=1e-4)
  # The cases are far apart, so a wrong convention cannot pass by accident.
  assert np.ptp(ref_ssim) > 0.05


def test_finalize_gives_both_psnr_conventions(pairs):
  originals, recons = pairs
  result = im.finalize(_batch_sums(originals, recons))
  a, b = originals.astype(np.float64), recons.astype(np.float64)
  per_image_mse = np.mean((a - b) ** 2, axis=(1, 2, 3))
  global_mse = np.mean((a - b) ** 2)
  assert result["num_images"] == _NUM
  np.testing.assert_allclose(result["psnr_mean_per_image"],
                             np.mean(-10 * np.log10(per_image_mse)), atol=1e-4)
  np.testing.assert_allclose(result["psnr_global_mse"], -10 * np.log10(global_mse), atol=1e-4)
  np.testing.assert_allclose(result["mse"], global_mse, rtol=1e-5)
  # Mean of PSNRs >= PSNR of the mean MSE (Jensen), strictly for unequal images.
  assert result["psnr_mean_per_image"] > result["psnr_global_mse"] + 0.1


def test_fields_extend_into_a_larger_collection(pairs):
  # An evaluator adds e.g. LPIPS next to the reconstruction sums.
  originals, recons = pairs
  extended = clu_metrics.Collection.create(
      **im.RECONSTRUCTION_METRICS, lpips=clu_metrics.Average.from_output("lpips"))
  lpips = np.linspace(0.1, 0.8, _NUM).astype(np.float32)
  sums = extended.single_from_model_output(
      **im.reconstruction_outputs(originals, recons), lpips=lpips)
  result = im.finalize(sums)
  base = im.finalize(_batch_sums(originals, recons))
  np.testing.assert_allclose(result["lpips"], lpips.mean(), rtol=1e-6)
  np.testing.assert_allclose(result["ssim"], base["ssim"], rtol=1e-5)


def test_masked_padded_batches_equal_unpadded(pairs):
  originals, recons = pairs
  full = im.finalize(_batch_sums(originals, recons))
  # Two batches of the same shape (5 + 3 real images, zero-padded to 8),
  # merged on the host in float64.
  acc = im.to_host(im.empty_sums())
  for lo, hi in ((0, 5), (5, 8)):
    x, y, mask = _padded(originals[lo:hi], recons[lo:hi], _NUM)
    acc = acc.merge(im.to_host(_batch_sums(x, y, mask)))
  merged = im.finalize(acc)
  assert merged.keys() == full.keys()
  for key in full:
    assert np.isfinite(merged[key]), key
    np.testing.assert_allclose(merged[key], full[key], rtol=1e-6, err_msg=key)


def test_sharded_over_8_devices_equals_unsharded(pairs):
  originals, recons = pairs
  x, y, mask = _padded(originals, recons, 2 * _NUM)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  shard = NamedSharding(mesh, P("data"))
  sharded = jax.jit(im.batch_sums)(*(jax.device_put(v, shard) for v in (x, y, mask)))
  assert len(jax.device_put(x, shard).sharding.device_set) == 8
  unsharded = _batch_sums(x, y, mask)
  host_s, host_u = im.to_host(sharded), im.to_host(unsharded)
  for leaf_s, leaf_u in zip(jax.tree.leaves(host_s), jax.tree.leaves(host_u)):
    np.testing.assert_allclose(leaf_s, leaf_u, rtol=1e-6)
  assert float(host_s.ssim.count) == _NUM
  unpadded = im.finalize(_batch_sums(originals, recons))
  for key, value in im.finalize(sharded).items():
    np.testing.assert_allclose(value, unpadded[key], rtol=1e-6, err_msg=key)


def test_bad_inputs_and_empty_sums():
  x = np.zeros((2, 16, 16, 3), np.float32)
  with pytest.raises(ValueError, match="reconstructions"):
    im.batch_sums(x, x[:1])
  with pytest.raises(ValueError, match="originals"):
    im.batch_sums(x[..., :1], x[..., :1])
  with pytest.raises(ValueError, match="mask"):
    im.batch_sums(x, x, np.ones((3,), bool))
  with pytest.raises(ValueError, match="SSIM window"):
    im.batch_sums(x[:, :8, :8], x[:, :8, :8])
  with pytest.raises(ValueError, match="no images"):
    im.finalize(im.empty_sums())
