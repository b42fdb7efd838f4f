"""GAN discriminators: taming PatchGAN and GSQ's DINOv2 projected discriminator.

All modules take NHWC images. BatchNorm layers are built in train mode
(`use_running_average=False`, batch statistics), as both references run them
in every step (GSQ.md §3.4, §6.8). Under `jax.jit` with a data-sharded batch
those statistics are global (SyncBN-like); the PyTorch references use
per-GPU statistics.

PatchGAN (taming `NLayerDiscriminator`, QUANTIZERS.md §2.2): 4×4 convs,
padding 1, LeakyReLU(0.2); conv kernels N(0, 0.02), BN scale N(1, 0.02), BN
bias 0; the first and last conv keep PyTorch's default bias init. GSQ's NLD
variant scales the output conv by 0.1 (`output_weight_scale=0.1`).

DINO discriminator (GSQ.md §3.4, StyleGAN-T projected discriminator):
DiffAugment (color, translation, cutout; independent draws per call) on the
[0, 1] input, area resize to 518, ImageNet normalisation, frozen DINOv2
ViT-S/14-reg4, one head per tapped token map, logits concatenated to (B, 5·T).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gsq_jax.models import dino as dino_lib

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _torch_default_bias_init(fan_in: int):
  """PyTorch's default conv/linear bias init U(±1/√fan_in)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# PyTorch's default conv weight init, kaiming_uniform(a=√5) = U(±1/√fan_in).
_torch_default_kernel_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _bn_scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def _batch_norm(channels: int, rngs: nnx.Rngs, scale_init=nnx.initializers.ones) -> nnx.BatchNorm:
  # torch BatchNorm: momentum 0.1 (flax convention 0.9), eps 1e-5.
  return nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, use_running_average=False,
                       scale_init=scale_init, rngs=rngs)


# ----------------------------------------------------------------------------
# PatchGAN.
# ----------------------------------------------------------------------------


class PatchGAN(nnx.Module):
  """Taming `NLayerDiscriminator`: (B, H, W, C) -> patch logits (B, H', W', 1).

  For 256² input and 3 layers the output is 30×30.
  """

  def __init__(self, in_channels: int = 3, num_filters: int = 64, num_layers: int = 3,
               output_weight_scale: float = 1.0, *, rngs: nnx.Rngs):
    if num_layers < 1:
      raise ValueError(f"PatchGAN: `num_layers` must be >= 1, got {num_layers}")
    k, pad = 4, ((1, 1), (1, 1))
    normal = nnx.initializers.normal(0.02)

    def conv(cin, cout, stride, bias):
      return nnx.Conv(cin, cout, (k, k), strides=stride, padding=pad, use_bias=bias,
                      kernel_init=normal,
                      bias_init=_torch_default_bias_init(cin * k * k), rngs=rngs)

    self.conv_in = conv(in_channels, num_filters, 2, True)
    convs, norms, mult = [], [], 1
    for n in range(1, num_layers + 1):
      prev, mult = mult, min(2 ** n, 8)
      stride = 2 if n < num_layers else 1
      convs.append(conv(num_filters * prev, num_filters * mult, stride, False))
      norms.append(_batch_norm(num_filters * mult, rngs, _bn_scale_init))
    self.convs, self.norms = nnx.List(convs), nnx.List(norms)
    self.conv_out = conv(num_filters * mult, 1, 1, True)
    if output_weight_scale != 1.0:
      self.conv_out.kernel[...] = self.conv_out.kernel[...] * output_weight_scale

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.leaky_relu(self.conv_in(x), 0.2)
    for conv, norm in zip(self.convs, self.norms):
      x = jax.nn.leaky_relu(norm(conv(x)), 0.2)
    return self.conv_out(x)


# ----------------------------------------------------------------------------
# DiffAugment (Zhao et al. 2020), NHWC, one independent draw per sample.
# ----------------------------------------------------------------------------


