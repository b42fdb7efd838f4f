"""GSQ paper Table 1: codebook initialisation x lookup normalisation.

Paper scale (GSQ.md §5.5): GSQ-VAE-F8, D = 8, V = 8192, G = 1, 128², 100k
steps (configs/gsq_vae_128.py), four of the five rows:
  init  uniform U(±1/V) (the VQ baseline) | spherical (l2 of a Gaussian)
  norm  none | l2 (of latents and codebook before the lookup)
The fifth row (spherical + l1) has no l1 lookup here. The paper reads 3.38 %
usage for uniform + none and 100 % for the three others.

  gsq-sweep sweeps/init_norm.py --backend slurm --site sweeps/sites/jsc_booster.yaml
  gsq-sweep sweeps/init_norm.py --tiny --jobs 2 && gsq-collect runs/init_norm_tiny

Tiny form: the tiny recipe (configs/gsq.py:tiny, lr 1e-4) at the paper's
D = 8, V = 1024, f = 4 on 16² crops (16 tokens per image, 128 lookups per
step), 2400 steps (on the held-out ImageNet split spherical + l2 uses 82 %). The
trained form of the same four rows on held-out ImageNet images is
`benchmarks/tiny_recipe.py --study table1 --study long_d8` (benchmarks/RESULTS.md).
The collected table carries `init` and `norm` columns (gsq-collect reads them
from config.json); analysis/gsq_vs_ibq_usage.ipynb sets them beside the paper.
"""

NAME = "init_norm"
CONFIG = "configs/gsq_vae_128.py"
TINY_CONFIG = "configs/gsq.py:tiny,res=16"
# 2400 steps: usage still rises with steps at lr 1e-4 (RESULTS.md); 640 eval
# crops x 16 tokens = 10,240 lookups per group, T / V = 10 (uniform: 99.995 %).
TINY_OVERRIDES = {"train.total_steps": 2400, "train.image_every_steps": 0,
                  "eval.num_images": 640, "eval.batch_size": 32, "eval.lpips": False,
                  "eval.kid": False, "eval.fd_vgg16": False}

ROWS = (("uniform", False), ("uniform", True), ("spherical", False), ("spherical", True))


def sweep(add, tiny=False):
  f, D, V = (4, 8, 1024) if tiny else (8, 8, 8192)
  for init, l2 in ROWS:
    add(name=f"f{f}_D{D}_V{V}_{init}_{'l2' if l2 else 'none'}", f=f, D=D, G=1, V=V,
        **{"model.quantizer.init": init, "model.quantizer.l2_normalize": l2})
