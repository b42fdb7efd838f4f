"""Test-wide setup: every test sees 8 simulated CPU devices.

The flag must be in place before JAX initialises its backend, which is why it
is set at import time of this conftest (pytest imports it before any test
module).
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# numpy/scipy (eigh in the Frechet tests) and XLA both start a thread per core;
# one BLAS thread avoids oversubscribing small CI machines.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

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


def pytest_report_header(config):
  del config
  return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"
