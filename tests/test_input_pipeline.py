"""Tests for gsq_jax.data.input_pipeline and gsq_jax.data (sources, transforms)."""

import json
import logging
import os
import pathlib

import grain
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
from PIL import Image
import pytest

from gsq_jax.data import input_pipeline as ip
from gsq_jax.data import sources
from gsq_jax.data import transforms

S = 32  # Output size used throughout: small keeps decode+resize cheap.
N_REAL = 16


@pytest.fixture(scope="module")
def image_folder(shared_dir, tmp_path_factory) -> pathlib.Path:
  """16 real JPEGs (symlinks) + a non-image + a truncated JPEG in a sub-dir."""
  real = sorted((shared_dir / "data" / "imagenet-samples-256").glob("*.jpg"))
  folder = tmp_path_factory.mktemp("images")
  for path in real[:N_REAL]:
    (folder / path.name).symlink_to(path)
  (folder / "bad.png").write_bytes(b"these bytes are not an image")
  (folder / "sub").mkdir()
  (folder / "sub" / "trunc.jpg").write_bytes(real[0].read_bytes()[:3000])
  (folder / "notes.txt").write_text("ignored: not an image extension")
  return folder


def _reference(folder: pathlib.Path) -> dict[str, np.ndarray]:
  """Independently decoded+cropped valid images, keyed by file name."""
  out = {}
  for name in sources.list_images(folder):
    try:
      img = transforms.decode_image(folder / name)
    except Exception:  # pylint: disable=broad-except
      continue
    out[name] = transforms.preprocess(img, S, "center")
  return out


def _key(image: np.ndarray) -> bytes:
  return np.asarray(image).tobytes()


# ----------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------
def _gradient_image(width: int, height: int) -> Image.Image:
  yy, xx = np.mgrid[0:height, 0:width]
  rgb = np.stack([xx * 255 // (width - 1), yy * 255 // (height - 1),
                  (xx + yy) % 256], axis=-1).astype(np.uint8)
  return Image.fromarray(rgb)


