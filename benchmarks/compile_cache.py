r"""Compile time of a run's first and second start with the persistent compilation cache (issue 14).

Starts the same tiny run twice, each in a fresh process and its own fresh
workdir (a second run of equal shapes; a resumed run compiles the same
programs), with one cache directory that is empty before the first start:

  python benchmarks/compile_cache.py [--steps 3] [--config configs/gsq.py:D=16,G=4,V=1024,f=8,tiny]

The trainer is started through `gsq_jax.training.train.main` (what `gsq-train`
runs) with a listener on JAX's own compile accounting (jax.monitoring):
`compile_s` sums the backend-compile events, which cover XLA compiling or,
on a cache hit, loading the executable; `trace_lower_s` is tracing plus
lowering to StableHLO, which no cache skips. One JSON line per start, then
a summary line with the ratio of the two starts' compile_s; exit 1 if the
second start is not >= 3x faster or a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs in the child: totals of JAX's compile events, written at exit.
_CHILD = r"""
import atexit, collections, json, os, sys
from jax import monitoring
totals = collections.defaultdict(float)
monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: totals.__setitem__(event, totals[event] + secs))
monitoring.register_event_listener(
    lambda event, **kw: totals.__setitem__(event, totals[event] + 1))
def _dump():
  with open(os.environ["COMPILE_CACHE_BENCH_OUT"], "w") as f:
    json.dump(totals, f)
atexit.register(_dump)
sys.argv = ["gsq-train"] + sys.argv[1:]
from gsq_jax.training import train
train.main()
"""

_BACKEND = "/jax/core/compile/backend_compile_duration"
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"


def start(config: str, steps: int, cache_dir: str, scratch: str, index: int) -> dict:
  """One fresh process training `steps` steps of `config` in a new workdir."""
  workdir = os.path.join(scratch, f"run{index}")
  out = os.path.join(scratch, f"events{index}.json")
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(GSQ_JAX_CACHE_DIR=cache_dir, COMPILE_CACHE_BENCH_OUT=out, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
  command = [sys.executable, "-c", _CHILD, f"--config={config}", f"--workdir={workdir}",
             f"--config.train.total_steps={steps}", "--config.train.log_every_steps=1",
             f"--config.train.checkpoint_every_steps={steps}", "--config.eval.num_images=8"]
  begin = time.perf_counter()
  proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - begin
  if proc.returncode != 0 or not os.path.exists(out):
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    raise SystemExit(f"start {index} failed with exit code {proc.returncode}")
  with open(out, encoding="utf-8") as f:
    events = json.load(f)
  entries = sum(1 for _ in pathlib.Path(cache_dir).glob("*-cache"))
  return {"start": index, "compile_s": round(events.get(_BACKEND, 0.0), 2),
          "trace_lower_s": round(events.get(_TRACE, 0.0) + events.get(_LOWER, 0.0), 2),
          "cache_hits": int(events.get("/jax/compilation_cache/cache_hits", 0)),
          "cache_misses": int(events.get("/jax/compilation_cache/cache_misses", 0)),
          "cache_entries_after": entries, "wall_s": round(wall, 1)}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--config", default="configs/gsq.py:D=16,G=4,V=1024,f=8,tiny")
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(prefix="gsq_compile_cache_") as scratch:
    cache_dir = os.path.join(scratch, "xla_cache")  # empty before the first start
    results = []
    for index in (1, 2):
      results.append(start(args.config, args.steps, cache_dir, scratch, index))
      print(json.dumps({"config": args.config, "steps": args.steps, **results[-1]}), flush=True)
  first, second = results
  ratio = first["compile_s"] / max(second["compile_s"], 1e-9)
  print(json.dumps({"speedup_compile": round(ratio, 1),
                    "speedup_wall": round(first["wall_s"] / second["wall_s"], 2),
                    "cpu": platform.processor() or platform.machine(), "load_avg_1m":
                    round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                        time.gmtime())}))
  return 0 if ratio >= 3 else 1


if __name__ == "__main__":
  sys.exit(main())
