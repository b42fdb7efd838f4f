"""Test-wide setup: every test sees 8 simulated CPU devices.

The flag must be in place before JAX initialises its backend, which is why it
is set at import time of this conftest (pytest imports it before any test
module). Compiling dominates the training tests, so one persistent XLA
compilation cache serves the whole run: every test process (pytest-xdist
workers inherit the environment) and every trainer subprocess they start;
identical programs compile once.
"""

import os
import shutil
import tempfile

# Compiling dominates the suite: XLA's LLVM backend at -O0 without its expensive
# passes compiles faster (the suite's summed test time: 1,130 -> 1,003 s) and
# computes the same within the tests' tolerances; HLO passes, and so buffer
# sizes and the HLO the tests inspect, are unchanged. A test that compares
# bitwise with a subprocess must give it these flags too (os.environ).
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
              "--xla_llvm_disable_expensive_passes=true"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# numpy/scipy (eigh in the Frechet tests) and XLA both start a thread per core;
# one BLAS thread avoids oversubscribing small CI machines.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"gsq_jax_test_xla_cache_{os.getpid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
XLA_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  """The ../shared folder beside the checkout (spec, reference vectors, data)."""
  if not SHARED.is_dir():
    pytest.skip(f"shared data folder not found at {SHARED}")
  return SHARED


@pytest.fixture(scope="session")
def trainer_env() -> dict[str, str]:
  """Environment of trainer subprocesses (sweeps): one CPU device each, not the
  tests' 8 simulated ones, with the tests' XLA backend settings (-O0: a
  few-step run is mostly compilation, and this saves ~20% of it). The shared
  compilation cache comes with os.environ."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  env["JAX_PLATFORMS"] = "cpu"
  return env


def pytest_sessionfinish(session, exitstatus):
  del exitstatus
  if _OWN_CACHE and not hasattr(session.config, "workerinput"):  # the xdist controller or a plain run
    shutil.rmtree(XLA_CACHE, ignore_errors=True)


def pytest_report_header(config):
  del config
  return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"
