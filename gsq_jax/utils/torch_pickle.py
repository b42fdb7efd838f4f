"""Reading (and, for tests, writing) PyTorch checkpoint files without torch.

Pretrained weights (DINOv2 for the discriminator, the FID Inception network)
are published as `torch.save` files. This module reads them into numpy arrays
so gsq_jax never needs torch. Two container formats exist:

* zip (torch >= 1.6): `<root>/data.pkl` is a pickle whose tensors refer, via
  `persistent_load`, to raw little-endian storages `<root>/data/<key>`. The
  root folder is free (`archive/` from a buffer save, the file stem from a
  path save), so it is found, not assumed.
* legacy (magic number 0x1950a86a20f9469cfc6c): five consecutive pickles
  (magic, protocol 1001, system info, the object, the list of storage keys),
  followed by each storage as an int64 element count and its raw bytes.

Tensors are pickled as `torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, ...)`; we rebuild them with numpy strides, so views with offsets
and non-contiguous strides (and several tensors sharing one storage) come out
right. Protocol-2 pickles spell a `bytes` object as `_codecs.encode(str,
'latin1')` (flex_gen's pickled `config`); that one call is allowed.

Safety: unpickling is restricted to an explicit allow-list of globals
(`AllowListUnpickler`): pickle resolves a global before it can call it, so a
file naming anything else (`os.system`, `builtins.eval`, ...) is refused with
an error naming the file and the global before any of it runs.

Memory: `open_checkpoint` keeps a zip open and returns `LazyTensor` leaves
that read their storage only when materialised, one at a time, so an
importer holds the converted weights plus one tensor in flight rather than the
whole file twice.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

try:  # numpy >= 2
  from numpy._core import multiarray as numpy_multiarray
except ImportError:  # pragma: no cover
  from numpy.core import multiarray as numpy_multiarray

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch storage class name -> numpy dtype.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("bool"),
}
_DTYPE_TO_STORAGE = {v: k for k, v in STORAGE_DTYPES.items()}


# ----------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stands in for `torch.FloatStorage` & co. during unpickling."""
  name: str

  @property
  def dtype(self) -> np.dtype:
    return STORAGE_DTYPES[self.name]


class _Storage:
  """A flat typed buffer; `data` is filled when its bytes are read."""

  def __init__(self, dtype: np.dtype, numel: int, reader=None):
    self.dtype = dtype
    self.numel = numel
    self.data: np.ndarray | None = None
    self.reader = reader  # zip: reads the bytes on demand, nothing cached
    self.base: _Storage | None = None  # legacy views: (base, element offset)
    self.base_offset = 0

  def array(self) -> np.ndarray:
    if self.base is not None:
      return self.base.array()[self.base_offset:self.base_offset + self.numel]
    if self.data is None and self.reader is not None:
      return self.reader()
    if self.data is None:
      raise ValueError("torch_pickle: a tensor refers to a storage whose data "
                       "was never read (truncated or corrupt file)")
    return self.data


@dataclasses.dataclass
class LazyTensor:
  """A tensor of a checkpoint whose bytes are read by `materialize()`."""
  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(int(s) for s in self.size)

  @property
  def dtype(self) -> np.dtype:
    return self.storage.dtype

  def materialize(self) -> np.ndarray:
    flat = self.storage.array()
    size, stride = tuple(int(s) for s in self.size), tuple(int(s) for s in self.stride)
    if len(size) != len(stride):
      raise ValueError(f"torch_pickle: tensor size {size} and stride {stride} "
                       "have different ranks")
    if any(s == 0 for s in size):
      return np.zeros(size, flat.dtype)
    extent = self.offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if self.offset < 0 or any(s < 0 for s in stride) or extent > flat.size:
      raise ValueError(
          f"torch_pickle: tensor (offset {self.offset}, size {size}, stride "
          f"{stride}) reaches past its storage of {flat.size} elements")
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=size, strides=[s * item for s in stride])
    return np.array(view)  # own contiguous copy


