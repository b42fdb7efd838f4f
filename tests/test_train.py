"""The training loop end to end: exact resume after SIGKILL, SIGTERM checkpoints,
corrupt and empty image folders, NaN failures, restore_tokenizer, the 300-step demo."""

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
from flax import nnx
from PIL import Image
import pytest

from gsq_jax.training import checkpointing
from gsq_jax.training import train
from gsq_jax.training import writers
from gsq_jax.evaluation import evaluator
from test_steps import ROOT, SMALL, SMALL_ARG, small_config  # noqa: F401

RUN = {"train.log_every_steps": 1, "train.checkpoint_every_steps": 8,
       "train.image_every_steps": 10, "train.final_eval": False}


def cli(workdir, overrides) -> list[str]:
  """`python -m gsq_jax.training.train` for SMALL_ARG with SMALL and `overrides` as flags."""
  flags = []
  for key, value in {**SMALL, **overrides}.items():
    if isinstance(value, tuple):
      value = "(" + ",".join(map(str, value)) + ",)"
    flags.append(f"--config.{key}={value}")
  return [sys.executable, "-m", "gsq_jax.training.train", "--config",
          f"{ROOT}/configs/gsq.py:{SMALL_ARG}", "--workdir", str(workdir), *flags]


def env() -> dict[str, str]:
  """The tests' own XLA flags (8 devices, conftest's backend settings): the resume test
  compares this process's weights bitwise with a subprocess's."""
  return {**os.environ, "JAX_PLATFORMS": "cpu"}


