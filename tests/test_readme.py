"""The README's Quickstart is what CI and a new user run: keep it honest."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def quickstart_lines() -> list[str]:
  text = (ROOT / "README.md").read_text(encoding="utf-8")
  section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", section, flags=re.S)
  assert len(blocks) == 1, "the Quickstart section must hold exactly one shell block"
  return [line for line in blocks[0].splitlines() if line.strip()]


def test_quickstart_is_two_commands_and_ci_runs_the_second():
  lines = quickstart_lines()
  assert len(lines) == 2
  demo, tests = lines
  ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
  assert tests in ci.splitlines(), ".ci/run must run the README's test command verbatim"
  assert "pytest" in tests and "pip install" in tests
  assert "pip install" in demo and "sweeps/demo.py" in demo and "gsq-collect" in demo
  assert (ROOT / "sweeps" / "demo.py").is_file()


def test_quickstart_commands_are_installed_console_scripts():
  setup = (ROOT / "setup.py").read_text(encoding="utf-8")
  for command in re.findall(r"\.venv/bin/(gsq-[a-z]+)", " ".join(quickstart_lines())):
    assert f'"{command}=' in setup, f"{command} is not a console script in setup.py"


def test_installs_use_the_constraints_file_of_tested_versions():
  """Quickstart and CI install the pinned versions; the pins are what this suite runs on."""
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  from gsq_jax.utils import environment  # pylint: disable=import-outside-toplevel
  for line in quickstart_lines():
    assert "pip install -c constraints.txt -e " in line, line
  pins = {}
  for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
    line = line.split("#", 1)[0].strip()
    if line:
      name, _, version = line.partition("==")
      assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
      pins[name.lower().replace("_", "-")] = version
  for package in environment.PINNED:
    assert package in pins, f"constraints.txt does not pin {package}"
    assert metadata.version(package) == pins[package], (
        f"{package} {metadata.version(package)} is installed but constraints.txt pins "
        f"{pins[package]}: update the pin with the version the tests pass on")
