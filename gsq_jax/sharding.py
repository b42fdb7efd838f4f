"""Device mesh, shardings and multi-host start-up.

The mesh has three axes, `data`, `fsdp` and `vocab` (config.mesh: sizes, -1 =
all devices left). Batches are split over *all* axes, so every device gets its
own slice of the global batch for the encoder, decoder and losses. With
fsdp = vocab = 1 this is plain data parallelism: parameters and optimiser
state are replicated. With fsdp > 1, parameters, EMA and optimiser state live
sharded over `fsdp` (each array on its largest dimension that divides), and
the train step gathers the parameters for the forward and backward pass and
scatters the gradients back to the shards (ZeRO-3 style; see `gather` /
`scatter_like`). With vocab > 1 the codebook (and its EMA and Adam moments)
is split by rows over `vocab` and never gathered: the quantizer becomes its
vocabulary-sharded twin (quantizers/sharded.py), which sees the tokens of a
(data, fsdp) slice on every vocab device and reduces the search over `vocab`
(`quantizer_axes`). With vocab = 1 GSQ/VQ/IBQ take the same per-device path
over the (data, fsdp) tokens, so their chunk loops run over local tokens
only. All layouts compute the same sums, so losses agree to float tolerance.

The mesh uses *Auto* axis types, not JAX 0.10's default Explicit: the model
and quantizer code is written without sharding annotations (gathers of a
replicated codebook with batch-sharded indices, reshapes that merge the batch
axis with space, ...), which explicit mode rejects as ambiguous, while XLA's
sharding propagation places them correctly from the input and output
shardings of the jitted step. The step functions run under
`jax.set_mesh(mesh)`, and `gather`/`scatter_like` are sharding constraints.

Multi-host: `initialize_distributed` calls `jax.distributed.initialize()`
once, before any JAX computation, when the run is multi-process: explicitly
(coordinator address / process count / id from flags or the environment
variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) or
detected (SLURM `srun` step with more than one task, Open MPI, TPU pod). On
SLURM jax takes the coordinator from the first host of the step's node list;
JSC machines want the InfiniBand name (host + "i"), so pass
`--coordinator_address` (or JAX_COORDINATOR_ADDRESS) there. On CPU the
processes talk through gloo collectives.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

from absl import logging
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import ml_collections

AXES = ("data", "fsdp", "vocab")
BATCH_AXES = AXES  # the batch is split over every device
VOCAB_AXIS = "vocab"
QUANTIZER_DATA_AXES = ("data", "fsdp")  # the tokens' split inside the per-device quantizer
VOCAB_SHARDABLE = ("gsq", "vq", "ibq")  # quantizers with a vocabulary-sharded twin
# Arrays smaller than this stay replicated under FSDP: sharding them saves
# nothing and costs a collective each.
MIN_FSDP_SIZE = 2 ** 14


def default_config() -> ml_collections.ConfigDict:
  """config.mesh: data-parallel over all devices, no parameter or codebook sharding."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, vocab=1))


