"""`gsq-train --help` and flag errors: what a new user sees first."""

import pathlib
import sys

from absl import flags
from ml_collections import config_flags
import pytest

from gsq_jax.training import cli_help
from gsq_jax.training import train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_help_lists_our_flags_and_the_config_arg_keys(monkeypatch, capsys):
  monkeypatch.chdir(ROOT)
  monkeypatch.setattr(sys, "argv", ["gsq-train", "--help"])
  with pytest.raises(SystemExit) as exit_:
    train.main()
  assert exit_.value.code == 0
  text = capsys.readouterr().out
  assert "Try --helpfull" not in text and "usage: gsq-train --config" in text
  for flag in ("--config", "--workdir", "--coordinator_address", "--distributed"):
    assert f"\n  {flag}\n" in text, flag
  for key in ("D", "G", "V", "f", "quantizer", "res", "disc", "seed", "tiny"):
    assert f"\n  {key} " in text, key
  assert "[default 8192]" in text  # V's default, from configs/gsq.py
  assert len(text.splitlines()) < 60


def _parse(argv, capsys):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  with pytest.raises(SystemExit) as exit_:
    cli_help.parse_flags(argv, fv)
  assert exit_.value.code == 2
  return capsys.readouterr().err


def test_mistyped_config_key_is_one_readable_line(capsys):
  err = _parse(["gsq-train", f"--config={ROOT}/configs/gsq.py:D=8,tyny"], capsys)
  assert "Traceback" not in err and len(err.splitlines()) == 2
  assert "config arg 'tyny' is unknown (did you mean 'tiny'?)" in err
  err = _parse(["gsq-train", f"--config={ROOT}/configs/gsq.py:tiny",
                "--config.train.totl_steps=3"], capsys)
  assert "Traceback" not in err and "\\n" not in err and "'\\''" not in err
  assert err.startswith("gsq-train: error: --config.train.totl_steps: the config has no field "
                        "'totl_steps'; Did you mean \"total_steps\"")
