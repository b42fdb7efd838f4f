"""Accelerator targets a run is planned for: parsing, device figures, deviceless devices.

A target names a device kind and how many: `gpu:h100:8` (8 GPUs on one host),
`gpu:h100:8x4` (8 GPUs per host on 4 hosts), `tpu:v5e:2x2`, `tpu:v5p:2x2x1`,
`tpu:v6e:4x4` (a TPU slice topology, as JAX's topology names spell it).
`devices()` returns JAX device descriptions of the target built on this CPU
host (`jax.experimental.topologies`, see spec/AOT.md); a mesh over them
compiles exactly like one over real devices, but nothing can run on it.

The figures below are the vendors' published dense peaks (no sparsity) and
HBM bandwidths; they feed a roofline estimate, not a measurement. GPU memory
sizes come from the XLA target description shipped in gpu_targets/.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import pathlib
import re

GIB = 2 ** 30
_GPU_TARGETS = pathlib.Path(__file__).resolve().parent / "gpu_targets"


@dataclasses.dataclass(frozen=True)
class DeviceKind:
  """Published figures of one accelerator (per device as JAX counts devices)."""

  name: str
  platform: str  # "gpu" or "tpu"
  peak_bf16: float  # dense FLOP/s
  peak_f32: float  # dense FLOP/s at JAX's default f32 matmul precision (GPU: TF32)
  bandwidth: float  # HBM bytes/s
  memory: float  # bytes per device the compiler may use
  usable_fraction: float  # share of `memory` the runtime hands to programs by default
  target_file: str | None = None  # GPU: the XLA GpuTargetConfigProto


def _gpu_memory(target_file: str) -> float:
  text = (_GPU_TARGETS / target_file).read_text()
  return float(re.search(r"device_memory_size:\s*(\d+)", text).group(1))


# JAX preallocates 75 % of GPU memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION);
# TPU memory as the TPU compiler states it (spec/AOT.md) is all usable.
JAX_GPU_DEFAULT_FRACTION = 0.75
DEVICE_KINDS = {
    "h100": DeviceKind("NVIDIA H100 SXM 80GB", "gpu", 989e12, 494e12, 3.35e12,
                       _gpu_memory("h100_sxm.txtpb"), JAX_GPU_DEFAULT_FRACTION, "h100_sxm.txtpb"),
    "a100-80g": DeviceKind("NVIDIA A100 SXM 80GB", "gpu", 312e12, 156e12, 2.04e12,
                           _gpu_memory("a100_sxm_80.txtpb"), JAX_GPU_DEFAULT_FRACTION,
                           "a100_sxm_80.txtpb"),
    "b200": DeviceKind("NVIDIA B200", "gpu", 2250e12, 1100e12, 7.67e12,
                       _gpu_memory("b200.txtpb"), JAX_GPU_DEFAULT_FRACTION, "b200.txtpb"),
    # TPU f32 matmuls at JAX's default precision run as bf16 passes.
    "v4": DeviceKind("TPU v4 (megacore)", "tpu", 275e12, 275e12, 1.2e12, 30.75 * GIB, 1.0),
    "v5e": DeviceKind("TPU v5e", "tpu", 197e12, 197e12, 0.82e12, 15.75 * GIB, 1.0),
    "v5p": DeviceKind("TPU v5p", "tpu", 459e12, 459e12, 2.76e12, 95.74 * GIB, 1.0),
    "v6e": DeviceKind("TPU v6e", "tpu", 918e12, 918e12, 1.64e12, 31.25 * GIB, 1.0),
}

# The optional extra that brings each platform's compiler (setup.py).
EXTRAS = {"gpu": "plan-gpu", "tpu": "plan-tpu"}
_TOOLCHAIN_MODULES = {"gpu": ("jax_plugins.xla_cuda12", "nvidia.cuda_nvcc"), "tpu": ("libtpu",)}


class ToolchainMissing(RuntimeError):
  """The compiler for a target's platform is not installed (names the pip extra)."""


@dataclasses.dataclass(frozen=True)
class Target:
  """A parsed target: `kind` devices per host x `hosts` (GPU) or a TPU topology."""

  spec: str
  platform: str
  kind: DeviceKind
  topology: str  # GPU: "slices x hosts x gpus"; TPU: "v5e:2x2"
  num_devices: int

  def devices(self) -> list:
    """Device descriptions of the target, built on this host (nothing allocated)."""
    check_toolchain(self.platform)
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    if self.platform == "gpu":
      text = (_GPU_TARGETS / self.kind.target_file).read_text()
      topo = topologies.get_topology_desc(platform="cuda", target_config=text,
                                          topology=self.topology)
    else:
      topo = topologies.get_topology_desc(platform="tpu", topology_name=self.topology)
    devices = list(topo.devices)
    if len(devices) != self.num_devices:
      raise ValueError(f"target {self.spec!r}: the topology has {len(devices)} devices, "
                       f"expected {self.num_devices}")
    return devices


def parse_target(spec: str) -> Target:
  """`gpu:KIND:N[xHOSTS]` or `tpu:GEN:AxB[xC]`; ValueError lists what is accepted."""
  parts = spec.split(":")
  usage = (f"--target {spec!r}: expected gpu:KIND:N[xHOSTS] (e.g. gpu:h100:8, gpu:h100:8x4) "
           f"or tpu:GEN:TOPOLOGY (e.g. tpu:v5e:2x2, tpu:v5p:2x2x1); kinds: "
           f"{', '.join(sorted(DEVICE_KINDS))}")
  if len(parts) != 3 or parts[0] not in EXTRAS:
    raise ValueError(usage)
  platform, name, shape = parts
  kind = DEVICE_KINDS.get(name)
  if kind is None or kind.platform != platform:
    raise ValueError(usage)
  if not re.fullmatch(r"\d+(x\d+)*", shape):
    raise ValueError(usage)
  dims = [int(d) for d in shape.split("x")]
  if platform == "gpu":
    if len(dims) > 2:
      raise ValueError(usage)
    per_host, hosts = dims[0], (dims[1] if len(dims) == 2 else 1)
    return Target(spec, platform, kind, f"1x{hosts}x{per_host}", per_host * hosts)
  return Target(spec, platform, kind, f"{name}:{shape}", math.prod(dims))


def check_toolchain(platform: str) -> None:
  """Raises ToolchainMissing naming the extra when the platform's compiler is absent."""
  missing = [m for m in _TOOLCHAIN_MODULES[platform] if _find_spec(m) is None]
  if missing:
    raise ToolchainMissing(
        f"compiling for a {platform.upper()} target needs {', '.join(missing)}, which is not "
        f"installed: pip install 'gsq_jax[{EXTRAS[platform]}]' (see spec/AOT.md)")


def _find_spec(module: str):
  try:
    return importlib.util.find_spec(module)
  except ModuleNotFoundError:
    return None


def configure_host_for_deviceless() -> None:
  """Environment for deviceless compilation (spec/AOT.md); before JAX starts a backend."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if not xla_bridge.backends_are_initialized():
    jax.config.update("jax_platforms", "cpu")
