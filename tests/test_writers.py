"""Tests for gsq_jax.training.writers (JSONL/TensorBoard/PNG writer, progress meter)."""

import json
import math

import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from gsq_jax.training import writers


def test_jsonl_lines_types_and_nonfinite(tmp_path):
  with writers.MetricWriter(tmp_path, process_index=0,
                            tensorboard=False) as w:
    w.write_scalars(1, {"loss": jnp.float32(0.5), "lr": np.float64(1e-4),
                        "count": np.int32(3), "ok": np.bool_(True),
                        "name": "gsq"})
    # Flushed on every write: readable before close.
    first = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert first == {"step": 1, "loss": 0.5, "lr": 1e-4, "count": 3,
                     "ok": True, "name": "gsq"}
    assert type(first["loss"]) is float and type(first["count"]) is int
    w.write_scalars(np.int64(2), {"loss": jnp.array(jnp.nan),
                                  "g": np.array([np.inf]), "d": -np.inf})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 2
  assert json.loads(lines[1]) == {"step": 2, "loss": "nan", "g": "inf",
                                  "d": "-inf"}
  json.loads(lines[1], parse_constant=pytest.fail)  # Strict JSON, no NaN.
  rows = writers.read_metrics(tmp_path / "metrics.jsonl")
  assert math.isnan(rows[1]["loss"]) and rows[1]["g"] == math.inf
  assert rows[1]["d"] == -math.inf and rows[0]["name"] == "gsq"
  with pytest.raises(ValueError, match="metric 'v' must be a number"):
    writers.to_json_value(np.ones(3), "v")


def test_appends_across_writers(tmp_path):
  for step in (1, 2):
    with writers.MetricWriter(tmp_path, process_index=0,
                              tensorboard=False) as w:
      w.write_scalars(step, {"x": step})
  steps = [r["step"] for r in writers.read_metrics(tmp_path / "metrics.jsonl")]
  assert steps == [1, 2]  # Resumed runs append to the same file.


def test_only_process_zero_writes(tmp_path):
  workdir = tmp_path / "run"
  w = writers.MetricWriter(workdir, process_index=1)
  w.write_scalars(1, {"loss": 1.0})
  assert w.write_images(1, "rec", np.zeros((2, 4, 4, 3))) is None
  assert w.write_config({"a": 1}) is None
  w.flush()
  w.close()
  assert not workdir.exists()


def test_tensorboard_images_and_config(tmp_path):
  pytest.importorskip("tensorboardX")
  w = writers.MetricWriter(tmp_path, process_index=0, tensorboard=True)
  w.write_scalars(5, {"loss": 0.25, "bad": float("nan")})
  images = np.stack([np.full((4, 6, 3), v, np.float32) for v in (-1, 0, 1)])
  path = w.write_images(5, "eval/recon", images, ncols=2)
  config = ml_collections.ConfigDict({"model": {"D": 16, "groups": (1, 2)},
                                      "lr": 1e-4, "eps": float("inf")})
  w.write_config(config)
  w.close()
  events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert events and events[0].stat().st_size > 0
  assert path.endswith("images/eval_recon_0000005.png")
  grid = np.asarray(Image.open(path))
  # 2 x 2 cells of 4 x 6 with 2-px borders; values -1, 0, 1 -> 0, 128, 255.
  assert grid.shape == (2 * 6 + 2, 2 * 8 + 2, 3)
  assert grid[2, 2, 0] == 0 and grid[2, 10, 0] == 128 and grid[8, 2, 0] == 255
  assert grid[8, 10, 0] == 0  # Empty fourth cell.
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved == {"model": {"D": 16, "groups": [1, 2]}, "lr": 1e-4,
                   "eps": "inf"}


def test_image_grid_inputs():
  single = writers.image_grid(np.full((3, 3, 1), 255, np.uint8), pad=0)
  assert single.shape == (3, 3, 3) and single.min() == 255
  clipped = writers.image_grid(np.full((1, 2, 2, 3), 5.0), pad=0,
                               value_range=(0.0, 1.0))
  assert clipped.max() == 255
  with pytest.raises(ValueError, match="images must have shape"):
    writers.image_grid(np.zeros((2, 4, 4, 2)))


