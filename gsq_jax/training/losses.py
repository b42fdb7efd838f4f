"""Tokenizer and GAN losses as pure functions (GSQ.md §3, QUANTIZERS.md §2.2).

Everything here takes arrays (or pure callables) and returns scalars, so it
can be used inside any jitted step. Conventions follow the PyTorch references
exactly where they are easy to get wrong:

* Reconstruction is MSE in [-1, 1] space for GSQ (L1 for the IBQ recipe).
* GSQ feeds LPIPS [0, 1] images through a scaling layer built for [-1, 1]
  (`perceptual_loss(input_range="zero_one")`); "minus_one_one" is the
  published LPIPS usage.
* The hinge discriminator loss is halved; the non-saturating losses average
  the logits *per sample first* and then apply softplus (GSQ.md §3.3).
* LeCam's EMAs are updated *before* the regulariser is computed, and are
  carried as explicit state (`LecamEMA`) in and out.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

LossType = Literal["hinge", "vanilla", "non_saturate"]
LOSS_TYPES = ("hinge", "vanilla", "non_saturate")
InputRange = Literal["zero_one", "minus_one_one"]
INPUT_RANGES = ("zero_one", "minus_one_one")


def _f32(x) -> jax.Array:
  return jnp.asarray(x).astype(jnp.float32)


# ----------------------------------------------------------------------------
# Reconstruction and perceptual losses.
# ----------------------------------------------------------------------------


def mse(x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean squared error over all elements (torch F.mse_loss)."""
  return jnp.mean(jnp.square(_f32(x) - _f32(y)))


