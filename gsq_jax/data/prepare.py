r"""gsq-prepare: image folder -> tfds ArrayRecord dataset, without TensorFlow.

  python -m gsq_jax.data.prepare --src /data/my_images --name my_images \
      --data_dir ~/tensorflow_datasets [--split train] [--labels]
  python -m gsq_jax.data.prepare --src train=/data/tr --src validation=/data/va \
      --name my_images --data_dir DIR

then train with `data.source='tfds:my_images'` (or `tfds:my_images:validation`)
and `data.data_dir=DIR`.

tfds' own `ImageFolder` needs TensorFlow, so this uses a small
`GeneratorBasedBuilder` with `file_format='array_record'` that stores each
file's *encoded bytes as they are* (an `Image` feature fed bytes is not
re-encoded), the file name relative to the split folder, and optionally a
`ClassLabel` from the first sub-folder. Files that Pillow cannot decode are
skipped, counted and named in a warning, so the dataset never holds a file the
training pipeline would have to drop.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import sys
import tempfile
from typing import Iterator, Sequence

from absl import logging
import tensorflow_datasets as tfds

from gsq_jax.data import sources
from gsq_jax.data import transforms

VERSION = "1.0.0"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_CHUNK = 256  # Files verified concurrently; bounds memory on huge folders.


def _read(path: str, verify: bool) -> tuple[bytes | None, str | None]:
  """(bytes, None) for a decodable file, (None, error) otherwise."""
  try:
    with open(path, "rb") as f:
      data = f.read()
    if verify:
      transforms.decode_image(data)
  except Exception as e:  # pylint: disable=broad-except
    return None, f"{type(e).__name__}: {e}"
  return data, None


def _make_builder_class(name: str):
  """A builder class whose tfds name is `name` (not put in the registry)."""

  class FolderImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Encoded images of one or more folders, one split per folder."""

    VERSION = tfds.core.Version(VERSION)
    # No checksums file sits next to this code. Setting this also avoids
    # tfds' code-path lookup, which imports `importlib_resources`, a package
    # tfds 4.9.10 uses for classes in packages but does not depend on.
    code_path = None

    def __init__(self, *, splits: dict[str, str], label_names, verify: bool,
                 threads: int, **kwargs):
      self._splits = splits
      self._label_names = label_names
      self._verify = verify
      self._threads = threads
      self.num_written: dict[str, int] = {}
      self.skipped: dict[str, list[str]] = {}
      super().__init__(**kwargs)

    def _info(self):
      features = {"image": tfds.features.Image(shape=(None, None, 3)),
                  "file_name": tfds.features.Text()}
      if self._label_names is not None:
        features["label"] = tfds.features.ClassLabel(names=self._label_names)
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict(features),
          description="Images prepared from a folder by gsq_jax.data.prepare.")

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split, root)
              for split, root in self._splits.items()}

    def _generate_examples(self, split: str, root: str) -> Iterator:
      files = sources.list_images(root, field=f"--src {split}={root}")
      self.num_written[split], self.skipped[split] = 0, []
      with concurrent.futures.ThreadPoolExecutor(self._threads) as pool:
        for start in range(0, len(files), _CHUNK):
          chunk = files[start:start + _CHUNK]
          paths = [os.path.join(root, rel) for rel in chunk]
          results = pool.map(_read, paths, [self._verify] * len(paths))
          for rel, (data, error) in zip(chunk, results):
            if data is None:
              logging.warning("Skipping corrupt image %s: %s", rel, error)
              self.skipped[split].append(rel)
              continue
            example = {"image": data, "file_name": rel}
            if self._label_names is not None:
              example["label"] = _label_of(rel)
            self.num_written[split] += 1
            yield rel, example

  FolderImages.name = name
  return FolderImages


def _label_of(rel: str) -> str:
  parts = rel.replace(os.sep, "/").split("/")
  return parts[0] if len(parts) > 1 else ""


