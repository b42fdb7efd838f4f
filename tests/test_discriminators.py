"""PatchGAN, DiffAugment, and the DINOv2 discriminator (conversion from a
synthetic checkpoint with the official key names and shapes)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsq_jax.models import weights
from gsq_jax.models import dino
from gsq_jax.models import discriminators as D
from gsq_jax.utils import torch_pickle


def make_state(rng, d=384, depth=12, patch=14, grid=37, regs=4, mlp=4):
  """A state dict with DINOv2's key names (dinov2/models/vision_transformer.py)."""
  def n(*shape, std=0.02):
    return rng.standard_normal(shape, dtype=np.float32) * std

  s = {"cls_token": n(1, 1, d), "pos_embed": n(1, 1 + grid * grid, d),
       "register_tokens": n(1, regs, d), "mask_token": np.zeros((1, d), np.float32),
       "patch_embed.proj.weight": n(d, 3, patch, patch, std=0.05),
       "patch_embed.proj.bias": n(d)}
  for i in range(depth):
    p = f"blocks.{i}."
    s.update({
        p + "norm1.weight": 1 + n(d), p + "norm1.bias": n(d),
        p + "attn.qkv.weight": n(3 * d, d, std=0.1), p + "attn.qkv.bias": n(3 * d),
        p + "attn.proj.weight": n(d, d, std=0.1), p + "attn.proj.bias": n(d),
        p + "ls1.gamma": n(d, std=0.5),
        p + "norm2.weight": 1 + n(d), p + "norm2.bias": n(d),
        p + "mlp.fc1.weight": n(mlp * d, d, std=0.1), p + "mlp.fc1.bias": n(mlp * d),
        p + "mlp.fc2.weight": n(d, mlp * d, std=0.1), p + "mlp.fc2.bias": n(d),
        p + "ls2.gamma": n(d, std=0.5)})
  s["norm.weight"], s["norm.bias"] = 1 + n(d), n(d)
  return s


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  """Full ViT-S/14-reg4 shapes (22M params), torch zip format, official file name."""
  state = make_state(np.random.default_rng(0))
  path = tmp_path_factory.mktemp("dino") / "dinov2_vits14_reg4_pretrain.pth"
  torch_pickle.save_state_dict_zip(path, state)
  return path, state


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """Same key names, tiny geometry: dim 64 (1 head), 3 blocks, 2x2 patch grid."""
  state = make_state(np.random.default_rng(1), d=64, depth=3, grid=2)
  path = tmp_path_factory.mktemp("dino_tiny") / "tiny.pth"
  torch_pickle.save_state_dict_zip(path, state)
  return path, state


