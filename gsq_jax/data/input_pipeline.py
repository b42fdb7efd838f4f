"""Grain input pipelines: per-host image batches and global jax.Arrays.

Train (infinite, checkpointable):

  source -> [process_index::process_count] -> shuffle(seed) -> repeat
    -> decode + crop (grain read threads)     -> batch of decodable images
    -> [worker processes]  -> count corrupt images (main process)
    -> thread prefetch     -> global jax.Array (if a sharding is given)

`make_train_iterator` returns grain's `DatasetIterator`, so the trainer saves
and restores it with `grain.checkpoint.CheckpointSave/CheckpointRestore`
(`get_state()/set_state()`); restoring resumes the exact same next batches.

Eval (finite, one pass per `iter()`, no shuffle): every host takes
`images[process_index::process_count]` and yields the *same* number of
batches, padding with `mask == False` rows, so that the masked union over
hosts is every image exactly once. Batches carry the image's global `index`.

Corrupt images are never fatal: decoding errors become markers that the
batching stage skips and passes on, and the counter lives in the main process
after any worker processes, so `CorruptImageCounter` sees every skipped file
(with a warning naming it) whether decoding ran in threads or in workers.

Data config (`default_config()`, ml_collections):
  source          'demo[:N]' | 'folder:PATH' | 'tfds:NAME[:SPLIT]' (train split
                  defaults to 'train').
  eval_source     same syntax; None = `source` (tfds split 'validation').
  data_dir        tfds data_dir for 'tfds:' sources.
  image_key       tfds image feature name.
  crop            train crop: 'center' (GSQ) | 'random' (IBQ) | 'crop_pct'.
  eval_crop       eval crop: 'center' | 'crop_pct' (timm, 292 -> 256).
  crop_pct        crop_pct for 'crop_pct' (0.875).
  eval_num_images evaluate on the first N images only; None = all.
  num_workers     grain worker processes; 0 = in-process (threads only).
  num_threads     grain read threads per process (decode + resize).
  read_buffer     elements the read threads may run ahead.
  prefetch        host batches prefetched by a background thread; 0 = none.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from typing import Any, Iterator, Mapping, Sequence

from absl import flags
from absl import logging
import grain
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from gsq_jax.data import sources as sources_lib
from gsq_jax.data import transforms

TRAIN_CROPS = ("center", "random", "crop_pct")
EVAL_CROPS = ("center", "crop_pct")
_EVAL_DEMO_SEED = 0x5EED0E7A  # Eval crops of the demo photos differ from train.


def default_config() -> ml_collections.ConfigDict:
  """The data config with its defaults (see the module docstring)."""
  return ml_collections.ConfigDict(dict(
      source="demo",
      # Optional fields are typed references so that the command line can set them.
      eval_source=ml_collections.FieldReference(None, field_type=str),
      data_dir=ml_collections.FieldReference(None, field_type=str),
      image_key="image",
      crop="center",
      eval_crop="center",
      crop_pct=transforms.DEFAULT_CROP_PCT,
      eval_num_images=ml_collections.FieldReference(None, field_type=int),
      num_workers=0,
      num_threads=8,
      read_buffer=64,
      prefetch=2,
  ))


def _resolve_config(data_cfg: Mapping[str, Any] | None
                    ) -> ml_collections.ConfigDict:
  """Defaults overlaid with `data_cfg`; unknown or bad fields -> ValueError."""
  cfg = default_config()
  data_cfg = data_cfg or {}
  for key in data_cfg.keys():
    if key not in cfg:
      raise ValueError(f"data.{key}: unknown field; known fields are "
                       f"{sorted(cfg.keys())}")
    try:
      cfg[key] = data_cfg[key]
    except TypeError as e:  # ConfigDict keeps each field's type.
      raise ValueError(f"data.{key}: {e}") from None
  if cfg.crop not in TRAIN_CROPS:
    raise ValueError(
        f"data.crop must be one of {TRAIN_CROPS}, got {cfg.crop!r}")
  if cfg.eval_crop not in EVAL_CROPS:
    raise ValueError(
        f"data.eval_crop must be one of {EVAL_CROPS}, got {cfg.eval_crop!r}")
  for key, low in (("num_workers", 0), ("num_threads", 1), ("read_buffer", 1),
                   ("prefetch", 0)):
    if not isinstance(cfg[key], int) or cfg[key] < low:
      raise ValueError(f"data.{key} must be an integer >= {low}, "
                       f"got {cfg[key]!r}")
  if cfg.eval_num_images is not None and (
      not isinstance(cfg.eval_num_images, int) or cfg.eval_num_images <= 0):
    raise ValueError("data.eval_num_images must be a positive integer or None,"
                     f" got {cfg.eval_num_images!r}")
  transforms.eval_resize_size(1, cfg.crop_pct)  # Validates crop_pct.
  return cfg


# ----------------------------------------------------------------------------
# Hosts, batch sizes and global arrays
# ----------------------------------------------------------------------------
def _process(process_index: int | None,
             process_count: int | None) -> tuple[int, int]:
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if not (isinstance(pc, int) and pc >= 1 and isinstance(pi, int)
          and 0 <= pi < pc):
    raise ValueError(f"need 0 <= process_index < process_count, got "
                     f"process_index={pi}, process_count={pc}")
  return pi, pc


def host_slice(ds: grain.MapDataset, process_index: int,
               process_count: int) -> grain.MapDataset:
  """This host's share of `ds`: elements process_index, +process_count, ...

  Strided like `tfds.split_for_jax_process` splits evenly; hosts' shares are
  disjoint and together cover `ds` once.
  """
  return ds[process_index::process_count]


def _batch_shards(sharding: jax.sharding.Sharding | None) -> int:
  """How many ways `sharding` splits the leading (batch) axis."""
  if not isinstance(sharding, NamedSharding) or not sharding.spec:
    return 1
  axes = sharding.spec[0]
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(sharding.mesh.shape[a] for a in axes)


def local_batch_size(global_batch_size: int, process_count: int,
                     sharding: jax.sharding.Sharding | None = None) -> int:
  """Per-host batch; checks divisibility by hosts and by batch shards."""
  if not isinstance(global_batch_size, int) or global_batch_size <= 0:
    raise ValueError(
        "global_batch_size must be a positive integer, got "
        f"{global_batch_size}")
  shards = max(process_count, _batch_shards(sharding))
  if global_batch_size % process_count or global_batch_size % shards:
    raise ValueError(
        f"global_batch_size={global_batch_size} must be divisible by the "
        f"process count ({process_count}) and by the number of batch shards "
        f"of the data sharding ({_batch_shards(sharding)})")
  return global_batch_size // process_count


def _leaf_sharding(sharding: jax.sharding.Sharding, ndim: int):
  """`sharding` cut to a leaf's rank, so one sharding serves (B,) and NHWC."""
  if isinstance(sharding, NamedSharding) and len(sharding.spec) > ndim:
    return NamedSharding(sharding.mesh, P(*sharding.spec[:ndim]))
  return sharding


