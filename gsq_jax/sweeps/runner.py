"""One attempt of one run: lock, status file, trainer process, exit-code meaning.

Shared by both back ends: the local launcher starts attempts itself; a SLURM
array task runs `python -m gsq_jax.sweeps.runner --manifest M --index
$SLURM_ARRAY_TASK_ID -- srun ...`, which reads its record from the manifest,
runs the trainer under `srun`, records the outcome and requeues itself after a
preemption or a retryable failure.

Per-run files the launcher owns (the trainer owns config.json, metrics.jsonl,
checkpoints/, eval.json, DONE and FAILED):

  WORKDIR/status.json   {"state": pending|running|done|failed|interrupted,
                         "reason", "failures", "starts", "wall_time_s",
                         "history": [one entry per attempt], ...}
  WORKDIR/train.log     the trainer's stdout and stderr, appended per attempt
  WORKDIR/.lock         flock held by the trainer process while it runs, so a
                        restarted launcher never starts a second trainer on a
                        workdir whose orphaned trainer is still saving
                        (gsq_jax/training/workdir.py; the trainer inherits it)

Outcome of an attempt (the trainer's exit codes are in the API contract):
  DONE present                -> done
  exit 75 / stopped by signal -> interrupted: resumes from its checkpoint, not
                                 counted as a failure
  FAILED present (e.g. NaN)   -> failed, with the trainer's reason
  other non-zero exit / death -> failed, "exit code N: <last log line>"
  time-out                    -> failed, "time-out after S s"
A failed run is retried (resuming from its last checkpoint) until it has
failed `max_retries + 1` times.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from gsq_jax.sweeps import manifest as manifest_lib
from gsq_jax.training.workdir import HOLDER_ENV, LOCK_NAME, RunLock, is_locked
from gsq_jax.utils import compilation_cache
from gsq_jax.utils import files

STATUS_NAME = "status.json"
LOG_NAME = "train.log"
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the trainer saved a checkpoint on SIGTERM/SIGUSR1

PENDING, RUNNING, DONE, FAILED, INTERRUPTED = "pending", "running", "done", "failed", "interrupted"


def _now() -> float:
  return time.time()


def read_status(workdir: str | os.PathLike) -> dict[str, Any]:
  """The run's status.json, or a fresh `pending` status."""
  status = manifest_lib.read_json(pathlib.Path(workdir) / STATUS_NAME)
  if not isinstance(status, dict):
    status = {}
  status.setdefault("state", PENDING)
  status.setdefault("reason", "")
  status.setdefault("failures", 0)
  status.setdefault("starts", 0)
  status.setdefault("wall_time_s", 0.0)
  status.setdefault("history", [])
  return status


def write_status(workdir: str | os.PathLike, status: Mapping[str, Any]) -> None:
  files.atomic_write_json(pathlib.Path(workdir) / STATUS_NAME, dict(status))


def current_state(workdir: str | os.PathLike) -> tuple[str, dict[str, Any]]:
  """The run's state, read from its files.

  DONE wins over everything; a `running` status whose lock nobody holds is an
  attempt that died with its launcher, i.e. `interrupted`.
  """
  workdir = pathlib.Path(workdir)
  status = read_status(workdir)
  if (workdir / "DONE").exists():
    return DONE, status
  state = status["state"]
  if state == DONE:  # status says done but DONE vanished: run it again
    state = PENDING
  if state == RUNNING and not is_locked(workdir):
    state = INTERRUPTED
  return state, status


def settle_done(workdir: str | os.PathLike) -> None:
  """Records DONE in the status when the trainer finished but its launcher died first.

  The attempt's time runs from its recorded start to the DONE file's mtime.
  """
  workdir = pathlib.Path(workdir)
  status = read_status(workdir)
  if status["state"] == DONE or not (workdir / "DONE").exists():
    return
  ended = (workdir / "DONE").stat().st_mtime
  started = status.get("started")
  if status["state"] == RUNNING and isinstance(started, (int, float)) and ended >= started:
    elapsed = ended - started
    status["wall_time_s"] = round(float(status["wall_time_s"]) + elapsed, 3)
    status["history"].append({
        "start": started, "end": ended, "returncode": None, "state": DONE,
        "reason": "finished while its launcher was gone", "host": status.get("host"),
        "device_seconds": round(elapsed * int(status.get("num_devices") or 1), 3)})
  status.update(state=DONE, reason="")
  write_status(workdir, status)


def gave_up(status: Mapping[str, Any], max_retries: int) -> bool:
  """True once a run has failed more than `max_retries` times."""
  return status["failures"] > max_retries


