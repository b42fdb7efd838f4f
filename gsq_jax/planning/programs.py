"""Compiles the programs a training run executes, for any mesh, from shapes only.

The programs are exactly the trainer's: `construction.build(config, mesh,
shapes_only=True)` gives the jitted train step (generator + discriminator in
the config's order), the usage report and their abstract state with its
NamedShardings; the eval step is the evaluator's, with the tokenizer's EMA
weights and the metric networks as shapes. On a mesh of target devices
(targets.py) nothing is allocated and no weight file is read.

Per program and per device: argument, output, aliased (donated) and temporary
bytes from XLA's buffer assignment, and `need` = arguments + outputs - aliases
+ temporaries (what must be resident at the peak; spec/AOT.md), model FLOPs
from the traced program (flops.py), and how many fusions XLA rematerialised
to fit its memory budget (GPU; a sign the step is at the memory limit).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import jax
import ml_collections
from flax import nnx

from gsq_jax.evaluation import evaluator
from gsq_jax.evaluation.eval_config import resolve_eval_config
from gsq_jax.planning import flops as flops_lib
from gsq_jax.training import steps
from gsq_jax.training import construction

_REMAT = re.compile(r"([\w.\-]+\.remat\d*)\b")  # names of XLA's rematerialised copies
# TPU: "the total memory required for HLO temporaries (135.56G) exceeds available HBM (95.74G)"
# or "Ran out of memory in memory space hbm. Used 95.87G of 95.74G hbm."
_TPU_OOM = re.compile(r"(?:required for HLO temporaries \(|memory space hbm\. Used )"
                      r"(\d+(?:\.\d+)?)([KMGT])")
_UNIT = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


@dataclasses.dataclass
class ProgramStats:
  """One compiled program: memory per device, model FLOPs over all devices."""

  name: str
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  need_bytes: int = 0
  flops: float = 0.0
  operand_bytes: float = 0.0
  unknown_loops: int = 0
  remat_fusions: int = 0
  compile_seconds: float = 0.0
  error: str | None = None  # e.g. TPU's RESOURCE_EXHAUSTED: does not fit


def compile_traced(name: str, traced, compiler_options: dict[str, Any] | None) -> ProgramStats:
  """Counts FLOPs on `traced.jaxpr`, then lowers and compiles it; errors are recorded."""
  count = flops_lib.count_jaxpr(traced.jaxpr)
  stats = ProgramStats(name, flops=count.flops, operand_bytes=count.operand_bytes,
                       unknown_loops=count.unknown_loops)
  start = time.perf_counter()
  try:
    compiled = traced.lower().compile(compiler_options or None)
  except Exception as e:  # pylint: disable=broad-except  (XLA raises plain RuntimeErrors)
    stats.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    stats.compile_seconds = time.perf_counter() - start
    oom = _TPU_OOM.search(str(e))
    if oom:  # a TPU program that does not fit still says what it would need
      stats.temp_bytes = int(float(oom.group(1)) * _UNIT[oom.group(2)])
      stats.need_bytes = stats.temp_bytes
    return stats
  stats.compile_seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  stats.argument_bytes = int(m.argument_size_in_bytes)
  stats.output_bytes = int(m.output_size_in_bytes)
  stats.alias_bytes = int(m.alias_size_in_bytes)
  stats.temp_bytes = int(m.temp_size_in_bytes)
  stats.need_bytes = (stats.argument_bytes + stats.output_bytes - stats.alias_bytes
                      + stats.temp_bytes)
  stats.remat_fusions = len(set(_REMAT.findall(compiled.as_text() or "")))
  return stats


PROGRAMS = ("train_step", "usage_report", "eval_step", "tokenizer_forward")


def trace_programs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                   names: tuple[str, ...] = PROGRAMS, run: construction.Run | None = None
                   ) -> dict[str, Any]:
  """{name: jax.stages.Traced} of the trainer's programs over abstract inputs on `mesh`.

  `tokenizer_forward` (encode + quantise + decode of one batch) is only
  counted, for FLOPs per image; the others are what the trainer compiles.
  `run`: the shapes-only build of `config` on `mesh`, if already made.
  """
  unknown = set(names) - set(PROGRAMS)
  if unknown:
    raise ValueError(f"unknown programs {sorted(unknown)}; known: {PROGRAMS}")
  t = config.train
  traced = {}
  with jax.set_mesh(mesh):
    run = run or construction.build(config, mesh, shapes_only=True)
    batch = run.batch_shapes(t.global_batch_size, t.image_size)
    if "train_step" in names:
      traced["train_step"] = run.train_step.trace(run.state, run.consts, batch)
    if "usage_report" in names:
      traced["usage_report"] = run.usage_report.trace(run.state)
    if "eval_step" in names:
      eval_cfg = resolve_eval_config(config.get("eval"))
      tokenizer = nnx.merge(run.nets.g_graphdef, run.state["ema"], run.consts["g_rest"])
      models = evaluator.load_metric_models(eval_cfg, shapes_only=True)
      traced["eval_step"] = evaluator.trace_eval_step(
          tokenizer, models, mesh, batch_size=eval_cfg.batch_size, image_size=t.image_size,
          fd_vgg16=eval_cfg.fd_vgg16, kid=eval_cfg.kid)
    if "tokenizer_forward" in names:
      traced["tokenizer_forward"] = jax.jit(
          lambda params, rest, x: steps.reconstruct(run.nets, params, rest, x)).trace(
              run.state["params"], run.consts["g_rest"], batch["image"])
  return traced


def compile_programs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                     compiler_options: dict[str, Any] | None = None,
                     include_eval: bool = True, compile: bool = True
                     ) -> dict[str, ProgramStats]:
  """Traces and compiles the trainer's programs for `mesh` (the forward is only counted).

  `compile=False` only counts FLOPs (seconds instead of minutes; no memory figures).
  """
  names = PROGRAMS if include_eval else tuple(n for n in PROGRAMS if n != "eval_step")
  traced = trace_programs(config, mesh, names=names)
  out = {}
  with jax.set_mesh(mesh):
    for name, program in traced.items():
      if name == "tokenizer_forward" or not compile:
        count = flops_lib.count_jaxpr(program.jaxpr)
        out[name] = ProgramStats(name, flops=count.flops, operand_bytes=count.operand_bytes)
      else:
        out[name] = compile_traced(name, program, compiler_options)
  return out
