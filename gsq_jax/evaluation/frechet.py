"""Fréchet distance, KID and streaming feature statistics, in float64 on the host.

FD = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2)   (covariances with N - 1)

Numerics (EVALUATION_AND_DATA.md §1.3): feature sums and Gram matrices are
accumulated in float64 numpy, and tr sqrt(S1 S2) is taken by the eigh-only route
(recipe 3): r1 = sqrtm_psd(S1) from `eigh` with negative eigenvalues clipped,
then tr sqrt(S1 S2) = sum sqrt(clip(eigvalsh(r1 S2 r1))), because r1 S2 r1 is
symmetric PSD and similar to S1 S2 (`trace_sqrt_product`). This avoids `scipy.linalg.sqrtm` (slow,
complex round-off) and `jax.scipy.linalg.sqrtm` (CPU only); float32 is off by
~0.6 FD at N=1k, so everything here is float64.

FD values are only comparable at equal N and with the same feature extractor
and preprocessing; `fd_vgg16` (FD on LPIPS-VGG16 features) is *not* rFID.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import os
from typing import Any

import numpy as np

ArrayLike = Any
FeatureFn = Callable[[Any], ArrayLike]

VGG16_FEATURE_DIM = 512


def _as_features(fn: str, features: ArrayLike, mask: ArrayLike | None = None,
                 dim: int | None = None) -> np.ndarray:
  """float64 (N, dim) host copy of the unmasked rows."""
  feats = np.asarray(features, np.float64)
  if feats.ndim != 2:
    raise ValueError(f"{fn}: `features` must have shape (N, dim), got {feats.shape}")
  if dim is not None and feats.shape[1] != dim:
    raise ValueError(f"{fn}: `features` must have dim {dim}, got shape {feats.shape}")
  if mask is not None:
    mask = np.asarray(mask)
    if mask.shape != (feats.shape[0],):
      raise ValueError(f"{fn}: `mask` must have shape ({feats.shape[0]},), got {mask.shape}")
    feats = feats[mask.astype(bool)]
  if not np.all(np.isfinite(feats)):
    raise ValueError(f"{fn}: `features` contains non-finite values")
  return feats


class FeatureStats:
  """Running count, feature sum and Gram matrix (float64) of a feature set.

  Update batch by batch (padded rows masked out), merge across hosts or
  shards, then read `mean` and `cov`. Memory is O(dim^2), independent of N.
  """

  def __init__(self, dim: int):
    if not isinstance(dim, (int, np.integer)) or dim < 1:
      raise ValueError(f"FeatureStats: `dim` must be a positive int, got {dim!r}")
    self.dim = int(dim)
    self.count = 0
    self.total = np.zeros((self.dim,), np.float64)
    self.gram = np.zeros((self.dim, self.dim), np.float64)

  def update(self, features: ArrayLike, mask: ArrayLike | None = None) -> FeatureStats:
    """Adds the rows of `features` (N, dim) whose `mask` (N,) is true; returns self."""
    feats = _as_features("FeatureStats.update", features, mask, self.dim)
    self.count += feats.shape[0]
    self.total += feats.sum(axis=0)
    self.gram += feats.T @ feats
    return self

  def merge(self, other: FeatureStats) -> FeatureStats:
    """A new `FeatureStats` holding both sets (e.g. two hosts' shards)."""
    if not isinstance(other, FeatureStats) or other.dim != self.dim:
      raise ValueError(f"FeatureStats.merge: `other` must be FeatureStats of dim {self.dim}, "
                       f"got {type(other).__name__} of dim {getattr(other, 'dim', None)}")
    merged = FeatureStats(self.dim)
    merged.count = self.count + other.count
    merged.total = self.total + other.total
    merged.gram = self.gram + other.gram
    return merged

  @property
  def mean(self) -> np.ndarray:
    if self.count < 1:
      raise ValueError("FeatureStats.mean: no features were added (count = 0)")
    return self.total / self.count

  @property
  def cov(self) -> np.ndarray:
    """Unbiased covariance (N - 1), as pytorch-fid and GSQ's FID."""
    if self.count < 2:
      raise ValueError(f"FeatureStats.cov: needs count >= 2 features, got {self.count}")
    mean = self.mean
    cov = (self.gram - self.count * np.outer(mean, mean)) / (self.count - 1)
    return (cov + cov.T) / 2

  def save(self, path: str | os.PathLike) -> None:
    """Writes the raw sums to an .npz (e.g. to reuse reference statistics)."""
    np.savez(path, count=np.int64(self.count), total=self.total, gram=self.gram)

  @classmethod
  def load(cls, path: str | os.PathLike) -> FeatureStats:
    with np.load(path) as data:
      if set(data.files) != {"count", "total", "gram"}:
        raise ValueError(f"FeatureStats.load: `path` {path} must hold count/total/gram "
                         f"(written by FeatureStats.save), found {data.files}")
      stats = cls(int(data["total"].shape[0]))
      stats.count = int(data["count"])
      stats.total = np.asarray(data["total"], np.float64)
      stats.gram = np.asarray(data["gram"], np.float64)
    return stats


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
  """tr sqrt(S1 S2) for symmetric PSD S1, S2, by eigh only (float64).

  With S1 = V diag(w) V' and r1 = V diag(sqrt w) V' (negative round-off
  eigenvalues clipped to 0), S1 S2 is similar to the symmetric PSD r1 S2 r1,
  which is orthogonally similar to D (V' S2 V) D with D = diag(sqrt w); so the
  trace is the sum of square roots of that matrix's eigenvalues (clipped).
  Two matrix products instead of three.
  """
  eigvals, eigvecs = np.linalg.eigh((cov1 + cov1.T) / 2)
  root = np.sqrt(np.clip(eigvals, 0.0, None))
  inner = root[:, None] * (eigvecs.T @ cov2 @ eigvecs) * root[None, :]
  inner = (inner + inner.T) / 2
  return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0.0, None))))


