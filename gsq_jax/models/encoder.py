"""GSQ encoder: image (B, H, W, 3) -> continuous latent (B, H/f, W/f, D).

Layout (spec GSQ.md §2.3), with C_i = hidden_channels * channel_multipliers[i]:

  conv_in: Conv3x3(3 -> hidden)
  for each level i:
    ResBlock(C_{i-1} -> C_i)            only if the channel count changes
    layer_configs[i] x ResBlock(C_i)
    Downsample (stride-2 conv)          except after the last level
  mid: layer_configs[-1] x ResBlock(C_last) [with attention in between]
  out: GN -> SiLU -> Conv1x1(C_last -> D)

so f = 2 ** (len(channel_multipliers) - 1). There is no separate quant_conv.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gsq_jax.models import layers


class Encoder(nnx.Module):
  """The reference's MagViT-2-style conv encoder, channels-last."""

  def __init__(
      self,
      *,
      hidden_channels: int,
      channel_multipliers: Sequence[int],
      layer_configs: Sequence[int],
      latent_dim: int,
      mid_block_attn: bool = False,
      dropout: float = 0.0,
      dtype: layers.Dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    """Builds the encoder.

    Args:
      hidden_channels: channels of the first level (128 in the paper).
      channel_multipliers: per-level multipliers cm; len(cm) - 1 downsamplings.
      layer_configs: len(cm) + 1 ResBlock counts, one per level then the mid.
      latent_dim: D, the channels of the output latent.
      mid_block_attn: put an AttentionBlock between consecutive mid ResBlocks.
      dropout: dropout rate inside the ResBlocks.
      dtype: compute dtype (parameters stay float32).
      rngs: parameter RNGs.
    """
    layers.check_layer_configs("Encoder", layer_configs, channel_multipliers)
    self.dtype = dtype
    self.conv_in = layers.conv(3, hidden_channels, 3, dtype=dtype, rngs=rngs)
    blocks = []
    channels = hidden_channels
    for level, multiplier in enumerate(channel_multipliers):
      out_channels = hidden_channels * multiplier
      if out_channels != channels:  # the extra channel-change ResBlock "introduced by MagViT"
        blocks.append(layers.ResBlock(channels, out_channels, dropout=dropout, dtype=dtype,
                                      rngs=rngs))
        channels = out_channels
      for _ in range(layer_configs[level]):
        blocks.append(layers.ResBlock(channels, channels, dropout=dropout, dtype=dtype,
                                      rngs=rngs))
      if level < len(channel_multipliers) - 1:
        blocks.append(layers.Downsample(channels, dtype=dtype, rngs=rngs))
    self.down = nnx.List(blocks)
    self.mid = layers.MidBlocks(channels, layer_configs[-1], attention=mid_block_attn,
                                dropout=dropout, dtype=dtype, rngs=rngs)
    self.norm_out = layers.group_norm(channels, dtype=dtype, rngs=rngs)
    self.conv_out = layers.conv(channels, latent_dim, 1,
                                kernel_init=layers.kaiming_linear_normal(layers.CONV_GAIN),
                                dtype=dtype, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) images in [-1, 1] -> float32 latent (B, H/f, W/f, D)."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"Encoder: `images` must be (B, H, W, 3), got shape {images.shape}")
    x = self.conv_in(images.astype(self.dtype))
    for block in self.down:
      x = block(x)
    x = self.mid(x)
    x = self.conv_out(nnx.silu(self.norm_out(x)))
    # The quantizer chooses its own precision, so it gets a float32 latent.
    return x.astype(jnp.float32)
