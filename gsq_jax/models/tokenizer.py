"""The GSQ tokenizer: encoder -> quantizer -> decoder, built from a config.

An image batch (B, H, W, 3) in [-1, 1] travels as

  encode               -> z   (B, H/f, W/f, D)   continuous float32 latent
  quantize             -> zq  (B, H/f, W/f, D)   codebook rows (+ indices, loss)
  decode               -> x'  (B, H, W, 3)       reconstruction, not clamped

and the discrete view of the same path is `encode_to_indices` (B, h, w, G)
int32 and `decode_from_indices`. The "model" config block and its checks live
here too, so every architectural choice is one named config field.

Two network families share this interface (`model.architecture`): "flex", the
GSQ paper's FlexTokenizer layout (encoder.py / decoder.py), and "ibq", the
Open-MAGVIT2/taming network IBQ was trained in (ibq_network.py, options in
`model.ibq`). Any quantizer goes into either.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gsq_jax.models import layers
from gsq_jax.models.decoder import Decoder
from gsq_jax.models.encoder import Encoder
from gsq_jax.models.ibq_network import IBQDecoder
from gsq_jax.models.ibq_network import IBQEncoder
from gsq_jax.quantizers import default_quantizer_config
from gsq_jax.quantizers import make_quantizer
from gsq_jax.quantizers import QuantizerOutput

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ARCHITECTURES = ("flex", "ibq")


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def default_model_config() -> ml_collections.ConfigDict:
  """The paper's F8 layout (hidden 128, cm 1-2-2-4, 2 ResBlocks everywhere, AGN + D2S).

  Field names map to the paper's symbols (D, G, V, f); flex_gen's names are
  in the comments for traceability.
  """
  cfg = ml_collections.ConfigDict()
  cfg.architecture = "flex"  # "flex" (FlexTokenizer layout) or "ibq" (SEED-Voken's network)
  cfg.hidden_channels = 128
  cfg.channel_multipliers = (1, 2, 2, 4)
  cfg.encoder_layer_configs = (2, 2, 2, 2, 2)  # per level, last = mid blocks
  cfg.decoder_layer_configs = (2, 2, 2, 2, 2)  # in encoder level order
  cfg.latent_dim = 16  # D (flex_gen embed_dim)
  cfg.num_groups = 1  # G (num_group)
  cfg.codebook_size = 8192  # V (num_embed)
  cfg.downsample_factor = 8  # f = 2 ** (len(channel_multipliers) - 1)
  cfg.use_adaptive_norm = True  # decoder AdaptiveGroupNorm
  cfg.use_depth_to_space = True  # decoder upsampling (use_learnable_up_down_sample)
  cfg.mid_block_attn = False
  cfg.dropout = 0.0
  cfg.dtype = "float32"  # compute dtype; parameters are always float32
  cfg.quantizer = default_quantizer_config("gsq")  # GSQ with l2 on (the paper's setting)
  # architecture="ibq" only (it ignores the layer configs, AGN, D2S and mid_block_attn).
  cfg.ibq = default_ibq_config()
  return cfg


def default_ibq_config() -> ml_collections.ConfigDict:
  """IBQ's released network options (imagenet_ibqgan_*.yaml ddconfig)."""
  return ml_collections.ConfigDict(dict(
      num_res_blocks=4,  # per encoder level; the decoder has one more
      attn_resolutions=(16,),  # attention after each block of a level at this resolution
      resolution=256,  # nominal input size that names the levels' resolutions
      z_channels=256,  # encoder output / decoder input, around the 1x1 quant convs
  ))


def ibq_model_config(*, hidden_channels: int = 128, channel_multipliers=(1, 1, 2, 2, 4),
                     latent_dim: int = 256, codebook_size: int = 262144,
                     **ibq_options) -> ml_collections.ConfigDict:
  """A model block for the IBQ network (default: the released IBQ 2^18 tokenizer)."""
  cfg = default_model_config()
  cfg.architecture = "ibq"
  cfg.hidden_channels = hidden_channels
  cfg.channel_multipliers = tuple(channel_multipliers)
  levels = len(cfg.channel_multipliers)
  cfg.encoder_layer_configs = cfg.decoder_layer_configs = (2,) * (levels + 1)  # unused
  cfg.downsample_factor = 2 ** (levels - 1)
  cfg.latent_dim, cfg.num_groups, cfg.codebook_size = latent_dim, 1, codebook_size
  cfg.use_adaptive_norm = cfg.use_depth_to_space = False
  cfg.quantizer = default_quantizer_config("ibq")
  cfg.ibq.update(ibq_options)
  return cfg


def _fail(field: str, message: str) -> None:
  raise ValueError(f"model.{field}: {message}")


def _int_list(cfg, field: str, minimum: int) -> list[int]:
  value = cfg.get(field)
  if (not isinstance(value, (list, tuple)) or not value
      or not all(isinstance(v, (int, np.integer)) and v >= minimum for v in value)):
    _fail(field, f"must be a non-empty list of integers >= {minimum}, got {value!r}")
  return [int(v) for v in value]


