"""Site profiles (`sweeps/sites/*.yaml`): where and how a sweep runs.

A site file is a small YAML mapping; every key is optional:

  name: jsc_booster
  # SLURM allocation of one run (one array task)
  account: myproject          partition: booster        qos: null
  nodes: 1                    gpus_per_node: 4          ntasks_per_node: 4
  cpus_per_task: 12           mem: null                 time: "24:00:00"
  max_concurrent: 8           # array concurrency (%K); --jobs overrides
  signal_seconds: 300         # --signal=B:USR1@300: checkpoint before the limit
  requeue: true               # --requeue, and requeue after preemption
  sbatch_extra: ["--mail-type=FAIL"]   # more #SBATCH options
  srun_args: ["--cpu-bind=none"]       # options of the srun that starts the trainer
  # environment on the compute nodes
  modules: ["module load Stages/2025 GCC Python CUDA"]
  env_activation: "source $PROJECT/venvs/gsq/bin/activate"
  env: {XLA_PYTHON_CLIENT_MEM_FRACTION: "0.9"}   # exported; $VARS expand on the node
  python: python              # interpreter there (default: the launcher's)
  coordinator_suffix: i       # JSC: JAX coordinator on "<first host>i"
  # both back ends
  root: $SCRATCH/gsq_runs     # default --root (then /<sweep name>)
  overrides: {data.data_dir: $SCRATCH/tfds}   # config fields of every run
  # local back end
  gpus: [0, 1]                # GPU ids to use (default: all visible)
  jobs: 2                     # runs at a time (default: one per GPU, else 1)

One process per GPU (JAX_STYLE.md §3.1): `ntasks_per_node` defaults to
`gpus_per_node`, and every task sees all of the node's GPUs, because JAX's
SLURM detection assigns local device SLURM_LOCALID to each process.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from typing import Any

_STR, _INT, _BOOL, _LIST, _DICT = "a string", "an integer", "true or false", "a list", "a mapping"
_SCHEMA = {
    "name": _STR, "account": _STR, "partition": _STR, "qos": _STR, "nodes": _INT,
    "gpus_per_node": _INT, "ntasks_per_node": _INT, "cpus_per_task": _INT, "mem": _STR,
    "time": _STR, "max_concurrent": _INT, "signal_seconds": _INT, "requeue": _BOOL,
    "sbatch_extra": _LIST, "srun_args": _LIST, "modules": _LIST, "env_activation": _LIST,
    "env": _DICT, "python": _STR, "coordinator_suffix": _STR, "root": _STR,
    "overrides": _DICT, "gpus": _LIST, "jobs": _INT,
}


@dataclasses.dataclass(frozen=True)
class Site:
  """A parsed site profile (defaults = a plain workstation)."""
  name: str = "default"
  account: str | None = None
  partition: str | None = None
  qos: str | None = None
  nodes: int = 1
  gpus_per_node: int = 0
  ntasks_per_node: int | None = None
  cpus_per_task: int | None = None
  mem: str | None = None
  time: str | None = None
  max_concurrent: int | None = None
  signal_seconds: int = 300
  requeue: bool = True
  sbatch_extra: tuple[str, ...] = ()
  srun_args: tuple[str, ...] = ()
  modules: tuple[str, ...] = ()
  env_activation: tuple[str, ...] = ()
  env: Mapping[str, str] = dataclasses.field(default_factory=dict)
  python: str | None = None
  coordinator_suffix: str = ""
  root: str | None = None
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  gpus: tuple[int, ...] | None = None
  jobs: int | None = None
  path: str | None = None

  @property
  def tasks_per_node(self) -> int:
    """Processes per node: one per GPU unless set."""
    return self.ntasks_per_node or max(self.gpus_per_node, 1)


def _check(path: str, key: str, value: Any) -> Any:
  """Type-checks one site field; returns the normalised value."""
  kind = _SCHEMA[key]
  fail = ValueError(f"site file {path}: `{key}` must be {kind}, got {value!r}")
  if value is None:
    return None
  if kind == _STR:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
      raise fail
    return os.path.expandvars(str(value)) if key == "root" else str(value)
  if kind == _INT:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise fail
    return value
  if kind == _BOOL:
    if not isinstance(value, bool):
      raise fail
    return value
  if kind == _LIST:
    if isinstance(value, str) and key in ("modules", "env_activation", "sbatch_extra", "srun_args"):
      value = [value]
    if not isinstance(value, list):
      raise fail
    if key == "gpus":
      if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError(f"site file {path}: `gpus` must be a list of GPU ids, got {value!r}")
      return tuple(value)
    return tuple(str(v) for v in value)
  if not isinstance(value, Mapping):
    raise fail
  if key == "env":
    return {str(k): str(v) for k, v in value.items()}
  # Config overrides are passed without a shell: expand $VARS here.
  return {str(k).removeprefix("config."): os.path.expandvars(v) if isinstance(v, str) else v
          for k, v in value.items()}


def load_site(path: str | os.PathLike | None) -> Site:
  """Reads a site YAML file (None gives the defaults)."""
  if path is None:
    return Site()
  import yaml  # pylint: disable=import-outside-toplevel

  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"--site: {path} does not exist; see sweeps/sites/ for examples")
  with open(path, encoding="utf-8") as f:
    raw = yaml.safe_load(f) or {}
  if not isinstance(raw, Mapping):
    raise ValueError(f"site file {path}: expected a mapping of settings, got {type(raw).__name__}")
  unknown = sorted(set(raw) - set(_SCHEMA))
  if unknown:
    raise ValueError(f"site file {path}: unknown setting(s) {unknown}; known: {sorted(_SCHEMA)}")
  values = {key: _check(str(path), key, value) for key, value in raw.items()}
  values = {k: v for k, v in values.items() if v is not None}
  values.setdefault("name", path.stem)
  if values.get("nodes", 1) < 1:
    raise ValueError(f"site file {path}: `nodes` must be >= 1, got {values['nodes']}")
  return Site(**values, path=str(path))


__all__ = ["Site", "load_site"]