def reference_vit(sd, x, taps, patch=14, head_dim=64):
  """Numpy DINOv2 forward in torch layout (x @ W.T + b), NHWC input."""
  def ln(t, w, b):
    m = t.mean(-1, keepdims=True)
    v = ((t - m) ** 2).mean(-1, keepdims=True)
    return (t - m) / np.sqrt(v + 1e-6) * w + b

  b_, h, w, _ = x.shape
  d = sd["cls_token"].shape[-1]
  gh, gw = h // patch, w // patch
  pt = x.reshape(b_, gh, patch, gw, patch, 3).transpose(0, 1, 3, 5, 2, 4)
  t = pt.reshape(b_, gh * gw, -1) @ sd["patch_embed.proj.weight"].reshape(d, -1).T
  t = t + sd["patch_embed.proj.bias"]
  t = np.concatenate([np.broadcast_to(sd["cls_token"], (b_, 1, d)), t], 1) + sd["pos_embed"]
  regs = np.broadcast_to(sd["register_tokens"], (b_,) + sd["register_tokens"].shape[1:])
  t = np.concatenate([t[:, :1], regs, t[:, 1:]], 1)
  feats = [t]
  heads = d // head_dim
  for i in range(max(taps) + 1):
    p = f"blocks.{i}."
    u = ln(t, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
    qkv = (u @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"])
    qkv = qkv.reshape(b_, -1, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
    a = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) / math.sqrt(head_dim)
    a = np.exp(a - a.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    o = (a @ qkv[2]).transpose(0, 2, 1, 3).reshape(b_, -1, d)
    t = t + (o @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]) * sd[p + "ls1.gamma"]
    u = ln(t, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
    u = u @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]
    u = 0.5 * u * (1 + np.vectorize(math.erf)(u / math.sqrt(2)))
    t = t + (u @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]) * sd[p + "ls2.gamma"]
    if i in taps:
      feats.append(t)
  return feats


# ----------------------------------------------------------------------------
# DINOv2 backbone conversion.
# ----------------------------------------------------------------------------


def test_official_checkpoint_converts(official):
  path, state = official
  vit = dino.load_dino_backbone(path)
  assert vit.loaded and len(vit.blocks) == 12 and vit.embed_dim == 384
  np.testing.assert_array_equal(vit.blocks[7].qkv_w[...], state["blocks.7.attn.qkv.weight"].T)
  np.testing.assert_array_equal(vit.patch_w[...],
                                state["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(vit.register_tokens[...], state["register_tokens"])
  # Frozen: nothing for the optimiser.
  assert not jax.tree.leaves(nnx.state(vit, nnx.Param))
  # At 518 px the 37x37 pos_embed grid is used as is (no interpolation).
  pos = vit.pos_embed[...]
  assert dino.interpolate_pos_embed(pos, 37, 37) is pos
  shapes = jax.eval_shape(lambda x: vit(x), jax.ShapeDtypeStruct((1, 518, 518, 3), jnp.float32))
  assert [s.shape for s in shapes] == [(1, 1374, 384)] * 5


def test_pos_embed_interpolation():
  grid = jnp.arange(37 * 37 * 2, dtype=jnp.float32).reshape(1, 37 * 37, 2)
  pos = jnp.concatenate([jnp.full((1, 1, 2), -7.0), grid], axis=1)
  small = dino.interpolate_pos_embed(pos, 4, 6)
  assert small.shape == (1, 1 + 24, 2)
  np.testing.assert_array_equal(small[0, 0], [-7.0, -7.0])  # class token untouched
  const = jnp.ones((1, 1 + 37 * 37, 3))
  np.testing.assert_allclose(dino.interpolate_pos_embed(const, 5, 5), 1.0, rtol=1e-5)


def test_tiny_vit_matches_numpy_reference(tiny):
  path, state = tiny
  vit = dino.load_dino_backbone(path, expected=None)
  assert len(vit.blocks) == 3 and vit.embed_dim == 64
  x = np.random.default_rng(2).standard_normal((2, 28, 28, 3)).astype(np.float32)
  got = jax.jit(lambda x: vit(x, taps=(0, 2)))(jnp.asarray(x))
  want = reference_vit(state, x, taps=(0, 2))
  assert [g.shape for g in got] == [(2, 9, 64)] * 3
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_checkpoint_validation(tiny, tmp_path):
  path, state = tiny
  with pytest.raises(ValueError, match="not dinov2_vits14_reg"):
    dino.load_dino_backbone(path)  # geometry differs from ViT-S/14-reg4
  extra = dict(state, **{"head.weight": np.zeros((2, 2), np.float32)})
  torch_pickle.save_state_dict_zip(tmp_path / "extra.pth", extra)
  with pytest.raises(ValueError, match="unexpected keys"):
    dino.load_dino_backbone(tmp_path / "extra.pth", expected=None)
  missing = {k: v for k, v in state.items() if k != "blocks.1.ls2.gamma"}
  torch_pickle.save_state_dict_zip(tmp_path / "missing.pth", missing)
  with pytest.raises(ValueError, match="missing key 'blocks.1.ls2.gamma'"):
    dino.load_dino_backbone(tmp_path / "missing.pth", expected=None)
  # Chunked block names (blocks.<chunk>.<i>.) are normalised.
  chunked = {k.replace("blocks.", "blocks.0.", 1): v for k, v in state.items()}
  assert set(dino.normalize_state_dict(chunked)) == set(state)


def test_missing_dino_file_raises_clearly(tmp_path, monkeypatch):
  monkeypatch.setenv(weights.ENV_VAR, str(tmp_path))
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  with pytest.raises(FileNotFoundError, match="dinov2_vits14_reg4_pretrain.pth"):
    dino.check_dino_checkpoint(None)
  with pytest.raises(FileNotFoundError, match="dl.fbaipublicfiles.com"):
    D.make_dino_discriminator(str(tmp_path / "nope.pth"), rngs=nnx.Rngs(0))
  junk = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
  junk.write_bytes(b"<html>404</html>")
  with pytest.raises(ValueError, match="not a torch checkpoint"):
    dino.check_dino_checkpoint(None)
  with pytest.raises(ValueError, match="no pretrained weights"):
    D.DinoDiscriminator(dino.DinoViT(), rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------
# DINO discriminator.
# ----------------------------------------------------------------------------


def test_dino_discriminator_official_518(official):
  path, _ = official
  disc = D.make_dino_discriminator(str(path), rngs=nnx.Rngs(0))
  shapes = nnx.eval_shape(lambda m, x, k: m(x, k), disc,
                          jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32),
                          jax.random.key(0))
  assert shapes.shape == (2, 5 * 1374)


@pytest.mark.slow  # 10 s of the default suite's budget; the shapes above stay in it
def test_dino_discriminator_official_518_forward(official):
  """One real forward at the native 518 resolution (batch 1)."""
  path, _ = official
  disc = D.make_dino_discriminator(str(path), rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(1), (1, 32, 32, 3))
  out = nnx.jit(lambda m, x, k: m(x, k))(disc, x, jax.random.key(2))
  assert out.shape == (1, 6870) and bool(jnp.all(jnp.isfinite(out)))


def test_dino_discriminator_gradients_and_augment_keys(tiny):
  path, _ = tiny
  vit = dino.load_dino_backbone(path, expected=None)
  disc = D.DinoDiscriminator(vit, rngs=nnx.Rngs(0), resolution=28, taps=(0, 2))
  x = jax.random.uniform(jax.random.key(3), (2, 16, 16, 3))

  def g_loss(m, x):
    return jnp.mean(jax.nn.softplus(-m(x, jax.random.key(6))))

  @nnx.jit
  def run(m, x):
    outs = [m(x, jax.random.key(k)) for k in (4, 5, 4)]
    # D is an argument of the differentiated function so that nnx carries its
    # BatchNorm statistics updates out of the trace.
    return outs, nnx.grad(g_loss, argnums=(0, 1))(m, x)

  (out, out_other_key, out_same_key), (gp, gx) = run(disc, x)
  assert out.shape == (2, 3 * 9)
  # DiffAugment draws: new key -> different logits; same key -> same logits.
  assert not np.allclose(out, out_other_key)
  np.testing.assert_allclose(out, out_same_key, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="`key` is required"):
    disc(x)
  # Generator side: the gradient reaches the input image through the frozen ViT.
  assert float(jnp.abs(gx).max()) > 0
  # Discriminator side: only the heads are trainable parameters.
  assert set(gp) == {"heads"}
  n_frozen = len(jax.tree.leaves(nnx.state(disc, weights.Frozen)))
  assert n_frozen == 5 + 3 * 14 + 2  # embeddings, 14 per block, final norm


def test_disc_head_is_circular():
  head = D.DiscHead(8, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 12, 8))
  y = head(x)
  assert y.shape == (2, 12)
  # Circular padding + batch statistics: rolling tokens rolls the logits.
  np.testing.assert_allclose(head(jnp.roll(x, 5, axis=1)), jnp.roll(y, 5, axis=1),
                             rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# PatchGAN.
# ----------------------------------------------------------------------------


def test_patchgan_shapes_and_init():
  d = D.PatchGAN(rngs=nnx.Rngs(0))
  assert nnx.eval_shape(lambda m, x: m(x), d,
                        jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)).shape == (2, 30, 30, 1)
  out = d(jnp.ones((2, 64, 64, 3)))
  assert out.shape == (2, 6, 6, 1)
  widths = [c.kernel.shape[-1] for c in d.convs]
  assert widths == [128, 256, 512] and d.conv_out.kernel.shape == (4, 4, 512, 1)
  assert d.conv_in.bias is not None and all(c.bias is None for c in d.convs)
  k = np.asarray(d.convs[2].kernel[...])
  assert abs(k.std() - 0.02) < 1e-3 and abs(k.mean()) < 1e-3
  s = np.asarray(d.norms[2].scale[...])
  assert abs(s.mean() - 1) < 5e-3 and abs(s.std() - 0.02) < 5e-3
  assert not d.norms[0].use_running_average  # batch statistics
  gsq = D.PatchGAN(output_weight_scale=0.1, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(gsq.conv_out.kernel[...], 0.1 * d.conv_out.kernel[...], rtol=1e-6)


# ----------------------------------------------------------------------------
# DiffAugment and area resize.
# ----------------------------------------------------------------------------


def test_color_ops():
  x = jax.random.uniform(jax.random.key(0), (6, 8, 8, 3))
  b = D.rand_brightness(x, jax.random.key(1))
  shift = np.asarray(b - x)
  assert b.shape == x.shape and np.all(np.abs(shift - shift[:, :1, :1, :1]) < 1e-6)
  assert np.all(np.abs(shift) <= 0.5)
  s = D.rand_saturation(x, jax.random.key(2))
  np.testing.assert_allclose(s.mean(-1), x.mean(-1), atol=1e-6)  # channel mean kept
  c = D.rand_contrast(x, jax.random.key(3))
  np.testing.assert_allclose(c.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-6)
  ratio = (c - c.mean((1, 2, 3), keepdims=True)) / (x - x.mean((1, 2, 3), keepdims=True))
  r = np.asarray(ratio).reshape(6, -1)
  assert np.allclose(r, r[:, :1], rtol=1e-3) and np.all((r >= 0.5) & (r <= 1.5))


def test_translation_is_zero_filled_shift():
  x = jax.random.uniform(jax.random.key(0), (8, 16, 16, 2)) + 1.0
  y = np.asarray(D.rand_translation(x, jax.random.key(1)))
  x = np.asarray(x)
  assert y.shape == x.shape
  shifts = set()
  for b in range(8):
    found = None
    for tx in range(-2, 3):  # int(16 * 0.125 + 0.5) = 2
      for ty in range(-2, 3):
        want = np.zeros_like(x[b])
        src = x[b][max(tx, 0):16 + min(tx, 0), max(ty, 0):16 + min(ty, 0)]
        want[max(-tx, 0):max(-tx, 0) + src.shape[0], max(-ty, 0):max(-ty, 0) + src.shape[1]] = src
        if np.array_equal(want, y[b]):
          found = (tx, ty)
    assert found is not None, f"sample {b} is not a zero-filled shift"
    shifts.add(found)
  assert len(shifts) > 1  # independent per sample


@pytest.mark.parametrize("size,side", [(64, 13), (256, 51)])
def test_cutout_zeroes_square_of_side_round_02h(size, side):
  assert D.cutout_size(size, size) == (side, side)
  b = 64 if size == 64 else 4
  y = np.asarray(D.rand_cutout(jnp.ones((b, size, size, 1)), jax.random.key(size)))
  inside = 0
  for img in y[..., 0]:
    rows, cols = np.nonzero(img == 0)
    h = rows.max() - rows.min() + 1
    w = cols.max() - cols.min() + 1
    assert len(rows) == h * w  # one solid rectangle
    assert h <= side and w <= side
    touches = rows.min() == 0 or cols.min() == 0 or rows.max() == size - 1 or cols.max() == size - 1
    if not touches:
      assert (h, w) == (side, side)
      inside += 1
  assert inside > 0


def test_diff_augment_policy():
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
  a = D.diff_augment(x, jax.random.key(1))
  assert a.shape == x.shape
  np.testing.assert_array_equal(a, D.diff_augment(x, jax.random.key(1)))
  assert not np.allclose(a, D.diff_augment(x, jax.random.key(2)))
  np.testing.assert_array_equal(D.diff_augment(x, jax.random.key(1), ""), x)
  with pytest.raises(ValueError, match="unknown `policy` entry"):
    D.diff_augment(x, jax.random.key(1), "color,flip")


def test_area_resize_is_adaptive_average_pool():
  def reference(img, size):  # torch adaptive_avg_pool2d, explicit windows
    h, w = img.shape[:2]
    out = np.zeros((size, size) + img.shape[2:])
    for i in range(size):
      for j in range(size):
        r0, r1 = (i * h) // size, -((-(i + 1) * h) // size)
        c0, c1 = (j * w) // size, -((-(j + 1) * w) // size)
        out[i, j] = img[r0:r1, c0:c1].mean((0, 1))
    return out

  rng = np.random.default_rng(0)
  for h, size in ((5, 3), (3, 7), (16, 37)):
    img = rng.standard_normal((h, h, 2)).astype(np.float32)
    got = D.area_resize(jnp.asarray(img)[None], size)[0]
    np.testing.assert_allclose(got, reference(img, size), rtol=1e-5, atol=1e-6)
  x = jnp.asarray(rng.standard_normal((1, 256, 256, 3)), jnp.float32)
  y = D.area_resize(x, 518)
  assert y.shape == (1, 518, 518, 3)
  assert float(y.mean()) == pytest.approx(float(x.mean()), abs=2e-3)


def test_area_resize_gradients_are_the_transposed_map_without_matmuls():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 16, 12, 3)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((2, 37, 37, 3)), jnp.float32)
  mh, mw = D._area_matrix(16, 37), D._area_matrix(12, 37)
  dense = lambda x: jnp.einsum("oh,pw,bhwc->bopc", mh, mw, x, precision="highest")
  _, vjp = jax.vjp(lambda x: D.area_resize(x, 37), x)
  np.testing.assert_allclose(vjp(g)[0], jax.vjp(dense, x)[1](g)[0], rtol=1e-5, atol=1e-6)
  # Second order (R1 penalty: the gradient of an input gradient).
  r1 = lambda f, s: jax.grad(lambda x: jnp.sum(jnp.square(jax.grad(
      lambda x: jnp.sum(jnp.sin(f(x) * s)))(x))))(x)
  np.testing.assert_allclose(r1(lambda x: D.area_resize(x, 37), g), r1(dense, g),
                             rtol=1e-4, atol=1e-5)
  # 256 -> 518 forward and backward lower to gathers and elementwise ops: no dot, no scatter.
  hlo = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(D.area_resize(x, 518))))).lower(
      jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)).as_text(dialect="hlo")
  assert "gather(" in hlo
  assert not re.search(r"\b(dot|convolution|scatter)\(", hlo)
