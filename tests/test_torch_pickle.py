"""Tests for gsq_jax.utils.torch_pickle: torch checkpoint reading without torch."""

import collections
import io
import pickle
import pickletools
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from gsq_jax.utils import torch_pickle as tp


def _state_dict():
  rng = np.random.default_rng(0)
  shared = np.arange(40, dtype=np.float32)
  return {
      "f32": rng.standard_normal((3, 4)).astype(np.float32),
      "f64": rng.standard_normal((2,)),
      "f16": rng.standard_normal((5,)).astype(np.float16),
      "bf16": np.array([1.5, -2.25, 3.0e-3], np.float32).astype(ml_dtypes.bfloat16),
      "i64": np.arange(-3, 4, dtype=np.int64),
      "i32": np.array([7, -8], np.int32),
      "u8": np.arange(250, 256, dtype=np.uint8),
      "bool": np.array([True, False, True]),
      "scalar": np.array(2.5, np.float32),
      "empty": np.zeros((0, 3), np.float32),
      # Non-contiguous views with offsets, two of them sharing one storage.
      "transposed": tp.StridedTensor(shared, 3, (2, 3), (1, 4)),
      "every_other": tp.StridedTensor(shared, 1, (5,), (2,)),
      "broadcast": tp.StridedTensor(shared, 10, (2, 3), (0, 1)),
  }


def _check_round_trip(path, sd):
  out = tp.load_state_dict(path)
  assert list(out) == list(sd)
  for name, value in sd.items():
    want = value.expected() if isinstance(value, tp.StridedTensor) else value
    assert out[name].dtype == want.dtype, name
    assert out[name].shape == want.shape, name
    np.testing.assert_array_equal(out[name], want, err_msg=name)
  return out


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_round_trip_all_dtypes_and_strides(tmp_path, fmt):
  sd = _state_dict()
  path = tmp_path / f"ckpt_{fmt}.pth"
  writer = tp.save_state_dict_zip if fmt == "zip" else tp.save_state_dict_legacy
  writer(path, sd)
  assert tp.is_torch_checkpoint(path)
  out = _check_round_trip(path, sd)
  # The transposed view is really non-contiguous in the file: [[3,7,11],[4,8,12]].
  np.testing.assert_array_equal(out["transposed"], [[3, 7, 11], [4, 8, 12]])
  np.testing.assert_array_equal(out["every_other"], [1, 3, 5, 7, 9])
  assert out["bf16"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(out["bf16"].astype(np.float32),
                                np.array([1.5, -2.25, 3.0e-3], np.float32)
                                .astype(ml_dtypes.bfloat16).astype(np.float32))
  assert isinstance(tp.load(path), collections.OrderedDict)


def test_zip_layout_and_pickle_globals_match_torch(tmp_path):
  """The writer produces torch's layout: one pickle naming torch globals + raw storages."""
  path = tmp_path / "c.pth"
  tp.save_state_dict_zip(path, {"w": np.ones((2, 2), np.float32),
                                "b": np.zeros((3,), np.int64)})
  with zipfile.ZipFile(path) as zf:
    names = set(zf.namelist())
    assert {"archive/data.pkl", "archive/data/0", "archive/data/1",
            "archive/version", "archive/byteorder"} <= names
    assert zf.read("archive/data/0") == np.ones(4, "<f4").tobytes()
    globals_ = {arg for op, arg, _ in pickletools.genops(zf.read("archive/data.pkl"))
                if op.name == "GLOBAL"}
  assert globals_ == {"collections OrderedDict", "torch._utils _rebuild_tensor_v2",
                      "torch FloatStorage", "torch LongStorage"}


def test_zip_root_folder_name_is_free(tmp_path):
  # torch < 2 names the root folder after the file; the reader must not care.
  path = tmp_path / "c.pth"
  tp.save_state_dict_zip(path, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
                         root="dinov2_vits14_reg4_pretrain")
  np.testing.assert_array_equal(tp.load_state_dict(path)["w"], np.arange(6).reshape(2, 3))


def test_legacy_layout_by_hand(tmp_path):
  """Parse our legacy file with plain pickle/struct, as torch._legacy_load does."""
  path = tmp_path / "legacy.pth"
  tp.save_state_dict_legacy(path, {"x": np.array([1.0, 2.0, 3.0], np.float32)})
  with open(path, "rb") as f:
    assert pickle.load(f) == 0x1950A86A20F9469CFC6C
    assert pickle.load(f) == 1001
    assert pickle.load(f)["little_endian"] is True
    raw = f.read()
  # Skip the main pickle (it names torch globals), then read the key list and
  # the storage: int64 element count + raw little-endian bytes.
  body = io.BytesIO(raw)
  for op, _, pos in pickletools.genops(body):
    if op.name == "STOP":
      break
  body.seek(pos + 1)
  assert pickle.load(body) == ["0"]
  (count,) = struct.unpack("<q", body.read(8))
  assert count == 3
  np.testing.assert_array_equal(np.frombuffer(body.read(12), "<f4"), [1, 2, 3])


def test_refuses_arbitrary_globals(tmp_path):
  path = tmp_path / "evil.pth"

  class Evil:

    def __reduce__(self):
      import os  # pylint: disable=import-outside-toplevel
      return (os.system, ("echo pwned",))

  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({"a": Evil()}, protocol=2))
  with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
    tp.load(path)