def validate_model_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad "model" field and how to fix it."""
  required = ("hidden_channels", "channel_multipliers", "encoder_layer_configs",
              "decoder_layer_configs", "latent_dim", "num_groups", "codebook_size",
              "downsample_factor", "use_adaptive_norm", "use_depth_to_space",
              "mid_block_attn", "dropout", "dtype", "quantizer")
  for field in required:
    if field not in cfg:
      _fail(field, "is missing; see gsq_jax.models.tokenizer.default_model_config()")
  architecture = cfg.get("architecture", "flex")
  if architecture not in ARCHITECTURES:
    _fail("architecture", f"must be one of {ARCHITECTURES}, got {architecture!r}")

  hidden = cfg.hidden_channels
  if not isinstance(hidden, int) or hidden <= 0:
    _fail("hidden_channels", f"must be a positive integer, got {hidden!r}")
  multipliers = _int_list(cfg, "channel_multipliers", 1)
  for m in multipliers:
    if (hidden * m) % layers.NORM_GROUPS:
      _fail("hidden_channels",
            f"hidden_channels * multiplier = {hidden} * {m} = {hidden * m} must be divisible "
            f"by {layers.NORM_GROUPS} (GroupNorm groups); use a multiple of "
            f"{layers.NORM_GROUPS} for hidden_channels")
  if architecture == "ibq":
    _validate_ibq(cfg)
  flex_layer_fields = ("encoder_layer_configs", "decoder_layer_configs")
  for field in flex_layer_fields if architecture == "flex" else ():
    counts = _int_list(cfg, field, 0)
    if len(counts) != len(multipliers) + 1:
      _fail(field, f"needs len(channel_multipliers) + 1 = {len(multipliers) + 1} entries "
            f"(one ResBlock count per level, then the number of mid blocks), got {len(counts)}")
  if architecture == "flex" and cfg.mid_block_attn and min(cfg.encoder_layer_configs[-1],
                                cfg.decoder_layer_configs[-1]) < 2:
    _fail("mid_block_attn", "attention sits between consecutive mid ResBlocks, so it needs "
          ">= 2 mid blocks (last entry of the layer configs); add blocks or set it False")

  f = cfg.downsample_factor
  expected_f = 2 ** (len(multipliers) - 1)
  if not isinstance(f, int) or f < 1 or f & (f - 1):
    _fail("downsample_factor", f"must be a power of two, got {f!r}")
  if f != expected_f:
    _fail("downsample_factor", f"is {f} but channel_multipliers {tuple(multipliers)} give "
          f"f = 2 ** (len - 1) = {expected_f}; change one of them "
          f"(f = 2 ** n needs n + 1 multipliers)")

  for field in ("latent_dim", "num_groups"):
    if not isinstance(cfg[field], int) or cfg[field] <= 0:
      _fail(field, f"must be a positive integer, got {cfg[field]!r}")
  if cfg.latent_dim % cfg.num_groups:
    _fail("num_groups", f"latent_dim D = {cfg.latent_dim} must be divisible by num_groups "
          f"G = {cfg.num_groups} (each group has d = D / G channels)")
  if not isinstance(cfg.codebook_size, int) or cfg.codebook_size < 2:
    _fail("codebook_size", f"must be an integer >= 2, got {cfg.codebook_size!r}")

  for field in ("use_adaptive_norm", "use_depth_to_space", "mid_block_attn"):
    if not isinstance(cfg[field], bool):
      _fail(field, f"must be True or False, got {cfg[field]!r}")
  if not isinstance(cfg.dropout, (int, float)) or not 0.0 <= cfg.dropout < 1.0:
    _fail("dropout", f"must be a rate in [0, 1), got {cfg.dropout!r}")
  if cfg.dtype not in COMPUTE_DTYPES:
    _fail("dtype", f"must be one of {sorted(COMPUTE_DTYPES)}, got {cfg.dtype!r}")
  if not isinstance(cfg.quantizer, ml_collections.ConfigDict) or "name" not in cfg.quantizer:
    _fail("quantizer", "must be a ConfigDict with a `name` (gsq, vq, ibq, fsq, lfq) "
          "and that quantizer's options")


def _validate_ibq(cfg: ml_collections.ConfigDict) -> None:
  ibq = cfg.get("ibq")
  if not isinstance(ibq, ml_collections.ConfigDict):
    _fail("ibq", "architecture 'ibq' needs the `ibq` block; see default_ibq_config()")
  for field in ("num_res_blocks", "resolution", "z_channels"):
    if not isinstance(ibq.get(field), int) or ibq.get(field) < 1:
      _fail(f"ibq.{field}", f"must be a positive integer, got {ibq.get(field)!r}")
  res = ibq.get("attn_resolutions")
  if not isinstance(res, (list, tuple)) or not all(isinstance(r, int) for r in res):
    _fail("ibq.attn_resolutions", f"must be a list of integers (may be empty), got {res!r}")


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


class Tokenizer(nnx.Module):
  """Encoder -> quantizer -> decoder; images are NHWC in [-1, 1]."""

  def __init__(self, encoder: Encoder, quantizer: nnx.Module, decoder: Decoder, *,
               downsample_factor: int):
    self.encoder = encoder
    self.quantizer = quantizer
    self.decoder = decoder
    self.downsample_factor = downsample_factor

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> "Tokenizer":
    """Builds the tokenizer described by a "model" config block (validated first)."""
    validate_model_config(cfg)
    dtype = COMPUTE_DTYPES[cfg.dtype]
    quantizer = make_quantizer(cfg.quantizer, latent_dim=cfg.latent_dim,
                               num_groups=cfg.num_groups, codebook_size=cfg.codebook_size,
                               rngs=rngs)
    if cfg.get("architecture", "flex") == "ibq":
      shared = dict(hidden_channels=cfg.hidden_channels,
                    channel_multipliers=tuple(cfg.channel_multipliers),
                    num_res_blocks=cfg.ibq.num_res_blocks,
                    attn_resolutions=tuple(cfg.ibq.attn_resolutions),
                    resolution=cfg.ibq.resolution, z_channels=cfg.ibq.z_channels,
                    latent_dim=cfg.latent_dim, dropout=float(cfg.dropout), dtype=dtype, rngs=rngs)
      return cls(IBQEncoder(**shared), quantizer, IBQDecoder(**shared),
                 downsample_factor=cfg.downsample_factor)
    shared = dict(hidden_channels=cfg.hidden_channels,
                  channel_multipliers=tuple(cfg.channel_multipliers),
                  latent_dim=cfg.latent_dim, mid_block_attn=cfg.mid_block_attn,
                  dropout=float(cfg.dropout), dtype=dtype, rngs=rngs)
    encoder = Encoder(layer_configs=tuple(cfg.encoder_layer_configs), **shared)
    decoder = Decoder(layer_configs=tuple(cfg.decoder_layer_configs),
                      use_adaptive_norm=cfg.use_adaptive_norm,
                      use_depth_to_space=cfg.use_depth_to_space, **shared)
    return cls(encoder, quantizer, decoder, downsample_factor=cfg.downsample_factor)

  def encode(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) -> continuous latent z (B, H/f, W/f, D), float32."""
    f = self.downsample_factor
    if images.ndim != 4 or images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"Tokenizer.encode: `images` must be (B, H, W, 3) with H and W "
                       f"divisible by f = {f}, got shape {images.shape}")
    return self.encoder(images)

  def quantize(self, z: jax.Array, rng: jax.Array | None = None) -> QuantizerOutput:
    """z -> QuantizerOutput(quantized, indices (B, h, w, G), loss, aux)."""
    return self.quantizer(z, rng=rng)

  def decode(self, zq: jax.Array) -> jax.Array:
    """Quantized latent (B, h, w, D) -> reconstruction (B, f*h, f*w, 3), float32."""
    return self.decoder(zq)

  def __call__(self, images: jax.Array,
               rng: jax.Array | None = None) -> tuple[jax.Array, QuantizerOutput]:
    """Full pass; returns (reconstruction, QuantizerOutput).

    `rng` goes to the quantizer (random tie-breaking). With dropout > 0 the
    ResBlocks draw from the rngs given at construction; use `model.eval()` or
    `nnx.view(model, deterministic=True)` for evaluation.
    """
    quantized = self.quantize(self.encode(images), rng=rng)
    return self.decode(quantized.quantized), quantized

  def encode_to_indices(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) -> int32 code indices (B, H/f, W/f, G)."""
    return self.quantize(self.encode(images)).indices

  def decode_from_indices(self, indices: jax.Array) -> jax.Array:
    """(B, h, w, G) indices -> reconstruction (B, f*h, f*w, 3)."""
    return self.decode(self.quantizer.decode_indices(indices))


def evaluation_view(tokenizer: nnx.Module) -> nnx.Module:
  """The tokenizer as evaluated: no dropout, deterministic first-index code ties.

  A paper recipe trains with random tie-breaks (as flex_gen), which need a
  key; evaluation, the trainer's image grids, gsq-plan's forward and
  `load_tokenizer` keep the run's distance dtype but always pick the lowest
  tied index, so two evaluations of the same weights give the same codes and
  no key is needed. Shares the weights.
  """
  return nnx.view(tokenizer, deterministic=True, tie_break="first", raise_if_not_found=False)


def build_tokenizer(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> Tokenizer:
  """Same as `Tokenizer.from_config`."""
  return Tokenizer.from_config(cfg, rngs=rngs)


# ---------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------


def _num_params(module: nnx.Module) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))


def parameter_counts(tokenizer: Tokenizer) -> dict[str, int]:
  """Trainable parameters per component and in total (works on abstract modules too)."""
  counts = {name: _num_params(getattr(tokenizer, name))
            for name in ("encoder", "decoder", "quantizer")}
  counts["total"] = sum(counts.values())
  return counts


def parameter_counts_from_config(cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """`parameter_counts` of the configured model, without allocating it (nnx.eval_shape)."""
  abstract = nnx.eval_shape(lambda: Tokenizer.from_config(cfg, rngs=nnx.Rngs(0)))
  return parameter_counts(abstract)
