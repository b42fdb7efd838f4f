"""The FID Inception-v3 (pytorch-fid variant) in Flax NNX, and its weight loader.

Architecture: torchvision's Inception3 with 1008 classes and no auxiliary
head, whose Mixed_5b..7c blocks are replaced by pytorch-fid's FID variants
(FIDInceptionA/C/E_1/E_2: average pools exclude padding, the last block max
pools). Together with the weights `pt_inception-2015-12-05-6726825d.pth` (the
2015 TF FID graph converted by pytorch-fid) this is the standard rFID feature
extractor: 2048-d global-average-pooled Mixed_7c features. The same file and
network back torch-fidelity's `inception-v3-compat`, which GSQ used.

Source of truth for parameter names and shapes: pytorch-fid's `inception.py`
(`fid_inception_v3()`, loaded with a strict `load_state_dict`), i.e. keys such
as `Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`,
`fc.weight`. The NNX attribute names below mirror those names one-to-one, so
`official_state_dict_shapes()` derives the full key list from this module.
Every conv is bias-free and followed by BatchNorm (eps 1e-3) and ReLU.

The weights cannot be downloaded here: pass a local path. Without the file,
`rfid_status` reports rFID as unavailable with the reason and the fix; it is
never replaced by a number.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import os
import pickle
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from gsq_jax.models import weights
from gsq_jax.utils import torch_pickle
from gsq_jax.utils.files import file_sha256

FID_WEIGHTS_FILENAME = weights.KNOWN_WEIGHTS["fid_inception"].filename
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
FEATURE_DIM = 2048
NUM_CLASSES = 1008
INPUT_SIZE = 299
PREPROCESS_MODES = ("pytorch_fid", "torch_fidelity")
_BN_EPS = 1e-3

# --------------------------------------------------------------------------
# Network.
# --------------------------------------------------------------------------


class BasicConv2d(nnx.Module):
  """Conv (no bias) -> BatchNorm (running statistics) -> ReLU."""

  def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int],
               stride: int = 1, padding: tuple[int, int] = (0, 0), *,
               precision: Any, rngs: nnx.Rngs):
    self.conv = nnx.Conv(in_ch, out_ch, kernel, strides=stride,
                         padding=((padding[0], padding[0]), (padding[1], padding[1])),
                         use_bias=False, precision=precision, rngs=rngs)
    self.bn = nnx.BatchNorm(out_ch, use_running_average=True, epsilon=_BN_EPS, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
  # count_include_pad=False is the FID-block change (TF's average pool).
  return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                      count_include_pad=False)


def _max_pool_3x3(x, stride: int):
  padding = ((1, 1), (1, 1)) if stride == 1 else "VALID"
  return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class InceptionA(nnx.Module):
  """Mixed_5b/c/d (FIDInceptionA): 64 + 64 + 96 + pool_features channels."""

  def __init__(self, in_ch: int, pool_features: int, *, precision, rngs):
    conv = lambda *a, **k: BasicConv2d(*a, **k, precision=precision, rngs=rngs)
    self.branch1x1 = conv(in_ch, 64, (1, 1))
    self.branch5x5_1 = conv(in_ch, 48, (1, 1))
    self.branch5x5_2 = conv(48, 64, (5, 5), padding=(2, 2))
    self.branch3x3dbl_1 = conv(in_ch, 64, (1, 1))
    self.branch3x3dbl_2 = conv(64, 96, (3, 3), padding=(1, 1))
    self.branch3x3dbl_3 = conv(96, 96, (3, 3), padding=(1, 1))
    self.branch_pool = conv(in_ch, pool_features, (1, 1))

  def __call__(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate(
        [self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_3x3(x))], axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a: stride-2 reduction to 384 + 96 + in_ch channels."""

  def __init__(self, in_ch: int, *, precision, rngs):
    conv = lambda *a, **k: BasicConv2d(*a, **k, precision=precision, rngs=rngs)
    self.branch3x3 = conv(in_ch, 384, (3, 3), stride=2)
    self.branch3x3dbl_1 = conv(in_ch, 64, (1, 1))
    self.branch3x3dbl_2 = conv(64, 96, (3, 3), padding=(1, 1))
    self.branch3x3dbl_3 = conv(96, 96, (3, 3), stride=2)

  def __call__(self, x):
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), b3, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nnx.Module):
  """Mixed_6b..e (FIDInceptionC): factorised 7x7 branches, 4 x 192 channels."""

  def __init__(self, in_ch: int, channels_7x7: int, *, precision, rngs):
    conv = lambda *a, **k: BasicConv2d(*a, **k, precision=precision, rngs=rngs)
    c7 = channels_7x7
    self.branch1x1 = conv(in_ch, 192, (1, 1))
    self.branch7x7_1 = conv(in_ch, c7, (1, 1))
    self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = conv(in_ch, c7, (1, 1))
    self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = conv(in_ch, 192, (1, 1))

  def __call__(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = layer(bd)
    return jnp.concatenate(
        [self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool_3x3(x))], axis=-1)


