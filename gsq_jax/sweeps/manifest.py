"""The sweep manifest: ROOT/sweep.json, one record per run.

The manifest is what every back end runs from: the local launcher walks its
records, and each SLURM array task reads `runs[$SLURM_ARRAY_TASK_ID]`. It
records where the runs came from (git commit and dirty flag, sweep file and
its hash) and, per run, the deterministic name and workdir (`ROOT/NAME`), the
table key, the resolved config's hash and the exact trainer arguments.

All files here are written atomically (temp file + os.replace), so a reader
(`gsq-collect`, an array task) never sees half a file.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from gsq_jax.sweeps import grid
from gsq_jax.utils.files import atomic_write_json

MANIFEST_NAME = "sweep.json"
FORMAT_VERSION = 1


def read_json(path: str | os.PathLike) -> Any | None:
  """A JSON file's value, or None when it is absent or (still being) written partially."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError):
    return None


def git_info(folder: str | os.PathLike) -> dict[str, Any]:
  """Commit and dirty flag of the checkout at `folder` (read-only git calls)."""
  def git(*args: str) -> str | None:
    try:
      out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                           timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
      return None
    return out.stdout.strip()
  commit = git("rev-parse", "HEAD")
  status = git("status", "--porcelain", "--untracked-files=no")
  return {"git_commit": commit or "unknown",
          "git_dirty": bool(status) if status is not None else None}


@dataclasses.dataclass(frozen=True)
class RunRecord:
  """One run of the manifest."""
  index: int
  name: str
  workdir: str
  config: str
  config_hash: str
  keys: Mapping[str, Any]
  overrides: Mapping[str, Any]
  train_args: Sequence[str]

  def to_json(self) -> dict[str, Any]:
    return {"index": self.index, "name": self.name, "workdir": self.workdir,
            "config": self.config, "config_hash": self.config_hash, "keys": dict(self.keys),
            "overrides": dict(self.overrides), "train_args": list(self.train_args)}

  @classmethod
  def from_json(cls, value: Mapping[str, Any]) -> RunRecord:
    return cls(index=int(value["index"]), name=value["name"], workdir=value["workdir"],
               config=value["config"], config_hash=value["config_hash"],
               keys=dict(value["keys"]), overrides=dict(value.get("overrides", {})),
               train_args=list(value["train_args"]))


@dataclasses.dataclass
class Manifest:
  """ROOT/sweep.json."""
  sweep: str
  sweep_file: str
  sweep_sha256: str
  tiny: bool
  root: str
  git_commit: str
  git_dirty: bool | None
  created: str
  python: str
  max_retries: int
  project_root: str
  runs: list[RunRecord]
  slurm_jobs: list[str] = dataclasses.field(default_factory=list)

  @property
  def path(self) -> pathlib.Path:
    return pathlib.Path(self.root) / MANIFEST_NAME

  def run(self, index: int) -> RunRecord:
    """The record of run `index` (the SLURM array task id)."""
    if not 0 <= index < len(self.runs):
      raise ValueError(f"run index {index} is out of range: the manifest {self.path} "
                       f"has {len(self.runs)} runs (0..{len(self.runs) - 1})")
    record = self.runs[index]
    if record.index != index:
      raise ValueError(f"manifest {self.path} is corrupt: runs[{index}].index = {record.index}")
    return record

  def to_json(self) -> dict[str, Any]:
    value = dataclasses.asdict(self)
    value["format_version"] = FORMAT_VERSION
    value["runs"] = [r.to_json() for r in self.runs]
    return value

  def write(self) -> None:
    atomic_write_json(self.path, self.to_json())


def read_manifest(path: str | os.PathLike) -> Manifest:
  """Reads ROOT/sweep.json (pass ROOT or the file)."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / MANIFEST_NAME
  value = read_json(path)
  if value is None:
    raise ValueError(f"manifest: no readable {MANIFEST_NAME} at {path}; launch the sweep with "
                     "gsq-sweep first")
  if value.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"manifest {path}: format_version {value.get('format_version')} is not "
                     f"{FORMAT_VERSION}")
  fields = {f.name for f in dataclasses.fields(Manifest)}
  kwargs = {k: v for k, v in value.items() if k in fields}
  kwargs["runs"] = [RunRecord.from_json(r) for r in value["runs"]]
  return Manifest(**kwargs)


def default_root(sweep_name: str, tiny: bool) -> pathlib.Path:
  """`runs/NAME` (`runs/NAME_tiny` for --tiny) under the current folder."""
  return pathlib.Path("runs") / (f"{sweep_name}_tiny" if tiny else sweep_name)


def build_manifest(sweep_file: grid.SweepFile, expansion: grid.Expansion, *,
                   root: str | os.PathLike, tiny: bool, max_retries: int,
                   python: str | None = None) -> Manifest:
  """A manifest for the valid points of an expansion, workdirs under `root`."""
  root = pathlib.Path(root).resolve()
  runs = []
  for index, point in enumerate(expansion.points):
    workdir = str(root / point.name)
    runs.append(RunRecord(index=index, name=point.name, workdir=workdir, config=point.config_spec,
                          config_hash=expansion.hashes[point.name], keys=point.keys(),
                          overrides=dict(point.overrides), train_args=point.train_args(workdir)))
  info = git_info(sweep_file.project_root)
  return Manifest(
      sweep=sweep_file.name, sweep_file=str(sweep_file.path), sweep_sha256=sweep_file.sha256,
      tiny=tiny, root=str(root), git_commit=info["git_commit"], git_dirty=info["git_dirty"],
      created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      python=python or sys.executable, max_retries=max_retries,
      project_root=str(sweep_file.project_root), runs=runs)


__all__ = ["MANIFEST_NAME", "Manifest", "RunRecord",
           "build_manifest", "default_root", "git_info", "read_json", "read_manifest"]
