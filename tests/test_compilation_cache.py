"""The persistent compilation cache: where it goes, how it is turned off, what JAX is told."""

import os
import subprocess
import sys

import jax
import pytest

from gsq_jax.sweeps import runner
from gsq_jax.utils import compilation_cache as cc

_SETTINGS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
             "jax_compilation_cache_max_size", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")


def test_cache_dir_precedence_and_opt_out(tmp_path):
  home = {"HOME": str(tmp_path)}
  assert cc.cache_dir(None, home) == os.path.join(str(tmp_path), ".cache", "gsq_jax", "xla")
  assert cc.cache_dir(None, {"XDG_CACHE_HOME": "/x"}) == "/x/gsq_jax/xla"
  env = {"GSQ_JAX_CACHE_DIR": "/gsq", **home}
  assert cc.cache_dir(None, env) == "/gsq"
  env["JAX_COMPILATION_CACHE_DIR"] = "/jax"  # JAX's own variable (the test suite's) wins
  assert cc.cache_dir(None, env) == "/jax"
  assert cc.cache_dir("/flag", env) == "/flag"
  assert cc.cache_dir("off", env) is None
  assert cc.cache_dir(None, {"GSQ_JAX_CACHE_DIR": "OFF"}) is None
  assert cc.cache_dir("rel", {}) == os.path.abspath("rel")


def test_size_bound_from_the_environment():
  assert cc.max_size_bytes({}) == 20 * 2 ** 30
  assert cc.max_size_bytes({"GSQ_JAX_CACHE_MAX_GB": "0.5"}) == 2 ** 29
  assert cc.max_size_bytes({"GSQ_JAX_CACHE_MAX_GB": "0"}) == -1
  for bad in ("lots", "-1"):
    with pytest.raises(ValueError, match=r"\$GSQ_JAX_CACHE_MAX_GB"):
      cc.max_size_bytes({"GSQ_JAX_CACHE_MAX_GB": bad})


@pytest.fixture
def restore_jax_settings():
  saved = {name: getattr(jax.config, name) for name in _SETTINGS}
  yield
  for name, value in saved.items():
    jax.config.update(name, value)


def test_enable_configures_jax_and_off_disables(tmp_path, restore_jax_settings):
  env = {"GSQ_JAX_CACHE_DIR": str(tmp_path / "c"), "GSQ_JAX_CACHE_MAX_GB": "0",
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.25"}
  assert cc.enable(None, env) == str(tmp_path / "c")
  assert jax.config.jax_enable_compilation_cache
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
  assert jax.config.jax_compilation_cache_max_size == -1
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.25
  assert cc.enable("off", env) is None
  assert not jax.config.jax_enable_compilation_cache


def test_sweep_children_share_the_sweep_cache_unless_one_is_named(tmp_path):
  assert runner.compile_cache_env(tmp_path, {}) == {
      "JAX_COMPILATION_CACHE_DIR": str(tmp_path / ".jax_cache")}
  assert runner.compile_cache_env(tmp_path, {"GSQ_JAX_CACHE_DIR": "off"}) == {}
  assert runner.compile_cache_env(tmp_path, {"JAX_COMPILATION_CACHE_DIR": "/j"}) == {}


def test_a_bounded_process_can_write_after_an_unbounded_one(tmp_path):
  """Unbounded entries have no -atime file; JAX's bounded writer read one for each and failed."""
  script = ("import sys, jax, jax.numpy as jnp\n"
            "from gsq_jax.utils import compilation_cache as cc\n"
            "cc.enable(sys.argv[1])\n"
            "print(jax.jit(lambda x: jnp.sin(x) * float(sys.argv[2]))(1.0))\n")
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  cache = tmp_path / "c"
  for max_gb, factor in (("0", "2"), ("1", "3")):
    done = subprocess.run([sys.executable, "-c", script, str(cache), factor], text=True,
                          capture_output=True, env=dict(env, GSQ_JAX_CACHE_MAX_GB=max_gb))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Error writing persistent compilation cache" not in done.stderr, done.stderr[-2000:]
  entries = {p.name.rsplit("-", 1)[0] for p in cache.glob("*-cache")}
  assert len(entries) >= 2 and all((cache / f"{e}-atime").is_file() for e in entries)
