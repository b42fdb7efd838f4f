"""Evaluation metrics for tokenizer reconstructions.

* `image_metrics`: PSNR (per-image mean and PSNR of the global MSE), SSIM and
  MSE as masked clu-metric sums for jitted, sharded evaluation steps.
* `frechet`: float64 Fréchet distance (eigh route), KID, streaming feature
  statistics, and FD-VGG16 (an in-project stand-in, not rFID).
* `inception`: the pytorch-fid FID Inception-v3 in Flax NNX, its preprocessing
  and its hash-checked weight loader; `rfid_status` says whether rFID can be
  computed and, if not, why and how to fix it.
"""
