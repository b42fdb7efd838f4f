"""What keeps a training run from losing work or failing silently.

- `RunFailed`, `describe_failure`: every failure becomes one FAILED line,
  the root cause first ("disk: [Errno 28] No space left on device: ... (while
  saving ...)"), instead of the last of a chain of wrapped exceptions.
- `PreemptionWatcher`: SIGTERM/SIGUSR1 (SLURM preemption, time limit) and
  SIGINT (Ctrl-C) are remembered and acted on at a step (or eval batch)
  boundary, on every process at the same one, so the trainer can save a
  checkpoint and exit 75. A second Ctrl-C stops at once (it cannot be
  swallowed by a JAX callback): the last saved checkpoint remains.
- `NonFiniteWatch`: names the first step whose loss was NaN/inf without a
  device sync per step.
- `CorruptFiles`: counts skipped (undecodable) images once per file, summed
  over hosts, for the `skipped` metric.
- `write_json`: atomic status files (DONE, FAILED).
"""

from __future__ import annotations

import dataclasses
import errno
import logging as logging_std
import os
import re
import signal
import threading
from typing import Any, Callable

from absl import logging
import jax
import numpy as np

from gsq_jax.data import input_pipeline
from gsq_jax.utils.files import atomic_write_json

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG)
_DISK_MESSAGES = re.compile(r"No space left on device|Disk quota exceeded|Read-only file system")


class RunFailed(Exception):
  """An error the run detected itself (bad config or data, NaN loss): FAILED + exit 1."""

  def __init__(self, reason: str, step: int = 0):
    super().__init__(reason)
    self.reason, self.step = reason, step


def root_cause(exc: BaseException) -> BaseException:
  """The innermost exception of `exc`'s cause/context chain."""
  seen = {id(exc)}
  while True:
    inner = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if inner is None or id(inner) in seen:
      return exc
    seen.add(id(inner))
    exc = inner


