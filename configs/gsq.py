r"""Base GSQ tokenizer config; the arg string picks the structure.

Tiny CPU run (2-core laptop: about 2 minutes for 300 steps at 32x32):

  python -m gsq_jax.training.train --config configs/gsq.py:D=16,G=4,V=4096,f=8,tiny \
      --workdir runs/gsq_tiny

Paper scaling run (GSQ.md §3.6 (C): 256², batch 512, 50k steps, AdamW 2e-4
(0.9, 0.99) wd 0.05, clip 2, EMA 0.999, bf16, MSE + LPIPS 1 + DINO
discriminator 0.1 (non-saturating G / hinge D), two batches per iteration),
e.g. F16-D64-G4-V256k on one 4-GPU node:

  srun --ntasks-per-node=4 gsq-train --config configs/gsq.py:D=64,G=4,V=256k,f=16 \
      --workdir runs/f16_D64_G4_V256k \
      --config.disc.dino_weights=$WEIGHTS/dinov2_vits14_reg4_pretrain.pth \
      --config.data.data_dir=$SCRATCH/tensorflow_datasets

Expected (paper Fig. 1b, rFID at 256² with the EMA weights): F16 D64 G4 0.45,
F8 D16 G1 0.39. Leaves override from the command line, e.g.
`--config.optim.lr=1e-4` (both networks) or `--config.train.total_steps=1000`.

Arg keys (comma separated, `key=value`, a bare key means True): ARG_HELP
below; `gsq-train --help` prints them with their defaults.

The paper symbols D, G, V, f are config.model.{latent_dim, num_groups,
codebook_size, downsample_factor}; each run records them in config.json and
in its first metrics.jsonl line.
"""

from __future__ import annotations

import pathlib
import sys

import ml_collections

_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # `configs` is importable from the checkout root
  sys.path.insert(0, _ROOT)
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import common
from gsq_jax.data import input_pipeline
from gsq_jax.training import optim
from gsq_jax import sharding
from gsq_jax.evaluation import evaluator
from gsq_jax.models import default_model_config
from gsq_jax.quantizers import default_quantizer_config

# Channel multipliers per down-sampling factor: the paper's F8 [1,2,2,4] and
# the F16 / F32 layouts derived from the released checkpoints (GSQ.md §2.7).
MULTIPLIERS = {
    4: (1, 2, 4),
    8: (1, 2, 2, 4),
    16: (1, 1, 2, 2, 4),
    32: (1, 1, 2, 2, 4, 4),
}

ARG_DEFAULTS = dict(D=16, G=1, V=8192, f=8, quantizer="gsq", res=0, disc="", seed=0,
                    tiny=False, arch="flex")
# One line per arg key, printed by `gsq-train --help`.
ARG_HELP = {
    "D": "latent dimension per latent pixel (model.latent_dim)",
    "G": "groups the D channels are split into (model.num_groups); d = D / G per group",
    "V": "codebook size (model.codebook_size); 64k = 65536, 256k = 2^18",
    "f": "spatial down-sampling factor (model.downsample_factor): 4, 8, 16 or 32",
    "quantizer": "gsq | vq | ibq | fsq | lfq",
    "arch": "network: flex (the GSQ paper's) | ibq (SEED-Voken's IBQ network, model.ibq: 4 "
            "ResBlocks per level, attention at 16 of 256, z = D; tiny: 1 block, no level "
            "attention); any quantizer goes into either network",
    "res": "training image size in pixels (0 = 256; tiny: max(32, 2 f))",
    "disc": "discriminator: none | patchgan | dino (empty = dino; tiny: none)",
    "seed": "train.seed (initialisation, data order, random tie-breaks)",
    "tiny": "CPU-sized run: hidden 32, one ResBlock per level, the built-in demo photos, "
            "float32, batch 8, 300 steps, lr 1e-4 (the paper's; 1e-3 collapses the codebook), "
            "EMA 0.99, no LPIPS, no discriminator",
}


