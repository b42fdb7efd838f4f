"""Reader glue: a released PyTorch checkpoint's tensors, streamed into an NNX model.

`open_tensors` opens the file with the torch-free, allow-listed reader
(gsq_jax/utils/torch_pickle.py) and turns its failures (truncated, not a
checkpoint, a refused global) into `CheckpointError` naming the file.
`TensorSet` hands out tensors by name, reading each one only when it is
taken, and remembers which were taken, so an importer can insist that every
tensor it should use was used. `load_params` fills every `nnx.Param` of a
model from a name mapping, converting PyTorch layouts to Flax ones:

  Conv weight (O, I, kh, kw) -> kernel (kh, kw, I, O)
  Linear weight (O, I)       -> kernel (I, O)
  GroupNorm weight           -> scale
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pickle
import struct
import zipfile
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gsq_jax.models import tokenizer as tokenizer_lib
from gsq_jax.utils import torch_pickle


class CheckpointError(ValueError):
  """A checkpoint that cannot be imported; the message names the file and the fix."""


@contextlib.contextmanager
def open_tensors(path: str | os.PathLike) -> Iterator[Any]:
  """Yields the checkpoint's top-level object, tensors lazy (valid inside the block)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file; pass the path of a local checkpoint file")
  try:
    with torch_pickle.open_checkpoint(path) as obj:
      yield obj
  except CheckpointError:
    raise
  except (pickle.UnpicklingError, ValueError, EOFError, zipfile.BadZipFile, struct.error) as e:
    if isinstance(e, ValueError) and not str(e).startswith("torch_pickle"):
      raise  # not the reader's: an error of the importer's own code in the `with` block
    message = str(e)
    if path not in message:
      message = f"{path}: {message}"
    raise CheckpointError(f"cannot read checkpoint {message}") from e


class TensorSet:
  """Named lazy tensors of one checkpoint; `take` reads one and marks it used."""

  def __init__(self, tensors: Mapping[str, Any], source: str):
    self.source = source
    self._tensors = dict(tensors)
    self._taken: set[str] = set()
    for name, value in self._tensors.items():
      if not isinstance(value, (torch_pickle.LazyTensor, np.ndarray)):
        raise CheckpointError(f"{source}: state-dict entry {name!r} is a "
                              f"{type(value).__name__}, expected a tensor")

  def __contains__(self, name: str) -> bool:
    return name in self._tensors

  def names(self) -> list[str]:
    return list(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._tensors[name].shape)

  def take(self, name: str) -> np.ndarray:
    value = self._tensors[name]
    self._taken.add(name)
    return value.materialize() if isinstance(value, torch_pickle.LazyTensor) else value

  def untaken(self) -> list[str]:
    return [n for n in self._tensors if n not in self._taken]


def empty_tokenizer(model_config: ml_collections.ConfigDict) -> nnx.Module:
  """The configured Tokenizer without initialised parameters (load_params fills every one).

  Parameters stay shape placeholders (nnx.eval_shape); the other state (RNG
  streams of dropout) comes from one jitted call, whose parameter init XLA
  drops as unused. Random init of a large model would cost more than reading it.
  """
  build = lambda: tokenizer_lib.Tokenizer.from_config(model_config, rngs=nnx.Rngs(0))
  graphdef, params, _ = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
  return nnx.merge(graphdef, params, _non_params(model_config.to_json(sort_keys=True)))


@functools.lru_cache(maxsize=4)
def _non_params(model_config_json: str):
  """The non-parameter state of a config's Tokenizer (cached: same config, same state)."""
  cfg = ml_collections.ConfigDict(json.loads(model_config_json))
  build = lambda: tokenizer_lib.Tokenizer.from_config(cfg, rngs=nnx.Rngs(0))
  return jax.jit(lambda: nnx.split(build(), nnx.Param, ...)[2])()


def _torch_to_flax(owner: nnx.Module, leaf: str, array: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and isinstance(owner, nnx.Conv) and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if leaf == "kernel" and isinstance(owner, nnx.Linear) and array.ndim == 2:
    return array.T
  return array


TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _owner(model: nnx.Module, path: tuple) -> Any:
  obj = model
  for key in path:
    obj = obj[key] if isinstance(key, int) else getattr(obj, key)
  return obj


def load_params(model: nnx.Module, torch_name: Callable[[tuple], str],
                tensors: TensorSet) -> None:
  """Sets every Param of `model` from `tensors[torch_name(path)]` (layouts converted).

  Missing tensors and shape mismatches are collected and raised together.
  """
  params = [(path, var) for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Param)]
  missing, wrong = [], []
  for path, var in params:
    name = torch_name(tuple(path))
    if name not in tensors:
      missing.append(name)
      continue
    owner = _owner(model, tuple(path[:-1]))
    array = _torch_to_flax(owner, path[-1], tensors.take(name))
    if tuple(array.shape) != tuple(var.shape):
      wrong.append(f"{name}: file {tensors.shape(name)} -> {array.shape}, model needs "
                   f"{tuple(var.shape)} ({'/'.join(map(str, path))})")
      continue
    var.value = jnp.asarray(array, dtype=var.dtype)
  if missing or wrong:
    raise CheckpointError(
        f"{tensors.source}: the checkpoint does not fit the model derived from it: "
        + (f"missing tensors {missing}" if missing else "")
        + ("; " if missing and wrong else "")
        + (f"shape mismatches {wrong}" if wrong else ""))


def require_all_taken(tensors: TensorSet, ignored: Callable[[str], bool] = lambda _: False) -> None:
  """Error listing every tensor neither used nor explicitly ignored (no partial loads)."""
  left = [n for n in tensors.untaken() if not ignored(n)]
  if left:
    raise CheckpointError(f"{tensors.source}: {len(left)} tensors were not used by the model "
                          f"(a different architecture or an unsupported option?): {left}")


@dataclasses.dataclass
class ImportedModel:
  """What an importer derived from a checkpoint: the model block and the loaded model."""
  model_config: ml_collections.ConfigDict
  tokenizer: nnx.Module
  source_kind: str  # "flex_gen" | "ibq"
  details: dict[str, Any]  # source-specific facts recorded in the provenance


def top_level_dict(obj: Any, source: str, expected: tuple[str, ...], hint: str) -> Mapping:
  """The checkpoint's top-level dict, or an error naming what was found and `hint`."""
  if not isinstance(obj, Mapping) or not all(k in obj for k in expected):
    found = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(f"{source}: not the expected kind of checkpoint: top level is {found}, "
                          f"expected keys {list(expected)}; {hint}")
  return obj
