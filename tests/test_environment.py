"""gsq_jax.utils.environment: what a run records about the software it ran on."""

import jax

from gsq_jax.utils import environment


def test_run_environment_names_versions_backend_and_device_kind():
  env = environment.run_environment(jax.devices())
  assert env["version_jax"] == jax.__version__
  assert env["version_orbax_checkpoint"] not in ("", "missing")
  assert {environment.version_key(p) for p in environment.PINNED} <= set(env)
  assert env["backend"] == "cpu" and env["device_kind"]
  assert environment.package_versions(["no-such-package-gsq"]) == {
      "version_no_such_package_gsq": "missing"}


def test_mixed_versions_ignores_unknown_and_equal():
  rows = [{"version_jax": "0.10.2", "version_flax": "0.12.8"},
          {"version_jax": "0.11.0", "version_flax": "0.12.8"},
          {"version_jax": None, "run": "pending"}]
  assert environment.mixed_versions(rows) == {"version_jax": ["0.10.2", "0.11.0"]}
  assert environment.mixed_versions(rows[1:]) == {}


def test_cuda_plugin_without_driver_is_one_warning_line():
  """[plan-gpu] installs JAX's CUDA plugin; on a CPU machine its traceback becomes one line."""
  import logging  # pylint: disable=import-outside-toplevel
  from gsq_jax.utils import quiet_logs  # pylint: disable=import-outside-toplevel

  def record(error):
    try:
      raise error
    except RuntimeError:
      import sys  # pylint: disable=import-outside-toplevel
      return logging.LogRecord("jax._src.xla_bridge", logging.ERROR, "xla_bridge.py", 1,
                               "Jax plugin configuration error: Exception when calling %s.initialize()",
                               ("jax_plugins.xla_cuda12",), sys.exc_info())

  condense = quiet_logs.CudaPluginWithoutDriver()
  no_driver = record(RuntimeError("Unable to load CUDA. Is it installed?"))
  assert condense.filter(no_driver)
  assert no_driver.exc_info is None and no_driver.levelno == logging.WARNING
  assert "CUDA cannot be loaded on this machine" in no_driver.getMessage()
  other = record(RuntimeError("cuDNN version mismatch"))  # a real GPU problem keeps its traceback
  assert condense.filter(other) and other.exc_info is not None and other.levelno == logging.ERROR
  import gsq_jax  # pylint: disable=import-outside-toplevel,unused-import
  assert any(isinstance(f, quiet_logs.CudaPluginWithoutDriver)
             for f in logging.getLogger("jax._src.xla_bridge").filters)
