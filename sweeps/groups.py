"""GSQ paper Table 13: splitting D into G groups (d = D / G) at fixed D and V.

Paper scale (GSQ.md §5.1), 256², 50k steps, GAN recipe:
  F16-D16 V=256k, G in {1, 2, 4, 8, 16}
  F32-D32 V=256k, G in {1, 2, 4, 8, 16, 32}
  F8-D64  V=8k,   G in {1, 2, 4, 16}          (the rows the paper reports)

  gsq-sweep sweeps/groups.py --backend slurm --site sweeps/sites/jsc_booster.yaml
  gsq-sweep sweeps/groups.py --tiny

Tiny form: the tiny recipe (configs/gsq.py:tiny, lr 1e-4, 2400 steps) at
D = 16, V = 1024, f = 4 on 16² crops, G in {1, 2, 4, 8}: the paper's F16-D16
family at CPU size. The
trained form on held-out ImageNet images is `benchmarks/tiny_recipe.py --study
groups` (benchmarks/RESULTS.md); analysis/group_scaling.ipynb sets the table
beside Table 13.
"""

NAME = "groups"
CONFIG = "configs/gsq_gan_256.py"
TINY_CONFIG = "configs/gsq.py:tiny,res=16"
# 2400 steps: usage still rises with steps at lr 1e-4 (RESULTS.md); 640 eval
# crops x 16 tokens = 10,240 lookups per group, T / V = 10 (uniform: 99.995 %).
TINY_OVERRIDES = {"train.total_steps": 2400, "train.image_every_steps": 0,
                  "eval.num_images": 640, "eval.batch_size": 32, "eval.lpips": False,
                  "eval.kid": False, "eval.fd_vgg16": False}

V256K = 2**18

# (f, D, V, groups)
FAMILIES = (
    (16, 16, V256K, (1, 2, 4, 8, 16)),
    (32, 32, V256K, (1, 2, 4, 8, 16, 32)),
    (8, 64, 8192, (1, 2, 4, 16)),
)
# Tiny: one family at fixed D = 16, at CPU size.
TINY_FAMILIES = (
    (4, 16, 1024, (1, 2, 4, 8)),
)


def sweep(add, tiny=False):
  for f, D, V, groups in TINY_FAMILIES if tiny else FAMILIES:
    for G in groups:
      add(f=f, D=D, G=G, V=V)