def _rebuild_tensor_v2(storage, storage_offset, size, stride,
                       requires_grad=False, backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  return LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_tensor(storage, storage_offset, size, stride):
  return LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  del new_type, state
  return func(*args)


def _latin1_encode(text, encoding="latin1"):
  """`_codecs.encode` as protocol-2 pickles use it for `bytes`; other codecs refused."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise pickle.UnpicklingError(
        f"torch_pickle: _codecs.encode is only allowed as the protocol-2 spelling of bytes "
        f"(a str with 'latin1'), got {type(text).__name__} with {encoding!r}")
  return text.encode("latin1")


class _Placeholder:
  """Stands in for a class (torch.Tensor, Parameter) named but never built."""

  def __init__(self, name: str):
    self.name = name


_TORCH_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _Placeholder("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _Placeholder("torch.nn.Parameter"),
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("_codecs", "encode"): _latin1_encode,
}


class AllowListUnpickler(pickle.Unpickler):
  """An unpickler that resolves only the globals in `allowed`.

  `allowed` maps (module, name) to the object to use instead; anything else
  raises `pickle.UnpicklingError` naming `source` (the file) and the global.
  Pickle resolves a global (GLOBAL/STACK_GLOBAL) before it can call it, so a
  refused callable never runs. `persistent_load` is refused unless a subclass
  defines it.
  """

  def __init__(self, file, allowed: Mapping[tuple[str, str], Any], source: str = "<pickle>"):
    super().__init__(file)
    self._allowed = allowed
    self.source = source

  def find_class(self, module: str, name: str):
    if (module, name) in self._allowed:
      return self._allowed[(module, name)]
    raise self.refuse(module, name)

  def refuse(self, module: str, name: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(
        f"{self.source}: refusing to load global {module}.{name}: it is not on the "
        "allow-list of a weights-only checkpoint (a pickle that names it could run code); "
        "only tensors, containers and known config classes can be read without torch")

  def persistent_load(self, pid):
    raise pickle.UnpicklingError(f"{self.source}: unexpected persistent id {pid!r}")


class _Unpickler(AllowListUnpickler):
  """Torch's allow-list; storages come from `storage_for(pid)`."""

  def __init__(self, file, storage_for, source: str = "<pickle>"):
    super().__init__(file, _TORCH_GLOBALS, source)
    self._storage_for = storage_for

  def find_class(self, module: str, name: str):
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in _TORCH_GLOBALS:
      return _TORCH_GLOBALS[(module, name)]
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in (
        "_reconstruct", "scalar"):
      return getattr(numpy_multiarray, name)
    if module == "numpy" and name in ("ndarray", "dtype"):
      return getattr(np, name)
    if module.startswith("numpy") and name.endswith("DType") and hasattr(np.dtypes, name):
      return getattr(np.dtypes, name)
    raise self.refuse(module, name)

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
      raise pickle.UnpicklingError(f"{self.source}: unsupported persistent id {pid!r}")
    return self._storage_for(pid)


def _storage_dtype(storage_type) -> np.dtype:
  if not isinstance(storage_type, _StorageType):
    raise pickle.UnpicklingError(
        f"torch_pickle: unsupported storage type {storage_type!r}; expected one "
        f"of torch.{{{', '.join(STORAGE_DTYPES)}}}")
  return storage_type.dtype


def _materialize(obj):
  """Replaces every `LazyTensor` in a nest of containers by its numpy array."""
  if isinstance(obj, LazyTensor):
    return obj.materialize()
  if isinstance(obj, collections.OrderedDict):
    return collections.OrderedDict((k, _materialize(v)) for k, v in obj.items())
  if isinstance(obj, dict):
    return {k: _materialize(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_materialize(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_materialize(v) for v in obj)
  return obj


def _zip_root(zf: zipfile.ZipFile, path) -> str:
  """The folder holding `data.pkl` (any name: torch uses the file stem or 'archive')."""
  pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(pkls) != 1:
    raise ValueError(f"torch_pickle: {path} is a zip file but not a torch "
                     f"checkpoint (expected one '<root>/data.pkl', found {pkls})")
  return pkls[0][:-len("data.pkl")]


def _read_storage(zf: zipfile.ZipFile, name: str, dtype: np.dtype, byteorder: str,
                  path) -> np.ndarray:
  try:
    raw = zf.read(name)
  except KeyError as e:
    raise ValueError(f"torch_pickle: {path} has no storage record {name!r} "
                     "(truncated or corrupt file)") from e
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise ValueError(f"torch_pickle: cannot read {name!r} from {path}: {e} "
                     "(truncated or corrupt file)") from e
  if len(raw) % dtype.itemsize:
    raise ValueError(f"torch_pickle: storage {name!r} of {path} has {len(raw)} bytes, not a "
                     f"multiple of {dtype.itemsize} (corrupt file)")
  if byteorder == "big" and dtype.itemsize > 1:
    return np.frombuffer(raw, dtype=dtype.newbyteorder(">")).astype(dtype)
  return np.frombuffer(raw, dtype=dtype)


def _unpickle_zip(zf: zipfile.ZipFile, path) -> Any:
  """The top-level object of an open zip checkpoint, with `LazyTensor` leaves."""
  root = _zip_root(zf, path)
  names = set(zf.namelist())
  byteorder = "little"
  if root + "byteorder" in names:
    byteorder = zf.read(root + "byteorder").decode().strip()
  storages: dict[str, _Storage] = {}

  def storage_for(pid):
    _, storage_type, key, _location, numel = pid[:5]
    dtype = _storage_dtype(storage_type)
    if key not in storages:
      name = f"{root}data/{key}"
      if name not in names:
        raise ValueError(f"torch_pickle: {path} has no storage record {name!r} "
                         "(truncated or corrupt file)")
      storages[key] = _Storage(dtype, int(numel), reader=lambda: _read_storage(
          zf, name, dtype, byteorder, path))
    return storages[key]

  try:
    data = zf.read(root + "data.pkl")
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise ValueError(f"torch_pickle: cannot read {root}data.pkl from {path}: {e} "
                     "(truncated or corrupt file)") from e
  return _Unpickler(io.BytesIO(data), storage_for, source=str(path)).load()


@contextlib.contextmanager
def open_checkpoint(path: str | os.PathLike) -> Iterator[Any]:
  """Yields a checkpoint's top-level object with `LazyTensor` leaves (zip or legacy).

  Inside the `with` block `leaf.materialize()` reads one tensor from the file;
  nothing else is held. (Legacy files store their storages after the pickle,
  so they are read whole.)
  """
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    try:
      zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
      raise ValueError(f"torch_pickle: {path} is not a readable zip file: {e} "
                       "(truncated or corrupt)") from e
    with zf:
      yield _unpickle_zip(zf, path)
    return
  with open(path, "rb") as f:
    yield _load_legacy(f, path, materialize=False)


def _load_legacy(f, path, materialize: bool = True) -> Any:
  try:
    magic = pickle.load(f)
  except Exception as e:  # any garbage: not a pickle at all
    magic = e
  if not isinstance(magic, int) or magic != LEGACY_MAGIC:
    raise ValueError(f"torch_pickle: {path} is neither a torch zip checkpoint "
                     "nor a legacy torch file (no zip directory, no legacy "
                     "magic number): truncated, or not a checkpoint")
  protocol = pickle.load(f)
  if protocol != LEGACY_PROTOCOL:
    raise ValueError(f"torch_pickle: unsupported legacy protocol {protocol}, "
                     f"expected {LEGACY_PROTOCOL}")
  sys_info = pickle.load(f)
  if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
    raise ValueError("torch_pickle: big-endian legacy checkpoints are not supported")
  storages: dict[str, _Storage] = {}

  def storage_for(pid):
    _, storage_type, root_key, _location, numel = pid[:5]
    view_metadata = pid[5] if len(pid) > 5 else None
    dtype = _storage_dtype(storage_type)
    if root_key not in storages:
      storages[root_key] = _Storage(dtype, int(numel))
    root = storages[root_key]
    if view_metadata is None:
      return root
    _view_key, offset, view_size = view_metadata
    view = _Storage(dtype, int(view_size))
    view.base, view.base_offset = root, int(offset)
    return view

  obj = _Unpickler(f, storage_for, source=str(path)).load()
  keys = pickle.load(f)
  for key in keys:
    if key not in storages:
      raise ValueError(f"torch_pickle: storage {key!r} is listed but unused")
    st = storages[key]
    (count,) = struct.unpack("<q", f.read(8))
    nbytes = count * st.dtype.itemsize
    raw = f.read(nbytes)
    if len(raw) != nbytes:
      raise ValueError("torch_pickle: file ends inside a storage (truncated)")
    st.data = np.frombuffer(raw, dtype=st.dtype)
    st.numel = count
  return _materialize(obj) if materialize else obj


def is_torch_checkpoint(path: str | os.PathLike) -> bool:
  """Cheap format sniff: a zip with '<root>/data.pkl', or the legacy magic."""
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as zf:
      return any(n.endswith("/data.pkl") and n.count("/") == 1 for n in zf.namelist())
  with open(path, "rb") as f:
    head = f.read(64)
  try:  # the first pickle in a legacy file is the magic int
    return _Unpickler(io.BytesIO(head), None).load() == LEGACY_MAGIC
  except Exception:  # pylint: disable=broad-except
    return False


def load(path: str | os.PathLike) -> Any:
  """Loads a `torch.save` file (zip or legacy) with tensors as numpy arrays."""
  with open_checkpoint(path) as obj:
    return _materialize(obj)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Loads a checkpoint holding a flat state dict `{name: tensor}`.

  Nested dicts are flattened with "." (so `{"model": {...}}` gives
  "model.<name>"); non-array leaves are an error.
  """
  obj = load(path)
  if not isinstance(obj, Mapping):
    raise ValueError(f"torch_pickle: {path} holds a {type(obj).__name__}, "
                     "expected a state dict")
  out: dict[str, np.ndarray] = {}

  def walk(prefix, d):
    for k, v in d.items():
      name = f"{prefix}{k}"
      if isinstance(v, Mapping):
        walk(name + ".", v)
      elif isinstance(v, np.ndarray):
        out[name] = v
      else:
        raise ValueError(f"torch_pickle: entry {name!r} of {path} is a "
                         f"{type(v).__name__}, expected a tensor")

  walk("", obj)
  return out


# ----------------------------------------------------------------------------
# Writing (small, for tests): the same on-disk layout torch produces.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class StridedTensor:
  """A tensor written as a view into a flat storage (tests non-contiguity).

  Tensors whose `storage` is the same numpy object share one storage on disk.
  """
  storage: np.ndarray  # 1-D
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]

  def expected(self) -> np.ndarray:
    """What a reader must return for this view."""
    item = self.storage.dtype.itemsize
    return np.array(np.lib.stride_tricks.as_strided(
        self.storage[self.offset:], self.shape, [s * item for s in self.stride]))


@dataclasses.dataclass(frozen=True)
class _GlobalRef:
  """A global (e.g. torch._utils._rebuild_tensor_v2) named in the pickle."""
  module: str
  name: str

  def __call__(self, *args):  # pickle requires reduce functions be callable
    raise TypeError(f"{self.module}.{self.name} is only a name in a pickle")


class _TensorRef:
  def __init__(self, storage_ref, offset, shape, stride):
    self.args = (storage_ref, offset, tuple(shape), tuple(stride), False,
                 collections.OrderedDict())

  def __reduce__(self):
    return (_GlobalRef("torch._utils", "_rebuild_tensor_v2"), self.args)


class _StorageRef:
  def __init__(self, key: str, data: np.ndarray):
    self.key, self.data = key, data


class _Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Pure-python pickler that can name torch globals without importing torch."""

  def __init__(self, file, legacy: bool):
    super().__init__(file, protocol=2)
    self.legacy = legacy

  def save(self, obj, save_persistent_id=True):
    if isinstance(obj, _GlobalRef):
      self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
      return
    super().save(obj, save_persistent_id)

  def persistent_id(self, obj):
    if not isinstance(obj, _StorageRef):
      return None
    kind = _DTYPE_TO_STORAGE[obj.data.dtype]
    pid = ("storage", _GlobalRef("torch", kind), obj.key, "cpu", int(obj.data.size))
    return pid + (None,) if self.legacy else pid


def _prepare(state_dict: Mapping[str, Any]):
  """Returns (pickle-able OrderedDict, ordered {key: flat storage array})."""
  storages: dict[int, _StorageRef] = {}
  out = collections.OrderedDict()
  for name, value in state_dict.items():
    if isinstance(value, StridedTensor):
      flat, offset, shape, stride = value.storage, value.offset, value.shape, value.stride
    else:
      arr = np.asarray(value)
      flat, offset, shape = arr, 0, arr.shape
      stride = tuple(int(np.prod(arr.shape[i + 1:])) for i in range(arr.ndim))
    if flat.dtype not in _DTYPE_TO_STORAGE:
      raise ValueError(f"save_state_dict: unsupported dtype {flat.dtype} for {name!r}")
    if id(flat) not in storages:
      storages[id(flat)] = _StorageRef(str(len(storages)),
                                       np.ascontiguousarray(flat).reshape(-1))
    out[name] = _TensorRef(storages[id(flat)], offset, shape, stride)
  return out, {s.key: s.data for s in storages.values()}


def save_state_dict_zip(path: str | os.PathLike, state_dict: Mapping[str, Any],
                        root: str = "archive") -> None:
  """Writes `{name: array | StridedTensor}` in torch's zip checkpoint format."""
  obj, storages = _prepare(state_dict)
  buf = io.BytesIO()
  _Pickler(buf, legacy=False).dump(obj)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr(f"{root}/data.pkl", buf.getvalue())
    zf.writestr(f"{root}/byteorder", "little")
    for key, data in storages.items():
      zf.writestr(f"{root}/data/{key}", data.astype(data.dtype.newbyteorder("<")).tobytes())
    zf.writestr(f"{root}/version", "3\n")


def save_state_dict_legacy(path: str | os.PathLike, state_dict: Mapping[str, Any]) -> None:
  """Writes `{name: array | StridedTensor}` in torch's legacy (pre-1.6) format."""
  obj, storages = _prepare(state_dict)
  with open(path, "wb") as f:
    for header in (LEGACY_MAGIC, LEGACY_PROTOCOL,
                   {"protocol_version": LEGACY_PROTOCOL, "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 8}}):
      pickle.dump(header, f, protocol=2)
    _Pickler(f, legacy=True).dump(obj)
    pickle.dump(list(storages), f, protocol=2)
    for data in storages.values():
      f.write(struct.pack("<q", data.size))
      f.write(data.astype(data.dtype.newbyteorder("<")).tobytes())