def logged(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [r for r in writers.read_metrics(path) if "g_loss" in r]


def checkpoint_steps(workdir) -> list[int]:
  """Steps of the finished checkpoints (orbax renames a complete one to its number)."""
  folder = pathlib.Path(workdir) / "checkpoints"
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def wait_for_step(proc, workdir, step: int, checkpoint: int = 0, timeout: float = 240) -> int:
  """Waits until `step` is logged and the checkpoint of step `checkpoint` is complete."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    rows = logged(workdir)
    if rows and rows[-1]["step"] >= step and (
        not checkpoint or checkpoint in checkpoint_steps(workdir)):
      return rows[-1]["step"]
    assert proc.poll() is None, f"trainer exited early with {proc.returncode}"
    time.sleep(0.02)
  raise TimeoutError(f"step {step} not reached")


@contextlib.contextmanager
def signal_at_step(workdir, step: int, sig: int):
  """Sends `sig` to this process from a thread once metrics.jsonl logs `step`."""
  stop = threading.Event()

  def send():
    while not stop.is_set():
      rows = logged(workdir)
      if rows and rows[-1]["step"] >= step:
        os.kill(os.getpid(), sig)
        return
      time.sleep(0.01)

  # Outside train_and_evaluate's own handler a late signal must not end pytest.
  previous = signal.signal(sig, lambda *_: None)
  sender = threading.Thread(target=send)
  sender.start()
  try:
    yield
  finally:
    stop.set()
    sender.join()
    signal.signal(sig, previous)


def weights(workdir, ema):
  tokenizer, _, step = checkpointing.restore_tokenizer(workdir, ema=ema)
  return jax.device_get(nnx.state(tokenizer, nnx.Param).to_pure_dict()), step


def test_resume_is_exact_after_sigkill_and_sigterm(tmp_path, monkeypatch):
  total = 30
  overrides = {**RUN, "train.total_steps": total}
  ref_dir, run_dir = tmp_path / "reference", tmp_path / "interrupted"

  # Uninterrupted reference, in this process.
  assert train.train_and_evaluate(small_config(**overrides), str(ref_dir)) == 0

  # 1. SIGKILL between two checkpoints.
  p = subprocess.Popen(cli(run_dir, overrides), env=env(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
  wait_for_step(p, run_dir, 10, checkpoint=8)
  p.send_signal(signal.SIGKILL)
  p.wait()
  killed_at = logged(run_dir)[-1]["step"]
  assert checkpoint_steps(run_dir)[-1] < killed_at < total

  # 2. Restarted (in this process): resumes; SIGTERM makes it save where it is
  #    and return 75. The signal comes from a thread once step 18 is logged.
  with signal_at_step(run_dir, 18, signal.SIGTERM):
    code = train.train_and_evaluate(small_config(**overrides), str(run_dir))
  assert code == 75
  stopped_at = logged(run_dir)[-1]["step"]
  assert killed_at < stopped_at < total and checkpoint_steps(run_dir)[-1] == stopped_at
  _, step = weights(run_dir, ema=True)  # the preemption checkpoint is complete
  assert step == stopped_at and not (run_dir / "DONE").exists()

  # 3. Restarted again: finishes its steps; a SIGTERM that arrives as the final
  #    evaluation starts stops it (75, no eval.json, no DONE) ...
  config = small_config(**{**overrides, "train.final_eval": True, "eval.num_images": 8,
                           "eval.lpips": False, "eval.kid": False, "eval.fd_vgg16": False})
  run_evaluation = evaluator.run_evaluation

  def signalled_evaluation(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return run_evaluation(*args, **kwargs)

  monkeypatch.setattr(evaluator, "run_evaluation", signalled_evaluation)
  assert train.train_and_evaluate(config, str(run_dir)) == 75
  assert checkpoint_steps(run_dir)[-1] == total
  assert not (run_dir / "eval.json").exists() and not (run_dir / "DONE").exists()
  # ... and the next start only evaluates, then writes DONE last.
  monkeypatch.setattr(evaluator, "run_evaluation", run_evaluation)
  assert train.train_and_evaluate(config, str(run_dir)) == 0
  assert (run_dir / "DONE").stat().st_mtime >= (run_dir / "eval.json").stat().st_mtime
  assert json.loads((run_dir / "eval.json").read_text())["protocol"]["step"] == total

  # Bitwise the same weights (and EMA) as the uninterrupted run.
  for ema in (False, True):
    (got, got_step), (want, want_step) = weights(run_dir, ema), weights(ref_dir, ema)
    assert got_step == want_step == total
    jax.tree.map(np.testing.assert_array_equal, got, want)
  final = [r for r in logged(run_dir) if r["step"] == total][-1]
  assert final["g_loss"] == logged(ref_dir)[-1]["g_loss"]

  # The run's records.
  config = json.loads((ref_dir / "config.json").read_text())
  assert config["model"]["latent_dim"] == 8 and config["train"]["total_steps"] == total
  environment = config[checkpointing.ENVIRONMENT_KEY]  # what it ran on, beside the config
  assert environment["version_jax"] == jax.__version__ and environment["backend"] == "cpu"
  assert checkpointing.ENVIRONMENT_KEY not in checkpointing.load_config(ref_dir)
  first = writers.read_metrics(ref_dir / "metrics.jsonl")[0]
  assert {k: first[k] for k in "DGVf"} == {"D": 8, "G": 2, "V": 64, "f": 1}
  assert first["version_jax"] == jax.__version__ and first["backend"] == "cpu"
  assert first["version_orbax_checkpoint"] and first["device_kind"]
  row = logged(ref_dir)[-1]
  for key in ("rec_loss", "quant_loss", "usage", "perplexity", "steps_per_sec",
              "images_per_sec", "eta_sec", "skipped", "g_grad_norm"):
    assert key in row, key
  # Codebook health of the logged window (G = 2, V = 64).
  for key in ("lookups", "uniform_usage", "effective_bits", "dead_codes", "usage_group0",
              "usage_group1", "perplexity_group0", "perplexity_group1", "codebook_norm_cv"):
    assert key in row, key
  assert 0 <= row["dead_codes"] <= 64 and row["lookups"] == 2 * row["tokens"]
  assert sorted(os.listdir(ref_dir / "images")) == [
      "reconstructions_0000010.png", "reconstructions_0000020.png",
      "reconstructions_0000030.png"]
  assert (ref_dir / "tensorboard").is_dir()
  # A finished workdir is left alone.
  assert train.train_and_evaluate(small_config(**overrides), str(ref_dir)) == 0
  assert logged(ref_dir)[-1]["step"] == total and len(checkpoint_steps(ref_dir)) == 3


def _image_folder(folder: pathlib.Path, n: int) -> None:
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(n):
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(folder / f"{i}.png")
  good = folder / "good.jpg"
  Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(good)
  data = good.read_bytes()
  (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
  (folder / "notes.png").write_text("this is not an image")


def test_corrupt_images_are_skipped_empty_folder_fails(tmp_path):
  folder = tmp_path / "images"
  _image_folder(folder, 7)  # + good.jpg = 8 decodable, 2 corrupt
  config = small_config(**{**RUN, "train.total_steps": 2, "train.image_every_steps": 0,
                           "data.source": f"folder:{folder}"})
  assert train.train_and_evaluate(config, str(tmp_path / "run")) == 0
  row = logged(tmp_path / "run")[-1]
  assert row["step"] == 2 and row["skipped"] == 2 and row["skipped_reads"] >= 2

  empty = tmp_path / "empty"
  empty.mkdir()
  config.data.source = f"folder:{empty}"
  assert train.train_and_evaluate(config, str(tmp_path / "run_empty")) == 1
  failed = json.loads((tmp_path / "run_empty" / "FAILED").read_text())
  assert str(empty) in failed["reason"] and failed["step"] == 0
  assert not (tmp_path / "run_empty" / "DONE").exists()


def test_nan_loss_stops_the_run_with_failed(tmp_path):
  config = small_config(**{**RUN, "train.total_steps": 6, "train.log_every_steps": 2,
                           "train.image_every_steps": 0, "train.inject_nan_at_step": 3})
  workdir = tmp_path / "run"
  assert train.train_and_evaluate(config, str(workdir)) == 1
  assert json.loads((workdir / "FAILED").read_text()) == {
      "reason": "non-finite loss at step 3", "step": 3}
  assert not (workdir / "DONE").exists() and not checkpoint_steps(workdir)


def test_invalid_config_fails_before_compiling(tmp_path):
  config = small_config(**{"train.global_batch_size": 12})
  assert train.train_and_evaluate(config, str(tmp_path)) == 1
  reason = json.loads((tmp_path / "FAILED").read_text())["reason"]
  assert "train.global_batch_size = 12 must be divisible" in reason


@pytest.mark.slow
def test_tiny_gsq_on_demo_300_steps(tmp_path):
  """Done-when: 300 tiny steps on `demo` cut the reconstruction loss >= 3x."""
  sys.path.insert(0, str(ROOT))
  from configs import gsq  # pylint: disable=g-import-not-at-top
  config = gsq.get_config("D=16,G=4,V=4096,f=8,tiny")
  assert train.train_and_evaluate(config, str(tmp_path)) == 0
  rows = logged(tmp_path)
  first, last = rows[0], rows[-1]
  assert last["step"] == 300 and first["rec_loss"] >= 3 * last["rec_loss"], (first, last)
  assert all(0 < r["usage"] <= 100 and r["perplexity"] > 1 for r in rows)
  result = json.loads((tmp_path / "eval.json").read_text())
  assert result["protocol"]["ema"] and np.isfinite(result["psnr"])


@pytest.mark.slow
@pytest.mark.parametrize("encoder_lr_factor,low,high", [(None, 80.0, 100.0), (1.0, 0.0, 35.0)])
def test_demo_one_group_usage_needs_the_slow_encoder(tmp_path, encoder_lr_factor, low, high):
  """The demo's D = 16, G = 1 point keeps >= 80 % of V = 256 in use on 8,192 lookups (measured
  83.2 %); at one lr for all parameters the same point collapses (measured 22.7 %)."""
  import runpy
  sys.path.insert(0, str(ROOT))
  from configs import gsq  # pylint: disable=g-import-not-at-top
  demo = runpy.run_path(str(ROOT / "sweeps" / "demo.py"))
  config = gsq.get_config(f"D=16,G=1,V={demo['V']},f=4,tiny")
  overrides = dict(demo["OVERRIDES"], **{"train.image_every_steps": 0})
  if encoder_lr_factor is not None:
    overrides["optim.encoder_lr_factor"] = encoder_lr_factor
  for key, value in overrides.items():
    block, field = key.split(".")
    config[block][field] = value
  assert train.train_and_evaluate(config, str(tmp_path)) == 0
  result = json.loads((tmp_path / "eval.json").read_text())
  assert result["lookups"] == 8192 and result["usage_uniform_expectation"] > 99.9
  assert low <= result["usage"] <= high, result["usage"]