# ----------------------------------------------------------------------------
# Multi-host start-up
# ----------------------------------------------------------------------------
def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def detected_cluster() -> str | None:
  """The multi-process launcher this process runs under, if any."""
  env = os.environ
  if ("SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env
      and (_env_int("SLURM_NTASKS") or _env_int("SLURM_STEP_NUM_TASKS") or 1) > 1):
    return "slurm"
  if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return "openmpi"
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env:
    return "tpu"
  return None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, *,
                           mode: str = "auto",
                           local_device_ids: Sequence[int] | None = None) -> bool:
  """Starts JAX's multi-controller runtime when this is a multi-process run.

  Args:
    coordinator_address: "host:port" of process 0; default from
      $JAX_COORDINATOR_ADDRESS or the cluster (SLURM/TPU auto-detection).
    num_processes, process_id: default from $JAX_NUM_PROCESSES /
      $JAX_PROCESS_ID or the cluster.
    mode: "auto" (initialise if anything above is given or a cluster is
      detected), "on" (always), "off" (never; single process).
    local_device_ids: devices of this process (default: jax's choice; on
      SLURM one GPU per task, `SLURM_LOCALID`).

  Returns:
    Whether `jax.distributed.initialize` was called.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"initialize_distributed: `mode` must be 'auto', 'on' or 'off', got {mode!r}")
  if mode == "off":
    return False
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None:
    num_processes = _env_int("JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int("JAX_PROCESS_ID")
  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
  cluster = detected_cluster()
  if mode == "auto" and not explicit and cluster is None:
    return False
  if num_processes is not None and num_processes > 1 and (
      coordinator_address is None or process_id is None) and cluster is None:
    raise ValueError(
        "multi-process run without a cluster launcher: pass --coordinator_address HOST:PORT, "
        "--num_processes N and --process_id I (or set JAX_COORDINATOR_ADDRESS, "
        "JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
  # CPU processes need a collectives implementation to talk to each other;
  # the setting only affects the CPU backend.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("jax.distributed.initialize(coordinator=%s, num_processes=%s, process_id=%s, "
               "cluster=%s)", coordinator_address, num_processes, process_id, cluster)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids)
  return True


# ----------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------
def mesh_shape(mesh_cfg: Mapping[str, Any], num_devices: int) -> tuple[int, ...]:
  """(data, fsdp, vocab) sizes; -1 takes the devices left. Raises ValueError naming the field."""
  unknown = set(mesh_cfg.keys()) - set(AXES)
  if unknown:
    raise ValueError(f"mesh.{sorted(unknown)[0]}: unknown mesh axis; the axes are {AXES}")
  sizes = {}
  for axis in AXES:
    value = mesh_cfg.get(axis, -1 if axis == "data" else 1)
    if not isinstance(value, int) or (value < 1 and value != -1):
      raise ValueError(f"mesh.{axis} must be a positive integer or -1 (all devices left), "
                       f"got {value!r}")
    sizes[axis] = value
  free = [a for a in AXES if sizes[a] == -1]
  if len(free) > 1:
    raise ValueError(f"mesh: at most one of mesh.{free[0]} and mesh.{free[1]} may be -1")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if num_devices % fixed:
      named = " * ".join(f"mesh.{a} = {sizes[a]}" for a in AXES if a != free[0])
      raise ValueError(f"{named} (= {fixed}) does not divide the {num_devices} devices")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    product = " * ".join(f"mesh.{a}" for a in AXES)
    values = " * ".join(str(sizes[a]) for a in AXES)
    raise ValueError(f"{product} = {values} must equal the number of devices ({num_devices}); "
                     "use -1 for one of them")
  return tuple(sizes[a] for a in AXES)


def make_mesh(mesh_cfg: Mapping[str, Any],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ("data", "fsdp", "vocab") mesh over `devices` (default: all, over all hosts)."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def mesh_platform(mesh: Mesh) -> str:
  """The platform of the mesh's devices ("cpu", "gpu"/"cuda", "tpu").

  Device-specific code paths key on this, never on jax.default_backend():
  the host backend is "cpu" while compiling deviceless for a GPU or TPU.
  """
  platforms = {d.platform for d in mesh.devices.flat}
  if len(platforms) != 1:
    raise ValueError(f"mesh mixes device platforms {sorted(platforms)}")
  return platforms.pop()


def validate_mesh(mesh_cfg: Mapping[str, Any], *, num_devices: int, global_batch_size: int,
                  quantizer: str, codebook_size: int) -> None:
  """Raises ValueError naming the field when the mesh does not fit the devices, batch or codebook."""
  data, fsdp, vocab = mesh_shape(mesh_cfg, num_devices)
  if global_batch_size % num_devices:
    raise ValueError(f"train.global_batch_size = {global_batch_size} must be divisible by "
                     f"the number of devices mesh.data * mesh.fsdp * mesh.vocab = {data} * "
                     f"{fsdp} * {vocab} = {num_devices} (the batch is split over all of them); "
                     f"use a multiple of {num_devices}")
  if vocab > 1:
    if quantizer not in VOCAB_SHARDABLE:
      raise ValueError(f"mesh.vocab = {vocab} shards the codebook, which only "
                       f"{VOCAB_SHARDABLE} quantizers support; the {quantizer!r} quantizer "
                       "needs mesh.vocab = 1")
    if codebook_size % vocab:
      raise ValueError(f"model.codebook_size V = {codebook_size} must be divisible by "
                       f"mesh.vocab = {vocab} (each vocab device holds V / mesh.vocab codes)")


def quantizer_axes(quantizer: str) -> dict[str, Any]:
  """Quantizer options for the trainer's mesh: vocab_axis/data_axis for GSQ/VQ/IBQ, else {}.

  They select the per-device path (quantizers/sharded.py) whatever mesh.vocab
  is: with vocab = 1 it runs the chunked search and IBQ's chunk loop over each
  device's own tokens, where the plain quantizer under a batch-sharded jit
  loops over the global tokens on every device and all-gathers the latent
  each iteration.
  """
  if quantizer not in VOCAB_SHARDABLE:
    return {}
  return {"vocab_axis": VOCAB_AXIS, "data_axis": QUANTIZER_DATA_AXES}


def batch_shards(mesh: Mesh) -> int:
  """How many ways the batch axis is split."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_spec(shape: Sequence[int], fsdp: int, min_size: int | None = None) -> P:
  """FSDP spec of one array: its largest dimension divisible by `fsdp` goes on "fsdp".

  Arrays with fewer than `min_size` (default MIN_FSDP_SIZE) elements stay replicated.
  """
  min_size = MIN_FSDP_SIZE if min_size is None else min_size
  if fsdp <= 1 or math.prod(shape) < min_size:
    return P()
  candidates = [(d, i) for i, d in enumerate(shape) if d % fsdp == 0]
  if not candidates:
    return P()
  _, axis = max(candidates)
  return P(*([None] * axis + ["fsdp"]))


def is_codebook(path: Sequence[Any]) -> bool:
  """Whether a key path names the quantizer's codebook (in params, EMA or optimiser state)."""
  names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  return "quantizer" in names and "codebook" in names


def _spec(path, x, mesh: Mesh, gathered: bool) -> P:
  if mesh.shape[VOCAB_AXIS] > 1 and is_codebook(path) and len(x.shape) == 2:
    return P(VOCAB_AXIS, None)  # rows over vocab, never gathered
  if gathered:
    return P()
  return param_spec(x.shape, mesh.shape["fsdp"])


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a pytree of arrays / ShapeDtypeStructs (FSDP / vocab if the mesh has it)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, _spec(path, x, mesh, gathered=False)), tree)


def _sharded_params(mesh: Mesh | None) -> bool:
  return mesh is not None and (mesh.shape["fsdp"] > 1 or mesh.shape[VOCAB_AXIS] > 1)


def gather(tree: Any, mesh: Mesh | None) -> Any:
  """Inside a step: every array replicated (FSDP's all-gather), except a vocab-sharded codebook."""
  if not _sharded_params(mesh):
    return tree
  return jax.lax.with_sharding_constraint(tree, jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, _spec(path, x, mesh, gathered=True)), tree))


def scatter_like(tree: Any, mesh: Mesh | None) -> Any:
  """Inside a step: `tree` laid out as the parameters (gradients onto FSDP / vocab shards)."""
  if not _sharded_params(mesh):
    return tree
  return jax.lax.with_sharding_constraint(tree, tree_shardings(tree, mesh))
