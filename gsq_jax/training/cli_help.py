"""`gsq-train --help` and its flag errors, written for the person at the terminal.

absl's own `--help` lists only the flags of the `__main__` module, which for a
console script is the generated wrapper: the user saw "Try --helpfull" and
then 200 lines of JAX flags. Here `--help` prints the trainer's flags and the
config arg keys (`ARG_HELP` of configs/gsq.py, the keys every config file
shares), and a bad `--config` prints the config file's own one-line error
instead of the traceback ml_collections wraps it in.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from absl import flags

HELP_ARGS = ("-h", "--help", "-?", "--helpshort")
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def wants_help(argv: Sequence[str]) -> bool:
  return any(a in HELP_ARGS for a in argv[1:])


def _config_path(argv: Sequence[str]) -> pathlib.Path | None:
  """The --config file named on the command line, else configs/gsq.py (cwd or checkout)."""
  for i, a in enumerate(argv[1:], start=1):
    value = None
    if a.startswith("--config="):
      value = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
    if value:
      path = pathlib.Path(value.split(":", 1)[0])
      if path.is_file():
        return path
  for root in (pathlib.Path.cwd(), _REPO_ROOT):
    if (root / "configs" / "gsq.py").is_file():
      return root / "configs" / "gsq.py"
  return None


def _load_module(path: pathlib.Path) -> Any:
  spec = importlib.util.spec_from_file_location(f"_gsq_help_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def arg_keys_text(path: pathlib.Path | None) -> str:
  """The config file's arg keys with their defaults (ARG_HELP + DEFAULTS / ARG_DEFAULTS)."""
  if path is None:
    return "Config arg keys: see the docstring of configs/gsq.py in the checkout.\n"
  try:
    module = _load_module(path)
  except Exception as err:  # pylint: disable=broad-except
    return f"Config arg keys: {path} did not import ({type(err).__name__}: {err}).\n"
  gsq = getattr(module, "gsq", module)
  help_text = getattr(module, "ARG_HELP", None) or getattr(gsq, "ARG_HELP", None)
  defaults = (getattr(module, "DEFAULTS", None) or getattr(module, "ARG_DEFAULTS", None)
              or getattr(gsq, "ARG_DEFAULTS", {}))
  if not help_text:
    return f"Config arg keys: see the docstring of {path}.\n"
  lines = [f"Config arg keys of {path} (after the ':', comma separated; a bare key means "
           "True):"]
  width = max(len(k) for k in help_text)
  for key, text in help_text.items():
    default = defaults.get(key, "")
    shown = f" [default {default!r}]" if default not in ("", None) else ""
    lines.append(textwrap.fill(f"{text}{shown}", width=96,
                               initial_indent=f"  {key:<{width}}  ",
                               subsequent_indent=" " * (width + 4)))
  return "\n".join(lines) + "\n"


def flags_text(holders: Sequence[flags.FlagHolder]) -> str:
  lines = []
  for holder in holders:
    flag = flags.FLAGS[holder.name]
    default = "" if flag.default is None else f" [default {flag.default!r}]"
    lines.append(f"  --{flag.name}")
    lines.append(textwrap.fill(f"{flag.help}{default}", width=96, initial_indent="      ",
                               subsequent_indent="      "))
  return "\n".join(lines) + "\n"


def help_text(summary: str, holders: Sequence[flags.FlagHolder], argv: Sequence[str]) -> str:
  prog = os.path.basename(argv[0]) if argv else "gsq-train"
  if prog in ("__main__.py", "train.py"):
    prog = "python -m gsq_jax.training.train"
  return (f"{summary}\n\n"
          f"usage: {prog} --config configs/gsq.py[:KEY=VALUE,...] --workdir DIR "
          "[--config.BLOCK.FIELD=VALUE ...]\n"
          f"  e.g. {prog} --config configs/gsq.py:D=16,G=4,V=4096,f=8,tiny --workdir runs/tiny\n\n"
          f"Flags:\n{flags_text(holders)}\n{arg_keys_text(_config_path(argv))}\n"
          "Any config leaf can be overridden, e.g. --config.train.total_steps=1000 or "
          "--config.optim.lr=1e-4;\na run's config.json lists them all. --helpfull also lists "
          "the flags of JAX and absl.\n")


def config_error(message: str) -> str:
  """The last line of a flag error that ml_collections wrapped around a traceback."""
  if "Traceback (most recent call last)" not in message:
    return message.strip()
  head = message.split(": Error whilst", 1)[0].strip()  # "flag --config=configs/gsq.py:D=1,x"
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  last = next((line for line in reversed(lines) if not line.startswith("Pass --help")), "")
  if ": " in last and last.split(": ", 1)[0].isidentifier():  # "ValueError: config arg ..."
    last = last.split(": ", 1)[1]
  return f"{head}: {last}"


def override_error(err: Exception, argv: Sequence[str]) -> str:
  """`--config.train.totl_steps=3`: ml_collections raises AttributeError(KeyError(text))."""
  text: Any = err
  while isinstance(text, BaseException) and text.args:
    text = text.args[0]
  text = str(text)
  name = text.splitlines()[0].strip("'\"") if text else ""
  flag = next((a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")
               and name and name in a.split("=", 1)[0].split(".")), "--config.*")
  hint = " ".join(text.splitlines()[1:])
  return f"{flag}: the config has no field {name!r}" + (f"; {hint}" if hint else "")


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl `flags_parser`: flag errors as one readable line and exit status 2."""
  prog = os.path.basename(argv[0]) if argv else "gsq-train"
  try:
    return flag_values(argv)
  except flags.Error as err:
    message = config_error(str(err))
  except (KeyError, AttributeError) as err:  # an unknown --config.BLOCK.FIELD
    message = override_error(err, argv)
  print(f"{prog}: error: {message}\n(--help lists the flags and config arg keys)",
        file=sys.stderr)
  sys.exit(2)
