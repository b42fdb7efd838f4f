"""Evaluation throughput: 903 real 256x256 images through `run_evaluation` on CPU.

Runs the full evaluator (tokenizer, PSNR/SSIM/MSE, LPIPS AlexNet + VGG16,
FD-VGG16, KID, codebook usage, eval.json + grid) over
../shared/data/imagenet-samples-256 and prints JSON lines:

  {"phase": "warmup", ...}  one batch: compilation + first batch
  {"phase": "eval", ...}    the whole set: images/s, seconds, load averages
  {"phase": "tokenizer_only", ...}  the tokenizer forward alone, same batches

so the time can be split between the tokenizer and the metric networks.

Models (`--model`):
  small     the paper's F8 layout (channel multipliers 1-2-2-4, AGN, depth to
            space, D=8, V=8192) at width 32 with one ResBlock per level: the
            evaluation machinery at a size a laptop CPU runs in minutes.
  paper-f8  the paper's F8 ablation model itself (width 128, two ResBlocks
            everywhere, ~71M parameters, GSQ.md §2.7). Its forward pass alone
            is seconds per 256^2 image on CPU; use --num-images to measure a
            subset and extrapolate.

Usage:
  python benchmarks/eval_throughput.py                     # small, all 903 images
  python benchmarks/eval_throughput.py --model paper-f8 --num-images 64
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from gsq_jax.data import input_pipeline
from gsq_jax.evaluation import evaluator
from gsq_jax.models import Tokenizer, default_model_config, parameter_counts

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-samples-256"


def model_config(name: str) -> ml_collections.ConfigDict:
  cfg = default_model_config()  # F8: cm 1-2-2-4, AGN, depth to space
  cfg.latent_dim, cfg.num_groups, cfg.codebook_size = 8, 1, 8192
  if name == "small":
    cfg.hidden_channels = 32
    cfg.encoder_layer_configs = cfg.decoder_layer_configs = (1, 1, 1, 1, 1)
  elif name != "paper-f8":
    raise ValueError(f"--model must be 'small' or 'paper-f8', got {name!r}")
  return cfg


def _machine() -> dict:
  return {"cpus": os.cpu_count(), "platform": platform.platform(),
          "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
          "jax": jax.__version__}


def _cpu_seconds() -> float:
  """User + system CPU time of this process so far (less load-dependent than wall time)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return round(usage.ru_utime + usage.ru_stime, 1)


def _line(**row) -> None:
  print(json.dumps({**row, "cpu_seconds_so_far": _cpu_seconds()}), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="small", choices=("small", "paper-f8"))
  parser.add_argument("--data", default=str(DATA), help="folder of images")
  parser.add_argument("--num-images", type=int, default=None, help="default: all")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--image-size", type=int, default=256)
  parser.add_argument("--out-dir", default=None, help="default: a temporary folder")
  args = parser.parse_args()
  if not pathlib.Path(args.data).is_dir():
    parser.error(f"--data {args.data!r} is not a folder (expected the 903 shared images)")

  start = time.perf_counter()
  load_start = os.getloadavg()
  cfg = model_config(args.model)
  tokenizer = nnx.jit(lambda: Tokenizer.from_config(cfg, rngs=nnx.Rngs(0)))()
  config = ml_collections.ConfigDict(dict(
      model=cfg, train=dict(image_size=args.image_size),
      data=dict(source=f"folder:{args.data}", num_threads=4, prefetch=2),
      eval=dict(batch_size=args.batch_size, num_images=args.num_images)))
  models = evaluator.load_metric_models(config.eval)
  out_dir = args.out_dir or tempfile.mkdtemp(prefix="gsq_eval_bench_")
  common = dict(model=args.model, params=parameter_counts(tokenizer)["total"],
                image_size=args.image_size, batch_size=args.batch_size, **_machine())

  # Warm-up on one batch: compiles the step (the full run reuses it).
  warm = evaluator.run_evaluation(tokenizer, config, out_dir=out_dir,
                                  num_images=args.batch_size, metric_models=models)
  _line(phase="warmup", seconds=round(time.perf_counter() - start, 2),
        images=warm["protocol"]["num_images"], **common)

  result = evaluator.run_evaluation(tokenizer, config, out_dir=out_dir,
                                    metric_models=models)
  protocol = result["protocol"]
  _line(phase="eval", images=protocol["num_images"],
        eval_seconds=round(protocol["eval_seconds"], 2),
        images_per_second=round(protocol["images_per_second"], 3),
        total_seconds_incl_warmup=round(time.perf_counter() - start, 2),
        loadavg_before=load_start, loadavg_after=os.getloadavg(),
        psnr=round(result["psnr"], 3), lpips_alex=round(result["lpips_alex"], 4),
        fd_vgg16=round(result["fd_vgg16"], 3), usage=round(result["usage"], 3),
        tokens=result["tokens"], out_dir=out_dir, **common)

  # The tokenizer forward alone on the same images (two batches, compiled first).
  view = nnx.view(tokenizer, deterministic=True, raise_if_not_found=False)
  graph, state = nnx.split(view)
  forward = jax.jit(lambda s, x: nnx.merge(graph, s)(x)[0])
  data = input_pipeline.make_eval_iterator(
      dict(config.data, eval_num_images=2 * args.batch_size),
      global_batch_size=args.batch_size, image_size=args.image_size)
  batches = [jnp.asarray(b["image"]) for b in data]
  forward(state, batches[0]).block_until_ready()
  tick = time.perf_counter()
  for batch in batches:
    forward(state, batch).block_until_ready()
  seconds = time.perf_counter() - tick
  images = len(batches) * args.batch_size
  _line(phase="tokenizer_only", images=images, seconds=round(seconds, 2),
        images_per_second=round(images / seconds, 3), loadavg=os.getloadavg(), **common)


if __name__ == "__main__":
  main()
