"""Frozen DINOv2 ViT-S/14 with 4 registers, converted from the official checkpoint.

The GSQ discriminator (GSQ.md §3.4) runs a frozen `dinov2_vits14_reg`
backbone (facebookresearch/dinov2 hub: img_size 518, patch 14, dim 384,
12 blocks, 6 heads, MLP ratio 4, LayerScale, 4 register tokens, pos_embed
interpolation bicubic with antialias and no offset) and taps its token
sequence. We rebuild that network in Flax NNX and fill it from the official
PyTorch file `dinov2_vits14_reg4_pretrain.pth`, read by
`gsq_jax.utils.torch_pickle` (no torch needed).

There is deliberately no randomly initialised backbone: `load_dino_backbone`
needs the file and fails with instructions when it is missing, and a
`DinoViT()` built without a state dict has zero weights and is marked
`loaded=False` so the discriminator refuses it. `DinoViT(shapes_only=True)`
under `nnx.eval_shape` is the one exception: its arrays are shapes only (known
from the architecture), so a run can be planned and compiled without the file,
never executed (training loads the file).

Weights are `Frozen` variables (outside `nnx.Param`), read with a stop-gradient
on the weights only: gradients still flow to the input image, as the generator
step needs.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gsq_jax.models import remat
from gsq_jax.models import weights as weights_lib
from gsq_jax.utils import torch_pickle
from gsq_jax.models.weights import Frozen, frozen_value

WEIGHT_NAME = "dinov2_vits14_reg"
LN_EPS = 1e-6
# The token sequence runs through the blocks padded to a multiple of this, the
# padding masked out of every attention. XLA's GPU Triton GEMM cannot tile the
# attention-output transpose it fuses into the projection when the token axis
# (1374 at 518 px) is not a multiple of 16: deviceless H100 compilation of the
# discriminator's backward failed with "Couldn't find output tile sizes" (#14).
# Masked keys get exactly zero weight and padded queries are dropped, so the
# function is unchanged; the cost is 2 tokens in 1376.
TOKEN_MULTIPLE = 16

# The official ViT-S/14-reg4 geometry (dinov2/hub/backbones.py).
VITS14_REG = dict(embed_dim=384, depth=12, num_heads=6, patch_size=14,
                  img_size=518, num_register_tokens=4, mlp_ratio=4)


def _layer_norm(x: jax.Array, w: Frozen, b: Frozen) -> jax.Array:
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + LN_EPS)
  return (y * frozen_value(w) + frozen_value(b)).astype(x.dtype)


def _linear(x: jax.Array, w: Frozen, b: Frozen) -> jax.Array:
  return x @ frozen_value(w).astype(x.dtype) + frozen_value(b).astype(x.dtype)


class _StateReader:
  """Hands out converted arrays by torch name, checking shapes and usage."""

  def __init__(self, state: Mapping[str, np.ndarray] | None):
    self.state = state
    self.used: set[str] = set()

  def get(self, name: str, torch_shape: tuple[int, ...], transpose: Sequence[int] | None = None):
    if self.state is None:  # placeholder (e.g. under nnx.eval_shape)
      shape = torch_shape if transpose is None else tuple(torch_shape[i] for i in transpose)
      return Frozen(jnp.zeros(shape, jnp.float32))
    if name not in self.state:
      raise ValueError(f"DINOv2 checkpoint: missing key {name!r}")
    a = np.asarray(self.state[name])
    if tuple(a.shape) != tuple(torch_shape):
      raise ValueError(f"DINOv2 checkpoint: {name!r} has shape {tuple(a.shape)}, "
                       f"expected {tuple(torch_shape)}")
    self.used.add(name)
    if transpose is not None:
      a = np.transpose(a, transpose)
    return Frozen(jnp.asarray(a, jnp.float32))


class Block(remat.Rematerializable):
  """Pre-norm transformer block with LayerScale (DINOv2 `Block`)."""

  remat_group = "dino"

  def __init__(self, r: _StateReader, prefix: str, dim: int, num_heads: int, hidden: int):
    p = prefix
    self.num_heads = num_heads
    self.norm1_w, self.norm1_b = r.get(p + "norm1.weight", (dim,)), r.get(p + "norm1.bias", (dim,))
    self.qkv_w = r.get(p + "attn.qkv.weight", (3 * dim, dim), (1, 0))
    self.qkv_b = r.get(p + "attn.qkv.bias", (3 * dim,))
    self.proj_w = r.get(p + "attn.proj.weight", (dim, dim), (1, 0))
    self.proj_b = r.get(p + "attn.proj.bias", (dim,))
    self.ls1 = r.get(p + "ls1.gamma", (dim,))
    self.norm2_w, self.norm2_b = r.get(p + "norm2.weight", (dim,)), r.get(p + "norm2.bias", (dim,))
    self.fc1_w = r.get(p + "mlp.fc1.weight", (hidden, dim), (1, 0))
    self.fc1_b = r.get(p + "mlp.fc1.bias", (hidden,))
    self.fc2_w = r.get(p + "mlp.fc2.weight", (dim, hidden), (1, 0))
    self.fc2_b = r.get(p + "mlp.fc2.bias", (dim,))
    self.ls2 = r.get(p + "ls2.gamma", (dim,))

  def forward(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    """`key_mask` (T,) bool: False marks padding tokens no query may attend to."""
    b, t, d = x.shape
    h = _layer_norm(x, self.norm1_w, self.norm1_b)
    qkv = _linear(h, self.qkv_w, self.qkv_b).reshape(b, t, 3, self.num_heads, d // self.num_heads)
    mask = None if key_mask is None else key_mask[None, None, None, :]
    att = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask=mask)
    att = _linear(att.reshape(b, t, d), self.proj_w, self.proj_b)
    x = x + att * frozen_value(self.ls1).astype(x.dtype)
    h = _layer_norm(x, self.norm2_w, self.norm2_b)
    h = jax.nn.gelu(_linear(h, self.fc1_w, self.fc1_b), approximate=False)
    h = _linear(h, self.fc2_w, self.fc2_b)
    return x + h * frozen_value(self.ls2).astype(x.dtype)


def interpolate_pos_embed(pos_embed: jax.Array, grid_h: int, grid_w: int) -> jax.Array:
  """DINOv2 `interpolate_pos_encoding`: resize the M×M patch grid to grid_h×grid_w.

  Identity when the grid already matches (518 px input for the hub models);
  otherwise bicubic with antialias (a = -0.5, half-pixel centres, the same
  kernel torch uses for antialiased bicubic). The class token is untouched.
  """
  n = pos_embed.shape[1] - 1
  m = math.isqrt(n)
  if m * m != n:
    raise ValueError(f"interpolate_pos_embed: {n} patch positions are not a square grid")
  if grid_h == m and grid_w == m:
    return pos_embed
  d = pos_embed.shape[-1]
  grid = pos_embed[:, 1:].astype(jnp.float32).reshape(1, m, m, d)
  grid = jax.image.resize(grid, (1, grid_h, grid_w, d), "bicubic", antialias=True)
  return jnp.concatenate([pos_embed[:, :1].astype(jnp.float32),
                          grid.reshape(1, grid_h * grid_w, d)], axis=1)


class DinoViT(nnx.Module):
  """DINOv2 ViT backbone with registers, frozen, NHWC input.

  `__call__` returns the token maps the discriminator uses: the input of
  block 0 (patch embedding + cls token + positions + registers, "patch
  tokens") followed by the outputs of the `taps` blocks, each (B, T, dim)
  with T = 1 + registers + (H/14)·(W/14) (1374 at 518×518).
  """

  def __init__(self, state: Mapping[str, np.ndarray] | None = None, *,
               embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
               patch_size: int = 14, img_size: int = 518, num_register_tokens: int = 4,
               mlp_ratio: int = 4, dtype: Any = jnp.float32, shapes_only: bool = False):
    if shapes_only and state is not None:
      raise ValueError("DinoViT: `shapes_only` builds placeholder weights; pass no `state`")
    r = _StateReader(state)
    grid = img_size // patch_size
    d = embed_dim
    self.patch_size, self.embed_dim, self.dtype = patch_size, embed_dim, dtype
    self.num_register_tokens = num_register_tokens
    # torch conv weight (out, in, kh, kw) -> HWIO.
    self.patch_w = r.get("patch_embed.proj.weight", (d, 3, patch_size, patch_size), (2, 3, 1, 0))
    self.patch_b = r.get("patch_embed.proj.bias", (d,))
    self.cls_token = r.get("cls_token", (1, 1, d))
    self.pos_embed = r.get("pos_embed", (1, 1 + grid * grid, d))
    self.register_tokens = (r.get("register_tokens", (1, num_register_tokens, d))
                            if num_register_tokens else None)
    self.blocks = nnx.List([
        Block(r, f"blocks.{i}.", d, num_heads, int(d * mlp_ratio)) for i in range(depth)])
    self.norm_w, self.norm_b = r.get("norm.weight", (d,)), r.get("norm.bias", (d,))
    if state is not None:
      r.get("mask_token", (1, d))  # unused at inference, but must be the official file
      unexpected = sorted(set(state) - r.used)
      if unexpected:
        raise ValueError(f"DINOv2 checkpoint: unexpected keys {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''} (not a "
                         f"ViT-S/14-reg{num_register_tokens} state dict?)")
    self.loaded = state is not None
    self.shapes_only = shapes_only  # build under nnx.eval_shape: compile, never run

  def prepare_tokens(self, x: jax.Array) -> jax.Array:
    """Images (B, H, W, 3), ImageNet-normalised -> tokens (B, 1+R+N, dim)."""
    b, h, w, c = x.shape
    p = self.patch_size
    if c != 3 or h % p or w % p:
      raise ValueError(f"DinoViT: input must be (B, H, W, 3) with H, W multiples of {p}, "
                       f"got {x.shape}")
    x = x.astype(self.dtype)
    t = jax.lax.conv_general_dilated(
        x, frozen_value(self.patch_w).astype(self.dtype), (p, p), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    t = t.reshape(b, (h // p) * (w // p), self.embed_dim)
    t = t + frozen_value(self.patch_b).astype(self.dtype)
    cls = jnp.broadcast_to(frozen_value(self.cls_token).astype(self.dtype), (b, 1, self.embed_dim))
    t = jnp.concatenate([cls, t], axis=1)
    pos = interpolate_pos_embed(frozen_value(self.pos_embed), h // p, w // p)
    t = t + pos.astype(self.dtype)
    if self.register_tokens is not None:
      reg = jnp.broadcast_to(frozen_value(self.register_tokens).astype(self.dtype),
                             (b, self.num_register_tokens, self.embed_dim))
      t = jnp.concatenate([t[:, :1], reg, t[:, 1:]], axis=1)
    return t

  def __call__(self, x: jax.Array, taps: Sequence[int] = (2, 5, 8, 11)) -> list[jax.Array]:
    if any(not 0 <= i < len(self.blocks) for i in taps):
      raise ValueError(f"DinoViT: `taps` must index blocks 0..{len(self.blocks) - 1}, got {taps}")
    t = self.prepare_tokens(x)
    feats = [t]
    n = t.shape[1]
    pad = -n % TOKEN_MULTIPLE
    key_mask = None
    if pad:
      t = jnp.pad(t, ((0, 0), (0, pad), (0, 0)))
      key_mask = jnp.arange(n + pad) < n
    for i in range(max(taps) + 1):
      t = self.blocks[i](t, key_mask)
      if i in taps:
        feats.append(t[:, :n])
    return feats

  def final_norm(self, tokens: jax.Array) -> jax.Array:
    """The backbone's last LayerNorm (x_norm_* outputs of DINOv2)."""
    return _layer_norm(tokens, self.norm_w, self.norm_b)


_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def normalize_state_dict(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Strips common wrappers: a 'model.'/'module.'/'teacher.backbone.' prefix and
  chunked block names (blocks.<chunk>.<i>. -> blocks.<i>.)."""
  out = {}
  for k, v in state.items():
    for pre in ("module.", "model.", "backbone.", "teacher.backbone."):
      if k.startswith(pre) and not k.startswith("blocks."):
        k = k[len(pre):]
    k = _CHUNKED.sub(r"blocks.\1.", k)
    out[k] = v
  return out


def config_from_state_dict(state: Mapping[str, np.ndarray]) -> dict[str, int]:
  """Infers the ViT geometry from tensor shapes (heads: dim // 64, DINOv2's head width)."""
  try:
    d = int(state["cls_token"].shape[-1])
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    n = int(state["pos_embed"].shape[1]) - 1
    hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
  except KeyError as e:
    raise ValueError(f"DINOv2 checkpoint: missing key {e.args[0]!r}; this is not a "
                     "DINOv2 ViT state dict") from e
  depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
  regs = int(state["register_tokens"].shape[1]) if "register_tokens" in state else 0
  return dict(embed_dim=d, depth=depth, num_heads=d // 64, patch_size=patch,
              img_size=math.isqrt(n) * patch, num_register_tokens=regs,
              mlp_ratio=hidden // d)


def check_dino_checkpoint(path: str | os.PathLike | None = None) -> str:
  """Startup check for runs that use the DINO discriminator.

  Returns the checkpoint path, or raises FileNotFoundError (with download
  instructions) when it is missing and ValueError when the file is not a
  torch checkpoint. Call this before building anything expensive.
  """
  file = weights_lib.find_weights(WEIGHT_NAME, path)
  if not torch_pickle.is_torch_checkpoint(file):
    raise ValueError(f"DINO discriminator: {file} is not a torch checkpoint "
                     "(neither zip nor legacy format); expected the official "
                     "dinov2_vits14_reg4_pretrain.pth")
  return str(file)


def load_dino_backbone(path: str | os.PathLike | None = None, *,
                       expected: Mapping[str, int] | None = VITS14_REG,
                       dtype: Any = jnp.float32) -> DinoViT:
  """Reads the official checkpoint and returns the frozen `DinoViT`.

  Args:
    path: the `.pth` file or its folder (else $GSQ_JAX_WEIGHTS_DIR or the
      torch hub cache); missing -> FileNotFoundError saying how to get it.
    expected: geometry the file must have (ViT-S/14-reg4 by default; None
      accepts any DINOv2 ViT).
    dtype: compute dtype of the backbone.
  """
  file = check_dino_checkpoint(path)
  state = normalize_state_dict(torch_pickle.load_state_dict(file))
  cfg = config_from_state_dict(state)
  if expected is not None:
    bad = {k: (cfg[k], v) for k, v in expected.items() if cfg.get(k) != v}
    if bad:
      raise ValueError(f"DINO discriminator: {file} is not dinov2_vits14_reg "
                       f"(found, expected): {bad}")
  return DinoViT(state, dtype=dtype, **cfg)