def rand_brightness(x: jax.Array, key: jax.Array) -> jax.Array:
  """x + U(−0.5, 0.5) per sample."""
  return x + (jax.random.uniform(key, (x.shape[0], 1, 1, 1), x.dtype) - 0.5)


def rand_saturation(x: jax.Array, key: jax.Array) -> jax.Array:
  """Scales the deviation from the per-pixel channel mean by U(0, 2)."""
  m = jnp.mean(x, axis=-1, keepdims=True)
  return (x - m) * (jax.random.uniform(key, (x.shape[0], 1, 1, 1), x.dtype) * 2) + m


def rand_contrast(x: jax.Array, key: jax.Array) -> jax.Array:
  """Scales the deviation from the per-image mean by U(0.5, 1.5)."""
  m = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return (x - m) * (jax.random.uniform(key, (x.shape[0], 1, 1, 1), x.dtype) + 0.5) + m


def rand_translation(x: jax.Array, key: jax.Array, ratio: float = 0.125) -> jax.Array:
  """Shifts each image by up to round(ratio·size) pixels per axis, zero fill."""
  b, h, w, _ = x.shape
  sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
  kx, ky = jax.random.split(key)
  tx = jax.random.randint(kx, (b, 1), -sh, sh + 1)
  ty = jax.random.randint(ky, (b, 1), -sw, sw + 1)
  # Index into a 1-pixel zero-padded copy; out-of-range reads hit the padding.
  ix = jnp.clip(jnp.arange(h)[None] + tx + 1, 0, h + 1)  # (B, H)
  iy = jnp.clip(jnp.arange(w)[None] + ty + 1, 0, w + 1)  # (B, W)
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  xp = jnp.take_along_axis(xp, ix[:, :, None, None], axis=1)
  return jnp.take_along_axis(xp, iy[:, None, :, None], axis=2)


def cutout_size(h: int, w: int, ratio: float = 0.2) -> tuple[int, int]:
  """Side lengths of the cutout square: round(ratio·H), round(ratio·W)."""
  return int(h * ratio + 0.5), int(w * ratio + 0.5)


def rand_cutout(x: jax.Array, key: jax.Array, ratio: float = 0.2) -> jax.Array:
  """Zeroes one square of side round(ratio·H) per image (clipped at the border)."""
  b, h, w, _ = x.shape
  ch, cw = cutout_size(h, w, ratio)
  kx, ky = jax.random.split(key)
  ox = jax.random.randint(kx, (b, 1, 1), 0, h + (1 - ch % 2))
  oy = jax.random.randint(ky, (b, 1, 1), 0, w + (1 - cw % 2))
  lx, ly = ox - ch // 2, oy - cw // 2
  i = jnp.arange(h)[None, :, None]
  j = jnp.arange(w)[None, None, :]
  inside = (i >= lx) & (i < lx + ch) & (j >= ly) & (j < ly + cw)
  return x * (~inside)[..., None].astype(x.dtype)


_AUGMENTS = {
    "color": (rand_brightness, rand_saturation, rand_contrast),
    "translation": (rand_translation,),
    "cutout": (rand_cutout,),
}


def diff_augment(x: jax.Array, key: jax.Array,
                 policy: str = "color,translation,cutout") -> jax.Array:
  """Applies the DiffAugment policy (comma-separated groups, in order)."""
  fns = []
  for group in [p for p in policy.split(",") if p]:
    if group not in _AUGMENTS:
      raise ValueError(f"diff_augment: unknown `policy` entry {group!r}; expected a "
                       f"comma-separated subset of {sorted(_AUGMENTS)}")
    fns.extend(_AUGMENTS[group])
  for fn, k in zip(fns, jax.random.split(key, max(len(fns), 1))):
    x = fn(x, k)
  return x