def make_global_batch(local_batch: Any,
                      sharding: jax.sharding.Sharding) -> Any:
  """Host-local numpy batch (pytree) -> global jax.Arrays, batch axis sharded.

  Every host passes its own rows; `jax.make_array_from_process_local_data`
  stitches them into arrays of global batch size laid out by `sharding`
  (e.g. `NamedSharding(mesh, P("data"))`). Works unchanged on one host.
  """
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(
        _leaf_sharding(sharding, x.ndim), x)
  return jax.tree.map(put, local_batch)


# ----------------------------------------------------------------------------
# Corrupt images
# ----------------------------------------------------------------------------
class CorruptImageCounter:
  """Thread-safe count (and first names) of images skipped as undecodable.

  Counts what this process skipped since the counter was created; it is not
  part of the iterator checkpoint, so a resumed run starts again from zero.
  """

  def __init__(self, keep_names: int = 100):
    self._lock = threading.Lock()
    self._keep = keep_names
    self.count = 0
    self.names: list[str] = []

  def record(self, skipped: Sequence[tuple[str, str]]) -> None:
    """Counts and warns about (name, error) pairs."""
    for name, error in skipped:
      logging.warning("Skipping corrupt image %s: %s", name, error)
    with self._lock:
      self.count += len(skipped)
      room = max(self._keep - len(self.names), 0)
      self.names.extend(name for name, _ in skipped[:room])


