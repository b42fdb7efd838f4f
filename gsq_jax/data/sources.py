"""Random-access image sources named by one config string.

  demo                random crops of the photographs shipped inside installed
                      packages (scikit-image, matplotlib); no setup, no network.
  demo:N              the same with N virtual images (default 10,000).
  folder:PATH         every jpg/jpeg/png/webp/bmp file under PATH (recursive).
  folder:PATH[i%K==R] a deterministic split of that folder: the files whose
  folder:PATH[i%K!=R] position i in the sorted list has i mod K == R (or !=),
                      e.g. train on `[i%7!=0]`, evaluate on `[i%7==0]`; the
                      two never share an image and both span all classes.
  tfds:NAME[:SPLIT]   a prepared tfds dataset read with `tfds.data_source` (no
                      TensorFlow), e.g. `tfds:imagenet2012:validation`, or one
                      written by `gsq-prepare`.

Every source has `len()` and `source[i] -> {"image": bytes | path | uint8
array, "name": str}`; decoding happens later, in the pipeline, so that a
corrupt file is counted and skipped there instead of failing here. Sources are
picklable and open files/readers lazily, so grain worker processes can use
them. The order of `folder:` files is sorted, hence identical on every host.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import re
from typing import Any

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEMO_DEFAULT_SIZE = 10_000
SCHEMES = ("demo", "folder", "tfds")
_FOLDER_SPLIT = re.compile(r"\[i%(?P<k>\d+)(?P<op>==|!=)(?P<r>\d+)\]$")

# Natural colour photographs that ship inside the wheels (package, relative
# path). Synthetic/grayscale files are left out.
_DEMO_PHOTOS = (
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/rocket.jpg"),
    ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/motorcycle_right.png"),
    ("skimage", "data/hubble_deep_field.jpg"),
    ("skimage", "data/retina.jpg"),
    ("skimage", "data/ihc.png"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """A parsed source string."""
  scheme: str
  location: str = ""  # folder path or tfds name
  split: str | None = None
  size: int | None = None  # demo only
  modulo: tuple[int, int, bool] | None = None  # folder split: (K, R, keep i%K == R)


def parse_source(source: str, field: str = "data.source") -> SourceSpec:
  """Parses `demo[:N]`, `folder:PATH` or `tfds:NAME[:SPLIT]`."""
  if not isinstance(source, str) or not source:
    raise ValueError(f"{field} must be a non-empty string like 'demo', "
                     f"'folder:PATH' or 'tfds:NAME[:SPLIT]', got {source!r}")
  scheme, _, rest = source.partition(":")
  if scheme == "demo":
    if not rest:
      return SourceSpec("demo", size=DEMO_DEFAULT_SIZE)
    if not rest.isdigit() or int(rest) <= 0:
      raise ValueError(f"{field}={source!r}: demo size must be a positive "
                       "integer, e.g. 'demo:1000'")
    return SourceSpec("demo", size=int(rest))
  if scheme == "folder":
    if not rest:
      raise ValueError(f"{field}={source!r}: expected 'folder:PATH'")
    split = _FOLDER_SPLIT.search(rest)
    if split is None:
      if rest.endswith("]") and "[" in rest:
        raise ValueError(f"{field}={source!r}: a folder split is written "
                         "'folder:PATH[i%K==R]' or 'folder:PATH[i%K!=R]' with 0 <= R < K")
      return SourceSpec("folder", location=rest)
    k, op, r = int(split["k"]), split["op"], int(split["r"])
    if k < 2 or r >= k:
      raise ValueError(f"{field}={source!r}: the folder split [i%K{op}R] needs K >= 2 and "
                       f"0 <= R < K, got K={k}, R={r}")
    return SourceSpec("folder", location=rest[:split.start()], modulo=(k, r, op == "=="))
  if scheme == "tfds":
    name, _, split = rest.partition(":")
    if not name:
      raise ValueError(f"{field}={source!r}: expected 'tfds:NAME[:SPLIT]'")
    return SourceSpec("tfds", location=name, split=split or None)
  raise ValueError(f"{field}={source!r}: unknown source scheme {scheme!r}; "
                   f"expected one of {SCHEMES} ('demo', 'folder:PATH', "
                   "'tfds:NAME[:SPLIT]')")


def make_source(source: str, *, image_size: int, default_split: str,
                data_dir: str | None = None, image_key: str = "image",
                seed: int = 0, field: str = "data.source"):
  """Builds the random-access source named by `source` (see module doc)."""
  spec = parse_source(source, field)
  if spec.scheme == "demo":
    return DemoSource(image_size=image_size, size=spec.size, seed=seed)
  if spec.scheme == "folder":
    return FolderSource(spec.location, field=field, modulo=spec.modulo)
  return TfdsSource(spec.location, split=spec.split or default_split,
                    data_dir=data_dir, image_key=image_key)


# ----------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------
def demo_photo_paths() -> list[pathlib.Path]:
  """Packaged photographs found on disk (no import of the packages needed)."""
  paths = []
  for package, rel in _DEMO_PHOTOS:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
      continue
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / rel
    if path.is_file():
      paths.append(path)
  return paths


class DemoSource:
  """`size` deterministic random square crops of the packaged photographs.

  Item i is a crop of photo i % n, of side between S and the photo's shorter
  side, at a position drawn from a generator seeded by (seed, i): random
  access, reproducible, and resumable like any other source. The pipeline's
  resize then brings each crop to S x S.
  """

  def __init__(self, *, image_size: int, size: int = DEMO_DEFAULT_SIZE,
               seed: int = 0):
    found = demo_photo_paths()
    if not found:
      raise ValueError(
          "data.source='demo' needs the photographs bundled with scikit-image "
          "(pip install scikit-image); none were found. Use "
          "'folder:PATH' or 'tfds:NAME' instead.")
    sizes = {p: Image.open(p).size for p in found}
    self._paths = [str(p) for p in found if min(sizes[p]) >= image_size]
    if not self._paths:
      largest = max(min(s) for s in sizes.values())
      raise ValueError(
          f"image_size={image_size} is too large for data.source='demo': the "
          f"largest packaged photo has a shorter side of {largest} px")
    self._image_size = image_size
    self._size = size
    self._seed = seed
    self._cache: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return self._size

  def _photo(self, k: int) -> np.ndarray:
    if k not in self._cache:
      with Image.open(self._paths[k]) as img:
        self._cache[k] = np.asarray(img.convert("RGB"))
    return self._cache[k]

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    k = index % len(self._paths)
    photo = self._photo(k)
    h, w = photo.shape[:2]
    rng = np.random.default_rng([self._seed, index])
    side = int(rng.integers(self._image_size, min(h, w) + 1))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    name = f"demo/{os.path.basename(self._paths[k])}#{index}"
    return {"image": photo[top:top + side, left:left + side], "name": name}

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"] = {}  # Workers decode their own copies, lazily.
    return state


# ----------------------------------------------------------------------------
# folder
# ----------------------------------------------------------------------------
def list_images(root: str | os.PathLike, field: str = "src") -> list[str]:
  """Sorted relative paths of all image files under `root` (recursive)."""
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise ValueError(f"{field}: image folder {root!r} does not exist or is "
                     "not a directory")
  found = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames.sort()
    for name in filenames:
      if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
        found.append(os.path.relpath(os.path.join(dirpath, name), root))
  if not found:
    raise ValueError(f"{field}: image folder {root!r} contains no "
                     f"{'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files")
  return sorted(found)


class FolderSource:
  """All images under a folder; items are file paths, decoded later."""

  def __init__(self, root: str | os.PathLike, field: str = "data.source",
               modulo: tuple[int, int, bool] | None = None):
    self.root = os.path.abspath(os.fspath(root))
    self._files = list_images(self.root, field)
    if modulo is not None:
      k, r, keep_equal = modulo
      self._files = [f for i, f in enumerate(self._files) if (i % k == r) == keep_equal]
      if not self._files:
        raise ValueError(f"{field}: the split of {self.root!r} selects no file")

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    rel = self._files[int(index)]
    return {"image": os.path.join(self.root, rel), "name": rel}


# ----------------------------------------------------------------------------
# tfds
# ----------------------------------------------------------------------------
class TfdsSource:
  """A prepared tfds split read through `tfds.data_source` (ArrayRecord).

  `tfds.features.Image` columns are read undecoded (`SkipDecoding`) so that
  Pillow decodes them in the pipeline with the same corrupt-image handling as
  folders; uint8 `Tensor` image columns are passed through as arrays.
  """

  def __init__(self, name: str, *, split: str, data_dir: str | None = None,
               image_key: str = "image"):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.image_key = image_key
    self._source = None
    self._len = len(self._open())

  def _open(self):
    if self._source is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      where = self.data_dir or "the default data_dir (~/tensorflow_datasets)"
      missing = ValueError(
          f"data.source='tfds:{self.name}': no prepared dataset "
          f"{self.name!r} in {where}. Prepare it first (for an image folder: "
          "`python -m gsq_jax.data.prepare --src FOLDER --name NAME --data_dir "
          "DIR`; for ImageNet, from the manual tarballs with tfds) and pass "
          "its data_dir as data.data_dir.")
      try:
        builder = tfds.builder(self.name, data_dir=self.data_dir)
      except Exception:  # DatasetNotFoundError and friends.
        raise missing from None
      if not builder.is_prepared():
        raise missing
      features = builder.info.features
      if self.image_key not in features:
        raise ValueError(
            f"data.image_key={self.image_key!r} is not a feature of "
            f"{self.name!r}; features are {sorted(features.keys())}")
      decoders = None
      if isinstance(features[self.image_key], tfds.features.Image):
        decoders = {self.image_key: tfds.decode.SkipDecoding()}
      splits = builder.info.splits
      base_split = self.split.split("[")[0]
      if base_split not in splits:
        raise ValueError(
            f"data.source='tfds:{self.name}:{self.split}': no split "
            f"{base_split!r}; available: {sorted(splits.keys())}")
      self._source = builder.as_data_source(split=self.split,
                                            decoders=decoders)
    return self._source

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._open()[int(index)]
    name = record.get("file_name", f"{self.name}/{self.split}/{index}")
    if isinstance(name, bytes):
      name = name.decode("utf-8", "replace")
    return {"image": record[self.image_key], "name": str(name)}

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None  # Reopened lazily in each worker process.
    return state