def _set_parent_death_signal() -> None:
  """preexec_fn: the trainer gets SIGTERM (checkpoint + exit 75) if its launcher dies."""
  with contextlib.suppress(Exception):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def _last_line(path: pathlib.Path, offset: int) -> str:
  """The last non-empty line the attempt wrote to its log (from `offset` on)."""
  try:
    with open(path, "rb") as f:
      f.seek(max(offset, os.path.getsize(path) - 65536))
      text = f.read().decode("utf-8", "replace")
  except OSError:
    return ""
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[-1][:300] if lines else ""


@dataclasses.dataclass
class Attempt:
  """A started trainer process of one run."""
  workdir: pathlib.Path
  process: subprocess.Popen
  started: float
  log_offset: int
  deadline: float | None = None
  stop_reason: str | None = None  # set when we stopped it (launcher exit, time-out)

  def poll(self) -> int | None:
    return self.process.poll()

  def stop(self, reason: str, sig: int = signal.SIGTERM) -> None:
    """Asks the trainer to checkpoint and exit (it exits 75)."""
    if self.stop_reason is None:
      self.stop_reason = reason
    with contextlib.suppress(ProcessLookupError):
      self.process.send_signal(sig)

  def check_deadline(self, grace_s: float = 120.0) -> None:
    """Past the deadline: SIGTERM (checkpoint and exit), SIGKILL after `grace_s`."""
    if self.deadline is None or self.process.poll() is not None:
      return
    now = _now()
    if now > self.deadline and self.stop_reason is None:
      self.stop(f"time-out after {self.deadline - self.started:.0f} s (stopped with SIGTERM; "
                "resumes from its checkpoint on retry)")
    elif now > self.deadline + grace_s:
      self.process.kill()