def frechet_distance(mu1: ArrayLike, cov1: ArrayLike, mu2: ArrayLike,
                     cov2: ArrayLike) -> float:
  """Fréchet distance of two Gaussians, float64, eigh route (see module doc)."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
  dim = mu1.shape[0] if mu1.ndim == 1 else -1
  for name, value, shape in (("mu1", mu1, (dim,)), ("mu2", mu2, (dim,)),
                             ("cov1", cov1, (dim, dim)), ("cov2", cov2, (dim, dim))):
    if dim < 1 or value.shape != shape:
      raise ValueError(f"frechet_distance: `{name}` must have shape {shape} "
                       f"(mu1 is (dim,)), got {value.shape}")
    if not np.all(np.isfinite(value)):
      raise ValueError(f"frechet_distance: `{name}` contains non-finite values")
  trace_sqrt = trace_sqrt_product(cov1, cov2)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt)


def frechet_distance_from_stats(stats1: FeatureStats, stats2: FeatureStats) -> float:
  """FD between two accumulated feature sets."""
  if not (isinstance(stats1, FeatureStats) and isinstance(stats2, FeatureStats)):
    raise ValueError("frechet_distance_from_stats: `stats1` and `stats2` must be FeatureStats")
  if stats1.dim != stats2.dim:
    raise ValueError(f"frechet_distance_from_stats: `stats2.dim` must equal "
                     f"`stats1.dim` = {stats1.dim}, got {stats2.dim}")
  return frechet_distance(stats1.mean, stats1.cov, stats2.mean, stats2.cov)


def _polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int, gamma: float,
                              coef0: float) -> float:
  """Unbiased MMD^2 with k(a, b) = (gamma a.b + coef0)^degree."""
  m = x.shape[0]
  k_xx = (gamma * (x @ x.T) + coef0) ** degree
  k_yy = (gamma * (y @ y.T) + coef0) ** degree
  k_xy = (gamma * (x @ y.T) + coef0) ** degree
  within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
  return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(features1: ArrayLike, features2: ArrayLike, *,
                              num_subsets: int = 100, subset_size: int = 1000,
                              degree: int = 3, gamma: float | None = None,
                              coef0: float = 1.0, seed: int = 2020) -> dict[str, float]:
  """KID: unbiased polynomial-kernel MMD^2 averaged over random subsets.

  torch-fidelity defaults (100 subsets of 1000, degree 3, gamma = 1/dim,
  coef0 1, seed 2020 with `np.random.RandomState(seed).choice(..., replace=False)`
  drawn for set 1 then set 2 per subset). Unlike torch-fidelity, which refuses
  sets smaller than `subset_size`, the subset size shrinks to the smaller set;
  `subset_size` in the result says what was used. Computed in float64.

  Returns:
    dict with `kid_mean`, `kid_std` (population std over subsets) and
    `subset_size`.
  """
  fn = "kernel_inception_distance"
  x = _as_features(fn, features1)
  y = _as_features(fn, features2, dim=x.shape[1])
  size = min(int(subset_size), x.shape[0], y.shape[0])
  if size < 2:
    raise ValueError(f"{fn}: each set needs >= 2 features and `subset_size` >= 2, got "
                     f"{x.shape[0]}, {y.shape[0]} features and subset_size={subset_size}")
  if num_subsets < 1:
    raise ValueError(f"{fn}: `num_subsets` must be >= 1, got {num_subsets}")
  gamma = 1.0 / x.shape[1] if gamma is None else float(gamma)
  rng = np.random.RandomState(seed)
  mmds = np.empty((num_subsets,), np.float64)
  for i in range(num_subsets):
    xi = x[rng.choice(x.shape[0], size, replace=False)]
    yi = y[rng.choice(y.shape[0], size, replace=False)]
    mmds[i] = _polynomial_mmd2_unbiased(xi, yi, degree, gamma, coef0)
  return {"kid_mean": float(mmds.mean()), "kid_std": float(mmds.std()),
          "subset_size": float(size)}


def accumulate_feature_stats(feature_fn: FeatureFn, batches: Iterable[tuple], *,
                             dim: int) -> tuple[FeatureStats, FeatureStats]:
  """Streams (originals, reconstructions[, mask]) batches through `feature_fn`.

  Args:
    feature_fn: maps a batch of images to (B, dim) features (e.g. a jitted
      Inception or VGG16 feature extractor); called once per image batch.
    batches: iterable of `(originals, reconstructions)` or
      `(originals, reconstructions, mask)`; mask (B,) marks real images.
    dim: the expected feature dimension.

  Returns:
    (stats of the originals, stats of the reconstructions).
  """
  real, fake = FeatureStats(dim), FeatureStats(dim)
  for i, batch in enumerate(batches):
    if len(batch) not in (2, 3):
      raise ValueError(f"accumulate_feature_stats: batch {i} of `batches` must be "
                       f"(originals, reconstructions[, mask]), got {len(batch)} items")
    mask = batch[2] if len(batch) == 3 else None
    real.update(feature_fn(batch[0]), mask)
    fake.update(feature_fn(batch[1]), mask)
  return real, fake


def fd_vgg16(vgg16_feature_fn: FeatureFn, batches: Iterable[tuple]) -> float:
  """FD-VGG16: Fréchet distance on LPIPS-VGG16 relu5_3 global-average features.

  An offline stand-in for rFID when the Inception weights are missing
  (EVALUATION_AND_DATA.md §1.2). It is comparable only within this project and
  must be labelled FD-VGG16, never rFID.

  Args:
    vgg16_feature_fn: maps a batch of images to (B, 512) features, e.g.
      global-average-pooled relu5_3 of the LPIPS VGG16 backbone.
    batches: `(originals, reconstructions[, mask])` tuples, see
      `accumulate_feature_stats`.
  """
  real, fake = accumulate_feature_stats(vgg16_feature_fn, batches, dim=VGG16_FEATURE_DIM)
  return frechet_distance_from_stats(real, fake)
