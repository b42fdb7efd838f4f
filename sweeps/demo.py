"""Quickstart demo: a small D x G grid on the built-in `demo` photos, on a CPU.

Four tiny GSQ tokenizers (configs/gsq.py:tiny: hidden 32, 32x32 crops of the
scikit-image photos, MSE + quantizer loss, no discriminator), f = 4 x
D in {8, 16} x G in {1, 4}, V = 256, 100 steps each, two runs at a time
(the time it takes is in README's Quickstart and benchmarks/RESULTS.md).
The decoder and codebook learn at lr 3e-4, the encoder at 0.05x that: at
one lr, Adam drifts every latent towards one direction in the first ~50
steps, and one group of d = 8 or 16 leaves most of the 256 codes unused
(10-23 % instead of ~100 %, recovering only over thousands of steps); with the slow
encoder the one-group rows stay near the uniform expectation and the
decoder still learns fast (optim.encoder_lr_factor; benchmarks/RESULTS.md,
"One group in the 100-step demo"). Usage is read on 128 evaluation crops,
8,192 lookups per group.

  gsq-sweep sweeps/demo.py --jobs 2 && gsq-collect runs/demo --plot psnr

The table has PSNR, SSIM, LPIPS (AlexNet/VGG) and codebook usage per run
(rFID only with the Inception weights file); the plot shows PSNR against D,
one line per G. Each run also writes eval_grid.png (originals over
reconstructions). `--tiny` is the test-sized variant (2 runs, 4 steps).
"""

NAME = "demo"
CONFIG = "configs/gsq.py:tiny"
TINY_CONFIG = "configs/gsq.py:tiny"
OVERRIDES = {
    "train.total_steps": 100,
    # The EMA weights are evaluated; a 100-step run needs a short EMA horizon.
    "optim.ema_decay": 0.9,
    # Keeps one group's latents spread out over the codebook in 100 steps (above).
    "optim.lr": 3e-4,
    "optim.encoder_lr_factor": 0.05,
    # 128 crops x 64 tokens = 8,192 lookups per group: uniform use covers all
    # of V = 256 (16 crops, the tiny default, are too few to read usage on).
    "eval.num_images": 128,
    "eval.batch_size": 32,  # 4 batches: 6 s less than the tiny default's 16
    # Labelled grids in images/ and TensorBoard at steps 50 and 100 (eval_grid.png at the end).
    "train.image_every_steps": 50,
}
TINY_OVERRIDES = {
    "train.total_steps": 4,
    "optim.ema_decay": 0.5,
    "optim.encoder_lr_factor": 0.05,
    "train.image_every_steps": 0,
    "eval.num_images": 8,
    "eval.batch_size": 8,  # one batch, not 8 images padded to 32
    "eval.kid": False,  # VGG16 features for KID / FD: compile time the tests do not read
    "eval.fd_vgg16": False,
}

V = 256


def sweep(add, tiny=False):
  if tiny:  # two runs that still differ in f, D and G
    add(f=4, D=8, G=1, V=V)
    add(f=8, D=16, G=4, V=V)
    return
  for D in (8, 16):  # f = 4: 8x8 latents of the 32x32 crops
    for G in (1, 4):
      add(f=4, D=D, G=G, V=V)
