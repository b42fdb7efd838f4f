r"""Generator-step throughput of the reference small tokenizer (issue 3).

The reference PyTorch implementation, measured on the project's 2-core CPU,
trains this model at 6.4 images/s at 64x64 and 1.3 images/s at 128x128
(11.76M parameters); the target here is >= 1.5x that. The model: hidden 64,
channel multipliers [1, 2, 2, 4], one ResBlock per level and mid, D = 16,
G = 4, V = 4096, adaptive group norm + depth-to-space; batch 8; loss MSE +
quantizer loss; AdamW (with the recipe's grad clip 2 and EMA 0.999). The timed
function is the trainer's own jitted step (gsq_jax.training.steps) on one device.

  python benchmarks/train_step.py                      # 64 and 128, float32
  python benchmarks/train_step.py --res 256 --dtype bfloat16 --model f16   # GPU

Prints one JSON line per resolution: images/s, ms/step, compile time,
parameter count, device, the XLA flags in force and the 1-minute load average
(the machine may be shared: compare numbers taken at low load). With --model
f16 the paper's F16 layout (hidden 128, cm [1,1,2,2,4], 2 ResBlocks) is timed
and the model FLOP utilisation is reported when the device's peak is known.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import gsq  # noqa: E402
from gsq_jax import sharding  # noqa: E402
from gsq_jax.training import construction  # noqa: E402
from gsq_jax.training import run_config  # noqa: E402

# Dense bf16 peak FLOP/s per device kind, for model FLOP utilisation.
PEAK_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
              "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12}


def reference_config(res: int, batch: int, dtype: str, model: str, fast_cpu_convs: bool):
  """The benchmark model as a trainer config (MSE + quantizer loss, AdamW)."""
  if model == "small":
    c = gsq.get_config(f"D=16,G=4,V=4096,f=8,res={res},disc=none")
    c.model.hidden_channels = 64
    c.model.encoder_layer_configs = c.model.decoder_layer_configs = (1,) * 5
  elif model == "f16":
    c = gsq.get_config(f"D=16,G=4,V=262144,f=16,res={res},disc=none")
  else:
    raise ValueError(f"--model must be 'small' or 'f16', got {model!r}")
  c.model.use_adaptive_norm = c.model.use_depth_to_space = True
  c.loss.perceptual_weight = 0.0
  c.train.global_batch_size = batch
  c.train.compute_dtype = dtype
  c.train.fast_cpu_convs = fast_cpu_convs
  c.mesh.data = 1
  return c


def measure(res: int, batch: int, steps: int, dtype: str, model: str,
            fast_cpu_convs: bool = True) -> dict:
  config = reference_config(res, batch, dtype, model, fast_cpu_convs)
  devices = jax.devices()[:1]
  device = devices[0]
  run_config.validate_config(config, num_devices=1, process_count=1)
  mesh = sharding.make_mesh(config.mesh, devices)
  rng = np.random.default_rng(0)
  with jax.set_mesh(mesh):
    run = construction.build(config, mesh)
    batches = [jax.device_put({"image": rng.uniform(-1, 1, (batch, res, res, 3)).astype(
        np.float32)}, sharding.data_sharding(mesh)) for _ in range(2)]
    start = time.perf_counter()
    compiled = run.train_step.lower(run.state, run.consts, batches[0]).compile()
    compile_s = time.perf_counter() - start
    flops = (compiled.cost_analysis() or {}).get("flops")
    model_flops = flops
    if fast_cpu_convs and device.platform == "cpu":
      # The model's FLOPs are those of direct convolutions; Winograd executes
      # fewer. Count them on the step with XLA's own convolutions (not compiled).
      plain = construction.build(reference_config(res, batch, dtype, model, False), mesh)
      model_flops = (plain.train_step.lower(plain.state, plain.consts, batches[0])
                     .cost_analysis() or {}).get("flops")
    state = run.state
    for i in range(2):  # warm-up
      state, metrics = compiled(state, run.consts, batches[i % 2])
    jax.block_until_ready(metrics)
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(steps):
      state, metrics = compiled(state, run.consts, batches[i % 2])
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    cpu_seconds = (time.process_time() - cpu_start) / steps
  out = {"model": model, "res": res, "batch": batch, "dtype": dtype, "steps": steps,
         "fast_cpu_convs": fast_cpu_convs and device.platform == "cpu",
         "images_per_sec": round(batch / seconds, 3), "ms_per_step": round(1e3 * seconds, 1),
         # CPU time of all threads per step: with the cores shared this stays
         # close to a quiet machine's; cores / cpu_s_per_step bounds steps/s.
         "cpu_s_per_step": round(cpu_seconds, 3), "cpu_count": os.cpu_count(),
         "compile_s": round(compile_s, 1), "params": run.num_params["total"],
         "device": device.device_kind, "platform": device.platform,
         "load_avg_1min": round(os.getloadavg()[0], 2),
         "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "final_loss": float(metrics["g_loss"])}
  if flops and model_flops:
    # model_tflop: with direct convolutions (what MFU counts); executed_tflop:
    # the compiled program's own count (fewer where Winograd runs).
    out["model_tflop"] = round(model_flops / 1e12, 4)
    out["executed_tflop"] = round(flops / 1e12, 4)
    peak = PEAK_FLOPS.get(device.device_kind)
    if peak:
      out["mfu"] = round(model_flops / seconds / peak, 4)
    # The device's own dense-matmul rate, measured: the model's FLOPs at that
    # rate bound the step time of any direct-convolution implementation.
    matmul = measured_matmul_flops(device, config.train.compute_dtype)
    out["matmul_gflops"] = round(matmul / 1e9, 1)
    out["model_flops_fraction_of_matmul_rate"] = round(model_flops / seconds / matmul, 3)
    out["ms_per_step_at_matmul_rate"] = round(1e3 * model_flops / matmul, 1)
  return out


def measured_matmul_flops(device, dtype: str, n: int = 2048, repeats: int = 10) -> float:
  """FLOP/s of an n x n x n matmul in `dtype` on `device` (best of `repeats`)."""
  a = jax.device_put(np.random.default_rng(0).standard_normal((n, n)).astype(jnp.dtype(dtype)), device)
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a))
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--res", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--model", default="small", choices=["small", "f16"])
  parser.add_argument("--no-fast-cpu-convs", dest="fast_cpu_convs", action="store_false",
                      help="use XLA's own convolutions (train.fast_cpu_convs=False)")
  args = parser.parse_args()
  for res in args.res:
    print(json.dumps(measure(res, args.batch, args.steps, args.dtype, args.model,
                             args.fast_cpu_convs)), flush=True)


if __name__ == "__main__":
  main()