def start_attempt(workdir: str | os.PathLike, command: Sequence[str], *,
                  env: Mapping[str, str] | None = None, cwd: str | None = None,
                  devices: str = "", num_devices: int = 1, timeout_s: float | None = None,
                  die_with_parent: bool = True) -> Attempt | None:
  """Locks the run, records the start and launches `command` (None if locked).

  A stale FAILED file of an earlier attempt is removed (its reason stays in
  the status history), so the retry's outcome is judged on its own.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  lock = RunLock(workdir)
  if not lock.acquire():
    return None
  try:
    with contextlib.suppress(FileNotFoundError):
      (workdir / "FAILED").unlink()
    status = read_status(workdir)
    status.update(state=RUNNING, reason="", starts=status["starts"] + 1, host=socket.gethostname(),
                  started=_now(), devices=devices, num_devices=num_devices,
                  command=list(command))
    write_status(workdir, status)
    log_path = workdir / LOG_NAME
    log = open(log_path, "ab")  # pylint: disable=consider-using-with
    offset = log.tell()
    log.write(f"\n==== attempt {status['starts']} on {status['host']} at "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(command)}\n".encode())
    log.flush()
    process = subprocess.Popen(  # pylint: disable=consider-using-with,subprocess-popen-preexec-fn
        list(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**(os.environ if env is None else env), HOLDER_ENV: lock.holder()},
        cwd=cwd, pass_fds=(lock.fd,),
        # Own session: a Ctrl-C in the launcher's terminal reaches only the
        # launcher, which asks the trainers to checkpoint (SIGTERM).
        start_new_session=True,
        preexec_fn=_set_parent_death_signal if die_with_parent else None)
    log.close()
  finally:
    lock.release()
  started = status["started"]
  return Attempt(workdir=workdir, process=process, started=started, log_offset=offset,
                 deadline=None if not timeout_s else started + timeout_s)


def finish_attempt(attempt: Attempt, returncode: int) -> dict[str, Any]:
  """Classifies the ended attempt, updates and returns the status."""
  workdir = attempt.workdir
  status = read_status(workdir)
  ended = _now()
  elapsed = ended - attempt.started
  failed_file = manifest_lib.read_json(workdir / "FAILED")
  if (workdir / "DONE").exists():
    state, reason = DONE, ""
  elif attempt.stop_reason and attempt.stop_reason.startswith("time-out"):
    state, reason = FAILED, attempt.stop_reason
  elif returncode == EXIT_PREEMPTED:
    state = INTERRUPTED
    reason = attempt.stop_reason or "preempted (exit 75): checkpoint saved, resumes on next start"
  elif isinstance(failed_file, dict) or (workdir / "FAILED").exists():
    state = FAILED
    reason = str((failed_file or {}).get("reason") or "trainer wrote FAILED")
  elif attempt.stop_reason:
    state, reason = INTERRUPTED, f"{attempt.stop_reason} (exit code {returncode})"
  elif returncode == 0:
    state, reason = FAILED, "trainer exited 0 without writing DONE"
  else:
    if returncode < 0:
      try:
        what = f"killed by {signal.Signals(-returncode).name}"
      except ValueError:
        what = f"killed by signal {-returncode}"
    else:
      what = f"exit code {returncode}"
    last = _last_line(workdir / LOG_NAME, attempt.log_offset)
    state, reason = FAILED, f"crashed ({what})" + (f": {last}" if last else "")
  status.update(state=state, reason=reason, ended=ended, returncode=returncode,
                wall_time_s=round(float(status["wall_time_s"]) + elapsed, 3))
  if state == FAILED:
    status["failures"] += 1
  status["history"].append({
      "start": attempt.started, "end": ended, "returncode": returncode, "state": state,
      "reason": reason, "host": status.get("host"),
      "device_seconds": round(elapsed * int(status.get("num_devices") or 1), 3)})
  write_status(workdir, status)
  return status


def _last_metrics_row(path: pathlib.Path, tail_bytes: int = 16384) -> dict[str, Any] | None:
  """The newest complete row of a metrics.jsonl with a loss (a partial last line is skipped)."""
  try:
    with open(path, "rb") as f:
      f.seek(max(0, os.path.getsize(path) - tail_bytes))
      lines = f.read().decode("utf-8", "replace").splitlines()
  except OSError:
    return None
  for line in reversed(lines):
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict) and "g_loss" in row:
      return row
  return None


def _short_duration(seconds: Any) -> str:
  try:
    seconds = int(round(float(seconds)))
  except (TypeError, ValueError, OverflowError):
    return "?"
  minutes, secs = divmod(max(seconds, 0), 60)
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress(attempt: Attempt) -> str:
  """One short phrase on where a running trainer is, read from its metrics.jsonl.

  'step 50/100, loss 0.0812, ETA 41s, 1m05s' once a log step is written
  (the trainer's `progress` and `eta_sec` columns); before that 'starting'
  with the trainer's last log message (building, compiling); after the last
  step 'evaluating'.
  """
  elapsed = _short_duration(_now() - attempt.started)
  row = _last_metrics_row(attempt.workdir / "metrics.jsonl")
  if row is None or not isinstance(row.get("step"), int) or row["step"] <= 0:
    # Before the first log step: the trainer's last log message says how far it got.
    last = _last_line(attempt.workdir / LOG_NAME, attempt.log_offset)
    last = last.split("] ", 1)[1] if "] " in last and not last.startswith("====") else ""
    last = last if len(last) <= 90 else last[:89] + "…"
    return f"starting, {elapsed}" + (f": {last}" if last else "")
  step, fraction = row["step"], row.get("progress")
  total = round(step / fraction) if isinstance(fraction, (int, float)) and fraction > 0 else None
  if total and step >= total:
    return f"step {step}/{total} done, evaluating, {elapsed}"
  loss = row.get("g_loss")
  loss = f"{loss:.4g}" if isinstance(loss, (int, float)) else str(loss)
  eta = row.get("eta_sec")
  if isinstance(eta, (int, float)):  # counted down since the row was written
    with contextlib.suppress(OSError):
      eta = max(0.0, eta - (_now() - (attempt.workdir / "metrics.jsonl").stat().st_mtime))
  return (f"step {step}{f'/{total}' if total else ''}, loss {loss}, "
          f"ETA {_short_duration(eta)}, {elapsed}")


def wait_attempt(attempt: Attempt, *, poll_s: float = 0.5) -> int:
  """Waits for the trainer, enforcing the attempt's deadline."""
  while (returncode := attempt.poll()) is None:
    attempt.check_deadline()
    time.sleep(poll_s)
  return returncode


# ---------------------------------------------------------------------------
# SLURM array task
# ---------------------------------------------------------------------------


def _requeue(job_id: str | None) -> bool:
  """`scontrol requeue` this array task (its own SLURM_JOB_ID)."""
  if not job_id:
    return False
  result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True,
                          check=False)
  if result.returncode:
    print(f"gsq-sweep task: scontrol requeue {job_id} failed: {result.stderr.strip()}",
          file=sys.stderr)
  return result.returncode == 0


def coordinator_env(suffix: str) -> dict[str, str]:
  """JAX_COORDINATOR_ADDRESS from the job's first host plus a site suffix (JSC: 'i').

  JAX's SLURM detection uses the bare first hostname; sites whose fast
  network has its own hostnames (JSC: `<host>i`) set `coordinator_suffix`.
  The port is the one JAX would derive from the job id.
  """
  if not suffix:
    return {}
  nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
  result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                          text=True, check=False)
  hosts = result.stdout.split()
  if not hosts:
    return {}
  port = int(os.environ.get("SLURM_JOB_ID", "0")) % 2**12 + (65535 - 2**12 + 1)
  return {"JAX_COORDINATOR_ADDRESS": f"{hosts[0]}{suffix}:{port}"}


