"""`gsq-sweep`: expand a sweep file, validate it, write the manifest and run it.

  gsq-sweep sweeps/NAME.py [--tiny] [--backend local|slurm] [--jobs N] [--dry-run]
            [--root DIR] [--site FILE] [--max-retries K] [--set BLOCK.FIELD=VALUE ...]

Every grid point is validated before anything starts; invalid points are
listed with their reason and nothing is launched (`--skip-invalid` launches
the valid ones). Runs get deterministic names and workdirs ROOT/NAME (ROOT
defaults to runs/NAME, runs/NAME_tiny with --tiny), so launching the same
sweep again skips finished runs (DONE), resumes interrupted ones from their
checkpoints and retries failed ones until they have failed K + 1 times.

Back ends:
  local  N runs at a time; with GPUs each run gets one (CUDA_VISIBLE_DEVICES),
         otherwise they share the CPU. Failures are recorded per run and never
         stop the others. Ctrl-C / SIGTERM asks the trainers to checkpoint
         (they exit 75) and the next launch resumes them.
  slurm  one `sbatch --array=...%K` job array over the manifest (see
         gsq_jax.sweeps.slurm); --dry-run prints the script instead.

Exit status: 0 all runs done (or submitted), 1 some run failed or was
interrupted, 2 invalid sweep/arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from gsq_jax.sweeps import grid
from gsq_jax.planning import cli as planning_cli
from gsq_jax.planning import targets as targets_lib
from gsq_jax.sweeps import manifest as manifest_lib
from gsq_jax.sweeps import runner
from gsq_jax.sweeps import sites as sites_lib
from gsq_jax.sweeps import slurm

_MAX_PREEMPTIONS = 20  # local requeues of one run after exit 75 within one launch


def _log(message: str) -> None:
  print(f"[gsq-sweep {time.strftime('%H:%M:%S')}] {message}", flush=True)


def visible_gpus(site: sites_lib.Site) -> list[str]:
  """GPU ids for the local back end: the site's, CUDA_VISIBLE_DEVICES, or nvidia-smi's."""
  if site.gpus is not None:
    return [str(g) for g in site.gpus]
  env = os.environ.get("CUDA_VISIBLE_DEVICES")
  if env is not None:
    return [g for g in env.split(",") if g.strip() and g.strip() != "-1"]
  if shutil.which("nvidia-smi") is None:
    return []
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30,
                         check=False).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def _plan(sweep: manifest_lib.Manifest) -> list[int]:
  """Indices of runs that still need to run; reports the others."""
  todo = []
  for record in sweep.runs:
    state, status = runner.current_state(record.workdir)
    if state == runner.DONE:
      runner.settle_done(record.workdir)
      _log(f"skip {record.name}: done")
    elif state == runner.FAILED and runner.gave_up(status, sweep.max_retries):
      _log(f"skip {record.name}: failed {status['failures']} time(s), max retries "
           f"{sweep.max_retries} reached: {status['reason']}")
    else:
      if state in (runner.INTERRUPTED, runner.FAILED, runner.RUNNING):
        _log(f"{record.name}: {state} before ({status['reason'] or 'no reason recorded'}), "
             "will resume")
      todo.append(record.index)
  return todo


class _Shutdown:
  """SIGINT/SIGTERM handler state of the local back end."""

  def __init__(self):
    self.count = 0

  @property
  def requested(self) -> bool:
    return self.count > 0

  @property
  def forced(self) -> bool:
    return self.count > 1

  def __call__(self, signum, frame):
    del frame
    self.count += 1
    if self.count == 1:
      _log(f"{signal.Signals(signum).name}: stopping the running trainers (they checkpoint and "
           "exit 75); launch again to resume. Repeat to kill them at once.")


def _report_progress(sweep: manifest_lib.Manifest,
                     running: dict[int, tuple[runner.Attempt, str | None]]) -> None:
  """One console line per running trainer: step, loss, ETA (from its metrics.jsonl)."""
  for index, (attempt, _) in sorted(running.items()):
    _log(f"  {sweep.run(index).name}: {runner.progress(attempt)}")


def run_local(sweep: manifest_lib.Manifest, site: sites_lib.Site, *, jobs: int | None,
              timeout_s: float | None, progress_every_s: float = 15.0) -> int:
  """Runs the manifest's pending runs, `jobs` at a time; returns the exit status.

  Every `progress_every_s` seconds (0 = never) it prints where each running
  trainer is; their full logs are WORKDIR/train.log.
  """
  gpus = visible_gpus(site)
  jobs = jobs or site.jobs or max(len(gpus), 1)
  if gpus and jobs > len(gpus):
    _log(f"--jobs {jobs} > {len(gpus)} GPUs: running {len(gpus)} at a time (one GPU per run)")
    jobs = len(gpus)
  queue = _plan(sweep)
  device = f"{len(gpus)} GPU(s) {gpus}" if gpus else "CPU"
  _log(f"local back end: {len(queue)} of {len(sweep.runs)} runs to do, {jobs} at a time on "
       f"{device}")
  base_env = {**os.environ, **site.env}
  base_env.update(runner.compile_cache_env(sweep.root, base_env))
  free_gpus = list(gpus)
  running: dict[int, tuple[runner.Attempt, str | None]] = {}
  waiting: dict[int, float] = {}  # run -> next time to look at its lock (orphaned trainer)
  preemptions: dict[int, int] = {}
  locked: set[int] = set()
  next_report = time.time() + progress_every_s
  stop = _Shutdown()
  previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    while queue or running or waiting:
      if stop.requested:
        for attempt, _ in running.values():
          attempt.stop("launcher stopped")
          if stop.forced:
            attempt.process.kill()
        queue.clear()
        waiting.clear()
      now = time.time()
      for index, when in list(waiting.items()):
        if when <= now:
          del waiting[index]
          queue.insert(0, index)
      while queue and len(running) < jobs and not stop.requested:
        index = queue.pop(0)
        record = sweep.run(index)
        if runner.current_state(record.workdir)[0] == runner.DONE:
          runner.settle_done(record.workdir)  # e.g. an orphaned trainer finished meanwhile
          _log(f"skip {record.name}: done")
          continue
        gpu = free_gpus.pop(0) if gpus else None
        env = dict(base_env)
        if gpu is not None:
          env["CUDA_VISIBLE_DEVICES"] = gpu
        resumed = " (resuming)" if (pathlib.Path(record.workdir) / "checkpoints").exists() else ""
        attempt = runner.start_attempt(
            record.workdir, [sweep.python, *record.train_args], env=env, cwd=sweep.project_root,
            devices=f"gpu:{gpu}" if gpu is not None else "cpu", timeout_s=timeout_s)
        if attempt is None:
          if index not in locked:
            _log(f"{record.name}: an earlier trainer still holds its lock; waiting for it")
            locked.add(index)
          waiting[index] = time.time() + 2.0
          if gpu is not None:
            free_gpus.insert(0, gpu)
          continue
        running[index] = (attempt, gpu)
        _log(f"start {record.name}{resumed} on {f'GPU {gpu}' if gpu is not None else 'CPU'} "
             f"-> {record.workdir} (log: train.log there)")
      for index, (attempt, gpu) in list(running.items()):
        returncode = attempt.poll()
        if returncode is None:
          attempt.check_deadline()
          continue
        del running[index]
        if gpu is not None:
          free_gpus.append(gpu)
        record = sweep.run(index)
        status = runner.finish_attempt(attempt, returncode)
        detail = f": {status['reason']}" if status["reason"] else ""
        _log(f"{status['state']} {record.name} after {time.time() - attempt.started:.0f} s{detail}")
        if stop.requested:
          continue
        if status["state"] == runner.INTERRUPTED:
          preemptions[index] = preemptions.get(index, 0) + 1
          if preemptions[index] <= _MAX_PREEMPTIONS:
            queue.insert(0, index)
        elif status["state"] == runner.FAILED and not runner.gave_up(status, sweep.max_retries):
          _log(f"retry {record.name} later (failure {status['failures']} of at most "
               f"{sweep.max_retries + 1})")
          queue.append(index)
      if progress_every_s and running and time.time() >= next_report:
        _report_progress(sweep, running)
        next_report += progress_every_s  # a fixed cadence, no drift
        if next_report <= time.time():  # e.g. after a stretch with nothing running
          next_report = time.time() + progress_every_s
      time.sleep(0.2)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  return _summary(sweep, interrupted=stop.requested)


def _summary(sweep: manifest_lib.Manifest, *, interrupted: bool = False) -> int:
  counts: dict[str, list[str]] = {}
  for record in sweep.runs:
    state, _ = runner.current_state(record.workdir)
    counts.setdefault(state, []).append(record.name)
  parts = [f"{len(names)} {state}" for state, names in sorted(counts.items())]
  _log(f"sweep {sweep.sweep}: {', '.join(parts)} (root {sweep.root}); tables: gsq-collect "
       f"{sweep.root}")
  for name in counts.get(runner.FAILED, []):
    status = runner.read_status(pathlib.Path(sweep.root) / name)
    _log(f"  failed {name}: {status['reason']}")
  if interrupted:
    return 130
  return 0 if set(counts) == {runner.DONE} else 1


def run_slurm(sweep: manifest_lib.Manifest, site: sites_lib.Site, *, jobs: int | None,
              dry_run: bool, wait: bool) -> int:
  """Writes (and unless dry-run submits) the job array of the pending runs."""
  todo = _plan(sweep) if not dry_run else [r.index for r in sweep.runs
                                            if runner.current_state(r.workdir)[0] != runner.DONE]
  if not todo:
    _log("nothing to submit: every run is done or has given up")
    return _summary(sweep)
  script = slurm.array_script(sweep, site, todo, max_concurrent=jobs)
  if dry_run:
    print(f"# would write {slurm.script_path(sweep)} and run: sbatch --parsable "
          f"{slurm.script_path(sweep)}")
    print(script)
    return 0
  still = slurm.active_jobs(sweep.slurm_jobs)
  if still:
    _log(f"array job(s) {still} of an earlier submission are still queued or running; wait for "
         f"them or scancel them, then launch again")
    return 2
  slurm.log_dir(sweep).mkdir(parents=True, exist_ok=True)
  path = slurm.write_script(sweep, script)
  job_id = slurm.submit(path)
  sweep.slurm_jobs.append(job_id)
  sweep.write()
  spec = slurm.array_spec(todo, jobs or site.max_concurrent)
  _log(f"submitted array job {job_id}: {len(todo)} runs ({spec}), script {path}, logs "
       f"{slurm.log_dir(sweep)}/{job_id}_*.out")
  if not wait:
    return 0
  _log(f"waiting for array job {job_id} (squeue)")
  slurm.wait(job_id)
  return _summary(sweep)


def _check_workdirs(sweep: manifest_lib.Manifest) -> list[grid.Invalid]:
  """Runs whose workdir already holds a run of a different config."""
  problems = []
  for record in sweep.runs:
    status = runner.read_status(record.workdir)
    old = status.get("config_hash")
    if old and old != record.config_hash:
      problems.append(grid.Invalid(record.name, (
          f"{record.workdir} holds a run of another config (hash {old}, this sweep's is "
          f"{record.config_hash}); use another --root or remove that workdir")))
  return problems


def _stamp_hashes(sweep: manifest_lib.Manifest) -> None:
  for record in sweep.runs:
    status = runner.read_status(record.workdir)
    if status.get("config_hash") != record.config_hash:
      status["config_hash"] = record.config_hash
      status["name"] = record.name
      runner.write_status(record.workdir, status)


def _print_warnings(warnings: Sequence[grid.Invalid]) -> None:
  """Missing files found by a dry run, one line per distinct reason."""
  by_reason: dict[str, list[str]] = {}
  for warning in warnings:
    by_reason.setdefault(warning.reason, []).append(warning.name)
  for reason, names in by_reason.items():
    who = names[0] if len(names) == 1 else f"{len(names)} points ({names[0]}, ...)"
    print(f"warning: {who}: {reason}\n  (a real launch refuses these points until the file "
          "is there; pass its path with --set or the site file's overrides)", file=sys.stderr)


def _sweep_root(args: argparse.Namespace, site: sites_lib.Site,
                sweep_file: grid.SweepFile) -> pathlib.Path:
  """--root, else the site's root, else runs/NAME[_tiny]."""
  if args.root:
    return pathlib.Path(args.root)
  if site.root:
    return pathlib.Path(site.root) / (sweep_file.name + ("_tiny" if args.tiny else ""))
  return manifest_lib.default_root(sweep_file.name, args.tiny)


