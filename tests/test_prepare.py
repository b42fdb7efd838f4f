"""Tests for gsq_jax.data.prepare (gsq-prepare): folder -> tfds ArrayRecord."""

import io
import pathlib
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from gsq_jax.data import input_pipeline as ip
from gsq_jax.data import prepare
from gsq_jax.data import sources
from gsq_jax.data import transforms

N = 12
S = 32


@pytest.fixture(scope="module")
def originals(shared_dir) -> list[pathlib.Path]:
  folder = shared_dir / "data" / "imagenet-samples-256"
  return sorted(folder.glob("*.jpg"))[:N]


@pytest.fixture(scope="module")
def prepared(originals, tmp_path_factory):
  """Runs the CLI once on 12 real images plus a corrupt file."""
  src = tmp_path_factory.mktemp("src")
  for path in originals:
    (src / path.name).symlink_to(path)
  (src / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
  data_dir = tmp_path_factory.mktemp("tfds")
  rc = prepare.main(["--src", str(src), "--name", "gsq_test_images",
                     "--data_dir", str(data_dir), "--split", "train"])
  assert rc == 0
  return src, data_dir


def test_prepare_stores_original_bytes_and_pixels(prepared, originals):
  src, data_dir = prepared
  source = sources.TfdsSource("gsq_test_images", split="train",
                              data_dir=str(data_dir))
  assert len(source) == N  # The corrupt file was skipped.
  by_name = {p.name: p for p in originals}
  names = set()
  for i in range(len(source)):
    record = source[i]
    original = by_name[record["name"]]
    names.add(record["name"])
    assert record["image"] == original.read_bytes()  # Stored as-is.
    decoded = np.asarray(transforms.decode_image(record["image"]))
    with Image.open(original) as img:
      np.testing.assert_array_equal(decoded, np.asarray(img.convert("RGB")))
  assert names == set(by_name)
  assert "tensorflow" not in sys.modules


def test_prepared_dataset_through_the_pipeline(prepared, originals):
  _, data_dir = prepared
  # Train split by default for training; evaluation must name it (its
  # default is 'validation', which this dataset does not have).
  cfg = {"source": "tfds:gsq_test_images", "data_dir": str(data_dir),
         "eval_source": "tfds:gsq_test_images:train"}
  data = ip.make_eval_iterator(cfg, global_batch_size=5, image_size=S)
  source = sources.TfdsSource("gsq_test_images", split="train",
                              data_dir=str(data_dir))
  by_name = {p.name: p for p in originals}
  seen = []
  for batch in data:
    for idx, image in zip(batch["index"][batch["mask"]],
                          batch["image"][batch["mask"]]):
      expected = transforms.preprocess(
          transforms.decode_image(by_name[source[int(idx)]["name"]]), S,
          "center")
      np.testing.assert_array_equal(image, expected)
      seen.append(int(idx))
  assert sorted(seen) == list(range(N))
  assert data.corrupt_counter.count == 0
  # The train split is also readable by the (shuffling) train iterator.
  it = ip.make_train_iterator(cfg, global_batch_size=4, image_size=S, seed=0)
  try:
    assert next(it)["image"].shape == (4, S, S, 3)
  finally:
    it.close()


def test_prepare_labels_and_two_splits(originals, tmp_path):
  for split, chunk in (("train", originals[:6]),
                       ("validation", originals[6:9])):
    for k, path in enumerate(chunk):
      folder = tmp_path / split / ("cat" if k % 2 else "dog")
      folder.mkdir(parents=True, exist_ok=True)
      # A PNG re-encode checks non-JPEG input; grayscale checks RGB output.
      with Image.open(path) as img:
        img.convert("L").save(folder / (path.stem + ".png"))
  result = prepare.prepare_folder(
      {"train": tmp_path / "train", "validation": tmp_path / "validation"},
      name="labelled", data_dir=str(tmp_path / "tfds"), labels=True)
  assert result["num_examples"] == {"train": 6, "validation": 3}
  src = tfds.data_source("labelled", split="validation",
                         data_dir=str(tmp_path / "tfds"),
                         decoders={"image": tfds.decode.SkipDecoding()})
  builder = tfds.builder("labelled", data_dir=str(tmp_path / "tfds"))
  assert builder.info.features["label"].names == ["cat", "dog"]
  for i in range(len(src)):
    record = src[i]
    name = record["file_name"].decode()
    assert builder.info.features["label"].int2str(record["label"]) == (
        name.split("/")[0])
    decoded = transforms.decode_image(record["image"])
    assert decoded.mode == "RGB" and decoded.size == (256, 256)
    assert Image.open(io.BytesIO(record["image"])).format == "PNG"
  data = ip.make_eval_iterator(
      {"source": "tfds:labelled", "data_dir": str(tmp_path / "tfds")},
      global_batch_size=2, image_size=S)  # Eval default split: validation.
  assert data.num_images == 3


def test_prepare_errors(originals, tmp_path):
  flat = tmp_path / "flat"
  flat.mkdir()
  (flat / originals[0].name).symlink_to(originals[0])
  with pytest.raises(ValueError, match="--name must be snake_case"):
    prepare.prepare_folder({"train": flat}, name="Bad-Name",
                           data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="not inside a class sub-folder"):
    prepare.prepare_folder({"train": flat}, name="flat", labels=True,
                           data_dir=str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match="does not exist"):
    prepare.prepare_folder({"train": tmp_path / "nope"}, name="nope",
                           data_dir=str(tmp_path / "tfds"))
  prepare.prepare_folder({"train": flat}, name="flat",
                         data_dir=str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match="already exists"):
    prepare.prepare_folder({"train": flat}, name="flat",
                           data_dir=str(tmp_path / "tfds"))
  with pytest.raises(SystemExit):  # argparse error exit for the CLI.
    prepare.main(["--src", str(flat), "--name", "flat",
                  "--data_dir", str(tmp_path / "tfds")])
  result = prepare.prepare_folder({"train": flat}, name="flat",
                                  data_dir=str(tmp_path / "tfds"),
                                  overwrite=True)
  assert result["num_examples"] == {"train": 1}