def _load(record: dict[str, Any], rng: np.random.Generator | None = None, *,
          image_size: int, crop: str, crop_pct: float) -> dict[str, Any]:
  """Source record -> {"image": float32 (S,S,3)[, "index"]} or a marker."""
  try:
    img = transforms.decode_image(record["image"])
  except Exception as e:  # pylint: disable=broad-except
    # Decoders raise many types (OSError, SyntaxError, ValueError, ...) on bad
    # bytes; any of them means "skip and count this file", never "crash".
    return {"corrupt": (record["name"], f"{type(e).__name__}: {e}")}
  out = {"image": transforms.preprocess(img, image_size, crop, rng=rng,
                                        crop_pct=crop_pct)}
  if "index" in record:
    out["index"] = np.int32(record["index"])
  return out


class _ValidBatchIterator(grain.DatasetIterator):
  """Pulls elements until `batch_size` decodable ones are collected."""

  def __init__(self, parent: grain.DatasetIterator, batch_size: int,
               pad: bool, max_corrupt_run: int):
    super().__init__(parent)
    self._batch_size = batch_size
    self._pad = pad
    self._max_corrupt_run = max_corrupt_run
    self._corrupt_run = 0

  def __next__(self) -> dict[str, Any]:
    items, corrupt = [], []
    while len(items) < self._batch_size:
      try:
        element = next(self._parent)
      except StopIteration:
        if self._pad and (items or corrupt):
          break  # Last, padded batch (all-masked if it only reports corrupt).
        raise
      if "corrupt" in element:
        corrupt.append(element["corrupt"])
        self._corrupt_run += 1
        if self._corrupt_run > self._max_corrupt_run:
          raise ValueError(
              f"no decodable image in {self._corrupt_run} consecutive records "
              f"(last: {element['corrupt'][0]}); check the data source")
      else:
        items.append(element)
        self._corrupt_run = 0
    return self._stack(items, corrupt)

  def _stack(self, items, corrupt) -> dict[str, Any]:
    """Stacks items, padding a short (eval) batch: index -1, mask False."""
    n, batch = len(items), {}
    for key in items[0] if items else ():
      value = np.stack([item[key] for item in items])
      if n < self._batch_size:
        pad = np.full((self._batch_size - n,) + value.shape[1:],
                      -1 if key == "index" else 0, value.dtype)
        value = np.concatenate([value, pad])
      batch[key] = value
    if self._pad:
      batch["mask"] = np.arange(self._batch_size) < n
    batch["corrupt"] = tuple(corrupt)
    return batch

  def get_state(self):
    # Nothing is buffered between calls, so the parent's position is ours.
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)
    self._corrupt_run = 0


class _ValidBatchDataset(grain.IterDataset):
  """Batches decodable images and carries corrupt-record messages along."""

  def __init__(self, parent: grain.IterDataset, batch_size: int, *, pad: bool,
               max_corrupt_run: int):
    super().__init__(parent)
    self._args = (batch_size, pad, max_corrupt_run)

  def __iter__(self) -> _ValidBatchIterator:
    return _ValidBatchIterator(self._parent.__iter__(), *self._args)

  def __str__(self) -> str:
    return f"ValidBatchDataset(batch_size={self._args[0]})"


