"""Tests of the GSQ encoder, decoder and tokenizer (gsq_jax.models)."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from gsq_jax.models import layers
from gsq_jax.models import remat
from gsq_jax.models import tokenizer as tok
from gsq_jax.models.decoder import Decoder
from gsq_jax.models.encoder import Encoder


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  """Each tiny graph here runs once or twice: XLA's optimisation passes cost more than they save."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def tiny_config(channel_multipliers=(1, 1, 2), **overrides) -> ml_collections.ConfigDict:
  """hidden 32, one ResBlock per level and in the mid: fast to build and run."""
  cfg = tok.default_model_config()
  n = len(channel_multipliers)
  cfg.hidden_channels = 32
  cfg.channel_multipliers = tuple(channel_multipliers)
  cfg.encoder_layer_configs = (1,) * (n + 1)
  cfg.decoder_layer_configs = (1,) * (n + 1)
  cfg.downsample_factor = 2 ** max(n - 1, 0)
  cfg.latent_dim, cfg.num_groups, cfg.codebook_size = 8, 2, 64
  cfg.update(overrides)
  return cfg


def images(shape=(2, 16, 16, 3), seed=0):
  return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


# ---------------------------------------------------------------------------
# Paper parameter counts (Fig. 3), on abstract modules: nothing is allocated.
# ---------------------------------------------------------------------------

FIG3 = [
    # (channel multipliers, encoder blocks, decoder blocks, attention, params in M)
    ((1, 2, 2, 4), (2,) * 5, (2,) * 5, False, 75.59),
    ((1, 2, 2, 4), (2,) * 5, (2,) * 5, True, 77.70),
    ((1, 1, 2, 2, 4), (2,) * 6, (2,) * 6, False, 77.53),
    ((1, 2, 2, 2, 4), (2,) * 6, (2,) * 6, False, 83.30),
    ((1, 1, 2, 4, 4), (2,) * 6, (2,) * 6, False, 100.58),
    ((1, 2, 2, 4, 4), (4, 3, 4, 3, 4, 4), (3, 4, 3, 4, 4, 4), False, 166.26),
]


@pytest.mark.parametrize("cm,enc,dec,attn,expected_m", FIG3)
def test_parameter_counts_match_paper_fig3(cm, enc, dec, attn, expected_m):
  cfg = tok.default_model_config()
  cfg.channel_multipliers, cfg.downsample_factor = cm, 2 ** (len(cm) - 1)
  cfg.encoder_layer_configs, cfg.decoder_layer_configs = enc, dec
  cfg.mid_block_attn = attn
  cfg.latent_dim, cfg.num_groups, cfg.codebook_size = 64, 4, 2**18
  counts = tok.parameter_counts_from_config(cfg)
  assert counts["quantizer"] == 2**18 * 64 // 4  # one shared (V, D/G) codebook
  assert counts["total"] == counts["encoder"] + counts["decoder"] + counts["quantizer"]
  assert round(counts["total"] / 1e6, 2) == expected_m, counts  # the paper prints 2 decimals


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------


