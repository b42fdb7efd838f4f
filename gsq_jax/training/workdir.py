"""Who may write a run directory, and with which config.

Two rules keep a workdir from being corrupted:

* One owner. `RunLock` is an advisory `flock` on WORKDIR/.lock, held for the
  whole run and released by the OS when the holder dies (no stale locks after
  a crash or `kill -9`). The file names the holder ("host pid"), so a second
  trainer is refused with who has it. One lock per run: in a multi-process
  run only process 0 takes it (the trainer shares its verdict with the
  others), because every process of a run writes the same workdir on purpose.
  `gsq-sweep` takes the lock before it starts a trainer and passes it on:
  the child inherits the descriptor and finds the launcher's holder line in
  $GSQ_RUN_LOCK_HOLDER (through `srun` too), so it runs under its launcher's
  lock instead of being refused by it.
* One config. Once a workdir holds a checkpoint (or DONE), its config.json is
  fixed: a relaunch may change only `RESUMABLE` fields (run length, cadences,
  evaluation, device layout, data loading speed); anything else would restore
  a checkpoint into a different model or silently change the experiment, so
  it is refused before any file is touched, listing the fields. Starting over
  is explicit (`--force_new`): a fresh subfolder, never an overwrite. An
  imported workdir (weights-only checkpoints, nothing trained yet) fixes only
  the `model` block: fine-tuning chooses its own recipe.

No JAX here: the sweep launcher imports this module.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pathlib
import re
import socket
from typing import Any, Mapping

LOCK_NAME = ".lock"
HOLDER_ENV = "GSQ_RUN_LOCK_HOLDER"
CONFIG_NAME = "config.json"
RESTART_PREFIX = "restart-"

# Dotted config keys (or "block." prefixes) a relaunch may change. Each is
# either read afresh every step (cadences, length: the LR schedule is
# re-stretched to the new total_steps), only used by evaluation, or a layout /
# throughput knob that leaves the computation the same (a checkpoint restores
# onto any mesh; data_dir is the same data at another path).
RESUMABLE = (
    "train.total_steps", "train.log_every_steps", "train.checkpoint_every_steps",
    "train.keep_checkpoints", "train.image_every_steps", "train.num_image_samples",
    "train.eval_every_steps", "train.final_eval", "train.preemption_check_every_steps",
    "train.fast_cpu_convs", "train.inject_nan_at_step", "train.dead_code_steps",
    "train.gpu_memory_fraction", "train.remat",
    "eval.", "mesh.",
    "data.data_dir", "data.eval_source", "data.eval_crop", "data.eval_num_images",
    "data.num_workers", "data.num_threads", "data.read_buffer", "data.prefetch",
)

# Fields added after runs were already being trained, with the value that
# reproduces what those runs did: a config.json written before the field
# existed, resumed with that value, is the same experiment.
ADDED_FIELDS = {"optim.encoder_lr_factor": 1.0}


class WorkdirRefused(Exception):
  """The workdir belongs to another process or another config: nothing was written."""


# ----------------------------------------------------------------------------
# The lock.
# ----------------------------------------------------------------------------
def holder_line() -> str:
  """"host pid" of this process, as written into the lock file."""
  return f"{socket.gethostname()} {os.getpid()}"


class RunLock:
  """An exclusive flock on WORKDIR/.lock that names its holder.

  The lock lives as long as any process holding the open file does, so
  passing the descriptor to a child (the trainer a launcher starts) keeps the
  run locked after the launcher dies. On file systems without flock support
  the lock is a no-op (acquire succeeds).
  """

  def __init__(self, workdir: str | os.PathLike):
    self.path = pathlib.Path(workdir) / LOCK_NAME
    self.fd: int | None = None

  def acquire(self) -> bool:
    """Takes the lock without blocking and records us as holder; False if held elsewhere."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
      if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        os.close(fd)
        return False
      if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        os.close(fd)
        raise
    self.fd = fd
    self.record_holder()
    return True

  def record_holder(self, line: str | None = None) -> None:
    """Writes "host pid" (ours by default) into the lock file for refused processes to read."""
    data = ((line or holder_line()) + "\n").encode()
    fd = self.fd if self.fd is not None else os.open(self.path, os.O_WRONLY)
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, data, 0)
    finally:
      if fd != self.fd:
        os.close(fd)

  def holder(self) -> str:
    """The recorded "host pid" of the holder ("" if none was recorded)."""
    try:
      return self.path.read_text(encoding="utf-8").strip()
    except OSError:
      return ""

  def release(self) -> None:
    """Closes our descriptor (a child's inherited one keeps the lock until it exits)."""
    if self.fd is not None:
      os.close(self.fd)
      self.fd = None


def is_locked(workdir: str | os.PathLike) -> bool:
  """Whether some live process (e.g. an orphaned trainer) holds the run's lock."""
  lock = RunLock(workdir)
  if not lock.path.exists():
    return False
  fd = os.open(lock.path, os.O_RDWR)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as err:
    if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
      return True
    if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
      raise
  finally:
    os.close(fd)  # closing drops a lock we may have taken
  return False


