"""The output type shared by all quantizers, and argument validation.

Every functional quantizer returns a `QuantizerOutput`, a pytree, so it can be
returned from jitted functions and sharded like any other array container.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class QuantizerOutput:
  """What a quantizer hands to the decoder and to the loss.

  Attributes:
    quantized: the decoder input, same shape as the latent `(..., D)`. Its
      value is the selected code; its gradient is the quantizer's estimator
      (straight-through, index back-propagation, ...).
    indices: int32 code indices; `(..., G)` for grouped quantizers, `(...)`
      for the others (the Flax modules always add the group axis).
    loss: scalar auxiliary loss to add to the model objective (weight 1).
    aux: dict of scalar diagnostics (loss pieces, entropies, ...).
  """

  quantized: jax.Array
  indices: jax.Array
  loss: jax.Array
  aux: dict[str, Any] = flax.struct.field(default_factory=dict)


def sg(x):
  """Stop-gradient, named as in the papers."""
  return jax.lax.stop_gradient(x)


def mse(a, b):
  """Mean over all elements, as torch.nn.functional.mse_loss."""
  return jnp.mean(jnp.square(a - b))


def l2_normalize(x, eps: float = 1e-12):
  """x / max(||x||_2, eps) over the last axis (torch F.normalize)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def require(condition: bool, fn: str, message: str) -> None:
  """Raises ValueError('<fn>: <message>') unless `condition` holds."""
  if not condition:
    raise ValueError(f"{fn}: {message}")


def check_latent(fn: str, z, last_dim: int | None = None, name: str = "z") -> None:
  require(getattr(z, "ndim", 0) >= 1, fn,
          f"`{name}` must have rank >= 1 with channels last, got shape {getattr(z, 'shape', None)}")
  if last_dim is not None:
    require(z.shape[-1] == last_dim, fn,
            f"`{name}.shape[-1]` must be {last_dim}, got {z.shape[-1]} (shape {z.shape})")


def check_codebook(fn: str, codebook, width: int, width_desc: str) -> None:
  require(getattr(codebook, "ndim", 0) == 2, fn,
          f"`codebook` must have rank 2 (V, {width_desc}), got shape {getattr(codebook, 'shape', None)}")
  require(codebook.shape[0] >= 2, fn,
          f"`codebook` must have V >= 2 entries, got V = {codebook.shape[0]}")
  require(codebook.shape[1] == width, fn,
          f"`codebook.shape[1]` must be {width_desc} = {width}, got {codebook.shape[1]}")
