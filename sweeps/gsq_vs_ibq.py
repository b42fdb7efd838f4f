"""GSQ vs IBQ codebook usage at matched bits per image (QUANTIZERS.md §7, issue 17).

A tokenizer's bits per image are (res / f)² tokens × G lookups × log2 V. IBQ
at V = 2^18 and f = 16 spends 16·16·18 = 4,608 bits on a 256² image; the GSQ
points spend 1×, 2× and 4× that, with the same encoder/decoder, recipe and
steps (only the quantizer block differs):

  bits   point                          why
  1×     IBQ  f16 D256 V2^18            IBQ's published setting (84 % usage)
  1×     GSQ  f16 D256 G1 V2^18         same latent width as IBQ
  1×     GSQ  f16 D16  G1 V2^18         the paper's F16-D16 (Table 13: 100 %)
  2×     GSQ  f16 D16  G2 V2^18         Table 13's 2×8 row
  4×     GSQ  f16 D16  G4 V2^18         Table 13's 4×4 row (62 % usage)

Every usage number is reported with its lookup count and the uniform-use
expectation 1 - exp(-lookups / V), with perplexity, effective bits
(log2 perplexity per lookup) and dead codes (unused for
train.dead_code_steps steps in training, `train_dead_codes`; never picked at
evaluation, `unused_codes`). analysis/gsq_vs_ibq_usage.ipynb reads the
collected table.

  gsq-sweep sweeps/gsq_vs_ibq.py --backend slurm --site sweeps/sites/jsc_booster.yaml
  gsq-sweep sweeps/gsq_vs_ibq.py --tiny --jobs 2   # CPU
  gsq-collect runs/gsq_vs_ibq_tiny                 # then run the notebook

Tiny form, scaled down consistently: f = 8 at 32² (16 tokens per image) and
V = 2^10, so IBQ spends 16·10 = 160 bits per image and the GSQ points 160,
160, 320, 640; widths D = 32 (IBQ and the same-width GSQ) and 8 (GSQ, groups
of 8, 4 and 2). The evaluation set of 1024 demo crops gives T = 16,384 tokens,
T / V = 16 (the paper's 50k images give T / V = 49 at 2^18), so uniform use
would cover 1 - exp(-16) = 100 % and usage below that is real concentration.
LPIPS, KID and FD-VGG16 are skipped (usage is what is compared).
"""

NAME = "gsq_vs_ibq"
CONFIG = "configs/gsq_gan_256.py"
TINY_CONFIG = "configs/gsq.py:tiny"
TINY_OVERRIDES = {
    "train.global_batch_size": 4,
    "train.num_image_samples": 4,
    "train.image_every_steps": 0,
    "eval.num_images": 1024,
    "eval.batch_size": 16,
    "eval.lpips": False,
    "eval.kid": False,
    "eval.fd_vgg16": False,
}


def sweep(add, tiny=False):
  f, V = (8, 2**10) if tiny else (16, 2**18)
  wide, narrow = (32, 8) if tiny else (256, 16)
  add(quantizer="ibq", f=f, D=wide, G=1, V=V)
  add(quantizer="gsq", f=f, D=wide, G=1, V=V)
  for G in (1, 2, 4):
    add(quantizer="gsq", f=f, D=narrow, G=G, V=V)
