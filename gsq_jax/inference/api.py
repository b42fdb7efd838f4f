"""`gsq_jax.load_tokenizer`: a run directory as four jitted, batch-sharded calls.

  tok = gsq_jax.load_tokenizer("runs/f8_D16_G4")     # trained or imported run
  z = tok.encode(images)             # (B, H, W, 3) in [-1, 1] -> (B, h, w, D) latent
  codes = tok.tokenize(images)       # -> (B, h, w, G) int32
  x = tok.decode_codes(codes)        # -> (B, H, W, 3), not clamped
  x, codes = tok.reconstruct(images)

The lookup is the evaluator's (`gsq_jax.models.evaluation_view`): first-index
ties and the run's distance dtype, so the codes are a function of the images
and equal what `gsq-eval` counts. Every call splits the batch over the mesh's
devices (all local devices by default) with a NamedSharding; a batch that
does not divide is padded with zeros and the padding is cut off again. The
weights are replicated. Compilation happens once per input shape.
"""

from __future__ import annotations

import os
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from gsq_jax.evaluation import evaluator
from gsq_jax.training import checkpointing

_BATCH_AXIS = "batch"


def _batch_mesh(devices) -> jax.sharding.Mesh:
  devices = list(jax.local_devices() if devices is None else devices)
  if not devices:
    raise ValueError("load_tokenizer: `devices` is empty")
  return jax.make_mesh((len(devices),), (_BATCH_AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


class PretrainedTokenizer:
  """A restored tokenizer behind jitted encode / tokenize / decode_codes / reconstruct.

  Attributes:
    config: the run's config (config.json).
    step: training step of the loaded weights.
    ema: whether the EMA weights were loaded.
    mesh: the one-axis device mesh the batch is split over.
    downsample_factor, latent_dim, num_groups, codebook_size: f, D, G, V.
    tie_break, distance_dtype: how codes are looked up (`lookup_settings`).
  """

  def __init__(self, tokenizer: nnx.Module, config: ml_collections.ConfigDict, *, step: int,
               ema: bool, devices=None):
    self.config, self.step, self.ema = config, int(step), bool(ema)
    self.mesh = _batch_mesh(devices)
    view = evaluator.evaluation_view(tokenizer)
    quantizer = view.quantizer
    self.downsample_factor = int(view.downsample_factor)
    self.latent_dim = int(quantizer.latent_dim)
    self.num_groups = int(quantizer.num_groups)
    self.codebook_size = int(quantizer.codebook_size)
    settings = evaluator.lookup_settings(view)
    self.tie_break, self.distance_dtype = settings["tie_break"], settings["distance_dtype"]
    graph, state = nnx.split(view)
    self._state = jax.device_put(state, NamedSharding(self.mesh, P()))
    self._batch = NamedSharding(self.mesh, P(_BATCH_AXIS))

    def run(method):
      return jax.jit(lambda state, x: method(nnx.merge(graph, state), x),
                     out_shardings=self._batch)

    self._encode = run(lambda m, x: m.encode(x))
    self._tokenize = run(lambda m, x: m.quantize(m.encode(x)).indices)
    self._decode = run(lambda m, codes: m.decode(m.quantizer.decode_indices(codes)))

    def forward(m, x):
      recon, quantized = m(x)
      return recon, quantized.indices

    self._reconstruct = run(forward)

  # -------------------------------------------------------------- checks
  def _images(self, images: Any) -> np.ndarray | jax.Array:
    shape = getattr(images, "shape", None)
    f = self.downsample_factor
    if shape is None or len(shape) != 4 or shape[-1] != 3 or shape[1] % f or shape[2] % f:
      raise ValueError(f"images must be an NHWC array (B, H, W, 3) in [-1, 1] with H and W "
                       f"divisible by f = {f}, got shape {shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f"images must be floats in [-1, 1] (uint8 x -> x / 127.5 - 1), got "
                       f"dtype {images.dtype}")
    return images

  def _codes(self, codes: Any) -> np.ndarray | jax.Array:
    shape = getattr(codes, "shape", None)
    if shape is None or len(shape) != 4 or shape[-1] != self.num_groups:
      raise ValueError(f"codes must be (B, h, w, G) with G = {self.num_groups}, "
                       f"got shape {shape}")
    if not jnp.issubdtype(codes.dtype, jnp.integer):
      raise ValueError(f"codes must be integers in [0, V = {self.codebook_size}), got dtype "
                       f"{codes.dtype}")
    low, high = int(jnp.min(codes)), int(jnp.max(codes))
    if low < 0 or high >= self.codebook_size:
      raise ValueError(f"codes must lie in [0, V = {self.codebook_size}), got values in "
                       f"[{low}, {high}]")
    return codes

  # -------------------------------------------------------------- sharding
  def _sharded(self, fn, x, dtype):
    """fn over x split along the batch; pads to a multiple of the device count."""
    n = x.shape[0]
    if n == 0:
      raise ValueError("the batch is empty")
    pad = -n % self.mesh.size
    x = jnp.asarray(x, dtype) if isinstance(x, jax.Array) else np.asarray(x, dtype)
    if pad:
      widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
      x = jnp.pad(x, widths) if isinstance(x, jax.Array) else np.pad(x, widths)
    out = fn(self._state, jax.device_put(x, self._batch))
    return jax.tree.map(lambda y: y[:n], out) if pad else out

  # -------------------------------------------------------------- the API
  def encode(self, images) -> jax.Array:
    """(B, H, W, 3) in [-1, 1] -> pre-quantization latent (B, H/f, W/f, D), float32."""
    return self._sharded(self._encode, self._images(images), jnp.float32)

  def tokenize(self, images) -> jax.Array:
    """(B, H, W, 3) in [-1, 1] -> int32 codes (B, H/f, W/f, G)."""
    return self._sharded(self._tokenize, self._images(images), jnp.float32)

  def decode_codes(self, codes) -> jax.Array:
    """(B, h, w, G) codes -> reconstruction (B, f*h, f*w, 3), float32, not clamped."""
    return self._sharded(self._decode, self._codes(codes), jnp.int32)

  def reconstruct(self, images) -> tuple[jax.Array, jax.Array]:
    """(B, H, W, 3) in [-1, 1] -> (reconstruction, codes): the model's forward pass."""
    return self._sharded(self._reconstruct, self._images(images), jnp.float32)

  def __repr__(self) -> str:
    return (f"PretrainedTokenizer(f={self.downsample_factor}, D={self.latent_dim}, "
            f"G={self.num_groups}, V={self.codebook_size}, step={self.step}, ema={self.ema}, "
            f"devices={self.mesh.size})")


def load_tokenizer(path: str | os.PathLike, ema: bool = True, *, step: int | None = None,
                   devices=None) -> PretrainedTokenizer:
  """Loads the tokenizer of a run directory (trained by gsq-train or made by gsq-import).

  Args:
    path: run directory (config.json + checkpoints/).
    ema: the EMA weights (default; what the paper evaluates and releases) or
      the raw training weights.
    step: checkpoint step; default the latest.
    devices: devices to split batches over; default all local devices.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"load_tokenizer: {os.fspath(path)!r} is not a directory; pass a "
                            "run directory (config.json + checkpoints/), e.g. the --workdir of "
                            "gsq-train or gsq-import")
  tokenizer, config, restored_step = checkpointing.restore_tokenizer(path, ema=ema, step=step)
  return PretrainedTokenizer(tokenizer, config, step=restored_step, ema=ema, devices=devices)
