"""argparse types shared by the console scripts (gsq-eval, gsq-tokenize)."""

from __future__ import annotations

import argparse


def _int_at_least(text: str, minimum: int, what: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = minimum - 1
  if value < minimum:
    raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
  return value


def positive_int(text: str) -> int:
  """An argparse `type=`: an integer >= 1."""
  return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
  """An argparse `type=`: an integer >= 0."""
  return _int_at_least(text, 0, "an integer >= 0")