def plan_sweep(sweep_file: grid.SweepFile, args: argparse.Namespace, overrides: dict,
               site: sites_lib.Site) -> int:
  """`--plan`: every valid point planned for --target; the table, ROOT/plan.{csv,json}."""
  try:
    targets = planning_cli.check_plan_arguments(args)
  except (ValueError, targets_lib.ToolchainMissing) as err:
    print(f"gsq-sweep: {err}", file=sys.stderr)
    return 2
  targets_lib.configure_host_for_deviceless()  # before anything starts a JAX backend
  from gsq_jax.planning import report as plan_report  # pylint: disable=import-outside-toplevel
  expansion = grid.expand(sweep_file, tiny=args.tiny, overrides=overrides,
                          num_devices=targets[0].num_devices, process_count=1,
                          missing_files_ok=True, full_check=False)
  _print_warnings(expansion.warnings)
  for problem in expansion.invalid:
    print(f"  invalid, not planned: {problem}", file=sys.stderr)
  root = _sweep_root(args, site, sweep_file)
  configs = [(p.name, grid.resolve_config(p)) for p in expansion.points]
  _log(f"planning {len(configs)} point(s) of {sweep_file.name} for {', '.join(args.target)}")
  done = []

  def on_plan(p) -> None:  # plan.csv / plan.json grow point by point (hours at paper scale)
    done.append(p)
    plan_report.write(done, str(root))
    _log(f"{p.label}: {(p.alternative or p).device_hours_at_mfu:.1f} device-hours, fits "
         f"{p.fits}{' (' + p.fix + ')' if p.fix else ''}")

  try:
    plans = planning_cli.plan_configs(configs, args, on_plan=on_plan)
  except (ValueError, targets_lib.ToolchainMissing) as err:
    print(f"gsq-sweep: {err}", file=sys.stderr)
    return 2
  print(plan_report.format_table(plans))
  for path in plan_report.write(plans, str(root)):
    print(f"wrote {path}")
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="gsq-sweep", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("sweep_file", help="sweeps/NAME.py with a sweep(add) function")
  parser.add_argument("--tiny", action="store_true",
                      help="the sweep's CPU-sized variant (sweep(add, tiny=True), TINY_CONFIG, "
                           "TINY_OVERRIDES)")
  parser.add_argument("--backend", choices=("local", "slurm"), default="local")
  parser.add_argument("--jobs", type=int, default=None,
                      help="local: runs at a time (default one per GPU, else 1); slurm: array "
                           "concurrency %%K (default the site's max_concurrent)")
  parser.add_argument("--dry-run", action="store_true",
                      help="validate and print what would run / be submitted; start nothing")
  parser.add_argument("--root", default=None,
                      help="sweep folder (default: the site's root, else runs/NAME[_tiny])")
  parser.add_argument("--site", default=None, help="site profile YAML (sweeps/sites/*.yaml)")
  parser.add_argument("--max-retries", type=int, default=1,
                      help="re-attempts of a failed run (default 1)")
  parser.add_argument("--set", action="append", default=[], metavar="BLOCK.FIELD=VALUE",
                      help="config override for every run, e.g. --set train.total_steps=4")
  parser.add_argument("--skip-invalid", action="store_true",
                      help="launch the valid points even if some are invalid")
  parser.add_argument("--fast-check", action="store_true",
                      help="skip the trainer's own validate_config per point (it builds each "
                           "model abstractly, ~1 s per point); structure, config resolution "
                           "and the model block are still checked")
  parser.add_argument("--progress-every", type=float, default=15.0, metavar="SECONDS",
                      help="local: print each running run's step, loss and ETA this often "
                           "(default 15; 0 = only starts and ends)")
  parser.add_argument("--run-timeout", type=float, default=None, metavar="SECONDS",
                      help="local: stop a run after this long (checkpoint, counted as failure)")
  parser.add_argument("--plan", action="store_true",
                      help="compile every point for --target on this host instead of running "
                      "it (gsq-plan): memory, fit, FLOPs, device-hours; writes ROOT/plan.csv")
  planning_cli.add_plan_arguments(parser)
  parser.add_argument("--wait", action="store_true",
                      help="slurm: block until the array job has finished, then summarise")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    if args.jobs is not None and args.jobs < 1:
      raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if args.max_retries < 0:
      raise ValueError(f"--max-retries must be >= 0, got {args.max_retries}")
    site = sites_lib.load_site(args.site)
    if args.backend == "slurm" and args.site is None:
      _log("no --site given: submitting with the cluster's defaults (no account/partition)")
    sweep_file = grid.load_sweep(args.sweep_file)
    overrides = {**site.overrides, **grid.parse_set(args.set)}
  except ValueError as err:
    print(f"gsq-sweep: {err}", file=sys.stderr)
    return 2
  if args.plan:
    return plan_sweep(sweep_file, args, overrides, site)
  if args.backend == "slurm":
    process_count = site.nodes * site.tasks_per_node
    num_devices = site.nodes * (site.gpus_per_node or site.tasks_per_node)
  else:
    process_count = num_devices = 1
  expansion = grid.expand(sweep_file, tiny=args.tiny, overrides=overrides,
                          num_devices=num_devices, process_count=process_count,
                          missing_files_ok=args.dry_run, full_check=not args.fast_check)
  _print_warnings(expansion.warnings)
  root = _sweep_root(args, site, sweep_file)
  sweep = manifest_lib.build_manifest(sweep_file, expansion, root=root, tiny=args.tiny,
                                      max_retries=args.max_retries, python=site.python)
  invalid = list(expansion.invalid) + _check_workdirs(sweep)
  _log(f"sweep {sweep_file.name}{' (tiny)' if args.tiny else ''}: {len(expansion.points)} valid "
       f"point(s), {len(invalid)} invalid; root {sweep.root}")
  if invalid:
    print(f"invalid grid points ({len(invalid)}), not launched:", file=sys.stderr)
    for problem in invalid:
      print(f"  {problem}", file=sys.stderr)
    if not args.skip_invalid or not expansion.points:
      print("gsq-sweep: nothing started; fix the sweep or pass --skip-invalid", file=sys.stderr)
      return 2
    bad = {p.name for p in invalid}
    sweep.runs = [r for r in sweep.runs if r.name not in bad]
    sweep.runs = [dataclasses.replace(r, index=i) for i, r in enumerate(sweep.runs)]
  if args.dry_run:
    print(f"# dry run, nothing written (a launch writes the manifest {sweep.path}); git "
          f"{sweep.git_commit}, {len(sweep.runs)} runs:")
    print(grid.describe(expansion.points))
  else:
    old = manifest_lib.read_json(sweep.path)
    if isinstance(old, dict):
      sweep.slurm_jobs = list(old.get("slurm_jobs", []))
    sweep.write()
    _stamp_hashes(sweep)
  if args.backend == "slurm":
    try:
      return run_slurm(sweep, site, jobs=args.jobs, dry_run=args.dry_run, wait=args.wait)
    except RuntimeError as err:
      print(f"gsq-sweep: {err}", file=sys.stderr)
      return 2
  if args.dry_run:
    for record in sweep.runs:
      print(" ".join([sweep.python, *record.train_args]))
    return 0
  return run_local(sweep, site, jobs=args.jobs, timeout_s=args.run_timeout,
                   progress_every_s=args.progress_every)


if __name__ == "__main__":
  sys.exit(main())
