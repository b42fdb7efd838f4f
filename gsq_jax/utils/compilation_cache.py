"""JAX's persistent compilation cache, on by default for gsq-train, gsq-eval and sweep runs.

Every start of a run compiles its programs again unless they are on disk: a
preempted and requeued SLURM job, a resumed run, a retried sweep point or a
second point with the same shapes. With the cache they load instead
(benchmarks/compile_cache.py; numbers in benchmarks/RESULTS.md).

Where, the first that is set:
  1. `--compilation_cache` of gsq-train / gsq-eval: a directory, or "off";
  2. $JAX_COMPILATION_CACHE_DIR (JAX's own variable; the test suite sets it,
     and gsq-sweep sets SWEEP_ROOT/.jax_cache for its runs unless 3. is set);
  3. $GSQ_JAX_CACHE_DIR: a directory, or "off";
  4. $XDG_CACHE_HOME/gsq_jax/xla (~/.cache/gsq_jax/xla).

Several processes at once: JAX 0.10's file cache writes an entry with a plain
write (no temporary file + rename), and a process that reads a torn entry
warns and compiles instead. When the `filelock` package is installed, a size
bound ($GSQ_JAX_CACHE_MAX_GB, default 20; 0 = unbounded) turns on JAX's LRU
eviction, which holds an inter-process file lock around every read and write
of the cache, so concurrent runs never see half-written entries. In
multi-process runs only process 0 writes (JAX's rule).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Mapping

from absl import logging

ENV_DIR = "GSQ_JAX_CACHE_DIR"
ENV_MAX_GB = "GSQ_JAX_CACHE_MAX_GB"
JAX_ENV_DIR = "JAX_COMPILATION_CACHE_DIR"
JAX_ENV_MIN_TIME = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
OFF = ("off", "none", "false", "0")
DEFAULT_MAX_GB = 20.0
# Programs compiling faster than this are not written (JAX's default is 1 s,
# which leaves out the many mid-sized programs of a start; under 0.1 s a load
# from disk saves next to nothing).
DEFAULT_MIN_COMPILE_SECS = 0.1
# File name suffixes of JAX's LRU cache entries and their access times (jax/_src/lru_cache.py).
_CACHE_SUFFIX, _ATIME_SUFFIX = "-cache", "-atime"


def cache_dir(setting: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
  """The cache directory the flag `setting` and the environment ask for; None = off."""
  environ = os.environ if environ is None else environ
  for value in (setting, environ.get(JAX_ENV_DIR), environ.get(ENV_DIR)):
    if value is not None and value.strip():
      return None if value.strip().lower() in OFF else os.path.abspath(os.path.expanduser(value))
  home = environ.get("HOME") or os.path.expanduser("~")
  base = environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
  return os.path.join(base, "gsq_jax", "xla")


def max_size_bytes(environ: Mapping[str, str] | None = None) -> int:
  """The LRU bound from $GSQ_JAX_CACHE_MAX_GB in bytes; -1 = unbounded (no eviction, no lock)."""
  environ = os.environ if environ is None else environ
  text = environ.get(ENV_MAX_GB, "").strip()
  try:
    gb = float(text) if text else DEFAULT_MAX_GB
  except ValueError:
    raise ValueError(f"${ENV_MAX_GB} must be a number of GB (0 = unbounded), got {text!r}") from None
  if gb < 0:
    raise ValueError(f"${ENV_MAX_GB} must be >= 0 (0 = unbounded), got {text!r}")
  return int(gb * 2 ** 30) if gb > 0 else -1


def enable(setting: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
  """Points JAX's persistent cache at `cache_dir(setting)`; call before the first compile.

  Returns the directory, or None when the cache is off. Raises ValueError for
  a bad $GSQ_JAX_CACHE_MAX_GB.
  """
  import jax  # pylint: disable=g-import-not-at-top  (the sweep launcher reads ENV_DIR without JAX)
  environ = os.environ if environ is None else environ
  path = cache_dir(setting, environ)
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
    logging.info("Persistent compilation cache off")
    return None
  max_size = max_size_bytes(environ)
  if max_size > 0 and importlib.util.find_spec("filelock") is None:
    logging.warning("Compilation cache %s: no size bound and no inter-process lock (install "
                    "`filelock` for both)", path)
    max_size = -1
  if max_size > 0:
    _adopt_unbounded_entries(path)
  min_time = float(environ.get(JAX_ENV_MIN_TIME) or DEFAULT_MIN_COMPILE_SECS)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_compilation_cache_max_size", max_size)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)  # any size (JAX may tune it)
  logging.info("Persistent compilation cache %s (max %s, programs compiling >= %.2f s)", path,
               "unbounded" if max_size < 0 else f"{max_size / 2 ** 30:.1f} GiB", min_time)
  return path


def _adopt_unbounded_entries(path: str) -> int:
  """Gives every entry without an access-time file one (its mtime); returns how many.

  An unbounded process ($GSQ_JAX_CACHE_MAX_GB=0) writes entries without the
  `-atime` files JAX's LRU eviction reads; a bounded process sharing the
  directory then fails every write ("Error writing persistent compilation
  cache entry ... -atime"). Idempotent, so concurrent starts are harmless.
  """
  if not os.path.isdir(path):
    return 0
  adopted = 0
  for name in os.listdir(path):
    if not name.endswith(_CACHE_SUFFIX):
      continue
    atime = os.path.join(path, name[:-len(_CACHE_SUFFIX)] + _ATIME_SUFFIX)
    if os.path.exists(atime):
      continue
    try:
      stamp = os.stat(os.path.join(path, name)).st_mtime_ns
      with open(atime, "wb") as f:
        f.write(stamp.to_bytes(8, "little"))
      adopted += 1
    except FileNotFoundError:  # evicted meanwhile by another process
      continue
  return adopted
