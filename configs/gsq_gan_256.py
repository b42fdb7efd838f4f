r"""GSQ-GAN scaling runs at 256² with the DINO discriminator (the paper's recipe).

GSQ.md §3.6 (C), used for all of the paper's scaling tables: 256², batch 512,
50k steps (20 epochs), AdamW lr 2e-4 (0.9, 0.99), wd 0.05, eps 1e-8, constant
lr, clip 2.0, EMA 0.999, bf16 with fp32 master weights; loss MSE + 1.0 L_q
+ 1.0 VGG-LPIPS (on [0, 1]) + 0.1 non-saturating G loss; DINOv2-S/14-reg4
projected discriminator, hinge D loss, DiffAugment color+translation+cutout,
a fresh batch for each D step; AGN + depth-to-space, two ResBlocks per level.
Tokenization as the reference trains (`gsq.tokenize_like_reference`): exact
distance ties broken uniformly at random (`quantizer.tie_break="random"`),
distances rounded to bf16 like flex_gen's autocast (`quantizer.distance_dtype`
follows `train.compute_dtype`); `gsq-eval` uses first-index ties and records
both in eval.json (`protocol.tie_break`, `protocol.distance_dtype`).
This is configs/gsq.py with `res=256,disc=dino` pinned; the arg string takes
the structural keys D, G, V, f, quantizer, seed.

Launch (one node with 4 GPUs; ~1 day on 32 A100s at the paper's batch):

  srun --ntasks-per-node=4 gsq-train \
      --config configs/gsq_gan_256.py:D=16,G=1,V=256k,f=8 --workdir runs/f8_D16_G1_V256k \
      --config.disc.dino_weights=$WEIGHTS/dinov2_vits14_reg4_pretrain.pth \
      --config.data.data_dir=$SCRATCH/tensorflow_datasets

Expected rFID (EMA, 50k ImageNet val at 256², GSQ.md §5.3): Fig. 1b with
G = D/16, V = 256k: F8 D16 0.39, D32 0.23, D64 0.14; F16 D16 1.63, D64 0.45;
F32 D128 0.83. Fig. 4 (F8, G = 1): D16 V8k 0.586, V64k 0.449, V256k 0.389.
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

PINNED = ("res", "disc", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  parsed = common.parse_arg(arg, **gsq.ARG_DEFAULTS)
  for key in PINNED:
    if parsed[key] != gsq.ARG_DEFAULTS[key]:
      raise ValueError(f"config arg {key}: configs/gsq_gan_256.py pins the paper recipe "
                       "(res=256, disc=dino, full size); use configs/gsq.py:"
                       f"{key}=... for other settings")
  config = gsq.get_config(",".join(filter(None, [arg, "res=256", "disc=dino"])))
  # The recipe, spelled out (these are also configs/gsq.py's defaults).
  config.train.global_batch_size = 512
  config.train.total_steps = 50_000
  config.train.two_batches_per_step = True
  config.train.compute_dtype = "bfloat16"
  config.optim.lr = 2e-4
  config.optim.grad_clip_norm = 2.0
  config.optim.ema_decay = 0.999
  config.loss.perceptual_weight = 1.0
  config.loss.adversarial_weight = 0.1
  config.model.use_adaptive_norm = True
  config.model.use_depth_to_space = True
  gsq.tokenize_like_reference(config)  # random ties, bf16 distances
  return config