def claim(workdir: str | os.PathLike) -> RunLock:
  """The trainer's lock on `workdir`; raises WorkdirRefused naming the holder.

  A trainer started by gsq-sweep runs under its launcher's lock: the holder
  line in $GSQ_RUN_LOCK_HOLDER matches the file, and the trainer records
  itself as the holder.
  """
  lock = RunLock(workdir)
  if lock.acquire():
    return lock
  holder = lock.holder()
  if holder and holder == os.environ.get(HOLDER_ENV):
    lock.record_holder()
    return lock
  host, _, pid = holder.partition(" ")
  who = f"host {host}, pid {pid}" if pid else "an unknown process"
  raise WorkdirRefused(
      f"{workdir} is in use by another trainer ({who}; lock file {lock.path}). Two trainers "
      "on one workdir would overwrite each other's checkpoints and logs: wait for it to end, "
      "stop it (SIGTERM/Ctrl-C saves a checkpoint), or use another --workdir")


# ----------------------------------------------------------------------------
# The config.
# ----------------------------------------------------------------------------
def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def is_resumable(key: str) -> bool:
  return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (old, new)} of the leaves that differ (JSON-normalised dicts).

  Top-level blocks that only the old file has (records other code may add
  to config.json, e.g. versions) are not part of the config and are ignored,
  and so is an `ADDED_FIELDS` key the old file lacks, at its old-behaviour value.
  """
  old_flat, new_flat = flatten(old), flatten(new)
  blocks = {k.split(".")[0] for k in new_flat}
  keys = set(new_flat) | {k for k in old_flat if k.split(".")[0] in blocks}
  missing = "<absent>"
  for key, value in ADDED_FIELDS.items():
    if key not in old_flat and new_flat.get(key, missing) == value:
      keys.discard(key)
  return {k: (old_flat.get(k, missing), new_flat.get(k, missing)) for k in sorted(keys)
          if old_flat.get(k, missing) != new_flat.get(k, missing)}


def read_config_json(workdir: str | os.PathLike) -> dict[str, Any] | None:
  """WORKDIR/config.json, or None if there is none; a corrupt one raises WorkdirRefused."""
  path = pathlib.Path(workdir) / CONFIG_NAME
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise WorkdirRefused(f"{path} is unreadable ({e}); the run's config is unknown, so it "
                         "cannot be resumed safely: restore the file or use --force_new") from e


def has_started(workdir: str | os.PathLike) -> bool:
  """Whether the workdir holds trained state (a finished checkpoint or DONE)."""
  workdir = pathlib.Path(workdir)
  folder = workdir / "checkpoints"
  return (workdir / "DONE").exists() or (
      folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir()))


def holds_only_weights(workdir: str | os.PathLike) -> bool:
  """Whether every checkpoint is weights-only (gsq-import): nothing was trained here yet.

  Such a workdir takes any training settings; only the model, which its
  weights are shaped for, is fixed (the checkpoint layout is
  gsq_jax/training/checkpointing.py's: a `train` item means train state).
  """
  workdir = pathlib.Path(workdir)
  steps = [p for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
  return (bool(steps) and not (workdir / "DONE").exists()
          and not any((p / "train").exists() for p in steps))


def _show(value: Any) -> str:
  return json.dumps(value) if not isinstance(value, str) else value


def check_relaunch(workdir: str | os.PathLike, config_json: Mapping[str, Any]) -> dict[str, tuple]:
  """Refuses a relaunch that would change a started run; returns the resumable changes.

  A finished run (DONE) refuses any change: there is nothing left to resume,
  so a different config means a different experiment.
  """
  if not has_started(workdir):
    return {}
  old = read_config_json(workdir)
  if old is None:
    raise WorkdirRefused(f"{workdir} holds checkpoints but no {CONFIG_NAME}: the config they were "
                         "trained with is unknown; restore the file or use --force_new")
  changes = config_changes(old, config_json)
  done = (pathlib.Path(workdir) / "DONE").exists()
  if holds_only_weights(workdir):  # imported: fine-tuning picks its own recipe
    fixed = {k: v for k, v in changes.items() if k.startswith("model.")}
  else:
    fixed = {k: v for k, v in changes.items() if done or not is_resumable(k)}
  if fixed:
    listed = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in fixed.items())
    what = "is finished" if done else "already trained with another config"
    hint = ""
    if done and all(is_resumable(k) for k in fixed):
      hint = " (to train a finished run further, delete its DONE file first)"
    raise WorkdirRefused(
        f"{workdir} {what}; this launch differs in {len(fixed)} field(s): {listed}. Nothing was "
        "changed. Relaunch with the workdir's config (its config.json), pick another --workdir, "
        f"or pass --force_new to start over in a fresh subfolder ({RESTART_PREFIX}N){hint}")
  return changes


def fresh_subfolder(workdir: str | os.PathLike) -> pathlib.Path:
  """WORKDIR itself if nothing was trained there yet, else the next unused WORKDIR/restart-N."""
  workdir = pathlib.Path(workdir)
  if not has_started(workdir):
    return workdir
  taken = [int(m.group(1)) for p in workdir.glob(f"{RESTART_PREFIX}*")
           if (m := re.fullmatch(rf"{RESTART_PREFIX}(\d+)", p.name))]
  return workdir / f"{RESTART_PREFIX}{max(taken, default=0) + 1}"
