"""What a run ran on: package versions, backend and device kind, as flat `version_*` keys.

The trainer writes these into the first metrics.jsonl row of every run, and
`gsq-collect` warns when one table mixes versions: numbers from two jax or
flax releases are not comparable without saying so. The packages are those
pinned in constraints.txt.
"""

from __future__ import annotations

from importlib import metadata
import platform
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# The distributions constraints.txt pins (their PyPI names).
PINNED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")
VERSION_PREFIX = "version_"


def version_key(package: str) -> str:
  """'orbax-checkpoint' -> 'version_orbax_checkpoint' (a column name)."""
  return VERSION_PREFIX + package.replace("-", "_")


def package_versions(packages: Sequence[str] = PINNED) -> dict[str, str]:
  """{version_<package>: installed version or "missing"}."""
  out = {}
  for package in packages:
    try:
      out[version_key(package)] = metadata.version(package)
    except metadata.PackageNotFoundError:
      out[version_key(package)] = "missing"
  return out


def run_environment(devices: Iterable[Any]) -> dict[str, str]:
  """Versions plus python, the devices' platform and kind (e.g. 'cpu', 'NVIDIA H100 80GB HBM3')."""
  devices = list(devices)
  kinds = sorted({str(d.device_kind) for d in devices})
  platforms = sorted({str(d.platform) for d in devices})
  return {**package_versions(), "version_python": platform.python_version(),
          "backend": ",".join(platforms), "device_kind": ",".join(kinds)}


def mixed_versions(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
  """{version column: its distinct values} for the columns with more than one value.

  Rows without a value (runs of an older trainer, pending runs) are ignored.
  """
  seen: dict[str, set[str]] = {}
  for row in rows:
    for key, value in row.items():
      if key.startswith(VERSION_PREFIX) and isinstance(value, str) and value:
        seen.setdefault(key, set()).add(value)
  return {k: sorted(v) for k, v in sorted(seen.items()) if len(v) > 1}
