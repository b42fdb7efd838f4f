"""GSQ paper Fig. 4: latent dimension D x codebook size V at f = 8, G = 1.

Paper scale (GSQ.md §5.3): F8, plain l2 GSQ (G = 1), 256², 50k steps with the
GAN recipe, D in {8, 16, 32, 64} x V in {8k, 16k, 64k, 256k, 512k}; 20 runs,
compared against rFID = 411.63 / (log2 V)^2.8375 + 0.1601 D^0.1956.

  gsq-sweep sweeps/dim_vocab.py --backend slurm --site sweeps/sites/jsc_booster.yaml
  gsq-sweep sweeps/dim_vocab.py --tiny            # 2 x 3 tiny runs on a CPU
  gsq-collect runs/dim_vocab
"""

NAME = "dim_vocab"
CONFIG = "configs/gsq_gan_256.py"
TINY_CONFIG = "configs/gsq.py:tiny"
TINY_OVERRIDES = {"train.total_steps": 100}

DIMS = (8, 16, 32, 64)
VOCABS = (8192, 16384, 65536, 262144, 524288)
# Tiny: the same axes at CPU size (V scaled down, still powers of two).
TINY_DIMS = (8, 16)
TINY_VOCABS = (64, 256, 1024)


def sweep(add, tiny=False):
  for D in TINY_DIMS if tiny else DIMS:
    for V in TINY_VOCABS if tiny else VOCABS:
      add(f=8, D=D, G=1, V=V)
