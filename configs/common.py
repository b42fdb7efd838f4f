"""Helpers shared by the config files (big_vision's `configs/common.py` idea).

A config file's `get_config(arg)` receives everything after the ':' of
`--config configs/gsq.py:D=16,G=4,V=64k,f=16,tiny` as one string. `parse_arg`
turns it into a ConfigDict typed by the defaults it is given: `key=value`
pairs separated by commas, and a bare `key` means `key=True`.
"""

from __future__ import annotations

import difflib
from typing import Any

import ml_collections

_TRUE = ("1", "true", "yes", "on", "")
_FALSE = ("0", "false", "no", "off")


def _convert(key: str, value: str, default: Any) -> Any:
  if isinstance(default, bool):
    low = value.lower()
    if low in _TRUE:
      return True
    if low in _FALSE:
      return False
    raise ValueError(f"config arg {key}={value!r}: expected a boolean (true/false)")
  if isinstance(default, int):
    try:
      return parse_int(value)
    except ValueError:
      raise ValueError(f"config arg {key}={value!r}: expected an integer") from None
  if isinstance(default, float):
    try:
      return float(value)
    except ValueError:
      raise ValueError(f"config arg {key}={value!r}: expected a number") from None
  return value


def parse_int(value: str | int) -> int:
  """'4096' -> 4096, '64k' -> 65536, '256k' -> 262144 (k = 1024, as the paper's V)."""
  if isinstance(value, int):
    return value
  text = value.strip().lower()
  if text.endswith("k"):
    return int(text[:-1]) * 1024
  if text.endswith("m"):
    return int(text[:-1]) * 1024 * 1024
  return int(text)


def closest(name: str, known: Any) -> str | None:
  """The known name `name` most likely meant ('tyny' -> 'tiny', 'd' -> 'D'), or None."""
  known = list(known)
  by_lower = {k.lower(): k for k in known}
  if name.lower() in by_lower:
    return by_lower[name.lower()]
  match = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
  return by_lower[match[0]] if match else None


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """'D=16,G=4,tiny' -> ConfigDict(D=16, G=4, tiny=True, <other defaults>).

  Values take the type of their default (bool, int with k/m suffixes, float,
  str). Unknown keys raise a one-line ValueError naming the likely intended
  key and the known ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, has_value, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      guess = closest(key, defaults)
      hint = f" (did you mean {guess!r}?)" if guess else ""
      raise ValueError(f"config arg {key!r} is unknown{hint}; known args: "
                       f"{', '.join(sorted(defaults))}")
    default = defaults[key]
    if not has_value and not isinstance(default, bool):
      raise ValueError(f"config arg {key!r} needs a value ({key}=...)")
    with out.ignore_type():
      out[key] = _convert(key, value.strip(), default)
  return out
