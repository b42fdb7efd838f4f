"""Model FLOPs of a jitted program, counted on its jaxpr with loop trip counts.

XLA's cost analysis counts a `while` body once and returns nothing for GPU
targets (spec/AOT.md), so the planner counts on the program's jaxpr instead:
the traced program before partitioning, the same for every target. Counted:
matrix products and convolutions (2 FLOPs per multiply-add; elementwise work
is left out, as in the usual model-FLOPs convention), each loop body times
its trip count (`scan` length, `lax.map` chunks), `shard_map` bodies times
the devices they run on, the costlier branch of a `cond`. A `while` loop
whose trip count is not static is counted once and reported in `unknown_loops`.

`operand_bytes` sums the bytes each product reads and writes, a lower bound on
memory traffic for the roofline estimate.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from jax.extend import core as jex_core
import numpy as np


@dataclasses.dataclass
class Count:
  flops: float = 0.0
  operand_bytes: float = 0.0
  unknown_loops: int = 0

  def __iadd__(self, other: "Count") -> "Count":
    self.flops += other.flops
    self.operand_bytes += other.operand_bytes
    self.unknown_loops += other.unknown_loops
    return self

  def scaled(self, factor: float) -> "Count":
    return Count(self.flops * factor, self.operand_bytes * factor, self.unknown_loops)


def _bytes(aval) -> float:
  return math.prod(aval.shape) * np.dtype(aval.dtype).itemsize


def _dot_flops(eqn) -> float:
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval
  contract = math.prod(lhs.shape[i] for i in lhs_contract)
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * contract


def _conv_flops(eqn) -> float:
  # Each output element sums kernel spatial x kernel input features products;
  # this also holds for the weight-gradient convolutions of the backward pass.
  rhs = eqn.invars[1].aval
  rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
  per_output = rhs.shape[rhs_spec[1]] * math.prod(rhs.shape[i] for i in rhs_spec[2:])
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output


def _as_jaxpr(value) -> Any:
  if isinstance(value, jex_core.ClosedJaxpr):
    return value.jaxpr
  if isinstance(value, jex_core.Jaxpr):
    return value
  return None


def _sub_jaxprs(params: dict) -> list:
  found = []
  for value in params.values():
    values = value if isinstance(value, (tuple, list)) else (value,)
    found.extend(j for j in map(_as_jaxpr, values) if j is not None)
  return found


def _manual_devices(params: dict) -> int:
  mesh = params.get("mesh")
  axes = params.get("manual_axes") or params.get("axis_names") or ()
  if mesh is None:
    return 1
  shape = dict(mesh.shape)
  return math.prod(shape[a] for a in axes) if axes else math.prod(shape.values())


def count_jaxpr(jaxpr) -> Count:
  """FLOPs and product operand bytes of a (closed) jaxpr, loops unrolled by trip count."""
  jaxpr = _as_jaxpr(jaxpr) or jaxpr
  total = Count()
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += Count(_dot_flops(eqn), sum(_bytes(v.aval) for v in eqn.invars + eqn.outvars))
    elif name == "conv_general_dilated":
      total += Count(_conv_flops(eqn), sum(_bytes(v.aval) for v in eqn.invars + eqn.outvars))
    elif name == "scan":
      total += count_jaxpr(eqn.params["jaxpr"]).scaled(eqn.params["length"])
    elif name == "while":
      body = count_jaxpr(eqn.params["body_jaxpr"])
      body += count_jaxpr(eqn.params["cond_jaxpr"])
      body.unknown_loops += 1
      total += body
    elif name == "cond":
      branches = [count_jaxpr(b) for b in eqn.params["branches"]]
      total += max(branches, key=lambda c: c.flops)
    elif name == "shard_map":
      total += count_jaxpr(eqn.params["jaxpr"]).scaled(_manual_devices(eqn.params))
    else:
      for sub in _sub_jaxprs(eqn.params):
        total += count_jaxpr(sub)
  return total


def count_program(fn, *args, **kwargs) -> Count:
  """FLOPs of `fn(*args)` (a jitted function or plain callable) over abstract args."""
  return count_jaxpr(jax.make_jaxpr(fn)(*args, **kwargs))
