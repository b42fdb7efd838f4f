"""Evaluation of a trained tokenizer: `gsq-eval` and its metrics.

Read in this order:

* `cli.py`: `gsq-eval` / `python -m gsq_jax.evaluation.cli`, restores a run and evaluates it.
* `eval_config.py`: the `config.eval` block and its checks.
* `evaluator.py`: the jitted, sharded evaluation pass over a data source.
* `compare.py`: several runs (`gsq-eval --workdir A --workdir B`) on the same
  images, one side-by-side table.

The metrics it computes:

* `image_metrics.py`: PSNR (per-image mean and PSNR of the global MSE), SSIM and
  MSE as masked clu-metric sums for jitted, sharded evaluation steps.
* `frechet.py`: float64 Fréchet distance (eigh route), KID, streaming feature
  statistics, and FD-VGG16 (an in-project stand-in, not rFID).
* `inception.py`: the pytorch-fid FID Inception-v3 in Flax NNX, its preprocessing
  and its hash-checked weight loader; `rfid_status` says whether rFID can be
  computed and, if not, why and how to fix it.
* `code_frequency.py`: the rank-frequency curve of the code histogram (code_frequency.png).
"""