class InceptionD(nnx.Module):
  """Mixed_7a: stride-2 reduction to 320 + 192 + in_ch channels."""

  def __init__(self, in_ch: int, *, precision, rngs):
    conv = lambda *a, **k: BasicConv2d(*a, **k, precision=precision, rngs=rngs)
    self.branch3x3_1 = conv(in_ch, 192, (1, 1))
    self.branch3x3_2 = conv(192, 320, (3, 3), stride=2)
    self.branch7x7x3_1 = conv(in_ch, 192, (1, 1))
    self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = conv(192, 192, (3, 3), stride=2)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = x
    for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                  self.branch7x7x3_4):
      b7 = layer(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nnx.Module):
  """Mixed_7b (FIDInceptionE_1, average pool) / Mixed_7c (E_2, max pool); 2048 ch."""

  def __init__(self, in_ch: int, max_pool: bool, *, precision, rngs):
    conv = lambda *a, **k: BasicConv2d(*a, **k, precision=precision, rngs=rngs)
    self.max_pool = max_pool
    self.branch1x1 = conv(in_ch, 320, (1, 1))
    self.branch3x3_1 = conv(in_ch, 384, (1, 1))
    self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = conv(in_ch, 448, (1, 1))
    self.branch3x3dbl_2 = conv(448, 384, (3, 3), padding=(1, 1))
    self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = conv(in_ch, 192, (1, 1))

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
    pooled = _max_pool_3x3(x, 1) if self.max_pool else _avg_pool_3x3(x)
    return jnp.concatenate([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
  """FID Inception-v3: (B, 299, 299, 3) in [-1, 1] -> (B, 2048) pool features.

  Use `preprocess` first (or `make_feature_fn`, which does both). Convolutions
  default to `Precision.HIGHEST` so float32 features do not silently drop to
  TF32/bf16 on GPUs and TPUs.
  """

  def __init__(self, *, rngs: nnx.Rngs, precision: Any = jax.lax.Precision.HIGHEST):
    kw = dict(precision=precision, rngs=rngs)
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, (3, 3), stride=2, **kw)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, (3, 3), **kw)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, (3, 3), padding=(1, 1), **kw)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, (1, 1), **kw)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, (3, 3), **kw)
    self.Mixed_5b = InceptionA(192, 32, **kw)
    self.Mixed_5c = InceptionA(256, 64, **kw)
    self.Mixed_5d = InceptionA(288, 64, **kw)
    self.Mixed_6a = InceptionB(288, **kw)
    self.Mixed_6b = InceptionC(768, 128, **kw)
    self.Mixed_6c = InceptionC(768, 160, **kw)
    self.Mixed_6d = InceptionC(768, 160, **kw)
    self.Mixed_6e = InceptionC(768, 192, **kw)
    self.Mixed_7a = InceptionD(768, **kw)
    self.Mixed_7b = InceptionE(1280, max_pool=False, **kw)
    self.Mixed_7c = InceptionE(2048, max_pool=True, **kw)
    self.fc = nnx.Linear(FEATURE_DIM, NUM_CLASSES, precision=precision, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = _max_pool_3x3(x, 2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = _max_pool_3x3(x, 2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                  self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                  self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
      x = block(x)
    return jnp.mean(x, axis=(1, 2))

  def logits(self, pool_features: jax.Array) -> jax.Array:
    """1008-way logits of the pool features (for the Inception Score)."""
    return self.fc(pool_features)


# --------------------------------------------------------------------------
# Preprocessing.
# --------------------------------------------------------------------------


def _tf1_bilinear_resize(x: jax.Array, size: int) -> jax.Array:
  """TF1 `resize_bilinear(align_corners=False)`: source = dest * in/out, no half-pixel."""
  for axis in (1, 2):
    in_size = x.shape[axis]
    src = np.arange(size, dtype=np.float64) * (in_size / size)
    lo = np.floor(src).astype(np.int32)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = jnp.asarray(src - lo, jnp.float32).reshape([-1 if a == axis else 1 for a in range(4)])
    a, b = jnp.take(x, lo, axis=axis), jnp.take(x, hi, axis=axis)
    x = a + (b - a) * frac
  return x


def preprocess(images: jax.Array, mode: str = "pytorch_fid") -> jax.Array:
  """[0, 1] float (or uint8) RGB (B, H, W, 3) -> Inception input (B, 299, 299, 3).

  Floats are first clamped and truncated to uint8 levels, `(x * 255).uint8`,
  as GSQ's FID does (truncation, not rounding). Then:
    * "pytorch_fid" (default): /255, bilinear resize to 299 with half-pixel
      centres and no antialias (torch `interpolate(align_corners=False)`),
      then 2x - 1.
    * "torch_fidelity": TF1-legacy bilinear resize of the 0..255 values, then
      (x - 128) / 128 (torch-fidelity `inception-v3-compat`, GSQ §4.3).
  """
  if mode not in PREPROCESS_MODES:
    raise ValueError(f"preprocess: `mode` must be one of {PREPROCESS_MODES}, got {mode!r}")
  if getattr(images, "ndim", 0) != 4 or images.shape[-1] != 3:
    raise ValueError(f"preprocess: `images` must be RGB (B, H, W, 3), "
                     f"got shape {getattr(images, 'shape', None)}")
  if images.dtype == jnp.uint8:
    levels = images.astype(jnp.float32)
  else:
    levels = jnp.floor(jnp.clip(images.astype(jnp.float32), 0.0, 1.0) * 255.0)
  shape = (images.shape[0], INPUT_SIZE, INPUT_SIZE, 3)
  if mode == "pytorch_fid":
    x = jax.image.resize(levels / 255.0, shape, method="bilinear", antialias=False)
    return 2.0 * x - 1.0
  return (_tf1_bilinear_resize(levels, INPUT_SIZE) - 128.0) / 128.0


def make_feature_fn(model: InceptionV3, mode: str = "pytorch_fid"
                    ) -> Callable[[jax.Array], jax.Array]:
  """A jitted `images in [0, 1] (B, H, W, 3) -> (B, 2048)` feature extractor.

  The model is split once into a graph and a state, so repeated calls reuse
  one compilation per input shape; a batch sharded over a mesh stays sharded.
  """
  if mode not in PREPROCESS_MODES:
    raise ValueError(f"make_feature_fn: `mode` must be one of {PREPROCESS_MODES}, got {mode!r}")
  graphdef, state = nnx.split(model)

  @jax.jit
  def features(state, images):
    return nnx.merge(graphdef, state)(preprocess(images, mode))

  return lambda images: features(state, images)


# --------------------------------------------------------------------------
# Weights: pytorch-fid state_dict <-> NNX state.
# --------------------------------------------------------------------------

# (last two NNX path entries) -> (torch suffix, torch-from-flax transpose).
_LEAF_NAMES = {
    ("conv", "kernel"): ("conv.weight", (3, 2, 0, 1)),  # (kh,kw,I,O) <-> (O,I,kh,kw)
    ("bn", "scale"): ("bn.weight", None),
    ("bn", "bias"): ("bn.bias", None),
    ("bn", "mean"): ("bn.running_mean", None),
    ("bn", "var"): ("bn.running_var", None),
    ("fc", "kernel"): ("fc.weight", (1, 0)),
    ("fc", "bias"): ("fc.bias", None),
}
_IGNORED_SUFFIX = "num_batches_tracked"  # BatchNorm counter, if the file has one


def abstract_model() -> InceptionV3:
  """The Inception with shape-only weights (its architecture; no file read)."""
  return nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))


def _torch_layout(path: tuple) -> tuple[str, tuple[int, ...] | None]:
  """NNX state path -> (pytorch-fid key, transpose from flax to torch)."""
  suffix, perm = _LEAF_NAMES[tuple(str(p) for p in path[-2:])]
  return ".".join([str(p) for p in path[:-2]] + [suffix]), perm


def _flat_torch_layout(state) -> dict[str, tuple[tuple, tuple[int, ...] | None, tuple]]:
  """torch key -> (NNX path, flax->torch transpose, flax shape)."""
  layout = {}
  for path, var in nnx.to_flat_state(state):
    key, perm = _torch_layout(path)
    layout[key] = (path, perm, tuple(var.get_value().shape))
  return layout


def official_state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """Every key of the official FID weights file with its torch shape."""
  _, state = nnx.split(abstract_model())
  shapes = {}
  for key, (_, perm, shape) in _flat_torch_layout(state).items():
    shapes[key] = tuple(shape[i] for i in perm) if perm else shape
  return shapes


def inception_from_state_dict(state_dict: Mapping[str, Any], *,
                              precision: Any = jax.lax.Precision.HIGHEST) -> InceptionV3:
  """Builds the NNX model from a pytorch-fid state_dict of numpy arrays.

  Strict like torch's `load_state_dict`: every key must be present with the
  official shape, and unknown keys are refused (BatchNorm
  `num_batches_tracked` counters are ignored).
  """
  fn = "inception_from_state_dict"
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"{fn}: `state_dict` must be a mapping of name -> array, "
                     f"got {type(state_dict).__name__}")
  graphdef, state = nnx.split(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0),
                                                                 precision=precision)))
  layout = _flat_torch_layout(state)
  given = {k for k in state_dict if not k.endswith(_IGNORED_SUFFIX)}
  missing, unexpected = sorted(set(layout) - given), sorted(given - set(layout))
  if missing or unexpected:
    raise ValueError(f"{fn}: `state_dict` keys do not match the pytorch-fid FID Inception "
                     f"layout: {len(missing)} missing (e.g. {missing[:3]}), "
                     f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
  pure = nnx.to_pure_dict(state)
  for key, (path, perm, shape) in layout.items():
    value = np.asarray(state_dict[key], np.float32)
    if perm:
      value = value.transpose(np.argsort(perm))
    if value.shape != shape:
      torch_shape = tuple(shape[i] for i in perm) if perm else shape
      raise ValueError(f"{fn}: `state_dict[{key!r}]` must have shape {torch_shape}, "
                       f"got {np.shape(state_dict[key])}")
    node = pure
    for p in path[:-1]:
      node = node[p]
    node[path[-1]] = jnp.asarray(value)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def export_state_dict(model: InceptionV3) -> dict[str, np.ndarray]:
  """The inverse of `inception_from_state_dict` (pytorch-fid names and layouts)."""
  _, state = nnx.split(model)
  out = {}
  for path, var in nnx.to_flat_state(state):
    key, perm = _torch_layout(path)
    value = np.asarray(var.get_value())
    out[key] = value.transpose(perm) if perm else value
  return out


# --------------------------------------------------------------------------
# Weights file: availability, hash, loading.
# --------------------------------------------------------------------------

_FIX = weights.KNOWN_WEIGHTS["fid_inception"].how_to_get + (
    f" Its sha256 must start with {FID_WEIGHTS_SHA256_PREFIX}.")


@dataclasses.dataclass(frozen=True)
class InceptionAvailable:
  """rFID can be computed: the weights file exists and its hash matches."""

  weights_path: str
  sha256: str
  available: bool = dataclasses.field(default=True, init=False)


@dataclasses.dataclass(frozen=True)
class InceptionUnavailable:
  """rFID cannot be computed; report `reason` and `fix`, never a number."""

  reason: str
  fix: str
  available: bool = dataclasses.field(default=False, init=False)

  def __str__(self) -> str:
    return f"rFID unavailable: {self.reason}. Fix: {self.fix}"


class InceptionWeightsError(ValueError):
  """The Inception weights cannot be used; carries the `InceptionUnavailable` status."""

  def __init__(self, status: InceptionUnavailable):
    super().__init__(str(status))
    self.status = status


def rfid_status(weights_path: str | os.PathLike | None, *,
                expected_sha256_prefix: str | None = FID_WEIGHTS_SHA256_PREFIX
                ) -> InceptionAvailable | InceptionUnavailable:
  """Whether rFID can be computed from `weights_path`, and if not, why and how to fix it.

  Args:
    weights_path: local path of `pt_inception-2015-12-05-6726825d.pth` (or a
      folder holding it); None searches `$GSQ_JAX_WEIGHTS_DIR` and the torch
      hub cache (`gsq_jax.models.weights.find_weights`).
    expected_sha256_prefix: required prefix of the file's sha256. Keep the
      default; None disables the check and exists only for tests with
      synthetic weight files.
  """
  try:
    path = os.fspath(weights.find_weights("fid_inception", weights_path))
  except FileNotFoundError:
    if weights_path is not None:
      where = (f"the given path {os.fspath(weights_path)!r} is not the file (nor a folder "
               "holding it)")
    else:
      searched = ", ".join(str(p) for p in weights.candidate_paths("fid_inception"))
      where = f"no path was given and it is not in {searched or 'any default location'}"
    return InceptionUnavailable(
        reason=f"the FID Inception weights {FID_WEIGHTS_FILENAME} were not found: {where}; "
        "they are not bundled and cannot be downloaded here", fix=_FIX)
  sha256 = file_sha256(path)
  if expected_sha256_prefix is not None and not sha256.startswith(expected_sha256_prefix):
    return InceptionUnavailable(
        reason=f"Inception weights file {path!r} has sha256 {sha256[:16]}..., expected a "
        f"sha256 starting with {expected_sha256_prefix} (wrong or truncated file; the "
        "official file is about 91 MB)", fix=_FIX)
  return InceptionAvailable(weights_path=path, sha256=sha256)


def load_inception(weights_path: str | os.PathLike | None, *,
                   expected_sha256_prefix: str | None = FID_WEIGHTS_SHA256_PREFIX,
                   precision: Any = jax.lax.Precision.HIGHEST) -> InceptionV3:
  """Loads the FID Inception from the pytorch-fid `.pth` after checking its hash.

  Raises:
    InceptionWeightsError (a ValueError): missing file, wrong hash, or a file
      whose tensors do not match the official layout; `.status` holds the
      `InceptionUnavailable` reason and fix.
  """
  status = rfid_status(weights_path, expected_sha256_prefix=expected_sha256_prefix)
  if not status.available:
    raise InceptionWeightsError(status)
  try:
    state_dict = torch_pickle.load_state_dict(status.weights_path)
    return inception_from_state_dict(state_dict, precision=precision)
  except (ValueError, pickle.UnpicklingError, EOFError) as e:
    raise InceptionWeightsError(InceptionUnavailable(
        reason=f"Inception weights file {status.weights_path!r} could not be used: {e}",
        fix=_FIX)) from e