def multipliers_for(f: int) -> tuple[int, ...]:
  if f not in MULTIPLIERS:
    raise ValueError(f"config arg f={f}: supported down-sampling factors are "
                     f"{sorted(MULTIPLIERS)} (f = 2 ** (len(channel_multipliers) - 1)); for "
                     "another layout set --config.model.channel_multipliers and "
                     "--config.model.downsample_factor")
  return MULTIPLIERS[f]


def model_config(arg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.model for the D, G, V, f, quantizer of `arg` (paper layout or tiny)."""
  m = default_model_config()
  m.channel_multipliers = multipliers_for(arg.f)
  levels = len(m.channel_multipliers) + 1
  m.encoder_layer_configs = (2,) * levels
  m.decoder_layer_configs = (2,) * levels
  if arg.tiny:
    m.hidden_channels = 32
    m.encoder_layer_configs = (1,) * levels
    m.decoder_layer_configs = (1,) * levels
  m.latent_dim = arg.D
  m.num_groups = arg.G
  m.downsample_factor = arg.f
  if arg.arch not in ("flex", "ibq"):
    raise ValueError(f"config arg arch={arg.arch!r}: use flex or ibq")
  m.architecture = arg.arch
  if arg.arch == "ibq":
    m.use_adaptive_norm = m.use_depth_to_space = False
    m.ibq.z_channels = arg.D  # IBQ's released models: z_channels = embed_dim
    if arg.tiny:
      m.ibq.num_res_blocks, m.ibq.attn_resolutions = 1, ()
  m.quantizer = default_quantizer_config(arg.quantizer)
  if arg.quantizer == "lfq":
    m.codebook_size = 2 ** arg.D
  elif arg.quantizer == "fsq":
    levels = m.quantizer.levels
    m.codebook_size = 1
    for level in levels:
      m.codebook_size *= level
  else:
    m.codebook_size = arg.V
  return m


def tokenize_like_reference(config: ml_collections.ConfigDict) -> None:
  """Training lookups as flex_gen trains (issue 15, item 3).

  flex_gen breaks exact distance ties uniformly at random (`argmin_func`
  'random') and computes the distances under bf16 autocast; measured on the
  same weights, bf16 distances change 24-26 % of the indices and 24-32 % of
  the tokens are exact ties. So the quantizer draws ties at random and rounds
  its inner products to the compute dtype (bf16 in the recipes; a float32
  run keeps float32 distances). Evaluation still uses first-index ties
  (`nnx.view(..., tie_break="first")` in the evaluator) and records it.
  """
  quantizer = config.model.quantizer
  if quantizer.name != "gsq":
    return  # flex_gen's VQ/GVQ use torch.argmin; IBQ/FSQ/LFQ have no distance search
  quantizer.tie_break = "random"
  quantizer.distance_dtype = config.train.get_ref("compute_dtype")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The scaling recipe of GSQ.md §3.6 (C), or its CPU-sized `tiny` version."""
  arg = common.parse_arg(arg, **ARG_DEFAULTS)
  res = arg.res or (max(32, 2 * arg.f) if arg.tiny else 256)
  disc = arg.disc or ("none" if arg.tiny else "dino")

  config = ml_collections.ConfigDict()
  config.train = ml_collections.ConfigDict(dict(
      seed=arg.seed,
      total_steps=50_000,
      global_batch_size=512,
      image_size=res,
      log_every_steps=100,  # also the window of the logged codebook usage
      dead_code_steps=1000,  # a code unused for this many steps counts as dead
      checkpoint_every_steps=1000,
      keep_checkpoints=3,
      image_every_steps=2500,
      num_image_samples=8,
      eval_every_steps=0,  # 0 = only at the end
      final_eval=True,  # evaluate the EMA weights into eval.json before DONE
      two_batches_per_step=True,  # the discriminator step draws a fresh batch
      gd_order="g_then_d",
      compute_dtype="bfloat16",
      fast_cpu_convs=True,  # CPU only: Winograd 3x3 convs, piecewise weight gradients (cpu_conv.py)
      # Recompute activations in the backward pass instead of keeping them:
      # "none", "dino" (the frozen DINO backbone's blocks: the discriminator's
      # share of memory for ~one extra DINO forward) or "blocks" (also every
      # encoder/decoder ResBlock and attention block). Same function either way.
      remat="none",
      # GPU only: fraction of device memory JAX preallocates (None = JAX's 0.75);
      # gsq-plan recommends one from the compiled step's peak memory.
      gpu_memory_fraction=ml_collections.FieldReference(None, field_type=float),
      preemption_check_every_steps=10,  # multi-process only: agree on a signal
      inject_nan_at_step=-1,  # test hook: the generator loss turns NaN there
  ))

  config.model = model_config(arg)
  # One switch for mixed precision: the model computes in train.compute_dtype.
  config.model.dtype = config.train.get_ref("compute_dtype")

  config.data = input_pipeline.default_config()
  config.data.source = "tfds:imagenet2012"
  config.data.eval_source = "tfds:imagenet2012:validation"
  config.data.crop = "center"  # resize shorter side, center crop, no flip

  config.optim = optim.default_config()

  config.loss = ml_collections.ConfigDict(dict(
      reconstruction="mse",
      reconstruction_weight=1.0,  # lambda_rec: scales the quantizer loss too
      quantizer_weight=1.0,
      perceptual_weight=1.0,  # VGG-LPIPS; 0 disables it
      perceptual_input_range="zero_one",  # GSQ feeds LPIPS [0, 1] (GSQ.md §3.2)
      lpips_weights=ml_collections.FieldReference(None, field_type=str),
      adversarial_weight=0.1,
      discriminator_weight=1.0,
      adaptive_weight=False,
      adaptive_weight_max=1e3,
  ))

  config.disc = ml_collections.ConfigDict(dict(
      name=disc,
      gen_loss="non_saturate",
      disc_loss="hinge",
      input_range="zero_one",  # D sees 0.5 x + 0.5
      start_step=0,
      lecam_weight=0.0,
      lecam_decay=0.999,
      r1_weight=0.0,
      # DINO projected discriminator (GSQ.md §3.4).
      dino_weights=ml_collections.FieldReference(None, field_type=str),
      dino_require_vits14=True,  # False accepts any DINOv2 ViT file (tests)
      dino_resolution=518,
      dino_taps=(2, 5, 8, 11),
      diffaug=True,
      aug_policy="color,translation,cutout",
      # PatchGAN (taming NLayerDiscriminator; GSQ's NLD scales the output by 0.1).
      patchgan_filters=64,
      patchgan_layers=3,
      patchgan_output_scale=1.0,
  ))

  # Evaluation of the EMA weights (gsq_jax/evaluation/evaluator.py fields).
  config.eval = evaluator.default_eval_config()
  config.eval.num_images = 50_000
  config.eval.crop = "crop_pct"  # resize 292, center crop 256 (timm crop_pct 0.875)
  config.eval.batch_size = 64

  config.mesh = sharding.default_config()

  if arg.tiny:
    _shrink(config)
  return config


def _shrink(config: ml_collections.ConfigDict) -> None:
  """CPU-sized run: demo photos, float32, small batch, no LPIPS / discriminator."""
  t = config.train
  t.total_steps = 300
  t.global_batch_size = 8
  t.log_every_steps = 25
  t.dead_code_steps = 100  # a third of the run: unpicked by 100 steps x 8 images
  t.checkpoint_every_steps = 100
  t.image_every_steps = 100
  t.compute_dtype = "float32"  # bf16 convolutions are slow on CPUs
  # The paper's constant lr (GSQ.md §3.5: 1e-4 - 2e-4). 10x that (the earlier
  # tiny lr 1e-3) collapses every variant to a few dozen codes within ~50 steps
  # (issue 17; benchmarks/RESULTS.md "Tiny recipe", docs/reading_usage.md).
  config.optim.lr = 1e-4
  # The EMA weights are evaluated: a horizon of ~100 steps suits a 300-step run
  # (0.999 would leave them near the initialisation).
  config.optim.ema_decay = 0.99
  config.loss.perceptual_weight = 0.0
  config.data.source = "demo"
  config.data.eval_source = None
  config.data.num_threads = 2
  config.data.read_buffer = 16
  config.eval.num_images = 16
  config.eval.batch_size = 8
  config.eval.crop = "center"
