"""Quantizer lookup and IBQ forward+backward at V = 2^18: time and peak memory.

Prints one JSON line per case:
  {"impl", "op", "V", "D", "G", "N", "median_s", "peak_rss_mb", ...}

Each case runs in a fresh subprocess so `peak_rss_mb` (the process's maximum
resident set, jax runtime included) belongs to that case alone. Compilation is
done ahead of time and excluded from `median_s`.

  impl = "tiled"  the library path (codebook scanned in tiles, no N x V buffer)
  impl = "dense"  materialise the full N*G x V distance matrix (the naive port)

Usage:
  python benchmarks/quantizer_lookup.py                 # the full table (slow: IBQ N=16384 takes minutes)
  python benchmarks/quantizer_lookup.py --quick         # skips the largest IBQ case
  python benchmarks/quantizer_lookup.py --case gsq:tiled:8:1:4096   # one case, in-process
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

V = 2**18
GSQ_SHAPES = [(8, 1), (16, 16), (64, 16)]
GSQ_TOKENS = [4096, 16384]
IBQ_DIM = 256
IBQ_TOKENS = [256, 1024, 16384]
# The dense path needs N*G*V*4 bytes for one distance matrix (and XLA keeps
# about two); beyond this it would swap or die on a 24 GB machine.
DENSE_LIMIT_BYTES = 6 * 2**30


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _time(compiled, args, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = compiled(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run_gsq(impl: str, dim: int, groups: int, tokens: int, repeats: int) -> dict:
  from gsq_jax.quantizers import gsq_quantize
  from gsq_jax.quantizers.base import l2_normalize
  from gsq_jax.quantizers.modules import spherical_init
  from gsq_jax.quantizers.search import nearest_code_dense

  d = dim // groups
  z = jax.random.normal(jax.random.key(0), (tokens, dim))
  codebook = spherical_init(jax.random.key(1), (V, d))
  if impl == "tiled":
    fn = jax.jit(lambda z, c: gsq_quantize(z, c, num_groups=groups).indices)
  else:
    fn = jax.jit(lambda z, c: nearest_code_dense(l2_normalize(z.reshape(-1, d)), l2_normalize(c)))
  compiled = fn.lower(z, codebook).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  return {"impl": impl, "op": "gsq_lookup", "V": V, "D": dim, "G": groups, "N": tokens,
          "median_s": _time(compiled, (z, codebook), repeats), "peak_rss_mb": _peak_rss_mb(),
          "xla_temp_mb": temp / 2**20}


def run_ibq(impl: str, tokens: int, repeats: int) -> dict:
  from gsq_jax.quantizers import ibq_quantize

  z = 0.05 / IBQ_DIM**0.5 * jax.random.normal(jax.random.key(0), (tokens, IBQ_DIM))
  codebook = jax.random.normal(jax.random.key(1), (V, IBQ_DIM))
  w = jax.random.normal(jax.random.key(2), z.shape)
  chunk = None if impl == "tiled" else tokens

  def objective(z, c):
    out = ibq_quantize(z, c, chunk_size=chunk)
    return jnp.sum(out.quantized * w) + out.loss + 0.05 * out.aux["entropy_loss"]

  fn = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))
  compiled = fn.lower(z, codebook).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  return {"impl": impl, "op": "ibq_fwd_bwd", "V": V, "D": IBQ_DIM, "G": 1, "N": tokens,
          "median_s": _time(compiled, (z, codebook), repeats), "peak_rss_mb": _peak_rss_mb(),
          "xla_temp_mb": temp / 2**20}


def run_case(spec: str) -> dict:
  kind, impl, *nums = spec.split(":")
  if kind == "gsq":
    dim, groups, tokens = map(int, nums)
    return run_gsq(impl, dim, groups, tokens, repeats=3 if tokens * groups <= 16384 else 1)
  (tokens,) = map(int, nums)
  return run_ibq(impl, tokens, repeats=3 if tokens <= 1024 else 1)


def all_cases(quick: bool):
  for dim, groups in GSQ_SHAPES:
    for tokens in GSQ_TOKENS:
      yield f"gsq:tiled:{dim}:{groups}:{tokens}", None
      dense_bytes = tokens * groups * V * 4
      skip = None if dense_bytes <= DENSE_LIMIT_BYTES else f"one {dense_bytes / 2**30:.0f} GiB distance matrix"
      yield f"gsq:dense:{dim}:{groups}:{tokens}", skip
  for tokens in IBQ_TOKENS:
    if quick and tokens > 1024:
      continue
    yield f"ibq:tiled:{tokens}", None


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--case", help="run one case in this process, e.g. gsq:tiled:8:1:4096 or ibq:tiled:1024")
  parser.add_argument("--quick", action="store_true", help="skip IBQ at N = 16384")
  parser.add_argument("--timeout", type=float, default=1800, help="seconds per case")
  args = parser.parse_args()
  if args.case:
    print(json.dumps(run_case(args.case)), flush=True)
    return
  for spec, skip in all_cases(args.quick):
    kind, impl, *nums = spec.split(":")
    if skip:
      print(json.dumps({"impl": impl, "op": f"{kind}_lookup", "case": spec, "skipped": skip}), flush=True)
      continue
    try:
      proc = subprocess.run([sys.executable, __file__, "--case", spec], capture_output=True, text=True,
                            timeout=args.timeout)
    except subprocess.TimeoutExpired:
      print(json.dumps({"case": spec, "error": f"timed out after {args.timeout:.0f} s"}), flush=True)
      continue
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
      print(json.dumps({"case": spec, "error": f"exit {proc.returncode}", "stderr": proc.stderr[-500:]}),
            flush=True)
    else:
      print(lines[-1], flush=True)


if __name__ == "__main__":
  import jax
  import jax.numpy as jnp
  main()