def _report_corrupt(batch: dict[str, Any],
                    counter: CorruptImageCounter) -> dict[str, Any]:
  batch = dict(batch)
  corrupt = batch.pop("corrupt")
  if corrupt:
    counter.record(list(corrupt))
  return batch


def _batched(ds: grain.MapDataset, cfg: ml_collections.ConfigDict, *,
             batch_size: int, pad: bool, max_corrupt_run: int,
             counter: CorruptImageCounter) -> grain.IterDataset:
  """Decoded elements -> host batches, corrupt images counted in-process.

  grain's worker processes each take a strided share of the elements. For
  training each worker batches its own share (cheaper IPC). For evaluation
  batches are formed after the workers, in the main process, so that only the
  final batch is padded and every host yields the expected number of batches.
  """
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=cfg.num_threads, prefetch_buffer_size=cfg.read_buffer))
  if pad:
    ds = _maybe_workers(ds, cfg)
  ds = _ValidBatchDataset(ds, batch_size, pad=pad,
                          max_corrupt_run=max_corrupt_run)
  if not pad:
    ds = _maybe_workers(ds, cfg)
  return ds.map(functools.partial(_report_corrupt, counter=counter))


def _maybe_workers(ds: grain.IterDataset,
                   cfg: ml_collections.ConfigDict) -> grain.IterDataset:
  if cfg.num_workers == 0:
    return ds
  if not flags.FLAGS.is_parsed():
    # grain's worker processes read absl flags; outside an absl app (tests,
    # notebooks) mark the defaults as parsed instead of failing.
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=cfg.num_workers, per_worker_buffer_size=2))


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------
def make_train_iterator(
    data_cfg: Mapping[str, Any] | None, *, global_batch_size: int,
    image_size: int, seed: int,
    sharding: jax.sharding.Sharding | None = None,
    process_index: int | None = None, process_count: int | None = None,
    corrupt_counter: CorruptImageCounter | None = None,
) -> grain.DatasetIterator:
  """Infinite, shuffled, checkpointable iterator of training batches.

  Args:
    data_cfg: the data config (fields in the module docstring).
    global_batch_size: batch over all hosts.
    image_size: S, output images are (S, S, 3) float32 in [-1, 1].
    seed: shuffling (reshuffled every epoch) and random-crop seed.
    sharding: if given (e.g. `NamedSharding(mesh, P("data"))`), batches are
      global jax.Arrays; otherwise host-local numpy arrays.
    process_index, process_count: this host's slot (default: from jax).
    corrupt_counter: receives skipped-image counts; pass one to read them.

  Returns:
    A grain `DatasetIterator` of `{"image": (B, S, S, 3)}` with B the global
    (sharding given) or per-host batch size.
  """
  cfg = _resolve_config(data_cfg)
  pi, pc = _process(process_index, process_count)
  batch = local_batch_size(global_batch_size, pc, sharding)
  _check_image_size(image_size)
  source = sources_lib.make_source(
      cfg.source, image_size=image_size, default_split="train",
      data_dir=cfg.data_dir, image_key=cfg.image_key, seed=seed)
  ds = host_slice(grain.MapDataset.source(source), pi, pc)
  if len(ds) == 0:
    raise ValueError(f"data.source={cfg.source!r} has {len(source)} images, "
                     f"fewer than the {pc} processes")
  max_corrupt_run = len(ds)
  ds = ds.seed(seed).shuffle().repeat()
  ds = ds.random_map(functools.partial(
      _load, image_size=image_size, crop=cfg.crop, crop_pct=cfg.crop_pct))
  ds = _batched(ds, cfg, batch_size=batch, pad=False,
                max_corrupt_run=max_corrupt_run,
                counter=corrupt_counter or CorruptImageCounter())
  if cfg.prefetch:
    ds = grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=cfg.prefetch)
  if sharding is not None:
    # Device transfers are asynchronous, so this runs in the consumer thread.
    ds = ds.map(functools.partial(make_global_batch, sharding=sharding))
  return iter(ds)