def test_not_a_checkpoint(tmp_path):
  path = tmp_path / "junk.pth"
  path.write_bytes(b"this is not a checkpoint at all")
  assert not tp.is_torch_checkpoint(path)
  with pytest.raises(ValueError, match="neither a torch zip checkpoint nor a legacy"):
    tp.load(path)
  zpath = tmp_path / "other.zip"
  with zipfile.ZipFile(zpath, "w") as zf:
    zf.writestr("readme.txt", "hi")
  with pytest.raises(ValueError, match="not a torch checkpoint"):
    tp.load(zpath)


def test_view_past_storage_end_is_an_error(tmp_path):
  path = tmp_path / "bad.pth"
  tp.save_state_dict_zip(path, {"v": tp.StridedTensor(np.arange(4, dtype=np.float32),
                                                      2, (3,), (1,))})
  with pytest.raises(ValueError, match="reaches past its storage"):
    tp.load(path)


def test_truncated_legacy_file(tmp_path):
  path = tmp_path / "t.pth"
  tp.save_state_dict_legacy(path, {"x": np.ones(100, np.float32)})
  data = path.read_bytes()
  path.write_bytes(data[:-40])
  with pytest.raises(ValueError, match="truncated"):
    tp.load(path)


def test_nested_state_dict_is_flattened(tmp_path):
  path = tmp_path / "n.pth"
  tp.save_state_dict_zip(path, {"a": np.ones(2, np.float32)})
  # Wrap the pickled OrderedDict as {"model": ...} by re-writing data.pkl.
  with zipfile.ZipFile(path) as zf:
    files = {n: zf.read(n) for n in zf.namelist()}
  inner = files["archive/data.pkl"]
  assert inner[:2] == b"\x80\x02" and inner[-1:] == b"."
  # protocol-2 pickle: EMPTY_DICT, "model", <inner object>, SETITEM, STOP
  files["archive/data.pkl"] = (b"\x80\x02}X\x05\x00\x00\x00model" + inner[2:-1] + b"s.")
  with zipfile.ZipFile(path, "w") as zf:
    for n, b in files.items():
      zf.writestr(n, b)
  out = tp.load_state_dict(path)
  assert list(out) == ["model.a"]
  np.testing.assert_array_equal(out["model.a"], [1, 1])


def test_open_checkpoint_streams_one_tensor_at_a_time(tmp_path):
  """Materialising tensors one by one holds the kept arrays plus about one tensor in flight."""
  import tracemalloc  # pylint: disable=import-outside-toplevel
  n, size = 8, 1 << 19  # 8 tensors of 2 MiB
  path = tmp_path / "big.pt"
  tp.save_state_dict_zip(path, {f"w{i}": np.full(size, i, np.float32) for i in range(n)})
  tensor_bytes = size * 4
  tracemalloc.start()
  try:
    with tp.open_checkpoint(path) as lazy:
      assert all(isinstance(v, tp.LazyTensor) for v in lazy.values())
      kept = {}
      for name, tensor in lazy.items():
        assert tensor.shape == (size,) and tensor.dtype == np.float32
        kept[name] = tensor.materialize()
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert [float(v[0]) for v in kept.values()] == list(range(n))
  # Everything read at once (bytes + copies) would peak near 2 * n tensors.
  assert peak < (n + 2.5) * tensor_bytes, peak / tensor_bytes
