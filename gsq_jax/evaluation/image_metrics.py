"""PSNR, SSIM and MSE as sums that add up over a whole evaluation set.

An evaluation set is seen in many jitted, sharded batches (and on many hosts),
and the last batch is usually padded. So a batch step does not return metrics
but *sums* (per-image PSNR sum, squared-error sum, value count, SSIM sum, image
count) with padded images masked out; the sums of all batches are merged and
`finalize` turns them into metrics at the end. Inside a jitted step over a
global, sharded batch, the sums are global (XLA inserts the cross-device and
cross-host reduction), so no explicit all-reduce is needed.

Conventions (EVALUATION_AND_DATA.md §2.1, GSQ.md §4.4):
  * images are float RGB in [0, 1], NHWC; both are cast to float32 (GSQ runs
    SSIM in fp32; bf16 variances are too coarse);
  * `psnr_mean_per_image`: the mean over images of each image's PSNR (LlamaGen
    and most tokenizer papers);
  * `psnr_global_mse`: one PSNR from the MSE over all pixels of all images
    (GSQ's torchmetrics `PeakSignalNoiseRatio(data_range=1.0)`);
  * `mse`: squared error averaged over all values, in [0, 1] space;
  * `ssim`: dm-pix SSIM, Gaussian window 11, sigma 1.5, k1 0.01, k2 0.03,
    data range 1, valid-region map averaged over pixels and channels, then
    over images (= skimage `gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1, channel_axis=-1`).

The sums are clu metrics: `ReconstructionMetrics` is a `clu.metrics.Collection`
and `RECONSTRUCTION_METRICS` holds its fields, so an evaluator can build a
larger collection (e.g. with an LPIPS `Average`) with `Collection.create`.
"""

# No `from __future__ import annotations`: clu metrics read real annotations.

from collections.abc import Mapping
from typing import Any

from clu import metrics as clu_metrics
import dm_pix as pix
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SSIM_SETTINGS = dict(max_val=1.0, filter_size=11, filter_sigma=1.5, k1=0.01, k2=0.03)
"""The SSIM settings used here; report them next to SSIM numbers."""


def _check_pair(fn: str, originals, reconstructions) -> None:
  size = SSIM_SETTINGS["filter_size"]
  if (getattr(originals, "ndim", 0) != 4 or originals.shape[-1] != 3
      or min(originals.shape[1:3]) < size):
    raise ValueError(f"{fn}: `originals` must be RGB images (B, H, W, 3) in [0, 1] with "
                     f"H, W >= {size} (the SSIM window), got shape "
                     f"{getattr(originals, 'shape', None)}")
  if getattr(reconstructions, "shape", None) != originals.shape:
    raise ValueError(f"{fn}: `reconstructions` must have the shape of `originals` "
                     f"{originals.shape}, got {getattr(reconstructions, 'shape', None)}")


def _check_mask(fn: str, mask, batch: int) -> None:
  if mask is not None and getattr(mask, "shape", None) != (batch,):
    raise ValueError(f"{fn}: `mask` must have shape ({batch},) (one flag per image), "
                     f"got {getattr(mask, 'shape', None)}")


