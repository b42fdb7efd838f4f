"""IBQ's encoder and decoder (SEED-Voken, Open-MAGVIT2 / taming style), channels-last.

The network IBQ (arXiv 2412.02692) trains its quantizer in, so the GSQ-vs-IBQ
comparison can run each quantizer in its own paper's network
(`config.model.architecture = "ibq"`); facts and line references in
../shared/reference/checkpoints/README.md ("IBQ architecture facts"):

  encoder: conv_in 3x3 (3 -> ch)
           level l: num_res_blocks x ResnetBlock(-> ch*ch_mult[l]) [each followed by an
                    AttnBlock if the level's resolution is in attn_resolutions],
                    Downsample except after the last level
           mid: block_1, attn_1, block_2;  norm_out -> swish -> conv_out 3x3 (-> z_channels)
           quant_conv 1x1 (z_channels -> D)
  decoder: post_quant_conv 1x1 (D -> z_channels); conv_in 3x3 (-> ch*ch_mult[-1]); mid
           level l = L-1 .. 0: (num_res_blocks + 1) ResnetBlocks [+ AttnBlock each], Upsample
                    except after level 0;  norm_out -> swish -> conv_out 3x3 (-> 3)

What differs from the flex tokenizer (encoder.py/decoder.py): GroupNorm eps 1e-6
everywhere, separate q/k/v 1x1 convs, a stride-2 conv padded only right and
bottom, attention inside levels chosen by a nominal `resolution` (not the
input size), the decoder's extra ResBlock per level, and the 1x1 quant_conv /
post_quant_conv around the quantizer. Attribute names follow the PyTorch
state dict (`down[l].block[b].norm1`, `mid.attn_1.q`, ...) so the importer
maps weights by name. Convs use PyTorch's default init, as taming's.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gsq_jax.models import layers
from gsq_jax.models import remat

EPSILON = 1e-6  # GroupNorm eps of every IBQ norm (model.py L34-35)


def _conv(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
          padding=None, dtype, rngs: nnx.Rngs) -> nnx.Conv:
  """A conv with PyTorch's default init; symmetric k//2 padding unless `padding` is given."""
  pad = kernel_size // 2
  return nnx.Conv(
      in_channels, out_channels, (kernel_size, kernel_size), strides=stride,
      padding=padding if padding is not None else ((pad, pad), (pad, pad)),
      kernel_init=layers.torch_default_kernel(),
      bias_init=layers.torch_default_bias(in_channels * kernel_size * kernel_size),
      dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class ResnetBlock(remat.Rematerializable):
  """norm1 -> swish -> conv1 -> norm2 -> swish -> dropout -> conv2, + (nin_shortcut) x."""

  def __init__(self, in_channels: int, out_channels: int, *, dropout: float, dtype,
               rngs: nnx.Rngs):
    self.norm1 = layers.group_norm(in_channels, epsilon=EPSILON, dtype=dtype, rngs=rngs)
    self.conv1 = _conv(in_channels, out_channels, 3, dtype=dtype, rngs=rngs)
    self.norm2 = layers.group_norm(out_channels, epsilon=EPSILON, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.conv2 = _conv(out_channels, out_channels, 3, dtype=dtype, rngs=rngs)
    self.nin_shortcut = (_conv(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
                         if in_channels != out_channels else None)

  def forward(self, x: jax.Array) -> jax.Array:
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(self.dropout(nnx.silu(self.norm2(h))))
    return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(remat.Rematerializable):
  """Single-head self-attention over all pixels with separate q, k, v convs; x + h."""

  def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
    self.norm = layers.group_norm(channels, epsilon=EPSILON, dtype=dtype, rngs=rngs)
    self.q = _conv(channels, channels, 1, dtype=dtype, rngs=rngs)
    self.k = _conv(channels, channels, 1, dtype=dtype, rngs=rngs)
    self.v = _conv(channels, channels, 1, dtype=dtype, rngs=rngs)
    self.proj_out = _conv(channels, channels, 1, dtype=dtype, rngs=rngs)

  def forward(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    normed = self.norm(x)
    q, k, v = (f(normed).reshape(b, h * w, c) for f in (self.q, self.k, self.v))
    logits = jnp.einsum("bqc,bkc->bqk", q, k) / math.sqrt(c)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, h, w, c)
    return x + self.proj_out(out)


class Downsample(nnx.Module):
  """Zero-pad right and bottom by 1, then a 3x3 stride-2 conv without padding."""

  def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype,
                      rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest-neighbour 2x, then a 3x3 conv."""

  def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
  """One resolution level: ResnetBlocks, each optionally followed by attention, then a resampler."""

  def __init__(self, in_channels: int, out_channels: int, num_blocks: int, *, attention: bool,
               resample, dropout: float, dtype, rngs: nnx.Rngs):
    blocks, attns = [], []
    for i in range(num_blocks):
      blocks.append(ResnetBlock(in_channels if i == 0 else out_channels, out_channels,
                                dropout=dropout, dtype=dtype, rngs=rngs))
      if attention:
        attns.append(AttnBlock(out_channels, dtype=dtype, rngs=rngs))
    self.block = nnx.List(blocks)
    self.attn = nnx.List(attns)
    self.resample = resample(out_channels, dtype=dtype, rngs=rngs) if resample else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, block in enumerate(self.block):
      x = block(x)
      if len(self.attn):
        x = self.attn[i](x)
    return x if self.resample is None else self.resample(x)


class Mid(nnx.Module):
  """block_1 -> attn_1 -> block_2 (IBQ's mid attention is always there)."""

  def __init__(self, channels: int, *, dropout: float, dtype, rngs: nnx.Rngs):
    self.block_1 = ResnetBlock(channels, channels, dropout=dropout, dtype=dtype, rngs=rngs)
    self.attn_1 = AttnBlock(channels, dtype=dtype, rngs=rngs)
    self.block_2 = ResnetBlock(channels, channels, dropout=dropout, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.block_2(self.attn_1(self.block_1(x)))


def _level_resolutions(resolution: int, levels: int) -> list[int]:
  return [resolution // 2 ** level for level in range(levels)]


class IBQEncoder(nnx.Module):
  """(B, H, W, 3) -> quant_conv output z (B, H/f, W/f, D), f = 2^(len(ch_mult) - 1)."""

  def __init__(self, *, hidden_channels: int, channel_multipliers: Sequence[int],
               num_res_blocks: int, attn_resolutions: Sequence[int], resolution: int,
               z_channels: int, latent_dim: int, dropout: float = 0.0,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    ch, mult = hidden_channels, tuple(channel_multipliers)
    self.conv_in = _conv(3, ch, 3, dtype=dtype, rngs=rngs)
    resolutions = _level_resolutions(resolution, len(mult))
    in_mult = (1,) + mult
    self.down = nnx.List([
        Level(ch * in_mult[l], ch * mult[l], num_res_blocks,
              attention=resolutions[l] in attn_resolutions,
              resample=Downsample if l < len(mult) - 1 else None, dropout=dropout, dtype=dtype,
              rngs=rngs)
        for l in range(len(mult))])
    self.mid = Mid(ch * mult[-1], dropout=dropout, dtype=dtype, rngs=rngs)
    self.norm_out = layers.group_norm(ch * mult[-1], epsilon=EPSILON, dtype=dtype, rngs=rngs)
    self.conv_out = _conv(ch * mult[-1], z_channels, 3, dtype=dtype, rngs=rngs)
    self.quant_conv = _conv(z_channels, latent_dim, 1, dtype=dtype, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"IBQEncoder: `images` must be (B, H, W, 3), got shape {images.shape}")
    x = self.conv_in(images.astype(self.dtype))
    for level in self.down:
      x = level(x)
    x = self.conv_out(nnx.silu(self.norm_out(self.mid(x))))
    return self.quant_conv(x).astype(jnp.float32)


class IBQDecoder(nnx.Module):
  """Quantized latent (B, h, w, D) -> image (B, f*h, f*w, 3), unclamped."""

  def __init__(self, *, hidden_channels: int, channel_multipliers: Sequence[int],
               num_res_blocks: int, attn_resolutions: Sequence[int], resolution: int,
               z_channels: int, latent_dim: int, dropout: float = 0.0,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    ch, mult = hidden_channels, tuple(channel_multipliers)
    self.post_quant_conv = _conv(latent_dim, z_channels, 1, dtype=dtype, rngs=rngs)
    self.conv_in = _conv(z_channels, ch * mult[-1], 3, dtype=dtype, rngs=rngs)
    self.mid = Mid(ch * mult[-1], dropout=dropout, dtype=dtype, rngs=rngs)
    resolutions = _level_resolutions(resolution, len(mult))
    # `up[l]` is indexed by level like the encoder (and the state dict); it runs L-1 .. 0,
    # and level l's first block comes from level l+1's channels.
    out_of = lambda l: ch * mult[l]
    self.up = nnx.List([
        Level(out_of(min(l + 1, len(mult) - 1)), out_of(l), num_res_blocks + 1,
              attention=resolutions[l] in attn_resolutions,
              resample=Upsample if l > 0 else None, dropout=dropout, dtype=dtype, rngs=rngs)
        for l in range(len(mult))])
    self.norm_out = layers.group_norm(ch * mult[0], epsilon=EPSILON, dtype=dtype, rngs=rngs)
    self.conv_out = _conv(ch * mult[0], 3, 3, dtype=dtype, rngs=rngs)

  def __call__(self, zq: jax.Array) -> jax.Array:
    if zq.ndim != 4:
      raise ValueError(f"IBQDecoder: `zq` must be (B, h, w, D), got shape {zq.shape}")
    x = self.conv_in(self.post_quant_conv(zq.astype(self.dtype)))
    x = self.mid(x)
    for l in range(len(self.up) - 1, -1, -1):
      x = self.up[l](x)
    return self.conv_out(nnx.silu(self.norm_out(x))).astype(jnp.float32)