def test_depth_to_space_is_dcr():
  b, h, w, c = 2, 3, 4, 8
  x = np.arange(b * h * w * c, dtype=np.float32).reshape(b, h, w, c)
  expected = np.zeros((b, 2 * h, 2 * w, c // 4), np.float32)
  for i in range(2):
    for j in range(2):
      for k in range(c // 4):  # spec §2.4: out[c, 2h+i, 2w+j] = in[(2i+j)*C/4 + c, h, w]
        expected[:, i::2, j::2, k] = x[:, :, :, (2 * i + j) * (c // 4) + k]
  np.testing.assert_array_equal(np.asarray(layers.depth_to_space(jnp.asarray(x))), expected)


def test_downsample_pads_symmetrically_like_torch():
  down = layers.Downsample(32, rngs=nnx.Rngs(0))
  x = np.asarray(images((1, 4, 4, 32)))
  kernel, bias = np.asarray(down.conv.kernel[...]), np.asarray(down.conv.bias[...])
  # torch Conv2d(3, stride=2, padding=1): zero-pad one pixel on *every* side.
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  expected = np.zeros((1, 2, 2, 32), np.float32)
  for oh in range(2):
    for ow in range(2):
      patch = padded[0, 2 * oh:2 * oh + 3, 2 * ow:2 * ow + 3, :]
      expected[0, oh, ow] = np.einsum("hwi,hwio->o", patch, kernel) + bias
  out = np.asarray(down(jnp.asarray(x)))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  # Flax 'SAME' pads (0, 1) at stride 2, which shifts the sampling grid.
  same = jax.lax.conv_general_dilated(x, kernel, (2, 2), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
  assert not np.allclose(np.asarray(same), expected, atol=1e-3)


def test_adaptive_group_norm_uses_unbiased_variance():
  c = d = 32
  agn = layers.AdaptiveGroupNorm(c, d, rngs=nnx.Rngs(0))
  for linear in (agn.to_scale, agn.to_bias):  # identity maps: scale = std, bias = mean
    linear.kernel[...] = jnp.eye(d)
    linear.bias[...] = jnp.zeros(c)
  x = np.asarray(images((2, 4, 4, c), seed=1))
  zq = np.asarray(images((2, 2, 3, d), seed=2))
  grouped = x.reshape(2, 16, 32, 1)  # GN(32 groups) with C = 32: one channel per group
  normed = ((grouped - grouped.mean(1, keepdims=True))
            / np.sqrt(grouped.var(1, keepdims=True) + 1e-6)).reshape(x.shape)

  def expected(ddof):
    std = np.sqrt(zq.var(axis=(1, 2), ddof=ddof) + 1e-6)[:, None, None, :]
    return std * normed + zq.mean(axis=(1, 2))[:, None, None, :]  # scale * GN + bias

  out = np.asarray(agn(jnp.asarray(x), jnp.asarray(zq)))
  np.testing.assert_allclose(out, expected(ddof=1), rtol=1e-4, atol=1e-4)
  assert not np.allclose(out, expected(ddof=0), rtol=1e-3, atol=1e-3)


def test_attention_block_matches_numpy():
  block = layers.AttentionBlock(32, rngs=nnx.Rngs(0))
  x = np.asarray(images((1, 2, 3, 32), seed=4))
  out = np.asarray(nnx.jit(lambda m, x: m(x))(block, jnp.asarray(x)))
  tokens = x.reshape(6, 32)
  normed = (tokens - tokens.mean(0)) / np.sqrt(tokens.var(0) + 1e-6)  # GN(32) on C = 32
  qkv = normed @ np.asarray(block.qkv.kernel[...])[0, 0] + np.asarray(block.qkv.bias[...])
  q, k, v = np.split(qkv, 3, axis=-1)
  logits = q @ k.T / np.sqrt(32)  # single head, scale 1/sqrt(C)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  proj = (weights @ v) @ np.asarray(block.proj.kernel[...])[0, 0] + np.asarray(block.proj.bias[...])
  np.testing.assert_allclose(out, x + proj.reshape(x.shape), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# Encoder / decoder shapes, traced abstractly (nnx.eval_shape): no compile.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("cm,options", [
    ((1, 1, 2), dict(dtype="bfloat16")),  # f = 4, bf16 compute
    ((1, 1, 2, 2), dict(mid_block_attn=True, use_depth_to_space=False,
                        use_adaptive_norm=False)),  # f = 8, attention, nearest upsampling
    ((1, 1, 1, 2, 2), {}),  # f = 16
    ((1, 1, 1, 1, 2, 2), {}),  # f = 32: a 1 x 2 latent
])
def test_encoder_decoder_shapes(cm, options):
  cfg = tiny_config(cm, **options)
  if cfg.mid_block_attn:
    cfg.encoder_layer_configs = cfg.decoder_layer_configs = (1,) * len(cm) + (2,)
  tok.validate_model_config(cfg)
  f = cfg.downsample_factor
  common = dict(hidden_channels=32, channel_multipliers=cm, latent_dim=8,
                mid_block_attn=cfg.mid_block_attn, dtype=tok.COMPUTE_DTYPES[cfg.dtype])
  x = images((2, 32, 64, 3))

  def build_and_run():
    enc = Encoder(layer_configs=cfg.encoder_layer_configs, rngs=nnx.Rngs(0), **common)
    dec = Decoder(layer_configs=cfg.decoder_layer_configs,
                  use_adaptive_norm=cfg.use_adaptive_norm,
                  use_depth_to_space=cfg.use_depth_to_space, rngs=nnx.Rngs(1), **common)
    z = enc(x)
    return enc, dec, z, dec(z)

  enc, dec, z, y = nnx.eval_shape(build_and_run)
  assert z.shape == (2, 32 // f, 64 // f, 8) and z.dtype == jnp.float32
  assert y.shape == x.shape and y.dtype == jnp.float32
  params = jax.tree.leaves(nnx.state((enc, dec), nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)  # bf16 is the compute dtype only
  modules = [type(m) for _, m in nnx.iter_graph((enc, dec))]
  assert (layers.AttentionBlock in modules) == cfg.mid_block_attn
  assert (layers.AdaptiveGroupNorm in modules) == cfg.use_adaptive_norm
  assert (layers.DepthToSpaceUpsample in modules) == cfg.use_depth_to_space
  assert (layers.NearestUpsample in modules) != cfg.use_depth_to_space
  assert modules.count(layers.Downsample) == len(cm) - 1


# ---------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,field", [
    (dict(latent_dim=10, num_groups=4), "model.num_groups"),
    (dict(downsample_factor=8), "model.downsample_factor"),  # cm (1, 1, 2) gives f = 4
    (dict(downsample_factor=6), "model.downsample_factor"),
    (dict(encoder_layer_configs=(1, 1, 1)), "model.encoder_layer_configs"),
    (dict(decoder_layer_configs=(1, 1, 1, 1, 1)), "model.decoder_layer_configs"),
    (dict(hidden_channels=48), "model.hidden_channels"),
    (dict(codebook_size=1), "model.codebook_size"),
    (dict(dtype="float64"), "model.dtype"),
    (dict(dropout=1.0), "model.dropout"),
    (dict(mid_block_attn=True), "model.mid_block_attn"),  # only one mid block
    (dict(channel_multipliers=()), "model.channel_multipliers"),
])
def test_validate_model_config_names_the_field(overrides, field):
  tok.validate_model_config(tiny_config())  # the base config is fine
  cfg = tiny_config(**overrides)
  with pytest.raises(ValueError, match=field):
    tok.validate_model_config(cfg)


def test_validate_model_config_reports_missing_field():
  cfg = tiny_config()
  del cfg["quantizer"]
  with pytest.raises(ValueError, match="model.quantizer"):
    tok.validate_model_config(cfg)


# ---------------------------------------------------------------------------
# Tokenizer with the real GSQ quantizer
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer():
  return tok.build_tokenizer(tiny_config(), nnx.Rngs(0))


def test_tokenizer_round_trip_and_gradients(tiny_tokenizer):
  x = images((2, 16, 16, 3))

  def loss_fn(model):
    recon, q = model(x)
    return jnp.mean((recon - x) ** 2) + q.loss, (recon, q)

  @nnx.jit
  def run(model):
    grads, (recon, q) = nnx.grad(loss_fn, has_aux=True)(model)
    indices = model.encode_to_indices(x)
    return grads, recon, q, indices, model.decode_from_indices(indices)

  grads, recon, q, indices, from_indices = run(tiny_tokenizer)
  assert recon.shape == x.shape and q.quantized.shape == (2, 4, 4, 8)
  assert indices.shape == (2, 4, 4, 2) and indices.dtype == jnp.int32
  assert int(indices.min()) >= 0 and int(indices.max()) < 64
  assert q.loss.shape == () and np.isfinite(float(q.loss))
  np.testing.assert_array_equal(np.asarray(indices), np.asarray(q.indices))
  # The decoder input's value is the raw codebook rows the indices select.
  codebook = np.asarray(tiny_tokenizer.quantizer.codebook[...])
  np.testing.assert_allclose(np.asarray(q.quantized).reshape(2, 4, 4, 2, 4),
                             codebook[np.asarray(indices)], rtol=1e-6, atol=1e-6)
  # decode_from_indices(encode_to_indices(x)) == decode(quantize(encode(x))).
  np.testing.assert_allclose(np.asarray(from_indices), np.asarray(recon), rtol=1e-5, atol=1e-5)
  # Straight-through: the reconstruction loss reaches the encoder.
  for part in ("encoder", "decoder", "quantizer"):
    norm = sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(getattr(grads, part)))
    assert norm > 0, part


def _std(param):
  return float(np.std(np.asarray(param[...])))


def test_init_scales_follow_reference(tiny_tokenizer):
  enc, dec = tiny_tokenizer.encoder, tiny_tokenizer.decoder
  block = next(b for b in enc.down if isinstance(b, layers.ResBlock) and b.skip is not None)
  assert block.conv1.kernel.shape == (3, 3, 32, 64)  # the 32 -> 64 channel-change block
  fan1, fan2 = 9 * 32, 9 * 64
  np.testing.assert_allclose(_std(block.conv1.kernel), 1.6761 / math.sqrt(fan1), rtol=0.03)
  np.testing.assert_allclose(_std(block.conv2.kernel), 1.6761 * 0.70711 / math.sqrt(fan2),
                             rtol=0.03)
  np.testing.assert_allclose(_std(block.skip.kernel), 1 / math.sqrt(32), rtol=0.06)
  for conv, fan_in in ((block.conv1, fan1), (block.conv2, fan2)):  # torch default bias
    bias = np.abs(np.asarray(conv.bias[...]))
    assert 0.8 / math.sqrt(fan_in) < bias.max() <= 1 / math.sqrt(fan_in)
  assert block.norm1.epsilon == 1e-5  # affine GN, initialised to the identity
  np.testing.assert_array_equal(np.asarray(block.norm1.scale[...]), 1.0)
  np.testing.assert_array_equal(np.asarray(block.norm1.bias[...]), 0.0)
  # Output convs: Kaiming-linear x 1.6761.
  np.testing.assert_allclose(_std(enc.conv_out.kernel), 1.6761 / math.sqrt(64), rtol=0.1)
  np.testing.assert_allclose(_std(dec.conv_out.kernel), 1.6761 / math.sqrt(9 * 32), rtol=0.1)
  # Depth-to-space conv and AGN Linears: torch default U(+-1/sqrt(fan_in)).
  up = next(b for b in dec.up if isinstance(b, layers.DepthToSpaceUpsample))
  bound = 1 / math.sqrt(9 * 64)
  assert up.conv.kernel.shape == (3, 3, 64, 256)
  assert np.abs(np.asarray(up.conv.kernel[...])).max() <= bound
  np.testing.assert_allclose(_std(up.conv.kernel), bound / math.sqrt(3), rtol=0.03)
  agn_kernel = np.asarray(dec.mid_norm.to_scale.kernel[...])  # Linear D = 8 -> C = 64
  assert agn_kernel.shape == (8, 64)
  assert 0.9 / math.sqrt(8) < np.abs(agn_kernel).max() <= 1 / math.sqrt(8)
  assert dec.mid_norm.norm.epsilon == 1e-6 and dec.mid_norm.norm.scale is None


def test_tokenizer_rejects_image_size_not_divisible_by_f(tiny_tokenizer):
  with pytest.raises(ValueError, match="divisible by f = 4"):
    tiny_tokenizer.encode(jnp.zeros((1, 18, 16, 3)))


def test_evaluation_view_needs_no_key_when_training_breaks_ties_at_random():
  """A paper recipe trains with random ties; grids, eval and gsq-plan's forward use the view."""
  quantizer = dict(tiny_config().quantizer, tie_break="random")
  model = tok.build_tokenizer(tiny_config(quantizer=ml_collections.ConfigDict(quantizer)),
                              nnx.Rngs(0))
  x = images((1, 16, 16, 3))
  with pytest.raises(ValueError, match="rng"):
    model(x)  # training's lookup needs its key
  view = tok.evaluation_view(model)
  assert view.quantizer.tie_break == "first" and model.quantizer.tie_break == "random"
  recon, q = view(x)
  assert recon.shape == x.shape and q.indices.shape == (1, 4, 4, 2)


# ---------------------------------------------------------------------------
# Rematerialisation (train.remat)
# ---------------------------------------------------------------------------
def test_remat_blocks_give_the_same_gradients():
  cfg = tiny_config()
  x = images((2, 16, 16, 3))

  def grads(choice):
    model = tok.Tokenizer.from_config(cfg, rngs=nnx.Rngs(0))
    count = remat.use_remat(model, choice)
    if choice == "dino":
      return count, None, None
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
      y, q = nnx.merge(graphdef, params, rest)(x)
      return jnp.mean(jnp.square(y - x)) + q.loss

    return count, jax.make_jaxpr(jax.grad(loss))(params), jax.jit(jax.grad(loss))(params)

  n0, jaxpr0, plain = grads("none")
  n_dino, _, _ = grads("dino")  # the tokenizer has no DINO blocks
  n1, jaxpr1, recomputed = grads("blocks")
  # encoder: 3 level + 1 channel-change + 1 mid ResBlocks; decoder the same.
  assert (n0, n_dino, n1) == (0, 0, 10)
  assert str(jaxpr1).count("remat") == 10 and "remat" not in str(jaxpr0)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(recomputed)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="train.remat must be one of"):
    remat.use_remat(tok.Tokenizer.from_config(cfg, rngs=nnx.Rngs(0)), "all")
