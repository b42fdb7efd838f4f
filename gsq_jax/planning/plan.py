"""A plan of one run on one target: memory per device, fit, FLOPs, roofline time, device-hours.

`plan_run` compiles the run's programs (programs.py) on a mesh of the
target's devices (targets.py) and reads:

- fit: the largest per-device `need` over the programs against the memory
  the runtime hands out (GPU: JAX preallocates 75 % by default; TPU: all
  HBM the compiler states; a TPU program that does not fit fails to
  compile). A GPU step that needs more than 75 % but at most 95 % fits with
  a raised `train.gpu_memory_fraction`, which the plan recommends.
- a point that does not fit is re-planned with the smallest change that
  fits, each tried by compiling: rematerialising the DINO backbone's blocks,
  then every block (`train.remat`: same function, more compute), FSDP over
  all devices, the codebook split over the devices (GSQ/VQ/IBQ), each remat
  with each layout, then halving the global batch (the only change to the
  recipe); the fix names what each smaller change would have needed (a TPU
  program that does not fit fails to compile but states its need). A point
  that fits only with a raised memory fraction also gets the remat option
  that fits JAX's default, as `option`.
- FLOPs: model FLOPs of one train step over all devices, per image of the
  global batch, of the tokenizer's forward per image, and for total_steps.
- roofline: per device max(FLOPs / peak, product operand bytes / bandwidth)
  at the compute dtype's published peak; an optimistic bound on step time.
  Device-hours are given at the roofline and at an assumed model-FLOPs
  utilisation (`mfu`, default 0.4) -- neither is a measurement.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import ml_collections
import numpy as np

from gsq_jax import sharding as sharding_lib
from gsq_jax.models import remat as remat_lib
from gsq_jax.planning import programs as programs_lib
from gsq_jax.planning import targets as targets_lib
from gsq_jax.training import run_config

MAX_MEMORY_FRACTION = 0.95  # leave room for the CUDA context and fragmentation
FRACTION_MARGIN = 1.05  # the runtime's allocator needs a little above XLA's figure
DEFAULT_MFU = 0.4


@dataclasses.dataclass
class Plan:
  """The plan of one (config, target); `fix` names the change a non-fitting point needs."""

  label: str
  target: str
  num_devices: int
  mesh: str
  global_batch_size: int
  per_device_batch: int
  programs: dict[str, programs_lib.ProgramStats]
  device_memory: float
  usable_fraction: float
  need_bytes: int = 0
  fits: bool | None = False  # None: not compiled (FLOPs only)
  recommended_memory_fraction: float | None = None
  flops_per_step: float = 0.0
  flops_per_image: float = 0.0
  forward_flops_per_image: float = 0.0
  total_flops: float = 0.0
  step_seconds_roofline: float = 0.0
  images_per_second_roofline: float = 0.0
  device_hours_roofline: float = 0.0
  device_hours_at_mfu: float = 0.0
  mfu: float = DEFAULT_MFU
  total_steps: int = 0
  fix: str = ""
  alternative: "Plan | None" = None  # the fitting change a non-fitting point needs
  option: "Plan | None" = None  # fits JAX's default GPU fraction where this plan needs more
  errors: str = ""

  def row(self) -> dict[str, Any]:
    """Flat record for the table, CSV and JSON (GiB and TFLOP as the table shows them)."""
    gib = 2.0 ** 30
    train = self.programs.get("train_step")
    out = {
        "label": self.label, "target": self.target, "devices": self.num_devices,
        "mesh": self.mesh, "batch": self.global_batch_size,
        "per_device_batch": self.per_device_batch,
        "need_gib": self.need_bytes / gib,
        "train_args_gib": train.argument_bytes / gib if train else float("nan"),
        "train_temp_gib": train.temp_bytes / gib if train else float("nan"),
        "device_gib": self.device_memory / gib,
        "usable_gib": self.device_memory * self.usable_fraction / gib,
        "fits": self.fits, "memory_fraction": self.recommended_memory_fraction,
        "remat_fusions": train.remat_fusions if train else 0,
        "flops_per_step": self.flops_per_step, "flops_per_image": self.flops_per_image,
        "forward_flops_per_image": self.forward_flops_per_image,
        "total_flops": self.total_flops,
        "step_s_roofline": self.step_seconds_roofline,
        "img_per_s_roofline": self.images_per_second_roofline,
        "total_steps": self.total_steps,
        "device_hours_roofline": self.device_hours_roofline,
        "device_hours_at_mfu": self.device_hours_at_mfu, "mfu": self.mfu,
        "fix": self.fix, "errors": self.errors,
    }
    for name, p in self.programs.items():
      if name != "tokenizer_forward":
        out[f"{name}_need_gib"] = p.need_bytes / gib
        out[f"{name}_compile_s"] = p.compile_seconds
    return out


def target_mesh(config: ml_collections.ConfigDict, devices: list) -> jax.sharding.Mesh:
  """The run's mesh (config.mesh) over the target's devices."""
  return sharding_lib.make_mesh(config.mesh, devices)


def _roofline(plan: Plan, kind: targets_lib.DeviceKind, compute_dtype: str, count_bytes: float):
  peak = kind.peak_bf16 if compute_dtype == "bfloat16" else kind.peak_f32
  n = plan.num_devices
  step = max(plan.flops_per_step / n / peak, count_bytes / n / kind.bandwidth)
  plan.step_seconds_roofline = step
  plan.images_per_second_roofline = plan.global_batch_size / step if step else 0.0
  plan.device_hours_roofline = step * plan.total_steps * n / 3600
  compute_seconds = plan.flops_per_step / n / peak
  plan.device_hours_at_mfu = compute_seconds / plan.mfu * plan.total_steps * n / 3600


def _fraction(need: float, kind: targets_lib.DeviceKind) -> float | None:
  """The GPU memory fraction that holds `need` (None: JAX's default suffices)."""
  if kind.platform != "gpu":
    return None
  fraction = math.ceil(need * FRACTION_MARGIN / kind.memory * 100) / 100
  return None if fraction <= kind.usable_fraction else fraction


def plan_run(config: ml_collections.ConfigDict, target: targets_lib.Target, *,
             label: str = "", devices: list | None = None,
             compiler_options: dict[str, Any] | None = None, include_eval: bool = True,
             try_fixes: bool = True, mfu: float = DEFAULT_MFU, compile: bool = True) -> Plan:
  """Compiles `config` for `target` and returns its Plan (with a fitting alternative).

  `compile=False`: FLOPs, roofline and device-hours only (fit unknown).
  """
  devices = devices if devices is not None else target.devices()
  t = config.train
  run_config.validate_config(config, num_devices=len(devices), process_count=1,
                             need_weights=False)
  mesh = target_mesh(config, devices)
  stats = programs_lib.compile_programs(config, mesh, compiler_options=compiler_options,
                                        include_eval=include_eval, compile=compile)
  kind = target.kind
  compiled = [p for n, p in stats.items() if n != "tokenizer_forward"]
  plan = Plan(label=label, target=target.spec, num_devices=len(devices),
              mesh="x".join(f"{a}{mesh.shape[a]}" for a in sharding_lib.AXES),
              global_batch_size=t.global_batch_size,
              per_device_batch=t.global_batch_size // len(devices), programs=stats,
              device_memory=kind.memory, usable_fraction=kind.usable_fraction,
              total_steps=t.total_steps, mfu=mfu)
  plan.errors = "; ".join(f"{p.name}: {p.error}" for p in compiled if p.error)
  plan.need_bytes = max(p.need_bytes for p in compiled)
  plan.recommended_memory_fraction = _fraction(plan.need_bytes, kind)
  limit = kind.memory * (MAX_MEMORY_FRACTION if kind.platform == "gpu" else 1.0)
  plan.fits = not plan.errors and plan.need_bytes <= limit if compile else None
  train_stats = stats["train_step"]
  plan.flops_per_step = train_stats.flops
  plan.flops_per_image = train_stats.flops / t.global_batch_size
  plan.forward_flops_per_image = stats["tokenizer_forward"].flops / t.global_batch_size
  plan.total_flops = train_stats.flops * t.total_steps
  _roofline(plan, kind, t.compute_dtype, train_stats.operand_bytes)

  def replan(change: str, fixed: ml_collections.ConfigDict) -> Plan:
    """`fixed` (the config with `change`) planned on the same devices, without a further search."""
    return plan_run(fixed, target, label=f"{label} [{change}]", devices=devices,
                    compiler_options=compiler_options, include_eval=include_eval,
                    try_fixes=False, mfu=mfu)

  if not compile:
    plan.fix, plan.recommended_memory_fraction = "not compiled (FLOPs only)", None
  elif plan.fits and plan.recommended_memory_fraction is not None:
    plan.fix = (f"needs --config.train.gpu_memory_fraction={plan.recommended_memory_fraction:g} "
                f"(JAX preallocates {kind.usable_fraction:.0%}; XLA rematerialised "
                f"{train_stats.remat_fusions} instructions to fit)")
    for change, fixed in (_remat_fixes(config) if try_fixes else ()):
      alt = replan(change, fixed)
      if alt.fits and alt.recommended_memory_fraction is None:
        plan.option = alt
        plan.fix += (f", or {change} ({alt.need_bytes / targets_lib.GIB:.1f} GiB, "
                     f"{alt.flops_per_step / plan.flops_per_step - 1:+.0%} FLOPs)")
        break
  elif not plan.fits and try_fixes and _out_of_memory(plan):
    tried = []
    for change, fixed in _fixes(config, len(devices)):
      alt = replan(change, fixed)
      if alt.fits:
        plan.fix, plan.alternative = change, alt
        break
      tried.append(f"{change}: {_need_text(alt)}")
    else:
      plan.fix = "no tried change fits"
    if tried:  # what the smaller changes would have needed, so the choice can be checked
      plan.fix += f" (not enough: {'; '.join(tried)})"
  elif not plan.fits and not _out_of_memory(plan):
    plan.fix = "compilation failed (see errors)"
  return plan


def _need_text(plan: Plan) -> str:
  return f"{plan.need_bytes / targets_lib.GIB:.1f} GiB" if plan.need_bytes else "failed"


def _out_of_memory(plan: Plan) -> bool:
  """Whether the plan failed for memory (not for a compiler error no change would fix)."""
  failed = [p.error for p in plan.programs.values() if p.error]
  return all("RESOURCE_EXHAUSTED" in e or "memory" in e.lower() for e in failed)


def _remat_fixes(config: ml_collections.ConfigDict):
  """The train.remat settings that recompute more than the config does, least first."""
  choices = list(remat_lib.REMAT_CHOICES)
  for choice in choices[choices.index(config.train.get("remat", "none")) + 1:]:
    if choice == "dino" and config.disc.name != "dino":
      continue  # nothing to recompute
    yield f"train.remat={choice}", _with(config, train=dict(remat=choice))


def _fixes(config: ml_collections.ConfigDict, num_devices: int):
  """(description, changed config) in the order of least change to the run.

  Each rematerialisation and each mesh layout alone, then each pair of them
  (the step computes the same function in all of these), and only then a
  smaller global batch, which changes the recipe.
  """
  remats = list(_remat_fixes(config))
  layouts = list(_layout_fixes(config, num_devices))
  yield from remats
  for change, mesh in layouts:
    yield change, _with(config, mesh=mesh)
  for remat_change, remat_config in remats:
    for change, mesh in layouts:
      yield f"{remat_change} + {change}", _with(remat_config, mesh=mesh)
  batch = config.train.global_batch_size
  while batch // 2 >= num_devices and (batch // 2) % num_devices == 0:
    batch //= 2
    yield (f"global batch {batch} ({batch // num_devices} per device)",
           _with(config, train=dict(global_batch_size=batch)))


def _layout_fixes(config: ml_collections.ConfigDict, num_devices: int):
  """(description, mesh block) of the layouts that spread state over all devices."""
  m = config.model
  _, fsdp, vocab = sharding_lib.mesh_shape(config.mesh, num_devices)
  if fsdp < num_devices:
    yield f"mesh fsdp={num_devices}", dict(data=1, fsdp=num_devices, vocab=1)
  if (vocab < num_devices and m.quantizer.name in sharding_lib.VOCAB_SHARDABLE
      and m.codebook_size % num_devices == 0):
    yield f"mesh vocab={num_devices}", dict(data=1, fsdp=1, vocab=num_devices)


def _with(config: ml_collections.ConfigDict, **blocks) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(config.to_dict())
  with out.unlocked():
    for block, values in blocks.items():
      for key, value in values.items():
        out[block][key] = value
  return out


def as_jsonable(value: Any) -> Any:
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value
