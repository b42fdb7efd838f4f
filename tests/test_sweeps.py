"""Tests of gsq-sweep and gsq-collect.

Two layers:
- Orchestration with a TEST-ONLY stand-in trainer (a 30-line script written
  into tmp_path that follows the trainer's workdir/exit-code contract without
  JAX), for the cases that would be slow with the real trainer: kill/resume
  bookkeeping, time-outs, retries, crash reasons, the array-task entry point.
- The real trainer (`python -m gsq_jax.training.train`, configs/gsq.py:tiny) on the
  tiny demo sweep: kill the launcher mid-sweep and relaunch, a run with an
  injected NaN, and gsq-collect's table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import re
import sys
import textwrap
import time

import pytest

from gsq_jax.analysis import load_table
from gsq_jax.sweeps import collect
from gsq_jax.sweeps import grid
from gsq_jax.sweeps import launch
from gsq_jax.sweeps import manifest as manifest_lib
from gsq_jax.sweeps import runner
from gsq_jax.sweeps import sites
from gsq_jax.sweeps import slurm

REPO = pathlib.Path(__file__).resolve().parents[1]

# A toy config with the trainer's config layout (model block of the real
# tokenizer, so validate_model_config runs on it) for the stand-in tests.
TOY_CONFIG = '''
import ml_collections
from gsq_jax.models.tokenizer import default_model_config

def get_config(arg=""):
  kv = dict(p.split("=") if "=" in p else (p, "1") for p in arg.split(",") if p)
  c = ml_collections.ConfigDict()
  c.model = default_model_config()
  c.model.hidden_channels = 32
  f = int(kv.get("f", 4))
  n = f.bit_length() - 1
  c.model.channel_multipliers = (1,) + (2,) * n
  c.model.encoder_layer_configs = (1,) * (n + 2)
  c.model.decoder_layer_configs = (1,) * (n + 2)
  c.model.downsample_factor = f
  c.model.latent_dim = int(kv.get("D", 8))
  c.model.num_groups = int(kv.get("G", 1))
  c.model.codebook_size = int(kv.get("V", 64))
  c.train = ml_collections.ConfigDict(dict(
      seed=0, total_steps=4, global_batch_size=2, image_size=16, inject_nan_at_step=-1,
      crash_at_step=-1, sleep=0.05))
  return c
'''

# TEST-ONLY stand-in for `python -m gsq_jax.training.train` (never shipped): follows the
# API contract's workdir files and exit codes, "trains" by sleeping.
STAND_IN = '''
import json, os, signal, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
workdir = args["workdir"]
conf = dict(p.split("=") for p in args["config"].split(":", 1)[1].split(",") if "=" in p)
train = {k[len("config.train."):]: v for k, v in args.items() if k.startswith("config.train.")}
total = int(train.get("total_steps", 4)); nan_at = int(train.get("inject_nan_at_step", -1))
crash_at = int(train.get("crash_at_step", -1)); sleep = float(train.get("sleep", 0.05))
os.makedirs(os.path.join(workdir, "checkpoints"), exist_ok=True)
ckpt = os.path.join(workdir, "checkpoints", "step")
start = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
with open(os.path.join(workdir, "starts.txt"), "a") as f:
  f.write(f"{start}\\n")
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))
json.dump({"model": {"latent_dim": int(conf["D"]), "num_groups": int(conf["G"]),
                     "codebook_size": int(conf["V"]), "downsample_factor": int(conf["f"]),
                     "quantizer": {"name": "gsq"}},
           "train": {"seed": 0, "total_steps": total, "global_batch_size": 2, "image_size": 16}},
          open(os.path.join(workdir, "config.json"), "w"))
for step in range(start + 1, total + 1):
  time.sleep(sleep)
  if stop:
    sys.exit(75)
  if step == crash_at:
    raise RuntimeError("boom at step %d" % step)
  if step == nan_at:
    json.dump({"reason": "non-finite loss at step %d" % step, "step": step},
              open(os.path.join(workdir, "FAILED"), "w"))
    sys.exit(1)
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": step, "g_loss": 1.0 / step, "params": 1234,
                        "progress": step / total, "eta_sec": (total - step) * sleep}) + "\\n")
  open(ckpt, "w").write(str(step))
json.dump({"psnr": 20.0 + int(conf["D"]), "ssim": 0.5, "usage": 99.0,
           "protocol": {"num_images": 8, "resolution": 16, "crop": "center", "ema": True,
                        "step": total, "source": "demo"}},
          open(os.path.join(workdir, "eval.json"), "w"))
open(os.path.join(workdir, "DONE"), "w").write("done")
'''


@pytest.fixture
def toy(tmp_path):
  """A toy project (configs/toy.py, sweeps/) and the stand-in trainer script."""
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "toy.py").write_text(TOY_CONFIG)
  (tmp_path / "sweeps").mkdir()
  stand_in = tmp_path / "stand_in_trainer.py"
  stand_in.write_text(STAND_IN)
  return tmp_path


def _write_sweep(folder: pathlib.Path, body: str, name: str = "toy") -> pathlib.Path:
  path = folder / "sweeps" / f"{name}.py"
  path.write_text('CONFIG = "configs/toy.py"\nTINY_CONFIG = "configs/toy.py:tiny"\n'
                  + textwrap.dedent(body))
  return path


def _standin_manifest(toy: pathlib.Path, body: str, root: pathlib.Path,
                      max_retries: int = 0) -> manifest_lib.Manifest:
  """Expands a toy sweep and points its runs at the stand-in trainer (test-only)."""
  sweep_file = grid.load_sweep(_write_sweep(toy, body))
  expansion = grid.expand(sweep_file, full_check=False)  # a toy config, not the trainer's
  assert not expansion.invalid, expansion.invalid
  sweep = manifest_lib.build_manifest(sweep_file, expansion, root=root, tiny=False,
                                      max_retries=max_retries)
  stand_in = str(toy / "stand_in_trainer.py")
  sweep.runs = [dataclasses.replace(r, train_args=[stand_in, *r.train_args[2:]])
                for r in sweep.runs]
  sweep.write()
  return sweep


def _run_local_cmd(root: pathlib.Path, jobs: int = 1, timeout: float | None = None,
                   progress_every: float = 15.0) -> list[str]:
  return [sys.executable, "-c",
          "import sys; from gsq_jax.sweeps import launch, manifest, sites; "
          f"sys.exit(launch.run_local(manifest.read_manifest({str(root)!r}), sites.Site(), "
          f"jobs={jobs}, timeout_s={timeout!r}, progress_every_s={progress_every!r}))"]


# ---------------------------------------------------------------------------
# Grid, names, validation
# ---------------------------------------------------------------------------


def test_run_names_are_deterministic():
  assert grid.run_name(quantizer="gsq", f=16, D=16, G=4, V=65536, seed=0) == "f16_D16_G4_V64k_s0"
  assert grid.run_name(quantizer="ibq", f=16, D=256, G=1, V=2**18, seed=1) == \
      "ibq_f16_D256_G1_V256k_s1"
  assert grid.run_name(quantizer="gsq", f=8, D=8, G=1, V=2**20, seed=0, res=128) == \
      "f8_D8_G1_V1M_s0_r128"
  assert grid.format_vocab(1000) == "1000"


def test_invalid_points_are_listed_before_anything_starts(toy, capsys):
  path = _write_sweep(toy, """
      def sweep(add):
        for G in (1, 3):
          add(D=8, G=G, V=64, f=4)
        add(D=8, G=2, V=64, f=3)
        add(D=8, V=64, f=4, lr=1)
        add(D=8, V=64, f=4, name="typo", **{"train.no_such_field": 1})
        add(D=8, G=1, V=64, f=4)
  """)
  root = toy / "runs"
  assert launch.main([str(path), "--root", str(root), "--fast-check"]) == 2
  err = capsys.readouterr().err
  assert "f4_D8_G3_V64_s0: D=8 is not divisible by G=3" in err
  assert "f3_D8_G2_V64_s0: f=3 is not a power of two" in err
  assert "unknown keyword(s) ['lr']" in err
  assert "typo: override(s) ['train.no_such_field'] name no field" in err
  assert "f4_D8_G1_V64_s0: duplicate run name" in err
  assert not root.exists()  # nothing written, nothing started


def test_point_config_must_carry_the_point(toy):
  """A config that ignores the arg (contract drift) makes the point invalid."""
  (toy / "configs" / "fixed.py").write_text(TOY_CONFIG.replace('int(kv.get("D", 8))', "8"))
  sweep_file = grid.load_sweep(_write_sweep(toy, """
      def sweep(add):
        add(D=16, G=1, V=64, f=4, config="configs/fixed.py")
  """))
  (invalid,) = grid.expand(sweep_file, full_check=False).invalid
  assert "model.latent_dim=8 (point wants 16)" in invalid.reason


def test_site_file_is_validated(tmp_path):
  bad = tmp_path / "bad.yaml"
  bad.write_text("gpus_per_node: 4\npartiton: booster\n")
  with pytest.raises(ValueError, match=r"unknown setting\(s\) \['partiton'\]"):
    sites.load_site(bad)
  bad.write_text("gpus_per_node: four\n")
  with pytest.raises(ValueError, match="`gpus_per_node` must be an integer"):
    sites.load_site(bad)
  for path in sorted((REPO / "sweeps" / "sites").glob("*.yaml")):
    assert sites.load_site(path).name == path.stem


def test_array_spec():
  assert slurm.array_spec(range(20), 8) == "0-19%8"
  assert slurm.array_spec([0, 2, 3, 4, 7], None) == "0,2-4,7"


# ---------------------------------------------------------------------------
# Orchestration with the stand-in trainer
# ---------------------------------------------------------------------------


def test_standin_kill_resume_nan_crash(toy):
  """Launcher SIGKILLed mid-sweep: the relaunch skips DONE runs and resumes the cut one."""
  root = toy / "runs"
  sweep = _standin_manifest(toy, """
      def sweep(add):
        add(D=8, G=1, V=64, f=4, **{"train.total_steps": 2})
        add(D=8, G=2, V=64, f=4, **{"train.total_steps": 60})
        add(D=8, G=4, V=64, f=4, **{"train.inject_nan_at_step": 2})
        add(D=8, G=8, V=64, f=4, **{"train.crash_at_step": 2})
  """, root)
  first, second, nan, crash = (pathlib.Path(r.workdir) for r in sweep.runs)
  proc = subprocess.Popen(_run_local_cmd(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 60
  while not ((first / "DONE").exists() and (second / "checkpoints" / "step").exists()):
    assert time.time() < deadline and proc.poll() is None, proc.stdout.read().decode()
    time.sleep(0.05)
  proc.kill()  # SIGKILL: no chance to clean up
  proc.wait()
  out = subprocess.run(_run_local_cmd(root), capture_output=True, text=True, timeout=120)
  assert out.returncode == 1, out.stdout  # some runs failed (by design)
  assert "skip f4_D8_G1_V64_s0: done" in out.stdout
  assert (first / "starts.txt").read_text().split() == ["0"]  # never re-run
  starts = [int(s) for s in (second / "starts.txt").read_text().split()]
  assert len(starts) == 2 and starts[1] > 0, starts  # resumed from its checkpoint
  assert (second / "DONE").exists()
  assert runner.read_status(second)["state"] == runner.DONE
  status = runner.read_status(nan)
  assert status["state"] == runner.FAILED
  assert status["reason"] == "non-finite loss at step 2"
  status = runner.read_status(crash)
  assert status["state"] == runner.FAILED
  assert "crashed (exit code 1): RuntimeError: boom at step 2" in status["reason"]

  df = collect.collect(root)
  assert list(df["run"]) == [r.name for r in sweep.runs]
  assert list(df["status"]) == ["done", "done", "failed", "failed"]
  assert df.loc[1, "steps"] == 60 and df.loc[1, "images_seen"] == 120
  assert df.loc[1, "params"] == 1234 and df.loc[1, "wall_time_s"] > 0
  assert df.loc[2, "reason"] == "non-finite loss at step 2"


def test_standin_timeout_retries_then_gives_up(toy):
  root = toy / "runs"
  _standin_manifest(toy, """
      def sweep(add):
        add(D=8, G=1, V=64, f=4, **{"train.total_steps": 1000, "train.sleep": 0.05})
  """, root, max_retries=1)
  out = subprocess.run(_run_local_cmd(root, timeout=1.0, progress_every=0.3),
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 1, out.stdout
  # Live progress of the running trainer on the launcher's console.
  assert re.search(r"f4_D8_G1_V64_s0: step \d+/1000, loss [\d.]+, ETA \d+s", out.stdout), out.stdout
  workdir = root / "f4_D8_G1_V64_s0"
  status = runner.read_status(workdir)
  assert status["state"] == runner.FAILED and status["failures"] == 2
  assert status["reason"].startswith("time-out after 1 s")
  starts = [int(s) for s in (workdir / "starts.txt").read_text().split()]
  assert len(starts) == 2 and starts[1] > 0  # the retry resumed
  # Relaunching does not try a run that used up its retries.
  out = subprocess.run(_run_local_cmd(root, timeout=1.0), capture_output=True, text=True,
                       timeout=60)
  assert "max retries 1 reached" in out.stdout
  assert len((workdir / "starts.txt").read_text().split()) == 2


def test_array_task_reads_its_run_by_task_id(toy):
  """The SLURM array task entry point, run directly with SLURM_ARRAY_TASK_ID set."""
  root = toy / "runs"
  sweep = _standin_manifest(toy, """
      def sweep(add):
        for D in (8, 16):
          add(D=D, G=1, V=64, f=4)
  """, root)
  env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1"}
  env.pop("SLURM_JOB_ID", None)
  out = subprocess.run([sys.executable, "-m", "gsq_jax.sweeps.runner", "--manifest",
                        str(sweep.path), "--"], env=env, capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 0, out.stdout + out.stderr
  assert (root / "f4_D16_G1_V64_s0" / "DONE").exists()
  assert not (root / "f4_D8_G1_V64_s0" / "DONE").exists()
  assert "task 1 (f4_D16_G1_V64_s0): done" in out.stdout


def test_collect_tolerates_partial_files_and_loads(toy):
  root = toy / "runs"
  _standin_manifest(toy, """
      def sweep(add):
        for D in (8, 16):
          add(D=D, G=1, V=64, f=4)
  """, root)
  subprocess.run(_run_local_cmd(root), capture_output=True, timeout=60, check=True)
  # A run mid-write: metrics line cut off, eval.json half written.
  with open(root / "f4_D16_G1_V64_s0" / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "lo')
  (root / "f4_D16_G1_V64_s0" / "eval.json").write_text('{"psnr": 3')
  assert collect.main([str(root), "--no-params"]) == 0
  table = root / "tables" / "toy.csv"
  df = load_table(table)
  assert list(df["D"]) == [8, 16] and list(df["d"]) == [8, 16]
  assert df.loc[0, "psnr"] == 28.0 and df.loc[0, "eval_images"] == 8
  assert df.loc[1, "steps"] == 4 and pd_isna(df.loc[1, "psnr"])
  assert (root / "tables" / "toy.md").read_text().startswith("| quantizer | f | D |")
  assert not list((root / "tables").glob(".*tmp"))


def pd_isna(value) -> bool:
  return value != value  # NaN


# ---------------------------------------------------------------------------
# Paper sweeps and the SLURM dry run (need the real configs)
# ---------------------------------------------------------------------------


def _need_configs():
  for name in ("configs/gsq.py", "configs/gsq_gan_256.py"):
    if not (REPO / name).exists():
      pytest.skip(f"{name} not in the checkout yet")


@pytest.mark.parametrize("name,tiny,count", [
    ("dim_vocab", False, 20), ("groups", False, 15), ("spatial", False, 12),
    ("gsq_vs_ibq", False, 5), ("demo", False, 4), ("dim_vocab", True, 6), ("groups", True, 4),
    ("spatial", True, 4), ("gsq_vs_ibq", True, 5), ("demo", True, 2), ("init_norm", False, 4),
    ("init_norm", True, 4)])
def test_paper_sweeps_expand_valid(name, tiny, count):
  """Every grid point resolves through its config and passes the model-block checks.

  (The trainer's full validate_config builds each model, ~1 s per point; the
  tiny demo runs go through it in test_demo_sweep_kill_resume_nan.)
  """
  _need_configs()
  expansion = grid.expand(grid.load_sweep(REPO / "sweeps" / f"{name}.py"), tiny=tiny,
                          full_check=False)
  assert not expansion.invalid, [str(i) for i in expansion.invalid]
  assert len(expansion.points) == count
  assert len({p.name for p in expansion.points}) == count


def test_slurm_dry_run_dim_vocab(capsys, tmp_path):
  _need_configs()
  site = REPO / "sweeps" / "sites" / "jsc_booster.yaml"
  code = launch.main([str(REPO / "sweeps" / "dim_vocab.py"), "--backend", "slurm", "--dry-run",
                      "--site", str(site), "--root", str(tmp_path / "dv"), "--jobs", "4",
                      "--fast-check"])
  out = capsys.readouterr().out
  assert code == 0, out
  script = out[out.index("#!/bin/bash"):]
  for line in ("#SBATCH --array=0-19%4", "#SBATCH --account=YOUR_PROJECT",
               "#SBATCH --partition=booster", "#SBATCH --gres=gpu:4",
               "#SBATCH --ntasks-per-node=4", "#SBATCH --time=24:00:00",
               "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue",
               "module load Stages/2025", "source $PROJECT/$USER/venvs/gsq_jax/bin/activate",
               '--index "$SLURM_ARRAY_TASK_ID"', "--coordinator-suffix i",
               "-- srun --ntasks-per-node=4 --cpu-bind=none"):
    assert line in script, line
  assert "f8_D64_G1_V512k_s0" in out  # the manifest's runs are listed
  assert not (tmp_path / "dv").exists()  # dry run writes nothing
  check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
  assert check.returncode == 0, check.stderr


# ---------------------------------------------------------------------------
# The real trainer: tiny demo sweep, launcher killed mid-sweep, injected NaN
# ---------------------------------------------------------------------------


def test_demo_sweep_kill_resume_nan(tmp_path, trainer_env):
  """Real trainer: the tiny demo grid plus one run with an injected NaN.

  The launcher (2 runs at a time) is SIGKILLed as soon as the first run is
  DONE; the relaunch must skip that run, finish the other demo run, and
  record the NaN run as failed with the trainer's reason while the others
  complete. gsq-collect then has one row per grid point, and no missing
  metric for the finished ones.
  """
  sweep_path = tmp_path / "demo_nan.py"
  sweep_path.write_text(textwrap.dedent(f"""
      import runpy
      _demo = runpy.run_path({str(REPO / "sweeps" / "demo.py")!r})
      NAME = "demo_nan"
      TINY_CONFIG = {str(REPO / "configs" / "gsq.py") + ":tiny"!r}
      TINY_OVERRIDES = _demo["TINY_OVERRIDES"]

      def sweep(add, tiny=False):
        _demo["sweep"](add, tiny=tiny)  # the demo grid itself
        add(f=4, D=8, G=1, V=256, seed=1, **{{"train.inject_nan_at_step": 2}})
  """))
  root = tmp_path / "runs"
  cmd = [sys.executable, "-m", "gsq_jax.sweeps.launch", str(sweep_path), "--tiny", "--jobs", "2",
         "--root", str(root), "--max-retries", "0"]
  demo_points = grid.expand(grid.load_sweep(REPO / "sweeps" / "demo.py"), tiny=True,
                            full_check=False).points
  demo_dirs = [root / p.name for p in demo_points]
  nan_dir = root / "f4_D8_G1_V256_s1"

  first = subprocess.Popen(cmd, env=trainer_env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 400
  while not any((d / "DONE").exists() for d in demo_dirs):
    assert first.poll() is None, first.stdout.read()
    assert time.time() < deadline, "no demo run finished in time"
    time.sleep(0.2)
  first.kill()  # SIGKILL mid-sweep; its trainers get SIGTERM (parent-death signal)
  first.wait()
  done_first = [d for d in demo_dirs if (d / "DONE").exists()]
  done_marks = {d: (d / "DONE").stat().st_mtime_ns for d in done_first}

  second = subprocess.run(cmd, env=trainer_env, capture_output=True, text=True, timeout=600)
  assert second.returncode == 1, second.stdout + second.stderr  # 1: a run failed (the NaN one)
  for d in done_first:
    assert f"skip {d.name}: done" in second.stdout
    assert (d / "DONE").stat().st_mtime_ns == done_marks[d]
    assert runner.read_status(d)["starts"] == 1  # never started again
  for d in demo_dirs:
    assert runner.read_status(d)["state"] == runner.DONE, (d, second.stdout)
  status = runner.read_status(nan_dir)
  assert status["state"] == runner.FAILED
  reason = json.loads((nan_dir / "FAILED").read_text())["reason"]  # the trainer's words
  assert reason.startswith("non-finite loss at step"), reason
  assert status["reason"] == reason

  out = subprocess.run([sys.executable, "-m", "gsq_jax.sweeps.collect", str(root)],
                       env=trainer_env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  for d in [*demo_dirs, nan_dir]:
    assert d.name in out.stdout  # the printed table
  df = load_table(root / "tables" / "demo_nan_tiny.csv")
  assert len(df) == 3
  done = df[df["status"] == "done"]
  assert sorted(done["run"]) == sorted(d.name for d in demo_dirs)
  for column in ("psnr", "ssim", "lpips_alex", "lpips_vgg", "usage", "perplexity", "tokens",
                 "params", "steps", "images_seen", "wall_time_s",
                 # codebook health: evaluation, last training window, quantizer variant
                 "effective_bits", "unused_codes", "codebook_norm_cv", "train_usage",
                 "train_usage_lookups", "train_usage_uniform_expectation", "train_dead_codes",
                 "init", "norm"):
    assert done[column].notna().all(), column
  assert (done["init"] == "spherical").all() and (done["norm"] == "l2").all()
  assert (done["steps"] == 4).all() and (done["images_seen"] == 32).all()
  failed = df[df["status"] == "failed"].iloc[0]
  assert failed["run"] == nan_dir.name and failed["reason"] == reason


# ---------------------------------------------------------------------------
# What the user reads: progress lines, table columns and notes
# ---------------------------------------------------------------------------


def test_progress_phrase_from_metrics(tmp_path):
  attempt = runner.Attempt(workdir=tmp_path, process=None, started=time.time() - 65,
                           log_offset=0)
  assert runner.progress(attempt).startswith("starting, 1m0")
  (tmp_path / runner.LOG_NAME).write_text(
      "==== attempt 1\nI1205 10:53:33.032553 1 train.py:341] Compiling the train step (the first "
      "step includes it); parameters: encoder 1,020,328, decoder 1,587,523, total 2,609,899\n")
  phrase = runner.progress(attempt)
  assert ": Compiling the train step (the first step includes it); param" in phrase
  assert phrase.endswith("…") and len(phrase.split(": ", 1)[1]) == 90
  facts = {"step": 0, "D": 8, "version_jax": "0.10.2"}  # the first row has no loss
  rows = [facts, {"step": 25, "g_loss": 0.25, "progress": 0.25, "eta_sec": 61.2}]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows)
                                          + '\n{"step": 50, "g_lo')  # a torn last line
  assert re.match(r"step 25/100, loss 0.25, ETA (1m01s|1m00s|59s), 1m0", runner.progress(attempt))
  written = time.time() - 20
  os.utime(tmp_path / "metrics.jsonl", (written, written))  # the ETA counts down meanwhile
  assert re.match(r"step 25/100, loss 0.25, ETA (41s|40s|39s), 1m0", runner.progress(attempt))
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('\n{"step": 100, "g_loss": 0.1, "progress": 1.0, "eta_sec": 0.0}\n')
  assert runner.progress(attempt).startswith("step 100/100 done, evaluating")


def _fake_run(root: pathlib.Path, name: str, D: int, jax_version: str) -> None:
  workdir = root / name
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps({
      "model": {"latent_dim": D, "num_groups": 2, "codebook_size": 64, "downsample_factor": 4,
                "quantizer": {"name": "gsq"}},
      "train": {"seed": 0, "total_steps": 4, "global_batch_size": 2, "image_size": 16}}))
  first = {"step": 0, "D": D, "version_jax": jax_version, "version_flax": "0.12.8",
           "backend": "cpu", "device_kind": "cpu"}
  (workdir / "metrics.jsonl").write_text(json.dumps(first) + "\n" + json.dumps(
      {"step": 4, "g_loss": 0.5, "progress": 1.0}) + "\n")
  reason = "rFID unavailable: the FID Inception weights were not found " + "x" * 500
  (workdir / "eval.json").write_text(json.dumps({
      "psnr": 20.0 + D, "usage": 50.0, "rfid_status": reason,
      "protocol": {"num_images": 8, "step": 4}}))
  (workdir / "DONE").write_text("done")


def test_collect_table_units_key_columns_notes_and_versions(tmp_path, capsys):
  root = tmp_path / "runs"
  _fake_run(root, "a", 8, "0.10.2")
  _fake_run(root, "b", 16, "0.11.0")
  assert collect.main([str(root), "--no-params"]) == 0
  out, err = capsys.readouterr()
  header = out.splitlines()[0]
  for column in ("run", "f", "D", "G", "V", "PSNR [dB]", "usage [%]"):
    assert f"| {column} |" in header, header
  # The rFID paragraph is said once, not in every row of the files.
  assert out.count("the FID Inception weights were not found") == 1
  csv = (root / "tables" / "runs.csv").read_text()
  assert "Inception" not in csv
  df = load_table(root / "tables" / "runs.csv")
  assert list(df["rfid_status"]) == ["unavailable", "unavailable"]
  assert list(df["version_jax"]) == ["0.10.2", "0.11.0"] and set(df["backend"]) == {"cpu"}
  assert "mixes package versions (jax 0.10.2 / 0.11.0)" in err
  assert "flax" not in err  # one version of flax: nothing to say
  assert (root / "tables" / "runs.md").read_text().count("Inception") == 1


def test_plot_axis_has_unit_and_no_stray_legend(tmp_path):
  root = tmp_path / "runs"
  for name, D in (("a", 8), ("b", 16)):
    _fake_run(root, name, D, "0.10.2")
  assert collect.main([str(root), "--no-params"]) == 0
  import matplotlib.pyplot  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  from gsq_jax import analysis  # pylint: disable=import-outside-toplevel
  df = analysis.load_table(root / "tables" / "runs.csv")
  fig = analysis.plot_scaling(df, x="D", y="psnr", by=["G"])
  ax = fig.axes[0]
  assert ax.get_ylabel() == "PSNR [dB]"
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ["G=2"]  # no "runs" entry


def test_local_dry_run_names_no_manifest_it_did_not_write(toy, capsys):
  path = _write_sweep(toy, """
      def sweep(add):
        add(D=8, G=1, V=64, f=4)
  """)
  root = toy / "runs"
  assert launch.main([str(path), "--root", str(root), "--fast-check", "--dry-run"]) == 0
  out = capsys.readouterr().out
  assert "# dry run, nothing written" in out and "--workdir" in out
  assert not root.exists()
