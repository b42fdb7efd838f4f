"""GSQ vs IBQ codebook usage at V = 2^18 (QUANTIZERS.md §7).

Both quantizers train with the same encoder/decoder, recipe and steps; only
the quantizer block differs. Points, all f = 16, V = 2^18:
  IBQ  D = 256 (IBQ's embedding width)
  GSQ  D = 256, G = 1     (same latent width as IBQ)
  GSQ  D = 16,  G = 1     (the paper's F16-D16 model)
Usage is reported on the fixed evaluation set with its token count and the
uniform-usage expectation 1 - exp(-T / V) (eval.json), so numbers from
different sample sizes are never compared blindly; the trainer's streaming
counter logs usage/perplexity over training (metrics.jsonl). The notebook
analysis/gsq_vs_ibq_usage.ipynb reads the collected table.

  gsq-sweep sweeps/gsq_vs_ibq.py --backend slurm --site sweeps/sites/jsc_booster.yaml
  gsq-sweep sweeps/gsq_vs_ibq.py --tiny       # V = 2^18 kept, tiny model, CPU
  gsq-collect runs/gsq_vs_ibq_tiny            # then run the notebook

Tiny form (CPU-sized; measured end to end in benchmarks/RESULTS.md): f = 8 at
32² (16 tokens per image: IBQ's 2^18-way softmax over every token dominates
both its training step and its evaluation, so few tokens keep it CPU-sized),
D = 32 / 8, batch 4, 200 steps, and a fixed evaluation set of 1024 demo crops
= 16,384 tokens, T = V / 16, where perfectly uniform usage would read only
1 - exp(-1/16) = 6.1% -- the point of reporting T next to usage. The
evaluation skips LPIPS, KID and FD-VGG16 (usage is what is compared, and they
would cost more than the training).
"""

NAME = "gsq_vs_ibq"
CONFIG = "configs/gsq_gan_256.py"
TINY_CONFIG = "configs/gsq.py:tiny"
TINY_OVERRIDES = {
    "train.total_steps": 200,
    "train.global_batch_size": 4,
    "train.num_image_samples": 4,
    "eval.num_images": 1024,
    "eval.batch_size": 16,
    "eval.lpips": False,
    "eval.kid": False,
    "eval.fd_vgg16": False,
}

V = 2**18


def sweep(add, tiny=False):
  f = 8 if tiny else 16
  wide = 32 if tiny else 256
  add(quantizer="ibq", f=f, D=wide, G=1, V=V)
  add(quantizer="gsq", f=f, D=wide, G=1, V=V)
  add(quantizer="gsq", f=f, D=8 if tiny else 16, G=1, V=V)
