"""Vocabulary-sharded quantizer training step at scale: per-device memory on 8 simulated devices.

The step is what a tokenizer's quantizer sees in training: forward and
backward of sum(quantized * w) + quantizer loss (+ 0.05 * entropy for IBQ)
with respect to the latent z and the codebook, then an AdamW update of the
codebook (its moments sharded like it). Cases:

  gsq  V = 2^20, d = 8  (D = 16, G = 2; 16 images of 16 x 16 tokens)
  ibq  V = 2^18, d = 256 (4 images of 16 x 16 tokens, the reference's per-GPU batch)

impl "sharded" runs on a ("data", "vocab") mesh of 8 simulated devices with
the codebook split over "vocab"; impl "unsharded" is the same step on one
device with the whole codebook, for comparison.

The `*_train` cases are the trainer's whole generator + EMA step
(gsq_jax.training.construction.build, configs/gsq.py tiny encoder/decoder, MSE + quantizer
loss, AdamW) with the same codebooks: impl "sharded" = `mesh.vocab = 8`,
impl "unsharded" = `mesh.data = 8` (plain data parallelism, every device
holding the whole codebook, its EMA and Adam moments).

  gsq_train  V = 2^20, D = 16, G = 2 (d = 8), 8 images of 128² at f = 8
  ibq_train  V = 2^18, D = 256, 8 images of 64² at f = 8

One JSON line per case:

  {"case", "impl", "mesh", "V", "d", "tokens", "rows", "per_device": {"argument_mb",
   "output_mb", "alias_mb", "temp_mb", "peak_bound_mb"}, "largest_buffer_elements",
   "rows_x_V", "no_rows_x_V_buffer", "compile_s", "step_s", "peak_rss_mb", "loss"}

`peak_bound_mb` = argument + output - alias + temp from XLA's compiled
memory analysis of the per-device program; `peak_rss_mb` is the process's
maximum resident set (all simulated devices and the runtime together).
`largest_buffer_elements` is the largest array shape anywhere in the compiled
per-device HLO, to compare with rows x V (rows = tokens x G).

Each case runs in a fresh subprocess so its peak RSS is its own.

  python benchmarks/sharded_quantizer_memory.py                 # gsq, ibq; sharded, unsharded
  python benchmarks/sharded_quantizer_memory.py --impl sharded   # skip the one-device baselines
  python benchmarks/sharded_quantizer_memory.py --case ibq:sharded:1   # in-process, data = 1
  python benchmarks/sharded_quantizer_memory.py --only gsq_train ibq_train   # trainer steps
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import resource
import subprocess
import sys
import time

CASES = {
    "gsq": dict(vocab=2**20, latent_dim=16, num_groups=2, images=16),
    "ibq": dict(vocab=2**18, latent_dim=256, num_groups=1, images=4),
    "gsq_train": dict(vocab=2**20, latent_dim=16, num_groups=2, images=8, res=128),
    "ibq_train": dict(vocab=2**18, latent_dim=256, num_groups=1, images=8, res=64),
}
TOKENS_PER_IMAGE = 16 * 16
DEVICES = 8
_SHAPE = re.compile(r"\b(?:pred|bf16|[suf]\d+)\[([\d,]*)\]")


def _largest_buffer(hlo_text: str) -> int:
  shapes = (m.group(1).split(",") for m in _SHAPE.finditer(hlo_text))
  return max(math.prod(int(s) for s in shape if s) for shape in shapes)


def run_case(name: str, impl: str, data: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import PartitionSpec as P

  from gsq_jax.quantizers import gsq_quantize, ibq_quantize
  from gsq_jax.quantizers.modules import normal_init, spherical_init
  from gsq_jax.quantizers.sharded import sharded_gsq_quantize, sharded_ibq_quantize

  spec = CASES[name]
  v, dim, groups = spec["vocab"], spec["latent_dim"], spec["num_groups"]
  d = dim // groups
  tokens = spec["images"] * TOKENS_PER_IMAGE
  z = jax.random.normal(jax.random.key(0), (spec["images"], 16, 16, dim))
  w = jax.random.normal(jax.random.key(1), z.shape)
  if name == "gsq":
    codebook = spherical_init(jax.random.key(2), (v, d))
    kwargs = dict(num_groups=groups)
    quantize = sharded_gsq_quantize if impl == "sharded" else gsq_quantize
    entropy_weight = 0.0
  else:
    z = 0.05 * z
    codebook = normal_init(jax.random.key(2), (v, d))
    kwargs = {}
    quantize = sharded_ibq_quantize if impl == "sharded" else ibq_quantize
    entropy_weight = 0.05
  if impl == "sharded":
    kwargs.update(data_axis="data" if data > 1 else None)
  tx = optax.adamw(1e-4, weight_decay=0.0)

  def objective(z, codebook, w):
    out = quantize(z, codebook, **kwargs)
    value = jnp.sum(out.quantized * w) + out.loss
    if entropy_weight:
      value = value + entropy_weight * out.aux["entropy_loss"]
    return value

  def train_step(codebook, opt_state, z, w):
    loss, (dz, dc) = jax.value_and_grad(objective, argnums=(0, 1))(z, codebook, w)
    updates, opt_state = tx.update(dc, opt_state, codebook)
    return optax.apply_updates(codebook, updates), opt_state, loss, dz

  if impl == "sharded":
    mesh = jax.make_mesh((data, DEVICES // data), ("data", "vocab"))
    mesh_desc = {"data": data, "vocab": DEVICES // data}
    jax.set_mesh(mesh)
    codebook = jax.device_put(codebook, P("vocab", None))
    z, w = (jax.device_put(x, P("data") if data > 1 else P()) for x in (z, w))
  else:
    mesh_desc = {"devices": 1}
    z, w, codebook = jax.device_put((z, w, codebook), jax.devices()[0])
  opt_state = jax.jit(tx.init)(codebook)

  step = jax.jit(train_step, donate_argnums=(0, 1))
  start = time.perf_counter()
  compiled = step.lower(codebook, opt_state, z, w).compile()
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    codebook, opt_state, loss, dz = compiled(codebook, opt_state, z, w)
    jax.block_until_ready((codebook, dz))
    times.append(time.perf_counter() - start)

  return _report(name, impl, mesh_desc, compiled, times, loss, v=v, d=d, tokens=tokens,
                 groups=groups, compile_s=compile_s)


def _report(name, impl, mesh_desc, compiled, times, loss, *, v, d, tokens, groups, compile_s):
  import jax
  mem = compiled.memory_analysis()
  largest = _largest_buffer(compiled.as_text())
  mb = lambda b: round(b / 2**20, 2)
  rows = tokens * groups
  return {
      "case": name, "impl": impl, "mesh": mesh_desc, "V": v, "d": d, "tokens": tokens, "rows": rows,
      "per_device": {"argument_mb": mb(mem.argument_size_in_bytes),
                     "output_mb": mb(mem.output_size_in_bytes),
                     "alias_mb": mb(mem.alias_size_in_bytes),
                     "temp_mb": mb(mem.temp_size_in_bytes),
                     "peak_bound_mb": mb(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                         - mem.alias_size_in_bytes + mem.temp_size_in_bytes)},
      "largest_buffer_elements": largest, "rows_x_V": rows * v,
      "no_rows_x_V_buffer": largest < rows * v,
      "compile_s": round(compile_s, 2), "step_s": round(min(times), 2),
      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
      "loss": float(loss), "platform": jax.devices()[0].platform,
  }


def run_train_case(name: str, impl: str, repeats: int) -> dict:
  """The trainer's generator step with the codebook split over mesh.vocab (or replicated)."""
  import jax
  import numpy as np

  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from configs import gsq  # pylint: disable=g-import-not-at-top
  from gsq_jax import sharding
  from gsq_jax.data import input_pipeline
  from gsq_jax.training import construction  # pylint: disable=g-import-not-at-top
  from gsq_jax.training import run_config  # pylint: disable=g-import-not-at-top

  spec = CASES[name]
  v, dim, groups = spec["vocab"], spec["latent_dim"], spec["num_groups"]
  quantizer = name.split("_")[0]
  config = gsq.get_config(f"D={dim},G={groups},V={v},f=8,quantizer={quantizer},"
                          f"res={spec['res']},tiny")
  config.train.global_batch_size = spec["images"]
  config.train.two_batches_per_step = False
  config.mesh.update({"data": 1, "fsdp": 1, "vocab": DEVICES} if impl == "sharded"
                     else {"data": DEVICES, "fsdp": 1, "vocab": 1})
  run_config.validate_config(config, num_devices=DEVICES, process_count=1)
  mesh = sharding.make_mesh(config.mesh)
  jax.set_mesh(mesh)
  run = construction.build(config, mesh)
  images = np.random.default_rng(0).uniform(
      -1, 1, (spec["images"], spec["res"], spec["res"], 3)).astype(np.float32)
  batch = input_pipeline.make_global_batch({"image": images}, sharding.data_sharding(mesh))
  start = time.perf_counter()
  compiled = run.train_step.lower(run.state, run.consts, batch).compile()
  compile_s = time.perf_counter() - start
  state, times = run.state, []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, run.consts, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  tokens = spec["images"] * (spec["res"] // 8) ** 2
  return _report(name, impl, dict(mesh.shape), compiled, times, metrics["g_loss"], v=v,
                 d=dim // groups, tokens=tokens, groups=groups, compile_s=compile_s)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--case", help="NAME:IMPL:DATA, e.g. ibq:sharded:1, run in this process")
  parser.add_argument("--impl", choices=["sharded", "unsharded", "both"], default="both")
  parser.add_argument("--data", type=int, default=1, choices=[1, 2, 4],
                      help="size of the data axis of the 8-device mesh (vocab = 8 / data)")
  parser.add_argument("--repeats", type=int, default=2, help="timed steps after compilation")
  parser.add_argument("--only", nargs="+", choices=sorted(CASES), help="run only these cases")
  parser.add_argument("--timeout", type=float, default=1800, help="seconds per case")
  args = parser.parse_args()
  # Before jax is imported (lazily, in run_case) here or in the subprocesses.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  flag = f"--xla_force_host_platform_device_count={DEVICES}"
  if flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

  if args.case:
    name, impl, data = args.case.split(":")
    if name not in CASES or impl not in ("sharded", "unsharded"):
      raise ValueError(f"--case must be NAME:IMPL:DATA with NAME in {sorted(CASES)} and IMPL "
                       f"'sharded' or 'unsharded', got {args.case!r}")
    case = (run_train_case(name, impl, args.repeats) if name.endswith("_train")
            else run_case(name, impl, int(data), args.repeats))
    print(json.dumps(case), flush=True)
    return

  impls = ["sharded", "unsharded"] if args.impl == "both" else [args.impl]
  names = [n for n in CASES if n in args.only] if args.only else list(CASES)
  for name in names:
    for impl in impls:
      cmd = [sys.executable, __file__, "--case", f"{name}:{impl}:{args.data}",
             "--repeats", str(args.repeats)]
      try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
      except subprocess.TimeoutExpired:
        print(json.dumps({"case": name, "impl": impl, "error": f"timeout after {args.timeout} s"}))
        continue
      lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
      if proc.returncode or not lines:
        print(json.dumps({"case": name, "impl": impl, "error": proc.stderr.strip()[-2000:]}))
      else:
        print(lines[-1], flush=True)


if __name__ == "__main__":
  main()
