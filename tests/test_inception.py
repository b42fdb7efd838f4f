"""FID Inception port: official weight layout, loader (hash check), forward pass.

The real weights file cannot be obtained offline, so the end-to-end test uses
random weights written in the official layout and format (legacy torch
pickle, pytorch-fid key names and shapes) and the loader's test-only
`expected_sha256_prefix=None`.
"""

import jax
import numpy as np
import pytest

from gsq_jax.evaluation import inception
from gsq_jax.utils import torch_pickle

# Parameter count of torchvision's Inception3 (27,161,264) minus its AuxLogits
# head (3,326,696), plus 8 more classes in the 1008-way fc (16,392): the FID
# network's trainable parameters, independent of the module written here.
_OFFICIAL_PARAM_COUNT = 23_850_960


def _random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights with the official keys and torch shapes (He-scaled convs)."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in inception.official_state_dict_shapes().items():
    if key.endswith("conv.weight"):
      fan_in = int(np.prod(shape[1:]))
      value = rng.normal(0, np.sqrt(2.0 / fan_in), shape)
    elif key.endswith("running_var"):
      value = rng.uniform(0.5, 1.5, shape)
    elif key.endswith("bn.weight"):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # biases, running means, fc
      value = rng.normal(0, 0.05, shape)
    out[key] = value.astype(np.float32)
  return out


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
  state_dict = _random_state_dict()
  path = tmp_path_factory.mktemp("fid") / inception.FID_WEIGHTS_FILENAME
  # Files from older torch versions may also carry BatchNorm step counters.
  with_counters = dict(state_dict)
  with_counters["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(0, np.int64)
  torch_pickle.save_state_dict_legacy(path, with_counters)
  return path, state_dict


@pytest.fixture(scope="module")
def loaded(weights_file):
  """The model read back through the real loader (hash check waived for tests)."""
  path, state_dict = weights_file
  return inception.load_inception(path, expected_sha256_prefix=None), state_dict


def test_official_layout():
  shapes = inception.official_state_dict_shapes()
  assert len(shapes) == 94 * 5 + 2  # 94 conv+BN units, fc weight and bias
  trainable = sum(int(np.prod(s)) for k, s in shapes.items()
                  if not k.endswith(("running_mean", "running_var")))
  assert trainable == _OFFICIAL_PARAM_COUNT
  assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
  assert shapes["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
  assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
  assert shapes["Mixed_6e.branch7x7dbl_2.conv.weight"] == (192, 192, 7, 1)
  assert shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
  assert shapes["Mixed_7c.branch_pool.bn.running_var"] == (192,)
  assert shapes["fc.weight"] == (1008, 2048)


def test_end_to_end_from_legacy_file(loaded):
  model, state_dict = loaded
  exported = inception.export_state_dict(model)
  assert exported.keys() == state_dict.keys()
  for key, value in state_dict.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)

  images = np.random.default_rng(1).uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
  images[1] = images[1] ** 3  # a different image statistics
  features = np.asarray(inception.make_feature_fn(model)(images))
  assert features.shape == (2, inception.FEATURE_DIM)
  assert np.all(np.isfinite(features)) and np.all(features >= 0)  # post-ReLU mean
  assert np.std(features) > 0 and not np.allclose(features[0], features[1])
  assert model.logits(features).shape == (2, inception.NUM_CLASSES)


def test_default_loader_refuses_wrong_hash(weights_file):
  path, _ = weights_file
  with pytest.raises(inception.InceptionWeightsError, match="6726825d") as info:
    inception.load_inception(path)
  assert isinstance(info.value, ValueError)
  assert "sha256" in info.value.status.reason
  status = inception.rfid_status(path)
  assert not status.available and "pytorch-fid" in status.fix
  ok = inception.rfid_status(path, expected_sha256_prefix=None)
  assert ok.available and len(ok.sha256) == 64


def test_missing_weights_are_reported_unavailable(tmp_path, monkeypatch):
  monkeypatch.setenv("GSQ_JAX_WEIGHTS_DIR", str(tmp_path))
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  for given in (None, tmp_path / "nope.pth"):
    status = inception.rfid_status(given)
    assert isinstance(status, inception.InceptionUnavailable) and not status.available
    assert inception.FID_WEIGHTS_FILENAME in status.reason
    assert "https://github.com/mseitzer/pytorch-fid" in status.fix
    assert str(status).startswith("rFID unavailable:")
    with pytest.raises(inception.InceptionWeightsError, match="not found"):
      inception.load_inception(given)


def test_truncated_file_is_refused(tmp_path):
  path = tmp_path / "truncated.pth"
  path.write_bytes(b"\x80\x02not a torch file")
  with pytest.raises(inception.InceptionWeightsError, match="could not be used"):
    inception.load_inception(path, expected_sha256_prefix=None)


def test_state_dict_validation_names_the_key(weights_file):
  _, state_dict = weights_file
  missing = {k: v for k, v in state_dict.items() if k != "Mixed_6a.branch3x3.bn.weight"}
  with pytest.raises(ValueError, match="1 missing.*Mixed_6a.branch3x3.bn.weight"):
    inception.inception_from_state_dict(missing)
  with pytest.raises(ValueError, match="1 unexpected.*AuxLogits.fc.weight"):
    inception.inception_from_state_dict({**state_dict, "AuxLogits.fc.weight": np.zeros(3)})
  bad = dict(state_dict)
  # A (7, 1) kernel where (1, 7) belongs: transposed-orientation mistakes fail.
  bad["Mixed_6b.branch7x7_2.conv.weight"] = np.zeros((128, 128, 7, 1), np.float32)
  with pytest.raises(ValueError, match=r"Mixed_6b.branch7x7_2.conv.weight.*\(128, 128, 1, 7\)"):
    inception.inception_from_state_dict(bad)


def _torch_conv_bn_relu(x_nchw, sd, prefix, stride, pad):
  """Direct numpy conv (torch semantics: cross-correlation, OIHW) + BN(eps 1e-3) + ReLU."""
  w = sd[prefix + ".conv.weight"].astype(np.float64)
  ph, pw = pad
  x = np.pad(x_nchw.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
  kh, kw = w.shape[2:]
  oh = (x.shape[2] - kh) // stride + 1
  ow = (x.shape[3] - kw) // stride + 1
  out = np.zeros((x.shape[0], w.shape[0], oh, ow))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
      out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
  bn = lambda name: sd[f"{prefix}.bn.{name}"][None, :, None, None]
  out = (out - bn("running_mean")) / np.sqrt(bn("running_var") + 1e-3) * bn("weight") + bn("bias")
  return np.maximum(out, 0)


@pytest.mark.parametrize("prefix,in_ch,stride,pad", [
    ("Conv2d_1a_3x3", 3, 2, (0, 0)),
    ("Mixed_6b.branch7x7_2", 128, 1, (0, 3)),
])
def test_conv_units_match_torch_semantics(loaded, prefix, in_ch, stride, pad):
  model, state_dict = loaded
  unit = model
  for name in prefix.split("."):
    unit = getattr(unit, name)
  x = np.random.default_rng(4).normal(size=(2, 9, 11, in_ch)).astype(np.float32)
  got = np.asarray(unit(x))
  want = _torch_conv_bn_relu(x.transpose(0, 3, 1, 2), state_dict, prefix, stride, pad)
  np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)


def _torch_bilinear_resize(x, size):
  """numpy torch `interpolate(bilinear, align_corners=False)` on NHWC."""
  for axis in (1, 2):
    n = x.shape[axis]
    src = np.maximum((np.arange(size) + 0.5) * n / size - 0.5, 0)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    frac = (src - lo).reshape([-1 if a == axis else 1 for a in range(4)])
    x = np.take(x, lo, axis) * (1 - frac) + np.take(x, hi, axis) * frac
  return x


def test_preprocess_pytorch_fid_truncates_and_resizes():
  rng = np.random.default_rng(5)
  images = rng.uniform(0, 1, (1, 17, 13, 3)).astype(np.float32)
  images[0, 0, 0] = [0.5, 1.0, 0.999 / 255]  # -> levels 127, 255, 0 (truncation)
  got = np.asarray(inception.preprocess(images))
  levels = np.floor(images.astype(np.float64) * 255)
  assert list(levels[0, 0, 0]) == [127, 255, 0]
  want = 2 * _torch_bilinear_resize(levels / 255, 299) - 1
  assert got.shape == (1, 299, 299, 3)
  np.testing.assert_allclose(got, want, atol=1e-5)
  uint8 = np.asarray(inception.preprocess(levels.astype(np.uint8)))
  np.testing.assert_allclose(uint8, got, atol=1e-6)


def test_preprocess_torch_fidelity_uses_tf1_legacy_resize():
  # TF1 align_corners=False: source = dest * in/out, last row repeated.
  x = np.array([0.0, 10.0], np.float32).reshape(1, 2, 1, 1) * np.ones((1, 1, 2, 1), np.float32)
  up = np.asarray(inception._tf1_bilinear_resize(jax.numpy.asarray(x), 4))
  np.testing.assert_allclose(up[0, :, 0, 0], [0.0, 5.0, 10.0, 10.0])
  images = np.full((1, 8, 8, 3), 1.0, np.float32)
  out = np.asarray(inception.preprocess(images, mode="torch_fidelity"))
  np.testing.assert_allclose(out, (255 - 128) / 128, atol=1e-6)
  with pytest.raises(ValueError, match="mode"):
    inception.preprocess(images, mode="clean_fid")
