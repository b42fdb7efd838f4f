"""Tests for gsq_jax.training.losses against hand computations (GSQ.md §3.3)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsq_jax.training import losses
from gsq_jax.models import discriminators

# Two samples, 3 logits each.
R = np.array([[0.5, -2.0, 3.0], [0.0, 1.5, -0.5]], np.float32)
F = np.array([[-1.5, 0.25, 2.0], [4.0, -3.0, 0.0]], np.float32)


def softplus(x):
  return math.log1p(math.exp(x))


def test_reconstruction_losses():
  x = jnp.array([[1.0, -1.0], [0.5, 0.0]])
  y = jnp.array([[0.0, -1.0], [-0.5, 2.0]])
  assert float(losses.mse(x, y)) == pytest.approx((1 + 0 + 1 + 4) / 4)
  assert float(losses.l1(x, y)) == pytest.approx((1 + 0 + 1 + 2) / 4)
  assert float(losses.reconstruction_loss(x, y, "l1")) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="`kind`"):
    losses.reconstruction_loss(x, y, "l2")


def test_hinge_by_hand_and_halved():
  r, f = R.ravel(), F.ravel()
  want_d = (sum(max(0, 1 - v) for v in r) / 6 + sum(max(0, 1 + v) for v in f) / 6) / 2
  assert float(losses.discriminator_loss(R, F, "hinge")) == pytest.approx(want_d)
  assert float(losses.generator_loss(F, "hinge")) == pytest.approx(-f.mean())
  # Halving: all-zero logits give (1 + 1) / 2 = 1, not 2.
  z = jnp.zeros((2, 3))
  assert float(losses.discriminator_loss(z, z, "hinge")) == pytest.approx(1.0)


def test_vanilla_by_hand():
  r, f = R.ravel(), F.ravel()
  want_d = (sum(softplus(-v) for v in r) / 6 + sum(softplus(v) for v in f) / 6) / 2
  assert float(losses.discriminator_loss(R, F, "vanilla")) == pytest.approx(want_d, rel=1e-6)
  want_g = sum(softplus(-v) for v in f) / 6
  assert float(losses.generator_loss(F, "vanilla")) == pytest.approx(want_g, rel=1e-6)


def test_non_saturating_averages_per_sample_first():
  m_f = F.mean(axis=1)  # [0.25, 1/3]
  want_g = (softplus(-m_f[0]) + softplus(-m_f[1])) / 2
  got_g = float(losses.generator_loss(F, "non_saturate"))
  assert got_g == pytest.approx(want_g, rel=1e-6)
  # Element-wise averaging (what a naive port does) gives a different number.
  elementwise = sum(softplus(-v) for v in F.ravel()) / 6
  assert abs(elementwise - got_g) > 0.1

  m_r = R.mean(axis=1)  # [0.5, 1/3]
  want_d = ((softplus(-m_r[0]) + softplus(m_f[0])) + (softplus(-m_r[1]) + softplus(m_f[1]))) / 2 / 2
  assert float(losses.discriminator_loss(R, F, "non_saturate")) == pytest.approx(want_d, rel=1e-6)


def test_non_saturating_handles_patch_and_token_logits():
  # (B, H, W, 1) PatchGAN logits and (B, 5T) DINO logits reduce per sample alike.
  patch = jnp.asarray(F).reshape(2, 3, 1, 1)
  assert float(losses.generator_loss(patch, "non_saturate")) == pytest.approx(
      float(losses.generator_loss(F, "non_saturate")))


def test_unknown_loss_type():
  with pytest.raises(ValueError, match="`loss_type` must be one of"):
    losses.discriminator_loss(R, F, "wgan")
  with pytest.raises(ValueError, match="`loss_type` must be one of"):
    losses.generator_loss(F, "ls")


def test_lecam_updates_then_regularises():
  ema = losses.lecam_init()
  assert float(ema.real) == 0.0 and float(ema.fake) == 0.0
  reg, ema1 = losses.lecam_loss(R, F, ema, decay=0.9)
  mr, mf = R.mean(), F.mean()
  assert float(ema1.real) == pytest.approx(0.1 * mr)
  assert float(ema1.fake) == pytest.approx(0.1 * mf)
  # The regulariser uses the *updated* EMAs.
  want = (np.mean(np.maximum(R - 0.1 * mf, 0) ** 2)
          + np.mean(np.maximum(0.1 * mr - F, 0) ** 2))
  assert float(reg) == pytest.approx(want, rel=1e-6)
  # Second step continues the EMA; jit-able with the state as a pytree.
  reg2, ema2 = jax.jit(losses.lecam_loss, static_argnames="decay")(R, F, ema1, decay=0.9)
  assert float(ema2.real) == pytest.approx(0.9 * 0.1 * mr + 0.1 * mr)
  assert np.isfinite(float(reg2))


def test_lecam_gradient_does_not_flow_into_ema():
  ema = losses.lecam_init()
  # d/dr of mean(relu(r - ema_fake)^2) with ema treated as a constant.
  g = jax.grad(lambda r: losses.lecam_loss(r, jnp.asarray(F), ema, 0.9)[0])(jnp.asarray(R))
  ema_fake = 0.1 * F.mean()
  want = 2 * np.maximum(R - ema_fake, 0) / R.size
  np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)


def test_r1_equals_analytic_gradient_norm_for_linear_d():
  key = jax.random.key(0)
  w = jax.random.normal(key, (4, 4, 3))
  x = jax.random.normal(jax.random.key(1), (5, 4, 4, 3))

  def d(img):  # per-sample linear logit
    return jnp.einsum("bhwc,hwc->b", img, w) + 0.3

  pen, logits = jax.jit(losses.r1_penalty, static_argnums=0)(d, x)
  assert float(pen) == pytest.approx(float(jnp.sum(w ** 2)), rel=1e-5)
  np.testing.assert_allclose(logits, d(x), rtol=1e-5, atol=1e-5)
  # Multiple logits per sample: gradient of their sum, e.g. 2 identical patches.
  pen2, _ = losses.r1_penalty(lambda img: jnp.stack([d(img), d(img)], -1), x)
  assert float(pen2) == pytest.approx(4 * float(jnp.sum(w ** 2)), rel=1e-5)
  # Differentiable w.r.t. D's parameters (double backprop): d/dw ||w||^2 = 2w.
  gw = jax.jit(jax.grad(lambda w_: losses.r1_penalty(
      lambda img: jnp.einsum("bhwc,hwc->b", img, w_), x)[0]))(w)
  np.testing.assert_allclose(gw, 2 * w, rtol=1e-5)


def test_r1_with_nnx_module_patchgan():
  d = discriminators.PatchGAN(num_filters=4, num_layers=2, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(2), (2, 16, 16, 3))
  mean0 = d.norms[0].mean[...]
  pen, logits = nnx.jit(losses.r1_penalty)(d, x)
  assert logits.shape == (2, 2, 2, 1)
  assert np.isfinite(float(pen)) and float(pen) > 0
  # BatchNorm ran in train mode and its statistics update reached the module.
  assert float(jnp.abs(d.norms[0].mean[...] - mean0).max()) > 0
  # The penalty trains D: nonzero gradients for its parameters.
  grads = nnx.jit(lambda m, x: nnx.grad(lambda m: losses.r1_penalty(m, x)[0])(m))(d, x)
  assert float(jnp.abs(grads["conv_in"]["kernel"][...]).max()) > 0


def test_adaptive_weight_formula():
  nll = {"k": jnp.array([3.0, 4.0])}  # norm 5
  gen = {"k": jnp.array([0.0, 2.0]), "b": jnp.array([0.0])}  # norm 2
  assert float(losses.adaptive_weight(nll, gen)) == pytest.approx(2.5)
  # The generator norm is floored at 1e-3, the ratio clamped at max_weight.
  tiny = {"k": jnp.array([1e-6, 0.0])}
  assert float(losses.adaptive_weight(nll, tiny, max_weight=1e6)) == pytest.approx(5e3)
  assert float(losses.adaptive_weight(nll, tiny, max_weight=100.0)) == pytest.approx(100.0)
  # NaN -> 1 (reference fallback).
  nan = {"k": jnp.array([jnp.nan, 1.0])}
  assert float(losses.adaptive_weight(nan, gen)) == 1.0


def test_adaptive_weight_from_losses():
  last = jnp.array([[1.0, 2.0], [3.0, -1.0]])
  a = jnp.array([[0.5, 0.0], [1.0, 2.0]])
  # nll = sum(a * W) -> grad a; gen = 0.5 * sum(W^2) -> grad W.
  w = losses.adaptive_weight_from_losses(last, lambda p: jnp.sum(a * p),
                                         lambda p: 0.5 * jnp.sum(p ** 2))
  assert float(w) == pytest.approx(float(jnp.linalg.norm(a) / jnp.linalg.norm(last)), rel=1e-6)


def test_lpips_input_range_mapping():
  x = jnp.array([-1.0, 0.0, 1.0])
  np.testing.assert_allclose(losses.to_lpips_input(x, "zero_one"), [0.0, 0.5, 1.0])
  np.testing.assert_allclose(losses.to_lpips_input(x, "minus_one_one"), x)
  with pytest.raises(ValueError, match="`input_range`"):
    losses.to_lpips_input(x, "0_255")