def _label_names(splits: dict[str, str]) -> list[str]:
  names = set()
  for split, root in splits.items():
    for rel in sources.list_images(root, field=f"--src {split}={root}"):
      label = _label_of(rel)
      if not label:
        raise ValueError(
            f"--labels: {os.path.join(root, rel)} is not inside a class "
            "sub-folder; with --labels every image must be in "
            "SRC/<class>/...")
      names.add(label)
  return sorted(names)


def prepare_folder(splits: dict[str, str], *, name: str, data_dir: str,
                   labels: bool = False, verify: bool = True,
                   overwrite: bool = False, threads: int = 8) -> dict:
  """Writes `{split: folder}` as tfds dataset `name` under `data_dir`.

  Returns:
    {"path": dataset version dir, "num_examples": {split: n},
     "skipped": {split: [relative names of corrupt files]}}.
  """
  if not _NAME_RE.match(name or ""):
    raise ValueError(f"--name must be snake_case ([a-z][a-z0-9_]*), got "
                     f"{name!r}")
  if not splits:
    raise ValueError("--src: give at least one image folder")
  for split in splits:
    if not re.match(r"^[A-Za-z][A-Za-z0-9_]*$", split):
      raise ValueError(f"--split must be a plain name like 'train', got "
                       f"{split!r}")
  splits = {s: os.path.abspath(os.path.expanduser(r)) for s, r in
            splits.items()}
  for split, root in splits.items():
    sources.list_images(root, field=f"--src {split}={root}")  # Fail early.
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  version_dir = os.path.join(data_dir, name, VERSION)
  if os.path.exists(version_dir):
    if not overwrite:
      raise ValueError(f"--data_dir: {version_dir} already exists; pass "
                       "--overwrite to rebuild it")
    shutil.rmtree(version_dir)
  builder_cls = _make_builder_class(name)
  builder = builder_cls(
      splits=splits, label_names=_label_names(splits) if labels else None,
      verify=verify, threads=threads, data_dir=data_dir,
      file_format="array_record")
  with tempfile.TemporaryDirectory() as downloads:
    builder.download_and_prepare(download_dir=downloads)
  return {"path": version_dir, "num_examples": dict(builder.num_written),
          "skipped": dict(builder.skipped)}


def _parse_src(values: Sequence[str], default_split: str) -> dict[str, str]:
  splits = {}
  for value in values:
    split, sep, root = value.partition("=")
    if not sep or os.path.isdir(value):
      split, root = default_split, value
    if split in splits:
      raise ValueError(f"--src: split {split!r} given twice")
    splits[split] = root
  return splits


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point (`gsq-prepare`)."""
  parser = argparse.ArgumentParser(
      prog="gsq-prepare", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", action="append", required=True,
                      help="image folder, or SPLIT=FOLDER (repeatable)")
  parser.add_argument("--name", required=True, help="tfds dataset name")
  parser.add_argument("--data_dir", required=True, help="tfds data_dir")
  parser.add_argument("--split", default="train",
                      help="split name for a --src without SPLIT= (train)")
  parser.add_argument("--labels", action="store_true",
                      help="store the first sub-folder name as a ClassLabel")
  parser.add_argument("--no_verify", action="store_true",
                      help="store files without checking that they decode")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing dataset of the same version")
  parser.add_argument("--threads", type=int, default=8,
                      help="threads reading/verifying images")
  args = parser.parse_args(argv)
  try:
    result = prepare_folder(
        _parse_src(args.src, args.split), name=args.name,
        data_dir=args.data_dir, labels=args.labels,
        verify=not args.no_verify, overwrite=args.overwrite,
        threads=args.threads)
  except ValueError as e:
    parser.error(str(e))
  for split, n in result["num_examples"].items():
    skipped = len(result["skipped"][split])
    print(f"{split}: {n} images written, {skipped} corrupt skipped "
          f"-> data.source='tfds:{args.name}:{split}'")
  print(f"dataset at {result['path']} (data.data_dir={args.data_dir!r})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
