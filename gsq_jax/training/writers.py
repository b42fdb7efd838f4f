"""TF-free run logging: metrics.jsonl, TensorBoard, PNG grids, progress lines.

`clu.metric_writers` needs TensorFlow, so this is a small stand-in with its
method names (`write_scalars`, `write_images`, `flush`, `close`). Only JAX
process 0 writes; on every other process all methods are no-ops, so the
trainer can call them unconditionally (the code must be identical on all
processes).

Workdir layout written here:
  metrics.jsonl                  one line per call: {"step": s, **metrics}
  config.json                    the run config
  images/{name}_{step:07d}.png   image grids (reconstructions: labelled, >= 512 px wide)
  tensorboard/                   event files (tensorboardX): scalars, images, the
                                 config and the run's facts (D, G, V, f, versions) as text

JSON has no NaN/Infinity, so non-finite values are written as the strings
"nan", "inf" and "-inf": a diverged loss stays visible (null would read as
"missing"), and `float(v)` turns them back into floats; `read_metrics` does
that for you.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Mapping

from absl import logging
import jax
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from gsq_jax.utils import files

_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def to_json_value(value: Any, key: str = "value") -> Any:
  """A jax/numpy/python scalar (or string) as a plain JSON-safe value."""
  if isinstance(value, str):
    return value
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  array = np.asarray(value)
  if array.size != 1 or array.dtype.kind not in "biuf":
    raise ValueError(f"metric {key!r} must be a number or string, got "
                     f"{type(value).__name__} of shape {array.shape}")
  if array.dtype.kind == "b":
    return bool(array.reshape(()))
  if array.dtype.kind in "iu":
    return int(array.reshape(()))
  number = float(array.reshape(()))
  if math.isnan(number):
    return "nan"
  if math.isinf(number):
    return "inf" if number > 0 else "-inf"
  return number


def _sanitize(tree: Any) -> Any:
  """Config values -> JSON-safe (non-finite as strings, tuples as lists)."""
  if isinstance(tree, Mapping):
    return {str(k): _sanitize(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_sanitize(v) for v in tree]
  if tree is None or isinstance(tree, str):
    return tree
  try:
    return to_json_value(tree)
  except ValueError:
    return repr(tree)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads a metrics.jsonl back, turning "nan"/"inf"/"-inf" into floats."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        rows.append({k: _NONFINITE.get(v, v) if isinstance(v, str) else v
                     for k, v in row.items()})
  return rows


def image_grid(images: Any, *, ncols: int | None = None, pad: int = 2,
               value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
  """(N, H, W, C) or (H, W, C) images -> one uint8 (H', W', 3) grid.

  Float images are mapped from `value_range` (the pipeline's [-1, 1] by
  default) to [0, 255] and clipped; uint8 images are used as they are.
  """
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or not len(images):
    raise ValueError("images must have shape (N, H, W, 1|3) or (H, W, 1|3), "
                     f"got {images.shape}")
  if images.dtype != np.uint8:
    lo, hi = value_range
    scaled = (images.astype(np.float32) - lo) / (hi - lo)
    images = np.round(np.clip(np.nan_to_num(scaled), 0, 1) * 255)
    images = images.astype(np.uint8)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  n, h, w, _ = images.shape
  ncols = ncols or math.ceil(math.sqrt(n))
  nrows = math.ceil(n / ncols)
  grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3),
                  np.uint8)
  for i, image in enumerate(images):
    top, left = pad + (i // ncols) * (h + pad), pad + (i % ncols) * (w + pad)
    grid[top:top + h, left:left + w] = image
  return grid


EARLY_BLUR_HINT = ("Blurry reconstructions are expected early in training; "
                   "detail comes with more steps.")
_INK, _PAPER = (20, 20, 20), (255, 255, 255)
_FONT_SIZE = 18
_LINE = _FONT_SIZE + 10  # header / footer height
_LABEL_WIDTH = 150  # room for "reconstruction"


def _font(size: int) -> ImageFont.ImageFont:
  return ImageFont.load_default(size=size)


@dataclasses.dataclass(frozen=True)
class GridLayout:
  """Where `reconstruction_grid` puts things: cells are enlarged `scale` times."""
  scale: int
  left: int  # x of the image rows (right of the labels)
  top: int  # y of the originals' row (below the header)
  row_height: int  # of one enlarged row, its 2-px padding included


def grid_layout(num_images: int, height: int, width: int, *, min_width: int = 512,
                pad: int = 2) -> GridLayout:
  row_width = num_images * (width + pad) + pad
  scale = max(1, math.ceil((min_width - _LABEL_WIDTH) / row_width))
  return GridLayout(scale, _LABEL_WIDTH, _LINE, (height + 2 * pad) * scale)


def reconstruction_grid(originals: Any, reconstructions: Any, *, step: int | None = None,
                        value_range: tuple[float, float] = (-1.0, 1.0),
                        min_width: int = 512, hint: str | None = EARLY_BLUR_HINT
                        ) -> np.ndarray:
  """Originals over their reconstructions as one labelled uint8 image, >= `min_width` wide.

  A bare grid of 32x32 crops is a few hundred pixels wide with nothing saying
  which row is which; here each row carries its label, the header the step,
  the footer `hint`, and cells are enlarged by an integer factor (nearest
  neighbour, so the pixels shown are the model's own) until the image is at
  least `min_width` pixels wide (`grid_layout` says where everything is).
  """
  originals, reconstructions = np.asarray(originals), np.asarray(reconstructions)
  if originals.shape != reconstructions.shape or originals.ndim != 4:
    raise ValueError("originals and reconstructions must both have shape (N, H, W, C), got "
                     f"{originals.shape} and {reconstructions.shape}")
  n, h, w = originals.shape[:3]
  layout = grid_layout(n, h, w, min_width=min_width)
  k = layout.scale
  rows = [np.kron(image_grid(x, ncols=n, value_range=value_range), np.ones((k, k, 1), np.uint8))
          for x in (originals, reconstructions)]
  row_h, row_w = rows[0].shape[:2]
  footer = _LINE if hint else 0
  canvas = Image.new("RGB", (layout.left + row_w, layout.top + 2 * row_h + footer), _PAPER)
  draw = ImageDraw.Draw(canvas)
  font = _font(_FONT_SIZE)
  title = "originals (top) vs reconstructions (bottom)"
  draw.text((6, 5), f"step {step}: {title}" if step is not None else title, fill=_INK, font=font)
  for i, (label, row) in enumerate(zip(("original", "reconstruction"), rows)):
    top = layout.top + i * row_h
    canvas.paste(Image.fromarray(row), (layout.left, top))
    draw.text((6, top + row_h // 2 - _FONT_SIZE // 2), label, fill=_INK, font=font)
  if hint:
    draw.text((6, layout.top + 2 * row_h + 5), hint, fill=(90, 90, 90),
              font=_font(_FONT_SIZE - 4))
  return np.asarray(canvas)


def _markdown_table(facts: Mapping[str, Any]) -> str:
  return "| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in facts.items())


class MetricWriter:
  """Process-0 writer of scalars (JSONL + TensorBoard), images and config."""

  def __init__(self, workdir: str | os.PathLike, *,
               process_index: int | None = None,
               tensorboard: bool | None = None, log_scalars: bool = False):
    """Creates the writer.

    Args:
      workdir: run directory (created if missing, on process 0 only).
      process_index: defaults to `jax.process_index()`; only 0 writes.
      tensorboard: None = write event files if tensorboardX is importable;
        True = require it; False = never.
      log_scalars: also log each `write_scalars` call with absl logging.
    """
    self.workdir = os.fspath(workdir)
    pi = jax.process_index() if process_index is None else process_index
    self.active = pi == 0
    self._log = log_scalars
    self._jsonl = None
    self._tb = None
    if not self.active:
      return
    os.makedirs(self.workdir, exist_ok=True)
    self._jsonl = open(os.path.join(self.workdir, "metrics.jsonl"), "a",
                       encoding="utf-8")
    if tensorboard is not False:
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top
      except ImportError:
        if tensorboard:
          raise ValueError("tensorboard=True needs the tensorboardX package "
                           "(pip install tensorboardX)") from None
      else:
        self._tb = tensorboardX.SummaryWriter(
            logdir=os.path.join(self.workdir, "tensorboard"))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Appends {"step": step, **scalars} to metrics.jsonl (and TensorBoard)."""
    if not self.active:
      return
    row = {"step": int(step)}
    row.update({k: to_json_value(v, k) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in row.items():
        if isinstance(value, str):
          if value not in _NONFINITE:
            continue  # Text values only go to the JSONL.
          value = _NONFINITE[value]
        if key != "step":
          self._tb.add_scalar(key, value, int(step))
      self._tb.flush()
    if self._log:
      logging.info("[%d] %s", step, ", ".join(
          f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
          for k, v in row.items() if k != "step"))

  def discard_after(self, step: int) -> int:
    """Drops the metrics.jsonl rows of steps > `step`; returns how many.

    A resumed run replays the steps after its checkpoint: dropping their
    first rows keeps one row per step. A torn last line goes too.
    """
    if not self.active:
      return 0
    path = os.path.join(self.workdir, "metrics.jsonl")
    self._jsonl.close()
    with open(path, encoding="utf-8") as f:
      lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
      except (ValueError, KeyError, TypeError):
        pass
    if len(kept) < len(lines):
      files.atomic_write_text(path, "".join(kept))
    self._jsonl = open(path, "a", encoding="utf-8")
    return len(lines) - len(kept)

  def write_images(self, step: int, name: str, images: Any, *,
                   ncols: int | None = None,
                   value_range: tuple[float, float] = (-1.0, 1.0)
                   ) -> str | None:
    """Saves a PNG grid to images/{name}_{step:07d}.png; returns its path."""
    if not self.active:
      return None
    return self._save_image(step, name, image_grid(images, ncols=ncols, value_range=value_range))

  def _save_image(self, step: int, name: str, grid: np.ndarray) -> str:
    folder = os.path.join(self.workdir, "images")
    os.makedirs(folder, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    path = os.path.join(folder, f"{safe}_{int(step):07d}.png")
    Image.fromarray(grid).save(path)
    if self._tb is not None:
      self._tb.add_image(name, grid, int(step), dataformats="HWC")
      self._tb.flush()
    return path

  def write_reconstructions(self, step: int, originals: Any, reconstructions: Any, *,
                            name: str = "reconstructions",
                            value_range: tuple[float, float] = (-1.0, 1.0)) -> str | None:
    """The labelled `reconstruction_grid` as images/{name}_{step:07d}.png (and TensorBoard)."""
    if not self.active:
      return None
    grid = reconstruction_grid(originals, reconstructions, step=step, value_range=value_range)
    return self._save_image(step, name, grid)

  def write_text(self, step: int, tag: str, text: str) -> None:
    """Markdown text for TensorBoard's Text tab (no-op without TensorBoard)."""
    if self.active and self._tb is not None:
      self._tb.add_text(tag, text, int(step))
      self._tb.flush()

  def write_facts(self, step: int, facts: Mapping[str, Any]) -> None:
    """Per-run constants (D, G, V, f, sizes, versions): a metrics.jsonl row, TensorBoard text.

    As scalars they would be one-point plots; TensorBoard shows them as one
    table in the Text tab instead.
    """
    if not self.active:
      return
    row = {"step": int(step), **{k: to_json_value(v, k) for k, v in facts.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    self.write_text(step, "run", _markdown_table(facts))

  def write_config(self, config: Any) -> str | None:
    """Writes config.json (ConfigDicts and dicts; odd leaves as repr)."""
    if not self.active:
      return None
    if hasattr(config, "to_dict"):
      config = config.to_dict()
    path = os.path.join(self.workdir, "config.json")
    with open(path, "w", encoding="utf-8") as f:
      json.dump(_sanitize(config), f, indent=2, sort_keys=True)
    self.write_config_text(config)
    return path

  def write_config_text(self, config: Any) -> None:
    """The config as indented JSON in TensorBoard's Text tab (config.json stays the record)."""
    if hasattr(config, "to_dict"):
      config = config.to_dict()
    text = json.dumps(_sanitize(config), indent=2, sort_keys=True)
    self.write_text(0, "config", "\n".join("    " + line for line in text.splitlines()))

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes the files; later writes raise on process 0."""
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressMeter:
  """Throughput and ETA between successive `update(step)` calls."""

  def __init__(self, total_steps: int, global_batch_size: int, *,
               start_step: int = 0,
               clock: Callable[[], float] = time.monotonic):
    if total_steps <= 0 or global_batch_size <= 0:
      raise ValueError("total_steps and global_batch_size must be positive, "
                       f"got {total_steps} and {global_batch_size}")
    self.total_steps = total_steps
    self.global_batch_size = global_batch_size
    self._clock = clock
    self._start = self._last_time = clock()
    self._last_step = start_step

  def elapsed(self) -> float:
    """Seconds since construction."""
    return self._clock() - self._start

  def restart(self, step: int) -> None:
    """Measures the next interval from now and `step` (e.g. after the compiling first step).

    The first step of a run includes compilation (tens of seconds on a CPU);
    an ETA that counts it is off by that much ("ETA 12m", then "47s").
    """
    self._last_time, self._last_step = self._clock(), step

  def update(self, step: int) -> tuple[dict[str, float], str]:
    """Stats since the previous call (or construction / `restart`) and a log line.

    The rate is measured over the last interval only, so it tracks the
    current speed.
    """
    now = self._clock()
    dt, dsteps = now - self._last_time, step - self._last_step
    rate = dsteps / dt if dt > 0 and dsteps > 0 else math.nan
    remaining = max(self.total_steps - step, 0)
    eta = remaining / rate if rate > 0 else (0.0 if not remaining else math.nan)
    stats = {"steps_per_sec": rate,
             "images_per_sec": rate * self.global_batch_size,
             "eta_sec": eta,
             "elapsed_sec": now - self._start,
             "progress": step / self.total_steps}
    self._last_time, self._last_step = now, step
    line = (f"step {step}/{self.total_steps} ({100 * stats['progress']:.1f}%)"
            f" | {rate:.2f} steps/s | {stats['images_per_sec']:.1f} img/s"
            f" | ETA {_duration(eta)}"
            f" | elapsed {_duration(stats['elapsed_sec'])}")
    return stats, line