def compile_cache_env(root: str | os.PathLike, env: Mapping[str, str]) -> dict[str, str]:
  """JAX's persistent compilation cache in ROOT/.jax_cache unless the environment names one.

  Shared by a sweep's runs, so a resumed, retried or requeued run (and runs
  of equal shapes) skip recompiling: minutes per restart at paper scale. The
  trainer turns the cache on (gsq_jax/utils/compilation_cache.py); a set
  $GSQ_JAX_CACHE_DIR (a directory or "off") is left to it.
  """
  if "JAX_COMPILATION_CACHE_DIR" in env or compilation_cache.ENV_DIR in env:
    return {}
  return {"JAX_COMPILATION_CACHE_DIR": str(pathlib.Path(root) / ".jax_cache")}


def _slurm_devices() -> int:
  """Accelerators of this allocation (GPUs, else the task count) for device-hours."""
  env = os.environ
  nodes = int(env.get("SLURM_JOB_NUM_NODES", "1") or 1)
  gpus = env.get("SLURM_GPUS_ON_NODE", "")
  if gpus.isdigit() and int(gpus):
    return nodes * int(gpus)
  tasks = env.get("SLURM_NTASKS", "")
  return int(tasks) if tasks.isdigit() else nodes


def run_array_task(manifest_path: str, index: int, launcher: Sequence[str], *,
                   coordinator_suffix: str = "") -> int:
  """Runs manifest run `index` once under `launcher` (e.g. srun ...) and records it.

  Preempted (USR1/TERM from SLURM, exit 75) and retryable failures requeue
  the task; the runs of other tasks are never affected. Returns 0 unless the
  task itself could not run (bad manifest/index).
  """
  sweep = manifest_lib.read_manifest(manifest_path)
  record = sweep.run(index)
  workdir = pathlib.Path(record.workdir)
  state, status = current_state(workdir)
  tag = f"gsq-sweep task {index} ({record.name})"
  if state == DONE:
    print(f"{tag}: already done")
    settle_done(workdir)
    return 0
  if state == FAILED and gave_up(status, sweep.max_retries):
    print(f"{tag}: gave up after {status['failures']} failures: {status['reason']}")
    return 0
  env = {**os.environ, **coordinator_env(coordinator_suffix)}
  env.update(compile_cache_env(sweep.root, env))
  command = [*launcher, sweep.python, *record.train_args]
  attempt = start_attempt(workdir, command, env=env, cwd=sweep.project_root,
                          devices=os.environ.get("SLURM_JOB_NODELIST", ""),
                          num_devices=_slurm_devices(),
                          die_with_parent=False)
  if attempt is None:
    print(f"{tag}: another process holds {workdir / LOCK_NAME}; not starting a second trainer")
    return 0

  def forward(signum, frame):  # SLURM's --signal=B:USR1@T reaches this batch process
    del frame
    attempt.stop(f"preempted by {signal.Signals(signum).name}", signum)

  for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, forward)
  print(f"{tag}: starting attempt {read_status(workdir)['starts']}: {' '.join(command)}",
        flush=True)
  status = finish_attempt(attempt, wait_attempt(attempt))
  print(f"{tag}: {status['state']} {status['reason']}".rstrip(), flush=True)
  job_id = os.environ.get("SLURM_JOB_ID")
  if status["state"] == INTERRUPTED or (status["state"] == FAILED
                                        and not gave_up(status, sweep.max_retries)):
    if _requeue(job_id):
      print(f"{tag}: requeued job {job_id}", flush=True)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m gsq_jax.sweeps.runner",
      description="SLURM array task: run manifest record INDEX under LAUNCHER (e.g. srun).")
  parser.add_argument("--manifest", required=True, help="ROOT/sweep.json")
  parser.add_argument("--index", type=int, default=None,
                      help="run index (default: $SLURM_ARRAY_TASK_ID)")
  parser.add_argument("--coordinator-suffix", default="",
                      help="append to the first hostname for JAX_COORDINATOR_ADDRESS (JSC: i)")
  parser.add_argument("launcher", nargs=argparse.REMAINDER,
                      help="-- followed by the launcher prefix, e.g. -- srun --kill-on-bad-exit=1")
  args = parser.parse_args(argv)
  launcher = list(args.launcher)
  if launcher[:1] == ["--"]:
    launcher = launcher[1:]
  index = args.index
  if index is None:
    task_id = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task_id is None:
      parser.error("--index not given and SLURM_ARRAY_TASK_ID is not set")
    index = int(task_id)
  return run_array_task(args.manifest, index, launcher, coordinator_suffix=args.coordinator_suffix)


if __name__ == "__main__":
  sys.exit(main())
