"""Keeps library chatter out of what a user reads at start-up, per checkpoint and in gsq-eval.

orbax logs dozens of INFO lines per checkpoint save or restore, grain a few
per iterator, and JAX's platform probe says "Unable to initialize backend
'tpu'" on every machine without one. Our own messages and every library
warning (error, for `gsq-eval`'s read-only restore) stay.
"""

from __future__ import annotations

import logging
import os

NOISY_LIBRARIES = ("orbax", "grain")
_PROBE_LOGGER = "jax._src.xla_bridge"  # "Unable to initialize backend 'tpu'" (INFO)


class QuietLibraries(logging.Filter):
  """Drops records of NOISY_LIBRARIES below `min_level` and JAX's platform-probe INFO."""

  def __init__(self, min_level: int = logging.WARNING):
    super().__init__()
    self.min_level = min_level

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == _PROBE_LOGGER or record.pathname.endswith(f"{os.sep}xla_bridge.py"):
      return record.levelno >= logging.WARNING
    noisy = any(f"{os.sep}{lib}{os.sep}" in record.pathname for lib in NOISY_LIBRARIES)
    return not noisy or record.levelno >= self.min_level


def install(min_level: int = logging.WARNING) -> QuietLibraries:
  """Filters the absl logger (orbax and grain log through it) and JAX's probe logger."""
  quiet = QuietLibraries(min_level)
  for name in ("absl", _PROBE_LOGGER):
    logger = logging.getLogger(name)
    for old in [f for f in logger.filters if isinstance(f, QuietLibraries)]:
      logger.removeFilter(old)
    logger.addFilter(quiet)
  return quiet
