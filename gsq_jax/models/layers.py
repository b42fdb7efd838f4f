"""Building blocks shared by the GSQ encoder and decoder (channels-last NHWC).

The layer list and the initialisation follow the authors' PyTorch code
(flex_gen `flexTokenizer`, spec GSQ.md §2 and pitfalls 10-12):

* Convolutions are "Kaiming-linear": normal with std = scale / sqrt(fan_in).
  The scale is 1.6761 on a ResBlock's first conv and on the encoder/decoder
  output convs, 1.6761 * 0.70711 on a ResBlock's second conv, 1 elsewhere.
* The depth-to-space conv and the adaptive-norm Linears keep PyTorch's default
  init (Kaiming-uniform with a = sqrt(5), i.e. U(+-1/sqrt(fan_in))).
* Every bias uses PyTorch's default U(+-1/sqrt(fan_in)).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gsq_jax.models import remat

Dtype = Any

# ResBlock / output-conv gain of the reference init; the 0.70711 (1/sqrt(2))
# on a ResBlock's second conv keeps the variance of `skip + residual` in check.
CONV_GAIN = 1.6761
RESIDUAL_GAIN = 0.70711
NORM_GROUPS = 32  # GroupNorm(32) everywhere, so channel counts must divide by 32.


# ---------------------------------------------------------------------------
# Initialisers
# ---------------------------------------------------------------------------


def kaiming_linear_normal(scale: float = 1.0) -> nnx.Initializer:
  """N(0, (scale / sqrt(fan_in))^2): torch kaiming_normal_(nonlinearity='linear') * scale."""
  return nnx.initializers.variance_scaling(scale**2, "fan_in", "normal")


def torch_default_kernel() -> nnx.Initializer:
  """U(+-1/sqrt(fan_in)): torch's default Conv/Linear weight init (kaiming_uniform_, a=sqrt(5))."""
  return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int) -> nnx.Initializer:
  """U(+-1/sqrt(fan_in)): torch's default bias init (needs the layer's fan_in)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    kernel_init: nnx.Initializer | None = None,
    dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Conv:
  """A square conv with symmetric zero padding kernel_size // 2, as torch's `padding=k//2`.

  Args:
    in_channels: input channels.
    out_channels: output channels.
    kernel_size: odd kernel size (1 or 3 here).
    stride: spatial stride.
    kernel_init: weight init; default Kaiming-linear with gain 1.
    dtype: compute dtype; parameters stay float32.
    rngs: parameter RNGs.
  """
  if kernel_size % 2 != 1:
    raise ValueError(f"conv: `kernel_size` must be odd, got {kernel_size}")
  pad = kernel_size // 2
  fan_in = in_channels * kernel_size * kernel_size
  kernel_init = kernel_init or kaiming_linear_normal(1.0)
  # Explicit ((p, p), (p, p)) padding: with stride 2 Flax's 'SAME' would pad
  # (0, 1) and shift every output pixel by half an input pixel w.r.t. torch.
  return nnx.Conv(
      in_channels, out_channels, (kernel_size, kernel_size),
      strides=stride, padding=((pad, pad), (pad, pad)),
      kernel_init=kernel_init, bias_init=torch_default_bias(fan_in),
      dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def linear(in_features: int, out_features: int, *, dtype: Dtype = jnp.float32,
           rngs: nnx.Rngs) -> nnx.Linear:
  """nnx.Linear with torch's default init (weight and bias U(+-1/sqrt(fan_in)))."""
  return nnx.Linear(
      in_features, out_features, kernel_init=torch_default_kernel(),
      bias_init=torch_default_bias(in_features), dtype=dtype,
      param_dtype=jnp.float32, rngs=rngs)