def test_resize_shorter_side_and_center_crop_geometry():
  img = _gradient_image(300, 200)  # W x H, landscape.
  assert transforms.resized_shape(200, 300, 100) == (100, 150)
  assert transforms.resized_shape(300, 200, 100) == (150, 100)  # Portrait.
  assert transforms.resized_shape(427, 640, 256) == (256, 383)  # floor(383.6)
  out = transforms.preprocess(img, 100, "center")
  assert out.shape == (100, 100, 3) and out.dtype == np.float32
  # By hand: 300x200 -> 150x100, crop left = round((150 - 100) / 2) = 25.
  expected = np.asarray(img.resize((150, 100), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(out, transforms.to_float(expected[:, 25:125]))


def test_eval_crop_pct_292_to_256():
  assert transforms.eval_resize_size(256) == 292
  assert transforms.eval_resize_size(128) == 146
  img = _gradient_image(402, 300)
  out = transforms.preprocess(img, 256, "crop_pct")
  # By hand: shorter side 300 -> 292, 402 -> int(292 * 402 / 300) = 391;
  # top = round(36 / 2) = 18, left = round(135 / 2) = 68 (Python round, as
  # torchvision: half to even, so 67.5 -> 68 and 42.5 -> 42 below).
  expected = np.asarray(img.resize((391, 292), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(
      out, transforms.to_float(expected[18:274, 68:324]))
  img = _gradient_image(400, 300)
  # 'center' on a 400x300 image: 300 -> 256, 400 -> 341, left = round(42.5)=42.
  center = transforms.preprocess(img, 256, "center")
  expected = np.asarray(img.resize((341, 256), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(center,
                                transforms.to_float(expected[:, 42:298]))


def test_resize_is_antialiased_like_pil():
  # A 1-px checkerboard shrunk 4x averages to mid-grey with an antialiased
  # filter; point-sampled bilinear would keep (near) black/white pixels.
  board = ((np.indices((128, 128)).sum(0) % 2) * 255).astype(np.uint8)
  small = np.asarray(transforms.resize_shorter_side(
      Image.fromarray(board).convert("RGB"), 32)).astype(float)
  assert np.abs(small[4:-4, 4:-4] - 127.5).max() < 4


def test_to_float_range_and_random_crop():
  np.testing.assert_array_equal(
      transforms.to_float(np.array([0, 255], np.uint8)), [-1.0, 1.0])
  image = np.arange(10 * 12 * 3, dtype=np.int32).reshape(10, 12, 3)
  a = transforms.random_crop(image, 4, np.random.default_rng(0))
  b = transforms.random_crop(image, 4, np.random.default_rng(0))
  np.testing.assert_array_equal(a, b)
  top, left = divmod(int(a[0, 0, 0]) // 3, 12)
  np.testing.assert_array_equal(a, image[top:top + 4, left:left + 4])
  tops = {int(transforms.random_crop(image, 4,
                                     np.random.default_rng(s))[0, 0, 0])
          for s in range(20)}
  assert len(tops) > 5
  with pytest.raises(ValueError, match="crop must be one of"):
    transforms.preprocess(Image.new("RGB", (8, 8)), 4, "flip")


# ----------------------------------------------------------------------------
# Sources and config validation
# ----------------------------------------------------------------------------
def test_parse_source_and_errors(tmp_path):
  assert sources.parse_source("demo").size == sources.DEMO_DEFAULT_SIZE
  assert sources.parse_source("demo:7").size == 7
  assert sources.parse_source("tfds:imagenet2012:validation[:10]") == (
      sources.SourceSpec("tfds", "imagenet2012", "validation[:10]"))
  assert sources.parse_source("folder:/a:b").location == "/a:b"
  kw = dict(global_batch_size=2, image_size=S, seed=0)
  with pytest.raises(ValueError, match="unknown source scheme 'http'"):
    ip.make_train_iterator({"source": "http://x"}, **kw)
  with pytest.raises(ValueError, match="does not exist"):
    ip.make_train_iterator({"source": f"folder:{tmp_path}/missing"}, **kw)
  (tmp_path / "empty" / "deeper").mkdir(parents=True)
  (tmp_path / "empty" / "readme.txt").write_text("x")
  with pytest.raises(ValueError, match="contains no"):
    ip.make_train_iterator({"source": f"folder:{tmp_path}/empty"}, **kw)
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "x.jpg").write_bytes(b"no jpeg")
  it = ip.make_train_iterator({"source": f"folder:{tmp_path}/broken"}, **kw)
  with pytest.raises(ValueError, match="no decodable image"):
    next(it)
  it.close()
  with pytest.raises(ValueError, match="too large for data.source='demo'"):
    ip.make_train_iterator({"source": "demo"}, global_batch_size=2,
                           image_size=4096, seed=0)
  with pytest.raises(ValueError, match="data.crop"):
    ip.make_train_iterator({"crop": "flip"}, **kw)
  with pytest.raises(ValueError, match="data.eval_crop"):
    ip.make_eval_iterator({"eval_crop": "random"}, global_batch_size=2,
                          image_size=S)
  with pytest.raises(ValueError, match="data.sorce: unknown field"):
    ip.make_train_iterator({"sorce": "demo"}, **kw)
  with pytest.raises(ValueError, match="data.num_workers"):
    ip.make_train_iterator({"num_workers": -1}, **kw)
  with pytest.raises(ValueError, match="process_index"):
    ip.make_train_iterator(None, **kw, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="divisible by the process count"):
    ip.make_train_iterator(None, global_batch_size=3, image_size=S, seed=0,
                           process_index=0, process_count=2)


def test_demo_source_batches():
  it = ip.make_train_iterator({"source": "demo:64"}, global_batch_size=4,
                              image_size=S, seed=0)
  try:
    batches = [next(it)["image"] for _ in range(3)]
  finally:
    it.close()
  for b in batches:
    assert b.shape == (4, S, S, 3) and b.dtype == np.float32
    assert b.min() >= -1.0 and b.max() <= 1.0
  stacked = np.concatenate(batches)
  assert stacked.std() > 0.1  # Real photo content, not a constant.
  assert len({_key(x) for x in stacked}) == len(stacked)  # All distinct crops.
  demo = sources.DemoSource(image_size=S, size=10)
  assert demo[3]["image"].dtype == np.uint8
  np.testing.assert_array_equal(demo[3]["image"], demo[3]["image"])


# ----------------------------------------------------------------------------
# Folder source: corrupt files, per-host slicing, eval coverage
# ----------------------------------------------------------------------------
def test_folder_train_skips_and_counts_corrupt(image_folder, caplog):
  counter = ip.CorruptImageCounter()
  it = ip.make_train_iterator(
      {"source": f"folder:{image_folder}", "prefetch": 0},
      global_batch_size=6, image_size=S, seed=1, corrupt_counter=counter)
  reference = {_key(v) for v in _reference(image_folder).values()}
  assert len(reference) == N_REAL
  with caplog.at_level(logging.WARNING):
    try:
      # 6 batches = 36 valid images: more than two epochs of 18 files.
      seen = [_key(x) for _ in range(6) for x in next(it)["image"]]
    finally:
      it.close()
  assert set(seen) == reference  # Only valid images, and all of them.
  assert counter.count >= 4  # Both corrupt files, in each of >= 2 epochs.
  assert {"bad.png", os.path.join("sub", "trunc.jpg")} <= set(counter.names)
  assert "bad.png" in caplog.text and "trunc.jpg" in caplog.text


def test_per_host_slices_are_disjoint_and_cover(image_folder):
  per_host = []
  for pi in range(2):
    it = ip.make_train_iterator(
        {"source": f"folder:{image_folder}", "prefetch": 0},
        global_batch_size=8, image_size=S, seed=0, process_index=pi,
        process_count=2)
    try:
      # Host slice = 9 files of which 8 or 9 decode; 2 batches of 4.
      per_host.append({_key(x) for _ in range(2) for x in next(it)["image"]})
    finally:
      it.close()
  assert not per_host[0] & per_host[1]
  assert per_host[0] | per_host[1] == {
      _key(v) for v in _reference(image_folder).values()}


@pytest.mark.parametrize("process_count", [1, 3])
def test_eval_covers_every_image_once(image_folder, process_count):
  files = sources.list_images(image_folder)
  reference = _reference(image_folder)
  runs = []
  for pi in range(process_count):
    data = ip.make_eval_iterator(
        {"eval_source": f"folder:{image_folder}"}, global_batch_size=
        4 * process_count, image_size=S, process_index=pi,
        process_count=process_count)
    batches = list(data)
    assert len(batches) == data.num_batches == len(data)
    runs.append((data, batches))
  # Same number of batches on every host (lockstep collectives).
  assert len({len(b) for _, b in runs}) == 1
  seen = []
  for data, batches in runs:
    for b in batches:
      assert b["image"].shape == (4, S, S, 3)
      assert b["mask"].dtype == bool and b["index"].dtype == np.int32
      assert np.all(b["index"][~b["mask"]] == -1)
      for idx, img in zip(b["index"][b["mask"]], b["image"][b["mask"]]):
        np.testing.assert_array_equal(img, reference[files[idx]])
        seen.append(int(idx))
    # The last row of the last batch is padding (16 valid of 18 files).
    assert not batches[-1]["mask"][-1]
  assert sorted(seen) == sorted(files.index(n) for n in reference)
  assert sum(d.corrupt_counter.count for d, _ in runs) == 2


def test_eval_crop_pct_and_limit(image_folder):
  data = ip.make_eval_iterator(
      {"eval_source": f"folder:{image_folder}", "eval_crop": "crop_pct",
       "eval_num_images": 5}, global_batch_size=4, image_size=S)
  batches = list(data)
  assert data.num_images == 5 and len(batches) == 2
  files = sources.list_images(image_folder)
  assert files[0] == "bad.png"  # So the first batch holds images 1..4.
  assert batches[0]["index"].tolist() == [1, 2, 3, 4]
  expected = transforms.preprocess(
      transforms.decode_image(image_folder / files[1]), S, "crop_pct")
  np.testing.assert_array_equal(batches[0]["image"][0], expected)
  assert not batches[1]["mask"].any()  # Padding batch: nothing left.


# ----------------------------------------------------------------------------
# Checkpointing and global arrays
# ----------------------------------------------------------------------------
def test_iterator_state_restores_exact_batches(image_folder, tmp_path):
  cfg = {"source": f"folder:{image_folder}", "crop": "random", "prefetch": 2}
  kw = dict(global_batch_size=4, image_size=S, seed=3)
  it = ip.make_train_iterator(cfg, **kw)
  for _ in range(5):  # Past the first epoch, so reshuffling is exercised.
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # As grain's handler saves.
  expected = [next(it)["image"] for _ in range(3)]
  restored = ip.make_train_iterator(cfg, **kw)
  restored.set_state(state)
  got = [next(restored)["image"] for _ in range(3)]
  fresh = ip.make_train_iterator(cfg, **kw)
  first = next(fresh)["image"]
  for x in (it, restored, fresh):
    x.close()
  for e, g in zip(expected, got):
    np.testing.assert_array_equal(e, g)
  assert not np.array_equal(first, expected[0])

  # The same through orbax, as the trainer saves it.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  it = ip.make_train_iterator(cfg, **kw)
  next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(1, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = next(it)["image"]
    restored = ip.make_train_iterator(cfg, **kw)
    mngr.restore(1, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(restored)))
  np.testing.assert_array_equal(next(restored)["image"], expected)
  it.close()
  restored.close()


def test_global_batches_sharded_over_devices(image_folder):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  it = ip.make_train_iterator({"source": f"folder:{image_folder}"},
                              global_batch_size=16, image_size=S, seed=0,
                              sharding=sharding)
  try:
    batch = next(it)
  finally:
    it.close()
  image = batch["image"]
  assert isinstance(image, jax.Array) and image.shape == (16, S, S, 3)
  assert image.sharding == sharding
  assert {s.data.shape for s in image.addressable_shards} == {(2, S, S, 3)}
  assert len({s.device for s in image.addressable_shards}) == 8

  # Eval: rank-1 leaves get the batch-axis sharding cut to their rank.
  nhwc = NamedSharding(mesh, P("data", None, None, None))
  data = ip.make_eval_iterator({"eval_source": f"folder:{image_folder}"},
                               global_batch_size=8, image_size=S,
                               sharding=nhwc)
  batches = list(data)
  assert batches[0]["image"].sharding == nhwc
  assert batches[0]["mask"].sharding == NamedSharding(mesh, P("data"))
  assert int(sum(np.asarray(b["mask"]).sum() for b in batches)) == N_REAL
  with pytest.raises(ValueError, match="number of batch shards"):
    ip.make_train_iterator(None, global_batch_size=12, image_size=S, seed=0,
                           sharding=sharding)


def test_corrupt_counted_with_worker_processes(image_folder):
  counter = ip.CorruptImageCounter()
  it = ip.make_train_iterator(
      {"source": f"folder:{image_folder}", "num_workers": 1, "prefetch": 0},
      global_batch_size=9, image_size=S, seed=0, corrupt_counter=counter)
  try:
    images = np.concatenate([next(it)["image"] for _ in range(4)])
  finally:
    it.close()
  assert images.shape == (36, S, S, 3)
  # 36 valid images need more than two passes over 18 files.
  assert counter.count >= 4
  assert "bad.png" in counter.names


def test_folder_modulo_split_is_disjoint_and_complete(tmp_path):
  for i in range(10):
    Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / f"{i:02d}.png")
  train = sources.make_source(f"folder:{tmp_path}[i%3!=0]", image_size=8, default_split="train")
  held_out = sources.make_source(f"folder:{tmp_path}[i%3==0]", image_size=8,
                                 default_split="train")
  names = lambda s: [s[i]["name"] for i in range(len(s))]
  assert names(held_out) == ["00.png", "03.png", "06.png", "09.png"]
  assert sorted(names(train) + names(held_out)) == [f"{i:02d}.png" for i in range(10)]
  for bad in ("[i%1==0]", "[i%3==3]", "[i%3<1]"):
    with pytest.raises(ValueError, match="folder split"):
      sources.parse_source(f"folder:{tmp_path}{bad}")