def reconstruction_outputs(originals: jax.Array, reconstructions: jax.Array,
                           mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per-image values that the metric classes sum up (clu "model outputs").

  Args:
    originals: (B, H, W, 3) images in [0, 1].
    reconstructions: the same shape, in [0, 1].
    mask: optional (B,) bool/0-1 flags; False marks a padded image.

  Returns:
    dict of (B,) arrays: `psnr`, `ssim`, `squared_error` (sum over the image),
    `num_values` (H*W*3, as float), and `mask` (all True if not given).
  """
  fn = "reconstruction_outputs"
  _check_pair(fn, originals, reconstructions)
  batch = originals.shape[0]
  _check_mask(fn, mask, batch)
  a = jnp.asarray(originals, jnp.float32)
  b = jnp.asarray(reconstructions, jnp.float32)
  squared_error = jnp.sum(jnp.square(a - b), axis=(1, 2, 3))
  num_values = float(np.prod(a.shape[1:]))
  if mask is None:
    mask = jnp.ones((batch,), bool)
  return dict(
      psnr=pix.psnr(a, b),  # dynamic range 1
      ssim=pix.ssim(a, b, **SSIM_SETTINGS),
      squared_error=squared_error,
      num_values=jnp.full((batch,), num_values, jnp.float32),
      mask=jnp.asarray(mask).astype(bool),
  )


@flax.struct.dataclass
class SquaredErrorSum(clu_metrics.Metric):
  """Masked sums of squared error and of the number of values; computes MSE.

  The count is a float, not clu's int32: 50k images of 256x256x3 are 9.8e9
  values, past the int32 range.
  """

  total: jax.Array
  count: jax.Array

  @classmethod
  def empty(cls):
    return cls(total=jnp.zeros((), jnp.float32), count=jnp.zeros((), jnp.float32))

  @classmethod
  def from_model_output(cls, squared_error: jax.Array, num_values: jax.Array,
                        mask: jax.Array | None = None, **_):
    if mask is None:
      mask = jnp.ones(squared_error.shape, bool)
    mask = mask.astype(bool)
    return cls(total=jnp.sum(jnp.where(mask, squared_error, 0.0)),
               count=jnp.sum(jnp.where(mask, num_values, 0.0)))

  def merge(self, other):
    return type(self)(total=self.total + other.total, count=self.count + other.count)

  def compute(self) -> Any:
    return self.total / self.count


@flax.struct.dataclass
class GlobalMsePsnr(SquaredErrorSum):
  """PSNR of the MSE over all values of all images (data range 1)."""

  def compute(self) -> Any:
    # numpy on host sums keeps float64; jnp under jit.
    xp = np if isinstance(self.total, np.ndarray) else jnp
    return -10.0 * xp.log10(self.total / self.count)


@flax.struct.dataclass
class ReconstructionMetrics(clu_metrics.Collection):
  """PSNR (both conventions), MSE and SSIM sums; see the module docstring.

  clu's masked `Average` sums with `jnp.where`, so the infinite PSNR of an
  identical padding pair (zero error) cannot leak in as 0 * inf = nan.
  """

  psnr_mean_per_image: clu_metrics.Average.from_output("psnr")
  psnr_global_mse: GlobalMsePsnr
  mse: SquaredErrorSum
  ssim: clu_metrics.Average.from_output("ssim")


# The fields, for building a larger collection (e.g. adding LPIPS) with
# `clu.metrics.Collection.create(**RECONSTRUCTION_METRICS, lpips=...)`.
RECONSTRUCTION_METRICS: Mapping[str, type[clu_metrics.Metric]] = dict(
    ReconstructionMetrics.__annotations__)


def batch_sums(originals: jax.Array, reconstructions: jax.Array,
               mask: jax.Array | None = None):
  """The metric sums of one batch (jit- and sharding-friendly).

  Args:
    originals: (B, H, W, 3) images in [0, 1].
    reconstructions: the same shape, in [0, 1].
    mask: optional (B,) flags; False marks padded images, which add nothing.

  Returns:
    A `ReconstructionMetrics` collection; merge batches with `.merge`.
  """
  return ReconstructionMetrics.single_from_model_output(
      **reconstruction_outputs(originals, reconstructions, mask))


def empty_sums():
  """The neutral element for `.merge` (an empty `ReconstructionMetrics`)."""
  return ReconstructionMetrics.empty()


def to_host(collection):
  """Copies a metric collection to numpy float64 leaves.

  Merging per-batch sums on the host in float64 keeps 50k-image totals exact
  to ~1e-12 instead of float32's ~1e-7 per addition.
  """
  return jax.tree.map(lambda v: np.asarray(jax.device_get(v), np.float64), collection)


def finalize(collection) -> dict[str, float]:
  """Turns accumulated sums into metrics (plus `num_images`).

  Raises:
    ValueError: if the sums hold no (unmasked) image.
  """
  host = to_host(collection)
  num_images = float(host.ssim.count) if hasattr(host, "ssim") else None
  if num_images is not None and num_images == 0:
    raise ValueError("finalize: `collection` holds no images (all masked or empty)")
  with np.errstate(divide="ignore"):  # identical images: PSNR = inf, as torchmetrics
    result = {name: float(value) for name, value in host.compute().items()}
  if num_images is not None:
    result["num_images"] = num_images
  return result