def group_norm(channels: int, *, epsilon: float = 1e-5, affine: bool = True,
               dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> nnx.GroupNorm:
  """GroupNorm(32 groups); statistics are computed in float32 even under bf16."""
  if channels % NORM_GROUPS:
    raise ValueError(f"group_norm: `channels` must be divisible by {NORM_GROUPS}, got {channels}")
  # Two-pass variance, as torch, rather than E[x^2] - E[x]^2 (cancellation-prone).
  return nnx.GroupNorm(
      channels, num_groups=NORM_GROUPS, epsilon=epsilon, use_bias=affine,
      use_scale=affine, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32,
      rngs=rngs)


# ---------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------


def check_layer_configs(owner: str, layer_configs: Sequence[int],
                        channel_multipliers: Sequence[int]) -> None:
  """One ResBlock count per level plus one for the mid blocks."""
  if len(layer_configs) != len(channel_multipliers) + 1:
    raise ValueError(
        f"{owner}: `layer_configs` needs len(channel_multipliers) + 1 = "
        f"{len(channel_multipliers) + 1} entries, got {len(layer_configs)}")


class ResBlock(remat.Rematerializable):
  """GN -> SiLU -> Conv3x3 -> GN -> SiLU -> Dropout -> Conv3x3, plus a skip.

  The skip is a Conv1x1 when the channel count changes, the identity otherwise.
  """

  def __init__(self, in_channels: int, out_channels: int, *, dropout: float = 0.0,
               dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.norm1 = group_norm(in_channels, dtype=dtype, rngs=rngs)
    self.conv1 = conv(in_channels, out_channels, 3,
                      kernel_init=kaiming_linear_normal(CONV_GAIN), dtype=dtype, rngs=rngs)
    self.norm2 = group_norm(out_channels, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.conv2 = conv(out_channels, out_channels, 3,
                      kernel_init=kaiming_linear_normal(CONV_GAIN * RESIDUAL_GAIN),
                      dtype=dtype, rngs=rngs)
    self.skip = (conv(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
                 if in_channels != out_channels else None)

  def forward(self, x: jax.Array) -> jax.Array:
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(self.dropout(nnx.silu(self.norm2(h))))
    return h + (x if self.skip is None else self.skip(x))


class AttentionBlock(remat.Rematerializable):
  """Single-head self-attention over all pixels, with a residual (spec §2.6)."""

  def __init__(self, channels: int, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.norm = group_norm(channels, epsilon=1e-6, dtype=dtype, rngs=rngs)
    self.qkv = conv(channels, 3 * channels, 1, dtype=dtype, rngs=rngs)
    self.proj = conv(channels, channels, 1, dtype=dtype, rngs=rngs)

  def forward(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    q, k, v = jnp.split(self.qkv(self.norm(x)).reshape(b, h * w, 3 * c), 3, axis=-1)
    logits = jnp.einsum("bqc,bkc->bqk", q, k) / math.sqrt(c)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, h, w, c)
    return x + self.proj(out)


class AdaptiveGroupNorm(nnx.Module):
  """scale(zq) * GN(x) + bias(zq), conditioned on the decoder input zq (spec §2.5).

  scale = Linear(sqrt(var_hw(zq) + 1e-6)) and bias = Linear(mean_hw(zq)), where
  var is the *unbiased* (N-1) per-channel variance over the latent pixels, as
  torch's default `var`. Note `scale * GN`, not `(1 + scale) * GN`.
  """

  def __init__(self, channels: int, cond_channels: int, *, dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.norm = group_norm(channels, epsilon=1e-6, affine=False, dtype=dtype, rngs=rngs)
    self.to_scale = linear(cond_channels, channels, dtype=dtype, rngs=rngs)
    self.to_bias = linear(cond_channels, channels, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, zq: jax.Array) -> jax.Array:
    if zq.shape[1] * zq.shape[2] < 2:
      raise ValueError(
          "AdaptiveGroupNorm: the latent `zq` needs >= 2 pixels for the unbiased "
          f"variance, got shape {zq.shape}; use larger images or use_adaptive_norm=False")
    zq = zq.astype(jnp.float32)
    std = jnp.sqrt(jnp.var(zq, axis=(1, 2), ddof=1) + 1e-6)  # (B, D)
    mean = jnp.mean(zq, axis=(1, 2))  # (B, D)
    scale = self.to_scale(std)[:, None, None, :]
    bias = self.to_bias(mean)[:, None, None, :]
    return (scale * self.norm(x) + bias).astype(x.dtype)


def depth_to_space(x: jax.Array, block: int = 2) -> jax.Array:
  """(B, H, W, C) -> (B, bH, bW, C/b^2) in DCR order, as the reference.

  out[b, bh+i, bw+j, c] = x[b, h, w, (b*i + j) * C/b^2 + c]: the channel axis is
  split (i, j, c) with the sub-pixel offsets *outermost* (DCR), not (c, i, j)
  as torch's pixel_shuffle (CRD). The order decides which conv filters feed
  which sub-pixel, so it must match the reference for weights to transfer.
  """
  b, h, w, c = x.shape
  if c % (block * block):
    raise ValueError(f"depth_to_space: channels must be divisible by {block * block}, got {c}")
  x = x.reshape(b, h, w, block, block, c // (block * block))  # (b, h, w, i, j, c')
  x = x.transpose(0, 1, 3, 2, 4, 5)  # (b, h, i, w, j, c')
  return x.reshape(b, h * block, w * block, c // (block * block))


class Downsample(nnx.Module):
  """Conv3x3, stride 2, symmetric padding 1 (torch `padding=1`, not Flax 'SAME')."""

  def __init__(self, channels: int, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, stride=2, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class DepthToSpaceUpsample(nnx.Module):
  """Conv3x3(C -> 4C) with torch's default init, then 2x depth-to-space (DCR)."""

  def __init__(self, channels: int, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.conv = conv(channels, 4 * channels, 3, kernel_init=torch_default_kernel(), dtype=dtype,
                     rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return depth_to_space(self.conv(x), 2)


class NearestUpsample(nnx.Module):
  """Nearest-neighbour 2x, then Conv3x3 (Kaiming-linear init; the spec leaves it open)."""

  def __init__(self, channels: int, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)


class MidBlocks(nnx.Module):
  """n ResBlock(C), with an AttentionBlock between consecutive ones if asked."""

  def __init__(self, channels: int, num_blocks: int, *, attention: bool, dropout: float,
               dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    layers = []
    for i in range(num_blocks):
      if attention and i > 0:
        layers.append(AttentionBlock(channels, dtype=dtype, rngs=rngs))
      layers.append(ResBlock(channels, channels, dropout=dropout, dtype=dtype, rngs=rngs))
    self.layers = nnx.List(layers)

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers:
      x = layer(x)
    return x
