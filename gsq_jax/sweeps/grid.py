"""Sweep files: load `sweeps/NAME.py`, expand `sweep(add)`, validate every point.

Expansion is pure bookkeeping: `add(D=16, G=4, V=65536, f=16, seed=0)` records
one grid point; config-field overrides go in as dotted keywords, e.g.
`add(D=16, G=4, V=65536, f=16, **{"train.total_steps": 50_000})`.

Validation happens for every point before anything is launched, so a typo in
the grid never costs a half-finished sweep. A point is checked
  1. structurally: D % G == 0, f a power of two, G = 1 unless GSQ, ...;
  2. by resolving its config exactly as the trainer will (`--config FILE:ARG
     --config.KEY=VALUE` through ml_collections' config_flags): unknown
     override fields, values config_flags cannot parse, a config that does not
     carry the point's D, G, V, f, and `validate_model_config`;
  3. by the trainer's own start-up check (`gsq_jax.training.train.validate_config`:
     batch vs devices, image size vs f, optimizer, weight files, ...), unless
     `full_check=False` (it builds each model abstractly, ~1 s per point).
Problems are returned as `Invalid(name, reason)` records, never raised one at
a time.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import os
import pathlib
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

# Keywords of `add` that describe the point; dotted keywords are config overrides.
_POINT_KEYS = ("D", "G", "V", "f", "quantizer", "seed", "res", "name", "config")
_REQUIRED_KEYS = ("D", "V", "f")
# The quantizer registry's names (gsq_jax.quantizers); only GSQ has groups.
KNOWN_QUANTIZERS = ("gsq", "ibq", "vq", "fsq", "lfq")


@dataclasses.dataclass(frozen=True)
class Point:
  """One grid point: a fully specified training run.

  Attributes:
    name: deterministic run name, e.g. `f16_D16_G4_V64k_s0`.
    quantizer, f, D, G, V, seed, res: the table key (res None = the config's).
    config_file: absolute path of the config file.
    config_arg: the `get_config(arg)` string, e.g. `D=16,G=4,V=65536,f=16,tiny`
      (the point's D, G, V, f, then any arg given after `:` in the config spec).
    overrides: dotted config fields -> values, applied after `get_config`.
  """
  name: str
  quantizer: str
  f: int
  D: int
  G: int
  V: int
  seed: int
  res: int | None
  config_file: str
  config_arg: str
  overrides: Mapping[str, Any]

  @property
  def d(self) -> int:
    """Group width D / G."""
    return self.D // self.G

  @property
  def config_spec(self) -> str:
    """`FILE:ARG`, the value of the trainer's `--config` flag."""
    return f"{self.config_file}:{self.config_arg}" if self.config_arg else self.config_file

  def keys(self) -> dict[str, Any]:
    """The table key (quantizer, f, D, G, d, V, seed) plus res."""
    return {"quantizer": self.quantizer, "f": self.f, "D": self.D, "G": self.G,
            "d": self.d, "V": self.V, "seed": self.seed, "res": self.res}

  def override_flags(self) -> list[str]:
    """The overrides as `--config.KEY=VALUE` flags (config_flags syntax)."""
    return [f"--config.{key}={format_value(value)}"
            for key, value in sorted(self.overrides.items())]

  def train_args(self, workdir: str) -> list[str]:
    """Arguments of `python -m gsq_jax.training.train` for this point."""
    return ["-m", "gsq_jax.training.train", f"--config={self.config_spec}",
            f"--workdir={workdir}", *self.override_flags()]


@dataclasses.dataclass(frozen=True)
class Invalid:
  """A grid point that will not be launched, and why."""
  name: str
  reason: str

  def __str__(self) -> str:
    return f"{self.name}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class SweepFile:
  """A loaded sweep file and its module-level settings."""
  name: str
  path: pathlib.Path
  sweep: Callable[..., None]
  config: str | None
  tiny_config: str
  overrides: Mapping[str, Any]
  tiny_overrides: Mapping[str, Any]
  project_root: pathlib.Path

  @property
  def sha256(self) -> str:
    return hashlib.sha256(self.path.read_bytes()).hexdigest()


def format_value(value: Any) -> str:
  """A config value as config_flags parses it back (bools lower-case, tuples as literals)."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  if value is None:
    raise ValueError("config overrides cannot set None on the command line")
  return str(value)


def format_vocab(V: int) -> str:
  """65536 -> '64k', 2**20 -> '1M', 1000 -> '1000' (run-name spelling)."""
  if V >= 2**20 and V % 2**20 == 0:
    return f"{V // 2**20}M"
  if V >= 1024 and V % 1024 == 0:
    return f"{V // 1024}k"
  return str(V)


def run_name(*, quantizer: str, f: int, D: int, G: int, V: int, seed: int,
             res: int | None = None) -> str:
  """Deterministic run name: `f16_D16_G4_V64k_s0` (GSQ), `ibq_f16_D256_G1_V256k_s0`."""
  name = f"f{f}_D{D}_G{G}_V{format_vocab(V)}_s{seed}"
  if res is not None:
    name += f"_r{res}"
  return name if quantizer == "gsq" else f"{quantizer}_{name}"


def _project_root(path: pathlib.Path) -> pathlib.Path:
  """Where relative config paths start: the nearest parent with a configs/ folder, else the cwd."""
  for parent in path.parents:
    if (parent / "configs").is_dir():
      return parent
  return pathlib.Path.cwd()


def load_sweep(path: str | os.PathLike) -> SweepFile:
  """Imports a sweep file by path and reads its `sweep` function and settings."""
  path = pathlib.Path(path).resolve()
  if not path.is_file():
    raise ValueError(f"sweep file: {path} does not exist; pass a file such as sweeps/demo.py")
  if path.suffix != ".py":
    raise ValueError(f"sweep file: expected a .py file with a sweep(add) function, got {path}")
  spec = importlib.util.spec_from_file_location(f"gsq_sweep_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sweep = getattr(module, "sweep", None)
  if not callable(sweep):
    raise ValueError(f"sweep file {path}: defines no `sweep(add)` function")
  for attr in ("OVERRIDES", "TINY_OVERRIDES"):
    if not isinstance(getattr(module, attr, {}), Mapping):
      raise ValueError(f"sweep file {path}: {attr} must be a dict of dotted config fields")
  return SweepFile(
      name=str(getattr(module, "NAME", path.stem)),
      path=path,
      sweep=sweep,
      config=getattr(module, "CONFIG", None),
      tiny_config=getattr(module, "TINY_CONFIG", "configs/gsq.py:tiny"),
      overrides=dict(getattr(module, "OVERRIDES", {})),
      tiny_overrides=dict(getattr(module, "TINY_OVERRIDES", {})),
      project_root=_project_root(path),
  )


def _call_sweep(sweep_file: SweepFile, tiny: bool) -> list[dict[str, Any]]:
  """Runs `sweep(add[, tiny])` and returns the raw keyword dicts in order."""
  raw: list[dict[str, Any]] = []

  def add(**kwargs: Any) -> None:
    raw.append(dict(kwargs))

  params = inspect.signature(sweep_file.sweep).parameters
  if "tiny" in params:
    sweep_file.sweep(add, tiny=tiny)
  elif tiny:
    raise ValueError(f"sweep file {sweep_file.path}: --tiny given but sweep(add) takes no "
                     "`tiny` argument; define sweep(add, tiny=False)")
  else:
    sweep_file.sweep(add)
  return raw


def _as_int(kwargs: Mapping[str, Any], key: str, default: Any = None) -> int | None:
  value = kwargs.get(key, default)
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"{key} must be an integer, got {value!r}")
  return value


def _structural_problem(p: Mapping[str, Any]) -> str | None:
  """The first structural problem of a point (None if fine)."""
  for key in ("D", "G", "V", "f"):
    if p[key] < 1:
      return f"{key} must be >= 1, got {p[key]}"
  if p["seed"] < 0:
    return f"seed must be >= 0, got {p['seed']}"
  if p["D"] % p["G"]:
    return f"D={p['D']} is not divisible by G={p['G']} (D % G = {p['D'] % p['G']})"
  if p["f"] & (p["f"] - 1):
    return f"f={p['f']} is not a power of two"
  if p["V"] < 2:
    return f"V={p['V']} must be >= 2"
  if p["quantizer"] not in KNOWN_QUANTIZERS:
    return f"quantizer={p['quantizer']!r} is not one of {list(KNOWN_QUANTIZERS)}"
  if p["quantizer"] != "gsq" and p["G"] != 1:
    return f"G={p['G']} needs quantizer 'gsq' (only GSQ groups); got {p['quantizer']!r}"
  if p["res"] is not None and p["res"] % p["f"]:
    return f"res={p['res']} is not divisible by f={p['f']}"
  return None


def _config_arg(p: Mapping[str, Any], extra: str) -> str:
  """`D=16,G=4,V=65536,f=16[,quantizer=ibq][,res=128][,EXTRA]`."""
  parts = [f"D={p['D']}", f"G={p['G']}", f"V={p['V']}", f"f={p['f']}"]
  if p["quantizer"] != "gsq":
    parts.append(f"quantizer={p['quantizer']}")
  if p["res"] is not None:
    parts.append(f"res={p['res']}")
  if extra:
    parts.append(extra)
  return ",".join(parts)


def _to_point(kwargs: Mapping[str, Any], sweep_file: SweepFile, tiny: bool,
              extra_overrides: Mapping[str, Any], index: int) -> Point | Invalid:
  """Turns one `add(...)` call into a Point, or an Invalid naming the problem."""
  label = str(kwargs.get("name") or f"point #{index}")
  unknown = [k for k in kwargs if k not in _POINT_KEYS and "." not in k]
  if unknown:
    return Invalid(label, f"unknown keyword(s) {unknown} in add(); use {list(_POINT_KEYS)} "
                   "or dotted config fields such as 'train.total_steps'")
  missing = [k for k in _REQUIRED_KEYS if k not in kwargs]
  if missing:
    return Invalid(label, f"add() lacks {missing}; every point needs D, V and f")
  try:
    p = {"D": _as_int(kwargs, "D"), "G": _as_int(kwargs, "G", 1), "V": _as_int(kwargs, "V"),
         "f": _as_int(kwargs, "f"), "seed": _as_int(kwargs, "seed", 0),
         "res": _as_int(kwargs, "res"), "quantizer": str(kwargs.get("quantizer", "gsq"))}
  except ValueError as err:
    return Invalid(label, str(err))
  name = str(kwargs.get("name") or run_name(**{k: p[k] for k in (
      "quantizer", "f", "D", "G", "V", "seed", "res")}))
  problem = _structural_problem(p)
  if problem:
    return Invalid(name, problem)
  config = kwargs.get("config") or (sweep_file.tiny_config if tiny else sweep_file.config)
  if not config:
    return Invalid(name, f"no config file: set CONFIG in {sweep_file.path.name} or pass "
                   "config= to add()")
  config, _, extra = str(config).partition(":")
  config_path = pathlib.Path(config)
  if not config_path.is_absolute():
    config_path = sweep_file.project_root / config_path
  overrides = {**sweep_file.overrides, **(sweep_file.tiny_overrides if tiny else {}),
               **{k: v for k, v in kwargs.items() if "." in k},
               **extra_overrides}
  overrides.setdefault("train.seed", p["seed"])
  try:
    for value in overrides.values():
      format_value(value)
  except ValueError as err:
    return Invalid(name, str(err))
  return Point(name=name, quantizer=p["quantizer"], f=p["f"], D=p["D"], G=p["G"], V=p["V"],
               seed=p["seed"], res=p["res"], config_file=str(config_path),
               config_arg=_config_arg(p, extra), overrides=overrides)


@contextlib.contextmanager
def _on_sys_path(*folders: pathlib.Path) -> Iterator[None]:
  """Config files may import siblings (`configs/common.py`) or the package."""
  added = [str(f) for f in folders if str(f) not in sys.path]
  sys.path[:0] = added
  try:
    yield
  finally:
    for folder in added:
      with contextlib.suppress(ValueError):
        sys.path.remove(folder)


def _missing_fields(config: Any, keys: Sequence[str]) -> list[str]:
  """Dotted override keys that name no field of `config`."""
  missing = []
  for key in keys:
    node = config
    for part in key.split("."):
      try:
        node = node[part]
      except (KeyError, TypeError, AttributeError):
        missing.append(key)
        break
  return missing


def load_config_spec(spec: str, override_flags: Sequence[str] = ()) -> Any:
  """`FILE:ARG` and `--config.KEY=VALUE` flags, parsed exactly as the trainer's command line.

  ml_collections' config_flags on a private FlagValues (no global flags touched).
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  config_file = pathlib.Path(spec.split(":", 1)[0])
  if not config_file.is_file():
    raise ValueError(f"config file {config_file} does not exist")
  argv = ["gsq-sweep", f"--config={spec}", *override_flags]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values,
                                  sys_argv=argv)
  with _on_sys_path(config_file.parent, config_file.parent.parent), warnings.catch_warnings():
    # config_flags loads the file with the deprecated load_module().
    warnings.simplefilter("ignore", DeprecationWarning)
    flag_values(argv)
    return flag_values.config


def resolve_config(point: Point) -> Any:
  """The point's config exactly as `python -m gsq_jax.training.train` will see it."""
  missing = _missing_fields(load_config_spec(point.config_spec), list(point.overrides))
  if missing:
    raise ValueError(f"override(s) {missing} name no field of {point.config_spec}")
  return load_config_spec(point.config_spec, point.override_flags())


def _check_resolved(point: Point, config: Any) -> str | None:
  """Checks the resolved config against the point and the model validator."""
  model = config.get("model") if hasattr(config, "get") else None
  if model is None:
    return f"{point.config_file} has no `model` block"
  expected = {"latent_dim": point.D, "num_groups": point.G, "codebook_size": point.V,
              "downsample_factor": point.f}
  wrong = {k: (model.get(k), v) for k, v in expected.items() if model.get(k) != v}
  if point.quantizer in ("fsq", "lfq"):
    wrong.pop("codebook_size", None)
  if wrong:
    detail = ", ".join(f"model.{k}={got!r} (point wants {want!r})"
                       for k, (got, want) in wrong.items())
    return f"config {point.config_spec} does not apply the point's values: {detail}"
  quantizer = model.get("quantizer")
  if quantizer is not None and quantizer.get("name") != point.quantizer:
    return (f"config sets model.quantizer.name={quantizer.get('name')!r}, "
            f"point wants {point.quantizer!r}")
  if point.res is not None:
    size = config.get("train", {}).get("image_size")
    if size is not None and size != point.res:
      return f"config sets train.image_size={size}, point wants res={point.res}"
  from gsq_jax.models import tokenizer  # pylint: disable=import-outside-toplevel
  tokenizer.validate_model_config(model)
  return None


def config_hash(config: Any) -> str:
  """A short stable hash of a resolved config (sorted JSON)."""
  text = json.dumps(_plain(config), sort_keys=True, default=repr)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


@dataclasses.dataclass(frozen=True)
class Expansion:
  """Result of `expand`: valid points (with config hashes), invalid ones, warnings."""
  points: tuple[Point, ...]
  hashes: Mapping[str, str]
  invalid: tuple[Invalid, ...]
  warnings: tuple[Invalid, ...] = ()


def _trainer_check(config: Any, num_devices: int, process_count: int) -> None:
  """The trainer's own start-up validation (the same checks, before any compile)."""
  from gsq_jax.training import run_config  # pylint: disable=import-outside-toplevel
  run_config.validate_config(config, num_devices=num_devices, process_count=process_count)


def expand(sweep_file: SweepFile, *, tiny: bool = False,
           overrides: Mapping[str, Any] | None = None, full_check: bool = True,
           num_devices: int = 1, process_count: int = 1,
           missing_files_ok: bool = False) -> Expansion:
  """Expands and validates every grid point of a sweep file.

  Args:
    sweep_file: from `load_sweep`.
    tiny: call `sweep(add, tiny=True)` and use TINY_CONFIG.
    overrides: dotted config fields applied to every point last (e.g. from
      `gsq-sweep --set train.total_steps=4` or a site file).
    full_check: also run the trainer's `validate_config` on each point (it
      builds the model abstractly, about a second per point); without it the
      points get the structural, config-resolution and model-block checks.
    num_devices, process_count: the devices and processes one run will have
      (batch divisibility).
    missing_files_ok: report missing weight files (DINO, LPIPS) as warnings
      instead of invalid points, e.g. for a dry run on a machine without them.

  Returns:
    An Expansion; `invalid` lists every rejected point with its reason.
  """
  points: list[Point] = []
  invalid: list[Invalid] = []
  warnings_: list[Invalid] = []
  hashes: dict[str, str] = {}
  seen: set[str] = set()
  for index, kwargs in enumerate(_call_sweep(sweep_file, tiny)):
    point = _to_point(kwargs, sweep_file, tiny, dict(overrides or {}), index)
    if point.name in seen:
      invalid.append(Invalid(point.name, "duplicate run name (the same point is added twice; "
                             "pass name= to add() to tell them apart)"))
      continue
    seen.add(point.name)
    if isinstance(point, Invalid):
      invalid.append(point)
      continue
    try:
      config = resolve_config(point)
      problem = _check_resolved(point, config)
      if problem is None and full_check:
        try:
          _trainer_check(config, num_devices, process_count)
        except FileNotFoundError as err:
          if not missing_files_ok:
            raise
          warnings_.append(Invalid(point.name, str(err)))
    except Exception as err:  # pylint: disable=broad-except
      # Any failure to build the config makes the point invalid; the message
      # names the field (ValueError from the validators) or the parse error.
      problem = (str(err) if isinstance(err, (ValueError, FileNotFoundError))
                 else f"{type(err).__name__}: {err}")
    if problem:
      invalid.append(Invalid(point.name, problem))
      continue
    points.append(point)
    hashes[point.name] = config_hash(config)
  if not points and not invalid:
    invalid.append(Invalid(sweep_file.name, "sweep(add) added no points"))
  return Expansion(points=tuple(points), hashes=hashes, invalid=tuple(invalid),
                   warnings=tuple(warnings_))


def parse_set(items: Sequence[str]) -> dict[str, Any]:
  """`["train.total_steps=4", "loss.perceptual=0.0"]` -> typed dict (Python literals)."""
  out: dict[str, Any] = {}
  for item in items:
    key, sep, text = item.partition("=")
    key = key.strip().removeprefix("config.")
    if not sep or not key or "." not in key:
      raise ValueError("--set: expected BLOCK.FIELD=VALUE (e.g. train.total_steps=4), got "
                       f"{item!r}")
    try:
      out[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      lowered = text.strip().lower()
      out[key] = {"true": True, "false": False}.get(lowered, text)
  return out


def describe(points: Sequence[Point]) -> str:
  """One line per point, for --dry-run output and logs."""
  return "\n".join(f"  {p.name:32s} {p.config_spec} {' '.join(p.override_flags())}"
                   for p in points)


__all__ = ["Expansion", "Invalid", "KNOWN_QUANTIZERS", "Point", "SweepFile", "config_hash",
           "describe", "expand", "format_value", "format_vocab", "load_sweep", "parse_set",
           "resolve_config", "run_name"]
