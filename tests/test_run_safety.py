"""Runs nobody can corrupt, failures nobody can miss (issue 16, problems 1-6).

Each test starts from a copy of one small trained workdir (module fixture:
4 steps, checkpoints at 2 and 4, DONE) and shows that the problem is refused
or reported, and that the workdir stays resumable with nothing lost.
"""

import errno
import hashlib
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
from orbax.checkpoint._src.path import atomicity
from PIL import Image
import pytest

from gsq_jax.training import construction
from gsq_jax.training import run_guards
from gsq_jax.training import train
from gsq_jax.training import workdir as workdir_lib
from gsq_jax.training import writers
from test_steps import ROOT, small_config  # noqa: F401
from test_train import checkpoint_steps, cli, env, logged, signal_at_step

RUN = {"train.total_steps": 4, "train.log_every_steps": 1, "train.checkpoint_every_steps": 2,
       "train.keep_checkpoints": 3, "train.image_every_steps": 0, "train.final_eval": False}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
  workdir = tmp_path_factory.mktemp("trained") / "run"
  assert train.train_and_evaluate(small_config(**RUN), str(workdir)) == 0
  assert checkpoint_steps(workdir) == [2, 4] and (workdir / "DONE").exists()
  return workdir


@pytest.fixture
def run_dir(trained, tmp_path) -> pathlib.Path:
  """A copy of the trained workdir, without DONE unless a test wants it."""
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  return workdir


def snapshot(workdir) -> dict[str, str]:
  """Every file of the workdir (but the lock) with its content hash."""
  out = {}
  for path in sorted(pathlib.Path(workdir).rglob("*")):
    if path.is_file() and path.name != workdir_lib.LOCK_NAME:
      out[str(path.relative_to(workdir))] = hashlib.sha256(path.read_bytes()).hexdigest()
  return out


def errors(caplog) -> str:
  return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def test_second_trainer_is_refused_with_the_holder(run_dir, caplog):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from gsq_jax.training import workdir; "
       "workdir.claim(sys.argv[1]); print('held', flush=True); time.sleep(300)", str(run_dir)],
      stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
  try:
    assert holder.stdout.readline().strip() == "held"
    before = snapshot(run_dir)
    (run_dir / "DONE").unlink()  # an unfinished run: the second trainer would train
    before.pop("DONE")
    assert train.train_and_evaluate(small_config(**RUN), str(run_dir)) == train.EXIT_REFUSED
    assert f"pid {holder.pid}" in errors(caplog) and "in use by another trainer" in errors(caplog)
    assert snapshot(run_dir) == before  # nothing touched, no FAILED
  finally:
    holder.kill()
    holder.wait()
  # The OS released the dead holder's lock: the run resumes (step 4 == total: nothing to train).
  assert train.train_and_evaluate(small_config(**RUN), str(run_dir)) == 0
  assert (run_dir / "DONE").exists() and checkpoint_steps(run_dir) == [2, 4]