def l1(x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean absolute error over all elements (torch F.l1_loss)."""
  return jnp.mean(jnp.abs(_f32(x) - _f32(y)))


def reconstruction_loss(x: jax.Array, x_hat: jax.Array, kind: str = "mse") -> jax.Array:
  """MSE (GSQ) or L1 (IBQ/taming) reconstruction loss."""
  if kind == "mse":
    return mse(x, x_hat)
  if kind == "l1":
    return l1(x, x_hat)
  raise ValueError(f"reconstruction_loss: `kind` must be 'mse' or 'l1', got {kind!r}")


def to_lpips_input(x: jax.Array, input_range: InputRange) -> jax.Array:
  """Maps model-space images in [-1, 1] to what the LPIPS network receives.

  "zero_one": 0.5·x + 0.5, as the GSQ trainer does (`post_norm`) although the
  LPIPS scaling layer expects [-1, 1]. "minus_one_one": x unchanged (the
  published LPIPS convention).
  """
  if input_range == "zero_one":
    return 0.5 * x + 0.5
  if input_range == "minus_one_one":
    return x
  raise ValueError(f"perceptual_loss: `input_range` must be one of {INPUT_RANGES}, "
                   f"got {input_range!r}")


def perceptual_loss(lpips_fn: Callable[[jax.Array, jax.Array], jax.Array],
                    x: jax.Array, x_hat: jax.Array,
                    input_range: InputRange = "zero_one") -> jax.Array:
  """Batch-mean LPIPS between model-space images x, x_hat in [-1, 1].

  Args:
    lpips_fn: e.g. a `gsq_jax.models.lpips.LPIPS`; maps two NHWC batches to
      per-sample distances (B,).
    x, x_hat: target and reconstruction, NHWC, in [-1, 1].
    input_range: range handed to the LPIPS network, see `to_lpips_input`.
      Default "zero_one" reproduces GSQ's training loss.
  """
  d = lpips_fn(to_lpips_input(x, input_range), to_lpips_input(x_hat, input_range))
  return jnp.mean(_f32(d))


# ----------------------------------------------------------------------------
# Adversarial losses.
# ----------------------------------------------------------------------------


def _per_sample_mean(logits: jax.Array) -> jax.Array:
  logits = _f32(logits)
  return jnp.mean(logits.reshape(logits.shape[0], -1), axis=-1)


def _check_type(fn: str, loss_type: str) -> None:
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"{fn}: `loss_type` must be one of {LOSS_TYPES}, got {loss_type!r}")


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array,
                       loss_type: LossType = "hinge") -> jax.Array:
  """Discriminator loss on D(real) and D(fake) logits of any shape (B, ...).

  hinge:        (mean relu(1 - r) + mean relu(1 + f)) / 2
  vanilla:      (mean softplus(-r) + mean softplus(f)) / 2
  non_saturate: per-sample mean logits m_r, m_f, then
                mean(softplus(-m_r) + softplus(m_f)) / 2   (BCE with 1 / 0)
  """
  _check_type("discriminator_loss", loss_type)
  if loss_type == "hinge":
    r, f = _f32(real_logits), _f32(fake_logits)
    return (jnp.mean(jax.nn.relu(1.0 - r)) + jnp.mean(jax.nn.relu(1.0 + f))) / 2
  if loss_type == "vanilla":
    r, f = _f32(real_logits), _f32(fake_logits)
    return (jnp.mean(jax.nn.softplus(-r)) + jnp.mean(jax.nn.softplus(f))) / 2
  m_r, m_f = _per_sample_mean(real_logits), _per_sample_mean(fake_logits)
  return jnp.mean(jax.nn.softplus(-m_r) + jax.nn.softplus(m_f)) / 2


def generator_loss(fake_logits: jax.Array,
                   loss_type: LossType = "non_saturate") -> jax.Array:
  """Generator loss on D(fake) logits of any shape (B, ...).

  hinge: -mean f;  vanilla: mean softplus(-f);
  non_saturate: mean over samples of softplus(-per-sample-mean(f)).
  """
  _check_type("generator_loss", loss_type)
  if loss_type == "hinge":
    return -jnp.mean(_f32(fake_logits))
  if loss_type == "vanilla":
    return jnp.mean(jax.nn.softplus(-_f32(fake_logits)))
  return jnp.mean(jax.nn.softplus(-_per_sample_mean(fake_logits)))


# ----------------------------------------------------------------------------
# Regularisers: LeCam, R1.
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class LecamEMA:
  """EMAs of the mean real / fake discriminator logits (start at 0)."""
  real: jax.Array
  fake: jax.Array


def lecam_init() -> LecamEMA:
  return LecamEMA(real=jnp.zeros((), jnp.float32), fake=jnp.zeros((), jnp.float32))


def lecam_update(ema: LecamEMA, real_logits: jax.Array, fake_logits: jax.Array,
                 decay: float = 0.999) -> LecamEMA:
  """ema ← decay·ema + (1 − decay)·mean(logits); no gradient flows into it."""
  r = jax.lax.stop_gradient(jnp.mean(_f32(real_logits)))
  f = jax.lax.stop_gradient(jnp.mean(_f32(fake_logits)))
  return LecamEMA(real=ema.real * decay + r * (1 - decay),
                  fake=ema.fake * decay + f * (1 - decay))


def lecam_regularizer(real_logits: jax.Array, fake_logits: jax.Array,
                      ema: LecamEMA) -> jax.Array:
  """mean(relu(D(x) − ema_fake)²) + mean(relu(ema_real − D(x̂))²)."""
  return (jnp.mean(jnp.square(jax.nn.relu(_f32(real_logits) - ema.fake)))
          + jnp.mean(jnp.square(jax.nn.relu(ema.real - _f32(fake_logits)))))


def lecam_loss(real_logits: jax.Array, fake_logits: jax.Array, ema: LecamEMA,
               decay: float = 0.999) -> tuple[jax.Array, LecamEMA]:
  """Updates the EMAs first, then the regulariser with the new EMAs (reference order)."""
  new_ema = lecam_update(ema, real_logits, fake_logits, decay)
  return lecam_regularizer(real_logits, fake_logits, new_ema), new_ema


def r1_penalty(d_fn: Callable[[jax.Array], jax.Array] | nnx.Module,
               real: jax.Array) -> tuple[jax.Array, jax.Array]:
  """R1 gradient penalty mean_b ‖∂(Σ D(real))/∂real_b‖², and D(real).

  `d_fn` is a pure function of the images, or an NNX module (then `nnx.vjp`
  carries its state updates, e.g. BatchNorm statistics). The penalty stays
  differentiable w.r.t. D's parameters (double backprop), as with
  `create_graph=True` in torch. The caller multiplies by its weight (10).
  """
  if isinstance(d_fn, nnx.Module):
    logits, vjp_fn = nnx.vjp(lambda m, x: m(x), d_fn, real, graph=False)
    _, grad = vjp_fn(jnp.ones_like(logits))
  else:
    logits, vjp_fn = jax.vjp(d_fn, real)
    (grad,) = vjp_fn(jnp.ones_like(logits))
  grad = _f32(grad).reshape(grad.shape[0], -1)
  return jnp.mean(jnp.sum(jnp.square(grad), axis=-1)), logits


# ----------------------------------------------------------------------------
# Adaptive adversarial weight (taming / flex_gen `get_adaptive_weight`).
# ----------------------------------------------------------------------------


def adaptive_weight(nll_grads: Any, gen_grads: Any, max_weight: float = 1e3) -> jax.Array:
  """‖∇nll‖ / max(‖∇gen‖, 1e-3), clamped above at `max_weight`, NaN → 1.

  Both gradients are taken w.r.t. the decoder's last layer (any pytree; the
  norm is the global L2 norm). nll is λp·perceptual + reconstruction.
  The result carries no gradient.
  """
  n = optax.tree.norm(jax.tree.map(_f32, nll_grads))
  g = optax.tree.norm(jax.tree.map(_f32, gen_grads))
  w = jnp.minimum(n / jnp.maximum(g, 1e-3), max_weight)
  return jax.lax.stop_gradient(jnp.where(jnp.isnan(w), 1.0, w))


def adaptive_weight_from_losses(last_layer: Any,
                                nll_fn: Callable[[Any], jax.Array],
                                gen_fn: Callable[[Any], jax.Array],
                                max_weight: float = 1e3) -> jax.Array:
  """`adaptive_weight` with the gradients of nll_fn / gen_fn at `last_layer`.

  nll_fn and gen_fn map the last layer's parameters to the scalar losses
  (everything else closed over).
  """
  return adaptive_weight(jax.grad(nll_fn)(last_layer), jax.grad(gen_fn)(last_layer),
                         max_weight)
