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
