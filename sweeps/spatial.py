"""GSQ paper Fig. 1b: spatial down-sampling f x latent dimension D at d = 16.

Paper scale (GSQ.md §5.3): f in {8, 16, 32} x D in {16, 32, 64, 128} with the
group width fixed at d = 16 (G = D / 16), V = 256k, 256², 50k steps.

  gsq-sweep sweeps/spatial.py --backend slurm --site sweeps/sites/jsc_booster.yaml
  gsq-sweep sweeps/spatial.py --tiny
"""

NAME = "spatial"
CONFIG = "configs/gsq_gan_256.py"
TINY_CONFIG = "configs/gsq.py:tiny"
TINY_OVERRIDES = {"train.total_steps": 100}

GROUP_WIDTH = 16
FACTORS = (8, 16, 32)
DIMS = (16, 32, 64, 128)
V = 2**18
# Tiny: d = 4, two factors and two dims, at CPU size.
TINY_GROUP_WIDTH = 4
TINY_FACTORS = (4, 8)
TINY_DIMS = (4, 8)
TINY_V = 256


def sweep(add, tiny=False):
  width = TINY_GROUP_WIDTH if tiny else GROUP_WIDTH
  for f in TINY_FACTORS if tiny else FACTORS:
    for D in TINY_DIMS if tiny else DIMS:
      add(f=f, D=D, G=D // width, V=TINY_V if tiny else V)
