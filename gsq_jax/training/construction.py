"""Networks, optimisers, train state and jitted step functions of a run: the one construction path.

`build(config, mesh)` is shared by the trainer (training/train.py), the
benchmarks and the planner (gsq_jax/planning): everything is first built from
shapes; `shapes_only=True` stops there (gsq-plan compiles that for a TPU/GPU
topology), otherwise the state is materialised on the mesh and the frozen
weights (DINO, LPIPS) are loaded. Choices that depend on the hardware (the
CPU-only convolutions, `train.remat`) are made here, keyed on the platform of
the mesh's devices, never on the host's backend.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from gsq_jax import sharding as sharding_lib
from gsq_jax.cpu_kernels import cpu_conv
from gsq_jax.models import Tokenizer
from gsq_jax.models import discriminators as disc_lib
from gsq_jax.models import dino as dino_lib
from gsq_jax.models import lpips as lpips_lib
from gsq_jax.models import parameter_counts_from_config
from gsq_jax.models import remat
from gsq_jax.models.tokenizer import COMPUTE_DTYPES
from gsq_jax.training import optim
from gsq_jax.training import steps


@dataclasses.dataclass
class Run:
  """Everything built for one run (jitted functions, shardings, constants).

  Built with `shapes_only=True`, `state` and `consts` are ShapeDtypeStructs
  carrying their NamedShardings: enough to lower and compile every program
  (gsq_jax/planning), nothing allocated and no weight file read.
  """

  nets: steps.Networks
  step_cfg: steps.StepConfig
  state: dict[str, Any]
  state_shardings: Any
  consts: dict[str, Any]
  train_step: Callable
  usage_report: Callable
  reconstruct: Callable
  num_params: dict[str, int]
  shapes_only: bool = False

  def batch_shapes(self, global_batch_size: int, image_size: int) -> dict[str, Any]:
    """The train step's `batch` argument as ShapeDtypeStructs split over the mesh."""
    spec = jax.ShapeDtypeStruct((global_batch_size, image_size, image_size, 3), np.float32,
                                sharding=sharding_lib.data_sharding(self.nets.mesh))
    return {"image": spec, **({"image_d": spec} if self.step_cfg.two_batches_per_step else {})}


def build_discriminator(config: ml_collections.ConfigDict, dtype, *,
                        shapes_only: bool = False) -> nnx.Module | None:
  """The config's discriminator; `shapes_only`: abstract, DINO's shapes from its architecture."""
  d = config.disc
  if d.name == "none":
    return None

  def make():
    rngs = nnx.Rngs(config.train.seed + 1)
    if d.name == "patchgan":
      return disc_lib.PatchGAN(3, d.patchgan_filters, d.patchgan_layers,
                               output_weight_scale=d.patchgan_output_scale, rngs=rngs)
    if shapes_only:
      backbone = dino_lib.DinoViT(None, dtype=dtype, shapes_only=True, **dino_lib.VITS14_REG)
    else:
      backbone = dino_lib.load_dino_backbone(
          d.dino_weights, expected=dino_lib.VITS14_REG if d.dino_require_vits14 else None,
          dtype=dtype)
    return disc_lib.DinoDiscriminator(backbone, rngs=rngs, diffaug=d.diffaug,
                                      aug_policy=d.aug_policy, resolution=d.dino_resolution,
                                      taps=tuple(d.dino_taps))

  return nnx.eval_shape(make) if shapes_only else make()