# ----------------------------------------------------------------------------
# Resizing and the DINO discriminator.
# ----------------------------------------------------------------------------


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
  """torch 'area' interpolation (adaptive average pooling) as an (out, in) matrix."""
  m = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    lo = (i * n_in) // n_out
    hi = -((-(i + 1) * n_in) // n_out)  # ceil
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


@functools.lru_cache(maxsize=None)
def _area_taps(n_in: int, n_out: int, transpose: bool) -> tuple[np.ndarray, np.ndarray]:
  """The nonzeros of each row of the area matrix (or of its transpose), zero-padded to K.

  Returns (out, K) source indices and (out, K) weights, K = the most nonzeros
  in a row: 2 for 256 -> 518 (3 for the transpose).
  """
  m = _area_matrix(n_in, n_out)
  m = m.T if transpose else m
  k = int((m != 0).sum(axis=1).max())
  index, weight = np.zeros((m.shape[0], k), np.int32), np.zeros((m.shape[0], k), np.float32)
  for i, row in enumerate(m):
    nonzero = np.flatnonzero(row)
    index[i, :len(nonzero)], weight[i, :len(nonzero)] = nonzero, row[nonzero]
  return index, weight


def _gather_resize(x, n_in: int, n_out: int, axis: int, transpose: bool):
  """The area matrix (or its transpose) applied along `axis`: K gathers and a weighted sum."""
  index, weight = _area_taps(n_in, n_out, transpose)
  shape = [1] * x.ndim
  shape[axis] = index.shape[0]
  out = 0.0
  for k in range(index.shape[1]):
    rows = jnp.take(x, index[:, k], axis=axis, mode="clip").astype(jnp.float32)
    out = out + rows * weight[:, k].reshape(shape)
  return out.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _area_resize_axis(x, n_in: int, n_out: int, axis: int, transpose: bool = False):
  """Area resize along one axis whose backward is the transposed map, also by gathers.

  Without the custom rule the gathers' transpose would be a scatter-add.
  """
  return _gather_resize(x, n_in, n_out, axis, transpose)


def _area_resize_axis_fwd(x, n_in, n_out, axis, transpose):
  return _gather_resize(x, n_in, n_out, axis, transpose), None


def _area_resize_axis_bwd(n_in, n_out, axis, transpose, _, g):
  return (_area_resize_axis(g, n_in, n_out, axis, not transpose),)


_area_resize_axis.defvjp(_area_resize_axis_fwd, _area_resize_axis_bwd)


def area_resize(x: jax.Array, size: int) -> jax.Array:
  """F.interpolate(mode='area') of NHWC images to size×size (exact).

  Separable, and each axis is a few gathers plus a weighted sum, forward and
  backward (upsampling 256 -> 518, every output pixel averages the 1 or 2
  input pixels under it). As a dense matmul per axis it did 256 multiply-adds
  per output where at most 2 are nonzero, and its backward failed XLA's
  Triton GEMM tiling on H100 ("Couldn't find output tile sizes").
  """
  _, h, w, _ = x.shape
  if (h, w) == (size, size):
    return x
  x = _area_resize_axis(x, h, size, 1)
  return _area_resize_axis(x, w, size, 2)


class _ConvBNAct(nnx.Module):
  """Conv1d (circular padding) -> BatchNorm1d (batch stats) -> LeakyReLU(0.2)."""

  def __init__(self, channels: int, kernel: int, rngs: nnx.Rngs):
    self.conv = nnx.Conv(channels, channels, (kernel,), padding="CIRCULAR",
                         kernel_init=_torch_default_kernel_init,
                         bias_init=_torch_default_bias_init(channels * kernel), rngs=rngs)
    self.norm = _batch_norm(channels, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.leaky_relu(self.norm(self.conv(x)), 0.2)


class DiscHead(nnx.Module):
  """One head on a (B, T, C) token map -> (B, T) logits (StyleGAN-T `DiscHead`)."""

  def __init__(self, channels: int = 384, residual_kernel: int = 9, *, rngs: nnx.Rngs):
    self.block = _ConvBNAct(channels, 1, rngs)
    self.residual = _ConvBNAct(channels, residual_kernel, rngs)
    self.cls = nnx.Conv(channels, 1, (1,), kernel_init=_torch_default_kernel_init,
                        bias_init=_torch_default_bias_init(channels), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.block(x)
    x = (self.residual(x) + x) / math.sqrt(2.0)
    return self.cls(x)[..., 0]


class DinoDiscriminator(nnx.Module):
  """GSQ's projected discriminator on a frozen DINOv2 ViT-S/14-reg4.

  Call with images (B, H, W, 3) in [0, 1] (fakes unclamped) and a PRNG key
  for DiffAugment (draw separate keys for real and fake). Returns logits
  (B, 5·T), T = 1374 at the native 518 resolution: the heads' outputs for the
  tapped blocks' token maps, then for the patch-token map (StyleGAN-T order).
  Build it with `make_dino_discriminator` (loads the checkpoint).
  """

  def __init__(self, backbone: dino_lib.DinoViT, *, rngs: nnx.Rngs, diffaug: bool = True,
               aug_policy: str = "color,translation,cutout", resolution: int = 518,
               taps: Sequence[int] = (2, 5, 8, 11), residual_kernel: int = 9):
    if not (backbone.loaded or backbone.shapes_only):
      raise ValueError("DinoDiscriminator: the backbone has no pretrained weights; build "
                       "it with gsq_jax.models.dino.load_dino_backbone(path) (a random "
                       "DINO backbone is never used)")
    self.backbone = backbone
    self.heads = nnx.List([DiscHead(backbone.embed_dim, residual_kernel, rngs=rngs)
                           for _ in range(len(taps) + 1)])
    self.diffaug, self.aug_policy = diffaug, aug_policy
    self.resolution, self.taps = resolution, tuple(taps)

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"DinoDiscriminator: `x` must be (B, H, W, 3) in [0, 1], got {x.shape}")
    if self.diffaug or x.shape[1] > self.resolution:
      if key is None:
        raise ValueError("DinoDiscriminator: `key` is required (DiffAugment / random crop)")
      k_aug, k_crop = jax.random.split(key)
    if self.diffaug:
      x = diff_augment(x, k_aug, self.aug_policy)
    if x.shape[1] > self.resolution or x.shape[2] > self.resolution:
      x = _random_crop(x, k_crop, self.resolution)  # p_crop = 1, only if larger
    x = area_resize(x, self.resolution)
    x = (x - jnp.asarray(IMAGENET_MEAN, x.dtype)) / jnp.asarray(IMAGENET_STD, x.dtype)
    feats = self.backbone(x, self.taps)
    feats = feats[1:] + feats[:1]  # blocks first, then the patch tokens
    return jnp.concatenate([h(f) for h, f in zip(self.heads, feats)], axis=1)


def _random_crop(x: jax.Array, key: jax.Array, size: int) -> jax.Array:
  """One crop location for the whole batch (torchvision RandomCrop on a batch)."""
  _, h, w, c = x.shape
  kx, ky = jax.random.split(key)
  ox = jax.random.randint(kx, (), 0, max(h - size, 0) + 1)
  oy = jax.random.randint(ky, (), 0, max(w - size, 0) + 1)
  return jax.lax.dynamic_slice(x, (0, ox, oy, 0), (x.shape[0], min(h, size), min(w, size), c))


def make_dino_discriminator(checkpoint_path: str | None = None, *, rngs: nnx.Rngs,
                            backbone_dtype: Any = jnp.float32, **kwargs) -> DinoDiscriminator:
  """Loads the DINOv2 checkpoint (raises if missing) and builds the discriminator."""
  backbone = dino_lib.load_dino_backbone(checkpoint_path, dtype=backbone_dtype)
  return DinoDiscriminator(backbone, rngs=rngs, **kwargs)
