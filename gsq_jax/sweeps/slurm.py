"""The SLURM back end: one job array over the manifest.

`array_script` writes a batch script whose task i runs manifest record
`runs[i]` (i = $SLURM_ARRAY_TASK_ID) through `python -m gsq_jax.sweeps.runner`,
which starts the trainer with `srun` (one process per GPU) and records the
outcome in the run's status.json. Preemption: `--signal=B:USR1@S` reaches the
runner (the batch shell `exec`s it), which forwards the signal to srun; the
trainer saves a checkpoint and exits 75; the runner then `scontrol requeue`s
the task, which resumes from the checkpoint. Retryable failures are requeued
the same way, up to the manifest's max_retries.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import time
from collections.abc import Sequence

from gsq_jax.sweeps import manifest as manifest_lib
from gsq_jax.utils import files
from gsq_jax.sweeps import sites as sites_lib


def array_spec(indices: Sequence[int], max_concurrent: int | None) -> str:
  """`[0,1,2,5,6]`, 2 -> `0-2,5-6%2` (sbatch --array syntax)."""
  if not indices:
    raise ValueError("array_spec: no runs to submit")
  indices = sorted(set(indices))
  parts, start, prev = [], indices[0], indices[0]
  for i in indices[1:] + [None]:
    if i is not None and i == prev + 1:
      prev = i
      continue
    parts.append(str(start) if start == prev else f"{start}-{prev}")
    if i is not None:
      start = prev = i
  spec = ",".join(parts)
  if max_concurrent:
    spec += f"%{max_concurrent}"
  return spec


def log_dir(sweep: manifest_lib.Manifest) -> pathlib.Path:
  return pathlib.Path(sweep.root) / "slurm"


def array_script(sweep: manifest_lib.Manifest, site: sites_lib.Site, indices: Sequence[int], *,
                 max_concurrent: int | None = None) -> str:
  """The sbatch script of one job array over manifest runs `indices`."""
  concurrency = max_concurrent or site.max_concurrent
  options = [f"--job-name=gsq-{sweep.sweep}", f"--array={array_spec(indices, concurrency)}"]
  for key, value in (("account", site.account), ("partition", site.partition),
                     ("qos", site.qos)):
    if value:
      options.append(f"--{key}={value}")
  options += [f"--nodes={site.nodes}", f"--ntasks-per-node={site.tasks_per_node}"]
  if site.gpus_per_node:
    options.append(f"--gres=gpu:{site.gpus_per_node}")
  if site.cpus_per_task:
    options.append(f"--cpus-per-task={site.cpus_per_task}")
  if site.mem:
    options.append(f"--mem={site.mem}")
  if site.time:
    options.append(f"--time={site.time}")
  if site.signal_seconds:
    options.append(f"--signal=B:USR1@{site.signal_seconds}")
  options.append("--requeue" if site.requeue else "--no-requeue")
  out = log_dir(sweep) / "%A_%a.out"
  options += ["--open-mode=append", f"--output={out}"]
  options += list(site.sbatch_extra)

  python = site.python or sweep.python
  launcher = ["srun", f"--ntasks-per-node={site.tasks_per_node}", *site.srun_args]
  runner = [python, "-m", "gsq_jax.sweeps.runner", "--manifest", str(sweep.path),
            "--index", "$SLURM_ARRAY_TASK_ID"]
  if site.coordinator_suffix:
    runner += ["--coordinator-suffix", site.coordinator_suffix]
  runner_line = " ".join(shlex.quote(a) if a != "$SLURM_ARRAY_TASK_ID" else '"$SLURM_ARRAY_TASK_ID"'
                         for a in runner)
  lines = [
      "#!/bin/bash",
      f"# gsq-sweep job array: sweep {sweep.sweep!r} ({len(sweep.runs)} runs in the manifest, "
      f"{len(indices)} submitted), site {site.name!r}",
      f"# Array task i runs the manifest record runs[i] of {sweep.path}",
      f"# (git {sweep.git_commit}{' dirty' if sweep.git_dirty else ''}).",
      *(f"#SBATCH {opt}" for opt in options),
      "",
      "set -eo pipefail",
  ]
  lines += list(site.modules) + list(site.env_activation)
  lines += [f"export {k}={_double_quote(v)}" for k, v in site.env.items()]
  lines += [
      f"cd {shlex.quote(sweep.project_root)}",
      'echo "gsq-sweep: array task ${SLURM_ARRAY_TASK_ID} of job ${SLURM_ARRAY_JOB_ID} '
      '(job ${SLURM_JOB_ID}) on $(hostname) at $(date)"',
      f"exec {runner_line} -- {' '.join(shlex.quote(a) for a in launcher)}",
      "",
  ]
  return "\n".join(lines)


def _double_quote(value: str) -> str:
  """A bash double-quoted word: $VARS still expand on the compute node."""
  escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`")
  return f'"{escaped}"'


def _run(cmd: Sequence[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  try:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=False, env=env,
                          timeout=120)
  except FileNotFoundError as err:
    raise RuntimeError(f"{cmd[0]} not found: the slurm back end needs the SLURM client tools "
                       "(sbatch, squeue, scontrol) on PATH") from err


def active_jobs(job_ids: Sequence[str]) -> list[str]:
  """Those of `job_ids` (array job ids) that squeue still lists."""
  if not job_ids:
    return []
  result = _run(["squeue", "-h", "-o", "%F", "-j", ",".join(job_ids)])
  if result.returncode:  # squeue errors for ids it no longer knows
    return []
  return sorted(set(result.stdout.split()) & set(job_ids))


def submit(script_path: pathlib.Path) -> str:
  """`sbatch --parsable SCRIPT`; returns the array job id."""
  result = _run(["sbatch", "--parsable", str(script_path)])
  if result.returncode:
    raise RuntimeError(f"sbatch {script_path} failed (exit {result.returncode}): "
                       f"{result.stderr.strip() or result.stdout.strip()}")
  return result.stdout.strip().split(";")[0]


def wait(job_id: str, *, poll_s: float = 2.0, timeout_s: float | None = None) -> None:
  """Blocks until squeue no longer lists the array job."""
  deadline = None if timeout_s is None else time.monotonic() + timeout_s
  while active_jobs([job_id]):
    if deadline is not None and time.monotonic() > deadline:
      raise TimeoutError(f"SLURM array job {job_id} still running after {timeout_s} s")
    time.sleep(poll_s)


def script_path(sweep: manifest_lib.Manifest) -> pathlib.Path:
  return log_dir(sweep) / f"{sweep.sweep}_array.sbatch"


def write_script(sweep: manifest_lib.Manifest, script: str) -> pathlib.Path:
  path = script_path(sweep)
  files.atomic_write_text(path, script)
  os.chmod(path, 0o755)
  return path


__all__ = ["active_jobs", "array_script", "array_spec", "log_dir", "script_path", "submit", "wait",
           "write_script"]
