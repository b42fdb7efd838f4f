"""GSQ decoder: quantized latent (B, h, w, D) -> image (B, f*h, f*w, 3).

Layout (spec GSQ.md §2.4), with C_i = hidden_channels * channel_multipliers[i]
visited in reverse (deepest level first):

  conv_in: Conv3x3(D -> C_last)
  mid: layer_configs[-1] x ResBlock(C_last) [with attention in between]
  AdaptiveGroupNorm(C_last)                   if use_adaptive_norm
  for each level i, deepest first:
    ResBlock(C_prev -> C_i)                   only if the channel count changes
    layer_configs[:-1][::-1][i] x ResBlock(C_i)
    Upsample 2x, then AdaptiveGroupNorm(C_i)  except after the last level
  out: GN -> SiLU -> Conv3x3(C_0 -> 3), no tanh

Adaptive norm follows the reference code (after each upsample), not the
paper's "before each up-sampling"; every AGN is conditioned on the decoder
input itself.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gsq_jax.models import layers


class Decoder(nnx.Module):
  """The reference's conv decoder, mirror of `Encoder`, channels-last."""

  def __init__(
      self,
      *,
      hidden_channels: int,
      channel_multipliers: Sequence[int],
      layer_configs: Sequence[int],
      latent_dim: int,
      use_adaptive_norm: bool = True,
      use_depth_to_space: bool = True,
      mid_block_attn: bool = False,
      dropout: float = 0.0,
      dtype: layers.Dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    """Builds the decoder; arguments as `Encoder`, except:

    Args:
      channel_multipliers: per-level multipliers cm, in encoder order.
      layer_configs: len(cm) + 1 ResBlock counts in encoder level order; the
        last entry is the number of mid blocks.
      latent_dim: D, the channels of the decoder input.
      use_adaptive_norm: AdaptiveGroupNorm after the mid blocks and each upsample.
      use_depth_to_space: upsample with Conv(C -> 4C) + depth-to-space instead
        of nearest-neighbour + conv.
    """
    layers.check_layer_configs("Decoder", layer_configs, channel_multipliers)
    self.dtype = dtype
    upsample = layers.DepthToSpaceUpsample if use_depth_to_space else layers.NearestUpsample

    def adaptive_norm(c):
      return (layers.AdaptiveGroupNorm(c, latent_dim, dtype=dtype, rngs=rngs)
              if use_adaptive_norm else None)

    channels = hidden_channels * channel_multipliers[-1]
    self.conv_in = layers.conv(latent_dim, channels, 3, dtype=dtype, rngs=rngs)
    self.mid = layers.MidBlocks(channels, layer_configs[-1], attention=mid_block_attn,
                                dropout=dropout, dtype=dtype, rngs=rngs)
    self.mid_norm = adaptive_norm(channels)
    blocks = []
    levels = list(zip(channel_multipliers, layer_configs[:-1]))[::-1]
    for level, (multiplier, num_blocks) in enumerate(levels):
      out_channels = hidden_channels * multiplier
      if out_channels != channels:
        blocks.append(layers.ResBlock(channels, out_channels, dropout=dropout, dtype=dtype,
                                      rngs=rngs))
        channels = out_channels
      for _ in range(num_blocks):
        blocks.append(layers.ResBlock(channels, channels, dropout=dropout, dtype=dtype,
                                      rngs=rngs))
      if level < len(levels) - 1:
        blocks.append(upsample(channels, dtype=dtype, rngs=rngs))
        if use_adaptive_norm:
          blocks.append(adaptive_norm(channels))
    self.up = nnx.List(blocks)
    self.norm_out = layers.group_norm(channels, dtype=dtype, rngs=rngs)
    self.conv_out = layers.conv(channels, 3, 3,
                                kernel_init=layers.kaiming_linear_normal(layers.CONV_GAIN),
                                dtype=dtype, rngs=rngs)

  def __call__(self, zq: jax.Array) -> jax.Array:
    """(B, h, w, D) quantized latent -> float32 image (B, f*h, f*w, 3), unclamped."""
    if zq.ndim != 4:
      raise ValueError(f"Decoder: `zq` must be (B, h, w, D), got shape {zq.shape}")
    x = self.conv_in(zq.astype(self.dtype))
    x = self.mid(x)
    if self.mid_norm is not None:
      x = self.mid_norm(x, zq)
    for block in self.up:
      x = block(x, zq) if isinstance(block, layers.AdaptiveGroupNorm) else block(x)
    x = self.conv_out(nnx.silu(self.norm_out(x)))
    return x.astype(jnp.float32)
