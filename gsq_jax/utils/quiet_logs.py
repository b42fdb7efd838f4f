"""Keeps library chatter out of what a user reads at start-up, per checkpoint and in gsq-eval.

orbax logs dozens of INFO lines per checkpoint save or restore, grain a few
per iterator, and JAX's platform probe says "Unable to initialize backend
'tpu'" on every machine without one. Our own messages and every library
warning (error, for `gsq-eval`'s read-only restore) stay.

`CudaPluginWithoutDriver` (installed when gsq_jax is imported) turns the
30-line traceback JAX's CUDA plugin logs on a machine without a CUDA driver
-- every CPU machine with the `[plan-gpu]` extra, which installs the plugin
to compile for GPUs deviceless -- into one warning line.
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


class CudaPluginWithoutDriver(logging.Filter):
  """Condenses "Exception when calling jax_plugins.xla_cuda12.initialize()" without a driver."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if (error is not None and "xla_cuda12.initialize" in record.getMessage()
        and "Unable to load CUDA" in str(error)):
      record.msg = ("JAX's CUDA plugin is installed (e.g. by gsq_jax[plan-gpu], to compile for GPUs "
                    "deviceless) but CUDA cannot be loaded on this machine: JAX runs on CPU")
      record.args, record.exc_info, record.exc_text = (), None, None
      record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


def condense_cuda_plugin_error() -> None:
  """Installs CudaPluginWithoutDriver on JAX's platform logger (idempotent)."""
  logger = logging.getLogger(_PROBE_LOGGER)
  if not any(isinstance(f, CudaPluginWithoutDriver) for f in logger.filters):
    logger.addFilter(CudaPluginWithoutDriver())