def test_relaunch_with_another_config_is_refused_untouched(run_dir, caplog):
  other = small_config(**{**RUN, "model.codebook_size": 32, "train.global_batch_size": 12})
  before = snapshot(run_dir)
  # Finished: a different config says so (no silent "nothing to do").
  assert train.train_and_evaluate(other, str(run_dir)) == train.EXIT_REFUSED
  message = errors(caplog)
  assert "is finished" in message and "model.codebook_size: 64 -> 32" in message
  assert "train.global_batch_size: 8 -> 12" in message
  # Unfinished: refused before a file is touched (config.json included).
  (run_dir / "DONE").unlink()
  before.pop("DONE")
  caplog.clear()
  assert train.train_and_evaluate(other, str(run_dir)) == train.EXIT_REFUSED
  assert "already trained with another config" in errors(caplog)
  assert snapshot(run_dir) == before
  # A resumable field alone is not a conflict.
  changes = workdir_lib.check_relaunch(run_dir, json.loads(small_config(**{
      **RUN, "train.total_steps": 9, "mesh.data": 2}).to_json_best_effort()))
  assert set(changes) == {"train.total_steps", "mesh.data"}
  assert changes["train.total_steps"] == (4, 9)
  # --force_new starts over in a fresh subfolder (here the invalid config fails there).
  assert train.train_and_evaluate(other, str(run_dir), force_new=True) == train.EXIT_FAILED
  failed = json.loads((run_dir / "restart-1" / "FAILED").read_text())
  assert "train.global_batch_size = 12 must be divisible" in failed["reason"]
  assert {k: v for k, v in snapshot(run_dir).items() if not k.startswith("restart-")} == before


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(run_dir, caplog):
  (run_dir / "DONE").unlink()
  metadata = run_dir / "checkpoints" / "4" / "_CHECKPOINT_METADATA"
  metadata.write_text('{"item_handlers": ')  # torn write
  caplog.set_level(logging.WARNING)
  assert train.train_and_evaluate(small_config(**RUN), str(run_dir)) == 0
  warned = "\n".join(r.getMessage() for r in caplog.records)
  assert "Checkpoint of step 4 does not restore" in warned and str(metadata) in warned
  assert (run_dir / "checkpoints_unrestorable" / "4" / "_CHECKPOINT_METADATA").exists()
  assert checkpoint_steps(run_dir) == [2, 4] and (run_dir / "DONE").exists()
  # Steps 3 and 4 were trained twice; metrics.jsonl keeps one row per step.
  rows = logged(run_dir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert rows[2]["resumed_from_step"] == 2 and rows[2]["skipped_checkpoints"] == 1


def _failing_finalize(calls):
  async def finalize(self):
    calls.append(str(self.get()))
    raise OSError(errno.ENOSPC, "No space left on device", str(self.get()))
  return finalize


def test_failed_save_stops_then_sigint_then_resume(run_dir, monkeypatch):
  (run_dir / "DONE").unlink()
  longer = {**RUN, "train.total_steps": 8}  # a resumable change

  # 1. The disk is full from the save of step 6 on: one retry, then FAILED.
  calls = []
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", _failing_finalize(calls))
  assert train.train_and_evaluate(small_config(**longer), str(run_dir)) == train.EXIT_FAILED
  monkeypatch.undo()
  failed = json.loads((run_dir / "FAILED").read_text())
  assert failed["reason"].startswith("disk (checkpoint): OSError: [Errno 28] No space left"), failed
  assert failed["step"] in (7, 8) and len(calls) == 2  # the async save and its one retry
  assert checkpoint_steps(run_dir) == [2, 4]
  assert not list((run_dir / "checkpoints").glob("*orbax-checkpoint-tmp*"))

  # 2. Resumed from step 4; Ctrl-C (SIGINT) once step 10 is logged (rows up to 8 are left
  #    from the failed run): checkpoint, 75, FAILED.
  longer["train.total_steps"] = 24  # room for the signal to arrive mid-run
  with signal_at_step(run_dir, 10, signal.SIGINT):
    code = train.train_and_evaluate(small_config(**longer), str(run_dir))
  assert code == train.EXIT_PREEMPTED
  failed = json.loads((run_dir / "FAILED").read_text())
  stopped = failed["step"]
  assert failed["interrupted"] and failed["reason"].startswith(f"interrupted by SIGINT at step ")
  assert 10 <= stopped < 24 and checkpoint_steps(run_dir)[-1] == stopped

  # 3. The next start resumes and finishes; one metrics row per step.
  assert train.train_and_evaluate(small_config(**longer), str(run_dir)) == 0
  assert not (run_dir / "FAILED").exists() and (run_dir / "DONE").exists()
  assert [r["step"] for r in logged(run_dir)] == list(range(1, 25))


def test_second_ctrl_c_stops_at_once():
  stopped = []
  watcher = run_guards.PreemptionWatcher(10, on_second_interrupt=stopped.append)
  watcher.install()
  try:
    os.kill(os.getpid(), signal.SIGINT)
    assert watcher.should_stop(0) and watcher.signal == signal.SIGINT and not stopped
    os.kill(os.getpid(), signal.SIGINT)
    assert stopped == [signal.SIGINT]
  finally:
    watcher.uninstall()


def test_only_corrupt_images_fail_before_building(tmp_path, monkeypatch):
  folder = tmp_path / "images"
  folder.mkdir()
  for i in range(12):
    (folder / f"{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  def no_build(*_):
    raise AssertionError("the model must not be built for data that cannot be read")
  monkeypatch.setattr(construction, "build", no_build)
  config = small_config(**{**RUN, "data.source": f"folder:{folder}"})
  assert train.train_and_evaluate(config, str(tmp_path / "run")) == train.EXIT_FAILED
  failed = json.loads((tmp_path / "run" / "FAILED").read_text())
  assert failed["reason"].startswith(f"data (folder:{folder}): ValueError: no decodable image")


def test_failure_reason_puts_the_root_cause_first():
  try:
    try:
      raise OSError(errno.ENOSPC, "No space left on device", "/w/checkpoints/6")
    except OSError as e:
      raise RuntimeError("Event loop is closed") from e
  except RuntimeError as e:
    reason = run_guards.describe_failure(e, "checkpoint")
  assert reason == ("disk (checkpoint): OSError: [Errno 28] No space left on device: "
                    "'/w/checkpoints/6' (while: Event loop is closed)")
  tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing "rng/0": Failed to write 134243 '
                           "bytes to file 9: No space left on device [os_error_code='28']")
  assert run_guards.describe_failure(tensorstore, "checkpoint").startswith(
      "disk (checkpoint): ValueError: RESOURCE_EXHAUSTED")
  assert run_guards.describe_failure(KeyError("image"), "data") == "data: KeyError: 'image'"


def test_metrics_rows_after_the_checkpoint_are_dropped(tmp_path):
  with writers.MetricWriter(tmp_path, tensorboard=False) as writer:
    for step in (0, 1, 2, 3):
      writer.write_scalars(step, {"g_loss": float(step)})
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 4, "g_lo')  # torn by a kill
  with writers.MetricWriter(tmp_path, tensorboard=False) as writer:
    assert writer.discard_after(2) == 2
    writer.write_scalars(3, {"g_loss": 9.0})
  rows = writers.read_metrics(tmp_path / "metrics.jsonl")
  assert [(r["step"], r["g_loss"]) for r in rows] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 9.0)]


