"""Quickstart demo: a small D x G grid on the built-in `demo` photos, on a CPU.

Four tiny GSQ tokenizers (configs/gsq.py:tiny: hidden 32, 32x32 crops of the
scikit-image photos, MSE + quantizer loss, no discriminator), f = 4 x
D in {8, 16} x G in {1, 4}, V = 256, 100 steps each, two runs at a time
(the time it takes is in README's Quickstart and benchmarks/RESULTS.md):

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
    # Labelled grids in images/ and TensorBoard at steps 50 and 100 (eval_grid.png at the end).
    "train.image_every_steps": 50,
}
TINY_OVERRIDES = {
    "train.total_steps": 4,
    "optim.ema_decay": 0.5,
    "train.image_every_steps": 0,
    "eval.num_images": 8,
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
