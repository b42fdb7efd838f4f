"""Real SLURM: a single-node cluster on this machine runs the tiny demo sweep.

The fixture installs Debian's `slurm-wlm` and `munge` when they are absent
(apt-get; needs root), starts munged, slurmctld and slurmd as root with
proctrack/linuxproc and task/none, state and spool in a temp folder and the
node's real CPU count and memory (`slurmd -C`), and stops exactly those three
daemons by pid afterwards. The test submits `sweeps/demo.py --tiny` through
`gsq-sweep --backend slurm` with sweeps/sites/local_slurm.yaml, where every
array task runs its trainer as two srun tasks, so the trainer's multi-process
start (jax.distributed.initialize() from SLURM's own environment variables)
runs for real; then `gsq-collect` must see every run, done.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from gsq_jax.analysis import load_table
from gsq_jax.sweeps import grid
from gsq_jax.sweeps import runner

REPO = pathlib.Path(__file__).resolve().parents[1]
_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun")


def _ensure_slurm_installed() -> None:
  """apt-get installs slurm-wlm and munge when missing; skips if that is impossible."""
  if all(shutil.which(b) for b in _BINARIES):
    if os.geteuid() != 0:
      pytest.skip("SLURM is installed, but starting munged/slurmctld/slurmd here needs root")
    return
  if shutil.which("apt-get") is None:
    pytest.skip("SLURM is not installed and apt-get is unavailable to install slurm-wlm/munge")
  if os.geteuid() != 0:
    pytest.skip("SLURM is not installed and installing slurm-wlm/munge with apt-get needs root")
  env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
  update = subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
  if update.returncode:
    pytest.skip(f"apt-get update failed (no package index?): {update.stderr.strip()[-300:]}")
  install = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm",
                            "munge"], capture_output=True, text=True, env=env, timeout=1200,
                           check=False)
  assert install.returncode == 0, f"apt-get install slurm-wlm munge failed:\n{install.stderr}"
  missing = [b for b in _BINARIES if not shutil.which(b)]
  assert not missing, f"slurm-wlm/munge installed but {missing} not on PATH"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str, logs: list[pathlib.Path]) -> None:
  deadline = time.time() + timeout
  while not predicate():
    if time.time() > deadline:
      tails = "\n".join(f"--- {p}:\n{p.read_text()[-2000:]}" for p in logs if p.exists())
      raise AssertionError(f"timed out waiting for {what}\n{tails}")
    time.sleep(0.2)


def _stop(process: subprocess.Popen) -> None:
  """Stops one daemon we started, by its pid."""
  if process.poll() is None:
    os.kill(process.pid, signal.SIGTERM)
    try:
      process.wait(timeout=15)
    except subprocess.TimeoutExpired:
      os.kill(process.pid, signal.SIGKILL)
      process.wait(timeout=15)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
  """A running single-node SLURM cluster; yields the environment that reaches it."""
  _ensure_slurm_installed()
  base = tmp_path_factory.mktemp("slurm")
  munge_dir, state, spool = base / "munge", base / "state", base / "spool"
  for folder in (munge_dir, state, spool):
    folder.mkdir()
  munge_dir.chmod(0o755)
  key = munge_dir / "munge.key"
  key.write_bytes(os.urandom(1024))
  key.chmod(0o600)
  socket_path = munge_dir / "munge.sock"
  node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True)
  node_line = node.stdout.splitlines()[0]  # NodeName=host CPUs=.. RealMemory=.. (this machine)
  hostname = node_line.split()[0].split("=", 1)[1]
  conf = base / "slurm.conf"
  conf.write_text("\n".join([
      "ClusterName=gsqtest",
      f"SlurmctldHost={hostname}(127.0.0.1)",
      "SlurmUser=root", "SlurmdUser=root",
      "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={socket_path}",
      f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
      f"StateSaveLocation={state}", f"SlurmdSpoolDir={spool}",
      f"SlurmctldPidFile={base / 'slurmctld.pid'}", f"SlurmdPidFile={base / 'slurmd.pid'}",
      f"SlurmctldLogFile={base / 'slurmctld.log'}", f"SlurmdLogFile={base / 'slurmd.log'}",
      "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
      "SchedulerType=sched/backfill", "SelectType=select/cons_tres",
      "SelectTypeParameters=CR_CPU", "MpiDefault=none", "ReturnToService=2",
      "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
      "SwitchType=switch/none", "SchedulerParameters=sched_interval=2",
      "MinJobAge=300", "KillWait=5", "InactiveLimit=0",
      f"{node_line} NodeAddr=127.0.0.1 State=UNKNOWN",
      f"PartitionName=debug Nodes={hostname} Default=YES MaxTime=INFINITE State=UP",
      ""]))
  env = {**os.environ, "SLURM_CONF": str(conf)}
  logs = [base / "munged.log", base / "slurmctld.log", base / "slurmd.log"]
  daemons = []
  try:
    daemons.append(subprocess.Popen(
        ["munged", "-F", "-f", f"--socket={socket_path}", f"--key-file={key}",
         f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={logs[0]}",
         f"--seed-file={munge_dir / 'seed'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
    _wait_for(socket_path.exists, 20, "munged's socket", logs)
    daemons.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
    daemons.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))

    def idle() -> bool:
      out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
      return out.stdout.strip() == "idle"

    _wait_for(idle, 60, "the node to be idle in sinfo", logs)
    yield env
  finally:
    if len(daemons) == 3:  # jobs of this private cluster left by a failed test
      jobs = subprocess.run(["squeue", "-h", "-o", "%A"], env=env, capture_output=True,
                            text=True).stdout.split()
      if jobs:
        subprocess.run(["scancel", *jobs], env=env, capture_output=True)
        time.sleep(5)
    for process in reversed(daemons):
      _stop(process)


def test_demo_sweep_runs_on_slurm(slurm_cluster, tmp_path, trainer_env):
  # One CPU device per trainer process (not conftest's 8): the two srun tasks
  # of each array task form a 2-process, 2-device JAX job.
  env = {**trainer_env, "SLURM_CONF": slurm_cluster["SLURM_CONF"]}
  root = tmp_path / "demo_slurm"
  submit = subprocess.run(
      [sys.executable, "-m", "gsq_jax.sweeps.launch", str(REPO / "sweeps" / "demo.py"), "--tiny",
       "--backend", "slurm", "--site", str(REPO / "sweeps" / "sites" / "local_slurm.yaml"),
       "--root", str(root), "--wait",
       # Training only: two processes per run already double the CPU work; the
       # final evaluation of the demo runs is checked in test_sweeps.py.
       "--set", "train.final_eval=False"],
      env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
  logs = "\n".join(f"--- {p}:\n{p.read_text()[-3000:]}" for p in sorted(root.rglob("*.out"))
                   + sorted(root.rglob("train.log")))
  assert submit.returncode == 0, submit.stdout + submit.stderr + logs
  assert "#SBATCH" not in submit.stdout and "submitted array job" in submit.stdout
  script = next((root / "slurm").glob("*.sbatch")).read_text()
  assert "#SBATCH --array=0-" in script and "#SBATCH --ntasks-per-node=2" in script
  assert '--index "$SLURM_ARRAY_TASK_ID"' in script

  points = grid.expand(grid.load_sweep(REPO / "sweeps" / "demo.py"), tiny=True).points
  for point in points:
    workdir = root / point.name
    status = runner.read_status(workdir)
    assert status["state"] == runner.DONE, (point.name, status, logs)
    assert status["num_devices"] == 2  # SLURM_NTASKS of the array task
    first = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["num_processes"] == 2 and first["num_devices"] == 2, first  # a 2-process JAX run
  collected = subprocess.run([sys.executable, "-m", "gsq_jax.sweeps.collect", str(root)],
                             env=env, capture_output=True, text=True, timeout=300)
  assert collected.returncode == 0, collected.stderr
  df = load_table(root / "tables" / "demo_tiny.csv")
  assert sorted(df["run"]) == sorted(p.name for p in points)
  assert (df["status"] == "done").all()
  assert (df["steps"] == 4).all() and df["params"].notna().all() and df["wall_time_s"].notna().all()