def _one_line(text: str, limit: int = 600) -> str:
  text = " ".join(text.split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def describe_failure(exc: BaseException, stage: str) -> str:
  """One line for FAILED: "<stage>: <root cause> (<outer message>)".

  A full or read-only disk is named as such (stage "disk") wherever it
  happened, since that is what the user must fix.
  """
  root = root_cause(exc)
  if ((isinstance(root, OSError) and root.errno in _DISK_ERRNOS)
      or _DISK_MESSAGES.search(str(root))):  # tensorstore reports ENOSPC inside a ValueError
    stage = f"disk ({stage})"
  text = f"{stage}: {type(root).__name__}: {root}"
  if root is not exc:
    text += f" (while: {exc})"
  return _one_line(text)


def interrupted_reason(signum: int, step: int, saved: bool = True) -> str:
  name = signal.Signals(signum).name
  then = ("checkpoint saved; the same command resumes" if saved
          else "stopped at once; the last saved checkpoint resumes")
  return f"interrupted by {name} at step {step}: {then}"


def exit_now(signum: int) -> None:
  """Exits at once with 128 + signum (no cleanup: nothing can swallow it)."""
  logging.flush()
  os._exit(128 + signum)  # pylint: disable=protected-access


@dataclasses.dataclass
class Progress:
  """Where the run is, for the FAILED line of an unexpected error."""
  stage: str = "start-up"
  step: int = 0


class PreemptionWatcher:
  """Remembers SIGTERM/SIGUSR1/SIGINT; processes agree on it before anyone saves."""

  def __init__(self, check_every: int, on_second_interrupt: Callable[[int], None] = exit_now):
    """`on_second_interrupt(signum)` runs on a Ctrl-C after an earlier signal; must not return."""
    self.signal: int | None = None
    self._check_every = check_every
    self._previous = {}
    self._second = on_second_interrupt

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return  # signal handlers can only be set from the main thread
    for sig in PREEMPTION_SIGNALS:
      self._previous[sig] = signal.signal(sig, self._handle)

  def uninstall(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT and self.signal is not None:
      logging.error("Second interrupt: stopping now, without a new checkpoint")
      self._second(signum)
      return
    logging.warning("Received %s: saving a checkpoint at the next step boundary, then exiting "
                    "(Ctrl-C again stops at once)", signal.Signals(signum).name)
    self.signal = signum

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.signal is not None
    if step % self._check_every:
      return False
    # Every process must take part in the save, so all stop at the same step.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags_all = multihost_utils.process_allgather(np.int32(self.signal is not None))
    return bool(np.any(flags_all))


class FailureNoiseFilter(logging_std.Filter):
  """Keeps a failure's cause findable in the log.

  A failed checkpoint write makes orbax, tensorstore and asyncio log the
  same error many times over, each with a long traceback, and asyncio adds
  one "Task exception was never retrieved" per orphaned write task at exit:
  thousands of lines around one cause. Library errors keep their message and
  exception line but lose the traceback (the trainer logs its own once),
  orphaned-task reports are dropped, and a message repeated more than `limit`
  times (by its first line) is dropped after saying so.
  """

  LIBRARIES = ("orbax", "tensorstore", "grain", "asyncio")

  def __init__(self, limit: int = 3):
    super().__init__()
    self._limit = limit
    self._seen: dict[tuple[str, int, str], int] = {}

  def filter(self, record) -> bool:
    first = record.getMessage().split("\n", 1)[0]
    library = record.name == "asyncio" or any(
        f"{os.sep}{lib}{os.sep}" in record.pathname for lib in self.LIBRARIES)
    if library and first.startswith("Task exception was never retrieved"):
      return False
    if library and record.exc_info and record.exc_info[1] is not None:
      exc = record.exc_info[1]
      first = _one_line(f"{first} ({type(exc).__name__}: {exc})")
      record.msg, record.args, record.exc_info, record.exc_text = first, (), None, None
    if len(self._seen) > 100_000:  # bounded memory on very long runs
      self._seen.clear()
    key = (record.pathname, record.lineno, first[:300])
    n = self._seen[key] = self._seen.get(key, 0) + 1
    if n == self._limit:
      record.msg, record.args = f"{record.getMessage()} (repeated {n}x; dropping repeats)", ()
    return n <= self._limit


class NonFiniteWatch:
  """Keeps the per-step losses since the last check to name the first bad step."""

  KEYS = ("g_loss", "d_loss")

  def __init__(self):
    self._window: list[tuple[int, dict[str, jax.Array]]] = []

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self._window.append((step, {k: metrics[k] for k in self.KEYS if k in metrics}))

  def first_bad_step(self) -> int | None:
    """Syncs with the devices; returns the first step with a non-finite loss."""
    window, self._window = self._window, []
    for step, values in jax.device_get(window):
      if not all(np.isfinite(v) for v in values.values()):
        return step
    return None


class CorruptFiles(input_pipeline.CorruptImageCounter):
  """Also remembers which files were skipped: each counts once, however many epochs."""

  def __init__(self):
    super().__init__()
    self.files: set[str] = set()
    self._files_lock = threading.Lock()

  def record(self, skipped) -> None:
    super().record(skipped)
    with self._files_lock:
      self.files.update(name for name, _ in skipped)

  def totals(self) -> dict[str, int]:
    """{"skipped": distinct files, "skipped_reads": skip events}, over all processes."""
    with self._files_lock:
      counts = np.array([len(self.files), self.count], np.int64)
    if jax.process_count() > 1:  # hosts read disjoint files, so the sums are exact
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      counts = np.sum(multihost_utils.process_allgather(counts), axis=0)
    return {"skipped": int(counts[0]), "skipped_reads": int(counts[1])}


def write_json(path: str, payload: dict[str, Any]) -> None:
  """Process 0 writes `payload` atomically (temp file + rename): DONE/FAILED are never half-written."""
  if jax.process_index() == 0:
    atomic_write_json(path, payload)
