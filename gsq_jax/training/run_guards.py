"""What keeps a training run from losing work or failing silently.

- `PreemptionWatcher`: SIGTERM/SIGUSR1 (SLURM preemption, time limit) are
  remembered and acted on at a step (or eval batch) boundary, on every process
  at the same one, so the trainer can save a checkpoint and exit 75.
- `NonFiniteWatch`: names the first step whose loss was NaN/inf without a
  device sync per step.
- `CorruptFiles`: counts skipped (undecodable) images once per file, summed
  over hosts, for the `skipped` metric.
- `write_json`: atomic status files (DONE, FAILED).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from absl import logging
import jax
import numpy as np

from gsq_jax.data import input_pipeline
from gsq_jax.utils.files import atomic_write_json

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatcher:
  """Remembers SIGTERM/SIGUSR1; processes agree on it before anyone saves."""

  def __init__(self, check_every: int):
    self.signal: int | None = None
    self._check_every = check_every
    self._previous = {}

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
    logging.warning("Received signal %d: saving a checkpoint at the next step boundary", signum)
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