def test_progress_meter():
  now = [100.0]
  meter = writers.ProgressMeter(1000, 256, start_step=100,
                                clock=lambda: now[0])
  now[0] += 10.0
  stats, line = meter.update(200)
  assert stats["steps_per_sec"] == pytest.approx(10.0)
  assert stats["images_per_sec"] == pytest.approx(2560.0)
  assert stats["eta_sec"] == pytest.approx(80.0)
  assert stats["progress"] == pytest.approx(0.2)
  assert line == ("step 200/1000 (20.0%) | 10.00 steps/s | 2560.0 img/s | "
                  "ETA 1m20s | elapsed 10s")
  now[0] += 2.0  # Speed-up: the rate follows the last interval.
  stats, line = meter.update(300)
  assert stats["steps_per_sec"] == pytest.approx(50.0)
  assert stats["elapsed_sec"] == pytest.approx(12.0)
  assert "ETA 14s" in line
  stats, _ = meter.update(300)  # No progress, no time: rate unknown.
  assert math.isnan(stats["steps_per_sec"])
  with pytest.raises(ValueError, match="must be positive"):
    writers.ProgressMeter(0, 8)


def _tensorboard_events(folder):
  """(tag, kind) of every summary value in the event files (TFRecord framing)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  out = []
  for path in sorted(folder.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      length = int.from_bytes(data[pos:pos + 8], "little")
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        out.append((value.tag, value.WhichOneof("value")))
  return out


def test_reconstruction_grid_is_labelled_and_large():
  originals = np.stack([np.full((8, 8, 3), v, np.float32) for v in (-1.0, 1.0, 0.0)])
  recons = -originals
  grid = writers.reconstruction_grid(originals, recons, step=120)
  layout = writers.grid_layout(3, 8, 8)
  assert grid.dtype == np.uint8 and grid.shape[1] >= 512
  k, left, top = layout.scale, layout.left, layout.top
  # First cell of each row, enlarged k times: original black, reconstruction white.
  first = grid[top + 2 * k:top + 10 * k, left + 2 * k:left + 10 * k]
  assert first.shape == (8 * k, 8 * k, 3) and (first == 0).all()
  second_row = top + layout.row_height
  assert (grid[second_row + 2 * k:second_row + 10 * k, left + 2 * k:left + 10 * k] == 255).all()
  # Text: dark pixels in the label column of both rows, the header and the footer hint.
  for y0, y1 in ((0, top), (top, second_row), (second_row, second_row + layout.row_height),
                 (second_row + layout.row_height, grid.shape[0])):
    assert (grid[y0:y1, :left] < 128).any(), (y0, y1)
  no_hint = writers.reconstruction_grid(originals, recons, hint=None)
  assert no_hint.shape[0] < grid.shape[0]
  with pytest.raises(ValueError, match="must both have shape"):
    writers.reconstruction_grid(originals, recons[:2])


def test_tensorboard_text_not_one_point_scalars(tmp_path):
  """Run facts (D, G, V, f, versions) and the config go to the Text tab, grids to Images."""
  pytest.importorskip("tensorboardX")
  with writers.MetricWriter(tmp_path, process_index=0, tensorboard=True) as w:
    w.write_facts(0, {"D": 16, "G": 4, "V": 256, "f": 8, "version_jax": "0.10.2"})
    w.write_config_text({"model": {"latent_dim": 16}})
    w.write_scalars(10, {"g_loss": 0.5})
    path = w.write_reconstructions(10, np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8, 3)))
  assert path.endswith("images/reconstructions_0000010.png")
  assert Image.open(path).size[0] >= 512
  rows = writers.read_metrics(tmp_path / "metrics.jsonl")
  assert rows[0] == {"step": 0, "D": 16, "G": 4, "V": 256, "f": 8, "version_jax": "0.10.2"}
  events = _tensorboard_events(tmp_path / "tensorboard")
  scalars = {tag for tag, kind in events if kind == "simple_value"}
  assert scalars == {"g_loss"}  # D, G, V, f are no one-point plots
  assert any(tag.startswith("run") and kind == "tensor" for tag, kind in events)
  assert any(tag.startswith("config") and kind == "tensor" for tag, kind in events)
  assert ("reconstructions", "image") in events


def test_progress_meter_restart_leaves_out_compilation():
  now = [0.0]
  meter = writers.ProgressMeter(100, 8, clock=lambda: now[0])
  now[0] += 60.0  # the first step: compilation
  meter.restart(1)
  now[0] += 9.0  # 9 more steps at 1 step/s
  stats, line = meter.update(10)
  assert stats["steps_per_sec"] == pytest.approx(1.0)
  assert stats["eta_sec"] == pytest.approx(90.0) and "ETA 1m30s" in line
  assert stats["elapsed_sec"] == pytest.approx(69.0)  # elapsed still counts it