@pytest.mark.slow
def test_two_trainer_processes_on_one_workdir(tmp_path):
  """The real CLI: the second `gsq-train` exits 2 naming the first one's pid."""
  overrides = {**RUN, "train.total_steps": 400, "train.checkpoint_every_steps": 100}
  first = subprocess.Popen(cli(tmp_path, overrides), env=env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while not logged(tmp_path) and time.time() < deadline:
      assert first.poll() is None
      time.sleep(0.2)
    second = subprocess.run(cli(tmp_path, overrides), env=env(), capture_output=True, text=True,
                            timeout=300, check=False)
    assert second.returncode == train.EXIT_REFUSED
    assert f"pid {first.pid}" in second.stderr and not (tmp_path / "FAILED").exists()
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=300) == train.EXIT_PREEMPTED
  finally:
    first.kill()
  assert json.loads((tmp_path / "FAILED").read_text())["interrupted"]
  rows = logged(tmp_path)
  assert len({r["step"] for r in rows}) == len(rows)


def test_library_failure_noise_is_trimmed():
  noise = run_guards.FailureNoiseFilter(limit=2)

  def record(name, path, msg, exc=None):
    exc_info = (type(exc), exc, None) if exc else None
    return logging.LogRecord(name, logging.ERROR, path, 1, msg, (), exc_info)

  orbax = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
  error = ValueError("RESOURCE_EXHAUSTED: No space left on device")
  r = record("absl", orbax, "Save Finalize thread failed.", error)
  assert noise.filter(r) and r.exc_info is None
  assert r.getMessage() == ("Save Finalize thread failed. (ValueError: RESOURCE_EXHAUSTED: "
                            "No space left on device)")
  assert not noise.filter(record("asyncio", "/py/asyncio/base_events.py",
                                 "Task exception was never retrieved\nfuture: <Task 1>", error))
  repeats = [noise.filter(record("absl", "/w/x.py", "Event loop is closed")) for _ in range(4)]
  assert repeats == [True, True, False, False]


def test_resumable_fields_name_config_fields():
  """A typo in workdir.RESUMABLE would silently make that field immutable."""
  keys = workdir_lib.flatten(json.loads(small_config().to_json_best_effort()))
  for field in workdir_lib.RESUMABLE:
    assert any(k == field or (field.endswith(".") and k.startswith(field)) for k in keys), field


def test_imported_workdir_fixes_only_the_model(tmp_path):
  """Weights-only checkpoints (gsq-import): fine-tuning may change the recipe, not the model."""
  old = {"model": {"latent_dim": 16}, "train": {"image_size": 32, "total_steps": 10}}
  (tmp_path / "config.json").write_text(json.dumps(old))
  (tmp_path / "checkpoints" / "0" / "params").mkdir(parents=True)
  assert workdir_lib.holds_only_weights(tmp_path)
  recipe = {"model": {"latent_dim": 16}, "train": {"image_size": 64, "total_steps": 10}}
  assert workdir_lib.check_relaunch(tmp_path, recipe) == {"train.image_size": (32, 64)}
  with pytest.raises(workdir_lib.WorkdirRefused, match="model.latent_dim"):
    workdir_lib.check_relaunch(tmp_path, {**recipe, "model": {"latent_dim": 8}})
  # Once a checkpoint holds train state, the recipe is fixed too.
  (tmp_path / "checkpoints" / "5" / "train").mkdir(parents=True)
  assert not workdir_lib.holds_only_weights(tmp_path)
  with pytest.raises(workdir_lib.WorkdirRefused, match="train.image_size"):
    workdir_lib.check_relaunch(tmp_path, recipe)


def test_a_field_added_later_resumes_runs_written_before_it():
  """config.json from before optim.encoder_lr_factor existed: 1.0 is what that run did."""
  new = json.loads(small_config().to_json_best_effort())
  old = json.loads(json.dumps(new))
  del old["optim"]["encoder_lr_factor"]
  for key in workdir_lib.ADDED_FIELDS:
    assert key in workdir_lib.flatten(new), key  # a typo would excuse nothing
  assert workdir_lib.config_changes(old, new) == {}
  new["optim"]["encoder_lr_factor"] = 0.05
  assert workdir_lib.config_changes(old, new) == {"optim.encoder_lr_factor": ("<absent>", 0.05)}