@dataclasses.dataclass
class EvalData:
  """Finite evaluation data; each `iter()` is one pass over all images.

  Batches are `{"image": (B,S,S,3) float32, "index": (B,) int32 (global image
  index, -1 on padding), "mask": (B,) bool}`. Every host yields exactly
  `num_batches` batches, so collective evaluation steps stay in lockstep.
  """
  dataset: grain.IterDataset
  num_images: int  # over all hosts
  num_batches: int  # per host, equal on all hosts
  batch_size: int  # per host
  image_size: int
  sharding: jax.sharding.Sharding | None
  corrupt_counter: CorruptImageCounter

  def __len__(self) -> int:
    return self.num_batches

  def _empty(self) -> dict[str, np.ndarray]:
    b, s = self.batch_size, self.image_size
    return {"image": np.zeros((b, s, s, 3), np.float32),
            "index": np.full((b,), -1, np.int32),
            "mask": np.zeros((b,), bool)}

  def __iter__(self) -> Iterator[dict[str, Any]]:
    produced = 0
    iterator = iter(self.dataset)
    try:
      for batch in iterator:
        if "image" not in batch:  # Only corrupt images were left.
          batch = {**self._empty(), "mask": batch["mask"]}
        produced += 1
        yield self._place(batch)
    finally:
      iterator.close()  # Stops read threads / worker processes of this pass.
    if produced > self.num_batches:
      raise AssertionError(f"{produced} eval batches > {self.num_batches}")
    for _ in range(self.num_batches - produced):
      yield self._place(self._empty())

  def _place(self, batch):
    if self.sharding is None:
      return batch
    return make_global_batch(batch, self.sharding)


def make_eval_iterator(
    data_cfg: Mapping[str, Any] | None, *, global_batch_size: int,
    image_size: int, sharding: jax.sharding.Sharding | None = None,
    process_index: int | None = None, process_count: int | None = None,
    corrupt_counter: CorruptImageCounter | None = None,
) -> EvalData:
  """Evaluation batches over `data.eval_source` (or `data.source`).

  No shuffling, no repetition; the last batch is padded (`mask` False) and
  hosts with fewer images pad with fully masked batches. Uses `data.eval_crop`
  ('crop_pct' = the GSQ/timm resize-292/center-crop-256 protocol).
  """
  cfg = _resolve_config(data_cfg)
  pi, pc = _process(process_index, process_count)
  batch = local_batch_size(global_batch_size, pc, sharding)
  _check_image_size(image_size)
  field = "data.eval_source" if cfg.eval_source else "data.source"
  source = sources_lib.make_source(
      cfg.eval_source or cfg.source, image_size=image_size,
      default_split="validation", data_dir=cfg.data_dir,
      image_key=cfg.image_key, seed=_EVAL_DEMO_SEED, field=field)
  ds = grain.MapDataset.source(source)
  if cfg.eval_num_images is not None:
    ds = ds[:cfg.eval_num_images]
  num_images = len(ds)
  ds = ds.map_with_index(lambda i, record: {**record, "index": i})
  ds = host_slice(ds, pi, pc)
  ds = ds.map(functools.partial(
      _load, image_size=image_size, crop=cfg.eval_crop, crop_pct=cfg.crop_pct))
  counter = corrupt_counter or CorruptImageCounter()
  ds = _batched(ds, cfg, batch_size=batch, pad=True,
                max_corrupt_run=num_images + 1, counter=counter)
  num_batches = math.ceil(math.ceil(num_images / pc) / batch)
  return EvalData(ds, num_images, num_batches, batch, image_size, sharding,
                  counter)


def _check_image_size(image_size: int) -> None:
  if not isinstance(image_size, int) or image_size <= 0:
    raise ValueError(f"image_size must be a positive integer, got {image_size}")
