r"""IBQ-GAN at V = 2^18 (QUANTIZERS.md §2, SEED-Voken imagenet_ibqgan_262144.yaml).

The IBQ recipe in IBQ's own network (model.architecture = "ibq",
gsq_jax/models/ibq_network.py; Open-MAGVIT2/taming style): f = 16 (ch 128,
ch_mult [1, 1, 2, 2, 4]), 4 ResBlocks per encoder level (5 per decoder
level), attention after each block of the 16² level and in the mid, GroupNorm
eps 1e-6, z_channels = D = 256 around 1x1 quant_conv / post_quant_conv,
V = 262144, IBQ quantizer (N(0, 1) codebook, index back-propagation, beta
0.25, entropy loss 0.05 at T = 0.01): 173,896,579 parameters (encoder
46,818,048, decoder 59,969,667, codebook 67,108,864), as the released
checkpoint; loss L1 + 1.0 VGG-LPIPS (published [-1, 1] convention) + 1.0 L_q
+ 0.1 non-saturating G loss; PatchGAN (ndf 64, 3 layers) with hinge loss and
LeCam 0.05 (decay 0.999) on [-1, 1] images; each iteration runs the D step
first, then the G step, on one batch; Adam lr 1e-4 betas (0.5, 0.9), no weight
decay, no clipping, lr x0.1 after epochs 250 and 300; EMA 0.999; batch 256,
330 epochs (1.65M steps); train crop: resize shorter side 256 + random crop.
Precision: IBQ used fp16 AMP; bf16 here. `--config.model.architecture=flex`
puts the same quantizer into the GSQ paper's network instead.

Arg keys as configs/gsq.py (D, V, f, seed; defaults D=256,V=262144,f=16).
Launch (one 8-GPU node):

  srun --ntasks-per-node=8 gsq-train --config configs/ibq_262144.py \
      --workdir runs/ibq_262144 --config.data.data_dir=$SCRATCH/tensorflow_datasets

Expected (QUANTIZERS.md §3.1, IBQ tokenizer 2^18 at 256²): rFID 1.00,
LPIPS 0.2030, codebook usage 84%.
"""

from __future__ import annotations

import pathlib
import sys

import ml_collections

_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import common
from configs import gsq

DEFAULTS = dict(gsq.ARG_DEFAULTS, D=256, G=1, V=262144, f=16, quantizer="ibq")
STEPS_PER_EPOCH = 5005  # 1,281,167 images / 256


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  parsed = common.parse_arg(arg, **DEFAULTS)
  for key in ("res", "disc", "tiny", "quantizer", "G", "arch"):
    if parsed[key] != DEFAULTS[key]:
      raise ValueError(f"config arg {key}: configs/ibq_262144.py pins the IBQ recipe "
                       "(IBQ quantizer, G = 1, 256², PatchGAN); use configs/gsq.py for "
                       "other settings")
  structure = ",".join(f"{k}={parsed[k]}" for k in ("D", "V", "f", "seed"))
  config = gsq.get_config(structure + ",quantizer=ibq,G=1,res=256,disc=patchgan,arch=ibq")

  t = config.train
  t.global_batch_size = 256
  t.total_steps = 330 * STEPS_PER_EPOCH
  t.two_batches_per_step = False
  t.gd_order = "d_then_g"
  config.data.crop = "random"

  o = config.optim
  o.lr = 1e-4
  for name in ("generator", "discriminator"):
    o[name].b1, o[name].b2, o[name].weight_decay = 0.5, 0.9, 0.0
  o.grad_clip_norm = 0.0
  o.decay = "piecewise"
  o.piecewise_boundaries = (250 * STEPS_PER_EPOCH, 300 * STEPS_PER_EPOCH)
  o.piecewise_factor = 0.1
  o.ema_decay = 0.999

  loss = config.loss
  loss.reconstruction = "l1"
  loss.perceptual_weight = 1.0
  loss.perceptual_input_range = "minus_one_one"
  loss.adversarial_weight = 0.1

  d = config.disc
  d.gen_loss, d.disc_loss = "non_saturate", "hinge"
  d.input_range = "minus_one_one"
  d.patchgan_filters, d.patchgan_layers, d.patchgan_output_scale = 64, 3, 1.0
  d.lecam_weight, d.lecam_decay = 0.05, 0.999
  config.eval.crop = "center"
  return config
