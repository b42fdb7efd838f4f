r"""GSQ-VAE ablation recipe at 128² (GSQ.md §3.6 (A), paper Table 16).

128², batch 256, 100k steps (20 epochs); AdamW lr 1e-4 constant, betas
(0.9, 0.99), wd 0.05, eps 1e-8; clip 2, bf16, EMA 0.999; GSQ with D = 8,
V = 8192, G = 1, codebook l2(N(0, 1)), l2 lookup; loss MSE + 1.0 L_q
(commitment 0.25) + 1.0 VGG-LPIPS; no discriminator. Architecture: hidden 128,
cm [1, 2, 2, 4], two ResBlocks everywhere, AGN on, nearest-neighbour
upsampling (depth-to-space is the GAN's choice, GSQ.md §2.7). Arg keys as in
configs/gsq.py (D, G, V, f, quantizer, seed; defaults D=8,G=1,V=8192,f=8).
Training lookups as the reference's: random tie-breaks among exact distance
ties, bf16 distances under bf16 compute (`gsq.tokenize_like_reference`);
evaluation uses first-index ties and records it in eval.json.

Launch (one 4-GPU node; about half a day on 8 A100s):

  srun --ntasks-per-node=4 gsq-train --config configs/gsq_vae_128.py \
      --workdir runs/vae128_D8_V8k --config.data.data_dir=$SCRATCH/tensorflow_datasets

Expected (paper Table 1, l2(N) init + l2 lookup row, ImageNet val 128²):
rFID 5.375, LPIPS 0.11, PSNR 23.59, SSIM 0.71, usage 100%, perplexity 8062.
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

DEFAULTS = dict(gsq.ARG_DEFAULTS, D=8, G=1, V=8192, f=8)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  parsed = common.parse_arg(arg, **DEFAULTS)
  for key in ("res", "disc", "tiny"):
    if parsed[key] != DEFAULTS[key]:
      raise ValueError(f"config arg {key}: configs/gsq_vae_128.py pins the VAE recipe "
                       "(128², no discriminator); use configs/gsq.py for other settings")
  structure = ",".join(f"{k}={parsed[k]}" for k in ("D", "G", "V", "f", "quantizer", "seed"))
  config = gsq.get_config(structure + ",res=128,disc=none")
  config.train.total_steps = 100_000
  config.train.global_batch_size = 256
  config.train.two_batches_per_step = False
  config.optim.lr = 1e-4
  config.optim.generator.b1, config.optim.generator.b2 = 0.9, 0.99
  config.optim.generator.weight_decay = 0.05
  config.optim.grad_clip_norm = 2.0
  config.optim.ema_decay = 0.999
  config.loss.perceptual_weight = 1.0
  config.loss.adversarial_weight = 0.0
  config.model.use_adaptive_norm = True
  config.model.use_depth_to_space = False
  config.eval.crop = "crop_pct"
  gsq.tokenize_like_reference(config)  # random ties, bf16 distances
  return config