def state_shardings(state: Any, mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """FSDP layout for parameters, EMA and optimiser states; the rest replicated."""
  sharded = ("params", "ema", "opt", "d_params", "d_opt")
  return {k: (sharding_lib.tree_shardings(v, mesh) if k in sharded
              else jax.tree.map(lambda _: sharding_lib.replicated(mesh), v))
          for k, v in state.items()}


def _with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying `shardings` (a tree or one sharding)."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, shardings)


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
          shapes_only: bool = False) -> Run:
  """Networks, optimisers, initial state and jitted functions: the one construction path.

  Everything is first built from shapes (abstract networks, `jax.eval_shape`
  of the initial state, its NamedShardings on `mesh`); `shapes_only=True`
  stops there (no device allocated, no weight file read: gsq-plan compiles
  this for a TPU/GPU topology), otherwise the state is materialised on the
  mesh and the frozen weights are loaded. Kernels that only suit XLA:CPU are
  chosen by the platform of the mesh's devices, not by the host's backend.
  """
  t = config.train
  dtype = COMPUTE_DTYPES[t.compute_dtype]
  step_cfg = steps.StepConfig.from_config(config)
  g_tx, g_schedule = optim.make_optimizer(config.optim, "generator", t.total_steps)
  d_tx, d_schedule = optim.make_optimizer(config.optim, "discriminator", t.total_steps)
  replicated = sharding_lib.replicated(mesh)

  # GSQ/VQ/IBQ run per device over the mesh (codebook split when mesh.vocab > 1;
  # config.json keeps the plain quantizer: a checkpoint restores onto any mesh).
  model_cfg = config.model.copy_and_resolve_references()
  model_cfg.quantizer.update(sharding_lib.quantizer_axes(config.model.quantizer.name))

  def new_tokenizer():
    return Tokenizer.from_config(model_cfg, rngs=nnx.Rngs(t.seed))

  abstract = nnx.eval_shape(new_tokenizer)
  disc = build_discriminator(config, dtype, shapes_only=shapes_only)
  if t.fast_cpu_convs and sharding_lib.mesh_platform(mesh) == "cpu":
    # Faster convolutions on XLA:CPU (Winograd, piecewise weight gradients); see cpu_conv.py.
    for model in (abstract, disc):
      if model is not None:
        cpu_conv.use_fast_cpu_convs(model)
  for model in (abstract, disc):  # recompute activations in the backward (train.remat)
    if model is not None:
      remat.use_remat(model, t.get("remat", "none"))
  g_graphdef, _, _ = steps.split_tokenizer(abstract)
  frozen = {}  # pretrained, never trained, never checkpointed
  d_graphdef = d_params = d_stats = None
  if disc is not None:
    d_graphdef, d_params, d_stats, frozen["d_frozen"] = steps.split_discriminator(disc)
  lpips_graphdef = None
  if config.loss.perceptual_weight > 0:
    lpips = (lpips_lib.abstract_lpips("vgg16", dtype=dtype) if shapes_only else
             lpips_lib.load_lpips("vgg16", config.loss.lpips_weights, dtype=dtype))
    lpips_graphdef, frozen["lpips"] = nnx.split(lpips)
  nets = steps.Networks(g_graphdef, g_tx, g_schedule, d_graphdef, d_tx, d_schedule,
                        lpips_graphdef, mesh)

  def init(d_params, d_stats):
    _, params, rest = steps.split_tokenizer(new_tokenizer())
    state = steps.init_state(nets, params, seed=t.seed, num_groups=config.model.num_groups,
                             codebook_size=config.model.codebook_size, d_params=d_params,
                             d_stats=d_stats, lecam=step_cfg.lecam_weight > 0)
    return state, rest

  state_shape, rest_shape = jax.eval_shape(init, d_params, d_stats)
  shardings = state_shardings(state_shape, mesh)
  consts = {**frozen, "inject_nan_at_step": np.int32(t.inject_nan_at_step)}
  if shapes_only:
    state = _with_shardings(state_shape, shardings)
    consts = _with_shardings(dict(consts, g_rest=rest_shape), replicated)
  else:
    state, consts = _materialize(init, d_params, d_stats, shardings, consts, replicated)

  train_step = jax.jit(steps.make_train_step(nets, step_cfg), donate_argnums=(0,),
                       out_shardings=(shardings, replicated))
  usage_report = jax.jit(lambda state: steps.usage_report(state, dead_after=t.dead_code_steps),
                         donate_argnums=(0,),
                         out_shardings=(shardings, replicated))
  n = t.num_image_samples

  def samples(params, rest, images):
    images = jax.lax.with_sharding_constraint(images, replicated)[:n]
    return images, steps.reconstruct(nets, params, rest, images)

  reconstruct = jax.jit(samples, out_shardings=(replicated, replicated))
  return Run(nets, step_cfg, state, shardings, consts, train_step, usage_report, reconstruct,
             parameter_counts_from_config(config.model), shapes_only)


def _materialize(init, d_params, d_stats, shardings, consts, replicated):
  """The initial state on the mesh and the constants (frozen weights) replicated."""
  if jax.process_count() > 1:
    # Arrays built on this host enter global computations as host data
    # (identical on every process), not as arrays committed to a local device.
    d_params, d_stats, consts = jax.device_get((d_params, d_stats, consts))
  # One process: the initial state is computed by one jitted program on one
  # device, then laid out on the mesh; the same program serves every mesh (one
  # compilation, cached across runs; a tokenizer of 10^8 parameters fits one
  # device). Several processes: created directly in the global shards.
  # It runs once, so XLA's backend optimisations would only cost compile time.
  out_shardings = None
  if jax.process_count() > 1:
    out_shardings = (shardings, replicated)
  init = jax.jit(init, out_shardings=out_shardings).lower(d_params, d_stats).compile(
      compiler_options={"xla_backend_optimization_level": 0,
                        "xla_llvm_disable_expensive_passes": True})
  state, g_rest = init(d_params, d_stats)
  state = jax.device_put(state, shardings)
  consts = jax.device_put(consts, replicated)
  consts["g_rest"] = jax.device_put(g_rest, replicated)
  return state, consts


def tokenizer_from_state(run: Run, params) -> Tokenizer:
  """An nnx Tokenizer view of `params` (e.g. the EMA) for evaluation."""
  return nnx.merge(run.nets.g_graphdef, params, run.consts["g_rest"])
