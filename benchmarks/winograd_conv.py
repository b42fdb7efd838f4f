r"""Winograd 3x3 convolutions on XLA:CPU (gsq_jax/cpu_kernels/winograd_conv.py): parity and speed.

The CPU generator step (train_step.py) is bound by 3x3 convolutions that
XLA:CPU already runs at a large fraction of this machine's matmul rate, so a
faster step needs fewer FLOPs: Winograd F(m x m, 3 x 3) does 2.25x (m = 2) or
4x (m = 4) fewer multiplies, for extra elementwise tile transforms.
`gsq_jax/cpu_kernels/cpu_conv.py` uses m = 4 for convolutions of at least
`WINOGRAD_MIN_PIXELS` output pixels and `WINOGRAD_MIN_FLOPS`; this script is
how those thresholds were chosen.

  python benchmarks/winograd_conv.py              # parity + per-shape forward+backward
  python benchmarks/winograd_conv.py --step 64 128 --min-pixels 1024 999999
                                                  # the train step per threshold

Prints JSON lines; the numbers are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from gsq_jax.cpu_kernels import cpu_conv  # noqa: E402
from gsq_jax.cpu_kernels.winograd_conv import TRANSFORMS, conv3x3  # noqa: E402

_DIMS = cpu_conv._DIMS  # pylint: disable=protected-access


def _lax_conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMS)


def _piecewise_conv(x, w):
  """cpu_conv without Winograd: XLA's forward pass, piecewise weight gradient."""
  saved, cpu_conv.WINOGRAD_MIN_PIXELS = cpu_conv.WINOGRAD_MIN_PIXELS, float("inf")
  try:
    return cpu_conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMS)
  finally:
    cpu_conv.WINOGRAD_MIN_PIXELS = saved


def _seconds(fn, *args, repeats=5):
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def parity():
  """Max relative error of y, dx, dw against lax (float32, 'highest' precision)."""
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (2, 16, 8, 8))
  w = jax.random.normal(keys[1], (3, 3, 8, 5)) * 0.1
  dy = jax.random.normal(keys[2], (2, 16, 8, 5))
  with jax.default_matmul_precision("highest"):
    ref, ref_vjp = jax.vjp(_lax_conv, x, w)
    for m in TRANSFORMS:
      y, vjp = jax.vjp(functools.partial(conv3x3, m=m), x, w)
      errors = [float(jnp.abs(a - b).max() / jnp.abs(b).max())
                for a, b in zip((y, *vjp(dy)), (ref, *ref_vjp(dy)))]
      print(json.dumps({"case": "parity", "m": m, "rel_err_y_dx_dw": errors}), flush=True)
      assert max(errors) < 1e-4, errors


# The small model's largest 3x3 stride-1 convolutions at 64^2 (batch 8).
SHAPES = [(8, 64, 64, 64), (8, 64, 128, 64), (8, 32, 128, 128), (8, 32, 128, 512),
          (8, 16, 128, 128), (8, 8, 256, 256)]


def per_shape():
  """Forward and forward+backward ms: XLA, piecewise weight gradient, Winograd m = 2, 4."""
  key = jax.random.key(0)
  convs = [("lax", _lax_conv), ("piecewise", _piecewise_conv)] + [
      (f"winograd{m}", functools.partial(conv3x3, m=m)) for m in TRANSFORMS]
  for b, hw, cin, cout in SHAPES:
    x = jax.random.normal(key, (b, hw, hw, cin))
    w = jax.random.normal(key, (3, 3, cin, cout)) * 0.05
    dy = jax.random.normal(key, (b, hw, hw, cout))
    row = {"case": "conv", "shape": [b, hw, hw, cin, cout],
           "gflop_fwd": round(2 * b * hw * hw * cin * cout * 9 / 1e9, 3)}
    for name, conv in convs:
      step = jax.jit(lambda x_, w_, dy_, conv=conv: jax.vjp(conv, x_, w_)[1](dy_))
      row[f"{name}_fwd_ms"] = round(1e3 * _seconds(jax.jit(conv), x, w), 1)
      row[f"{name}_fwd_bwd_ms"] = round(1e3 * _seconds(step, x, w, dy), 1)
    print(json.dumps(row), flush=True)


def train_step_per_threshold(resolutions, thresholds):
  """train_step.py's measurement with cpu_conv.WINOGRAD_MIN_PIXELS at each threshold."""
  import train_step  # pylint: disable=g-import-not-at-top
  for res in resolutions:
    for min_pixels in thresholds:
      cpu_conv.WINOGRAD_MIN_PIXELS = min_pixels
      out = train_step.measure(res, 8, 5, "float32", "small")
      print(json.dumps({"case": "train_step", "winograd_min_pixels": min_pixels,
                        **{k: out[k] for k in ("res", "images_per_sec", "ms_per_step",
                                               "cpu_s_per_step", "load_avg_1min")}}), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--step", type=int, nargs="*", help="time the train step at these resolutions")
  parser.add_argument("--min-pixels", type=int, nargs="+", default=[cpu_conv.WINOGRAD_MIN_PIXELS],
                      help="Winograd thresholds to time the step with (a huge value: off)")
  args = parser.parse_args()
  parity()
  if args.step:
    train_step_per_threshold(args.step, args.min_pixels)
  else:
    per_shape()


if __name__ == "__main__":
  main()
