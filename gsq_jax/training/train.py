r"""Trains a GSQ (or IBQ/VQ/FSQ/LFQ) tokenizer: `gsq-train` / `python -m gsq_jax.training.train`.

  python -m gsq_jax.training.train --config configs/gsq.py:D=16,G=4,V=4096,f=8,tiny \
      --workdir runs/gsq_tiny [--config.train.total_steps=100]

The same command runs on one CPU, one GPU node (one process per GPU) or a
multi-node SLURM / TPU allocation (`jax.distributed.initialize()` with cluster
auto-detection; `--coordinator_address` overrides, e.g. JSC's "<host>i").

Workdir (other commands rely on it; gsq_jax/training/checkpointing.py, API contract):
  config.json     resolved config, written at start, plus `environment`: package
                  versions, backend and device kind
  metrics.jsonl   one JSON line per log step (first line: D, G, V, f, params, package
                  versions, backend, device kind)
  checkpoints/    orbax: params, EMA, optimisers, D, RNG, counter, data position
  images/         labelled original / reconstruction grids every train.image_every_steps
  tensorboard/    event files: scalars, image grids, the config and run facts as text
  eval.json       final evaluation (gsq_jax.evaluation.evaluator)
  DONE            written last, when every step and the final eval are done
  FAILED          {"reason", "step"}: why the run stopped, one line, the root
                  cause first (config, data, resume, checkpoint, disk, NaN, ...);
                  "interrupted": true when a signal stopped it
  .lock           held by the running trainer (gsq_jax/training/workdir.py)
  checkpoints_unrestorable/  checkpoints a resume had to skip, with the reason logged
  restart-N/      a run started over with --force_new

Exit codes: 0 finished (or already DONE with this config), 1 failed (FAILED
written), 2 refused (the workdir is in use by another trainer, or was trained
with another config: nothing written), 75 stopped by SIGTERM/SIGUSR1/SIGINT
after saving a checkpoint (SLURM preemption / time limit / Ctrl-C: run it
again; FAILED says "interrupted"). A run started again in the same workdir
resumes from its newest checkpoint that restores, exactly: parameters end
bitwise equal to an uninterrupted run. Only `workdir.RESUMABLE` config
fields may change between its launches.

Sections: the loop (logging, images, checkpoints, preemption, evaluation) |
main. Networks and state are built by construction.py, config checks live in
run_config.py, the run's guards (signals, NaN, corrupt files) in run_guards.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
from clu import metrics as clu_metrics
from clu import parameter_overview
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from gsq_jax.training import checkpointing
from gsq_jax.training import construction
from gsq_jax.training import cli_help
from gsq_jax.data import input_pipeline
from gsq_jax.training import run_config
from gsq_jax.training import run_guards
from gsq_jax.training.run_config import paper_symbols, validate_config  # noqa: F401  (public here too)
from gsq_jax import sharding as sharding_lib
from gsq_jax.training import workdir as workdir_lib
from gsq_jax.training import writers
from gsq_jax.evaluation import evaluator
from gsq_jax.utils import compilation_cache
from gsq_jax.utils import environment
from gsq_jax.utils import quiet_logs

EXIT_OK, EXIT_FAILED, EXIT_PREEMPTED = 0, 1, 75


EXIT_REFUSED = 2  # the workdir belongs to another trainer or config; nothing was written
RunFailed = run_guards.RunFailed


# ============================================================================
# The loop.
# ============================================================================
def _metric_collection(names):
  return clu_metrics.Collection.create(
      **{k: clu_metrics.Average.from_output(k) for k in sorted(names)})


class Evaluator:
  """Runs gsq_jax.evaluation.evaluator on the EMA (or raw) weights of the state."""

  def __init__(self, run: construction.Run, config: ml_collections.ConfigDict,
               mesh: jax.sharding.Mesh):
    self._run, self._config, self._mesh = run, config, mesh
    self._models = None  # LPIPS / Inception, loaded once per run

  def __call__(self, state: dict[str, Any], out_dir: str, step: int,
               should_stop=None) -> dict[str, Any] | None:
    """The eval.json content, or None when `should_stop` interrupted it."""
    use_ema = bool(self._config.eval.use_ema)
    params = state["ema"] if use_ema else state["params"]
    tokenizer = construction.tokenizer_from_state(self._run, params)
    if self._models is None:
      self._models = evaluator.load_metric_models(self._config.eval)
    logging.info("Evaluating step %d into %s", step, out_dir)
    try:
      return evaluator.run_evaluation(tokenizer, self._config, out_dir=out_dir, mesh=self._mesh,
                                      use_ema_note=use_ema, step=step,
                                      metric_models=self._models, should_stop=should_stop)
    except evaluator.EvaluationInterrupted as e:
      logging.warning("Evaluation of step %d interrupted (%s)", step, e)
      return None


def _scalars(results: dict[str, Any], prefix: str) -> dict[str, float]:
  out = {}
  for k, v in results.items():
    if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
      out[prefix + k] = float(v)
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       force_new: bool = False) -> int:
  """Trains (resuming from `workdir` if it holds checkpoints); returns the exit code.

  The workdir is claimed first (gsq_jax/training/workdir.py): a workdir in
  use by another trainer, or trained with a different config, is refused
  (EXIT_REFUSED) before any of its files is touched. `force_new` starts over
  in a fresh subfolder instead. Every later failure writes FAILED.
  """
  workdir = _resolve_workdir(os.path.abspath(workdir), force_new)
  config_json = json.loads(config.to_json_best_effort(sort_keys=True))
  lock, refusal, changes = None, None, {}
  if jax.process_index() == 0:
    try:
      lock = workdir_lib.claim(workdir)
      changes = workdir_lib.check_relaunch(workdir, config_json)
    except workdir_lib.WorkdirRefused as e:
      refusal = str(e)
  if _any_process(refusal is not None):
    if lock is not None:
      lock.release()
    logging.error("Refused: %s", refusal or "process 0 refused the workdir (see its log)")
    return EXIT_REFUSED
  done_path = os.path.join(workdir, "DONE")
  failed_path = os.path.join(workdir, "FAILED")
  progress = run_guards.Progress()
  try:
    if os.path.exists(done_path):
      logging.info("%s exists and the config matches: the run is finished, nothing to do",
                   done_path)
      return EXIT_OK
    for key, (old, new) in changes.items():
      logging.warning("Relaunch changes %s: %s -> %s", key, old, new)
    return _train(config, workdir, done_path, failed_path, progress)
  except RunFailed as e:
    return _failed(failed_path, e.reason, e.step)
  except KeyboardInterrupt:  # Ctrl-C before the loop's handler is installed
    return _failed(failed_path, run_guards.interrupted_reason(signal.SIGINT, progress.step, False),
                   progress.step, interrupted=True)
  except Exception as e:  # pylint: disable=broad-except
    stage = progress.stage
    if isinstance(e, checkpointing.CheckpointError) and stage != "resume":
      stage = "checkpoint"
    logging.exception("Run failed during %s at step %d", stage, progress.step)
    return _failed(failed_path, run_guards.describe_failure(e, stage), progress.step)
  finally:
    if lock is not None:
      lock.release()


def _resolve_workdir(workdir: str, force_new: bool) -> str:
  """`workdir`, or with `force_new` a fresh WORKDIR/restart-N (chosen by process 0)."""
  if not force_new:
    return workdir
  fresh = workdir_lib.fresh_subfolder(workdir)
  n = int(fresh.name[len(workdir_lib.RESTART_PREFIX):]) if str(fresh) != workdir else 0
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    n = int(multihost_utils.broadcast_one_to_all(np.int32(n)))
  if n:
    workdir = os.path.join(workdir, f"{workdir_lib.RESTART_PREFIX}{n}")
    logging.warning("--force_new: starting over in %s (resume it with --workdir %s)",
                    workdir, workdir)
  return workdir


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _failed(failed_path: str, reason: str, step: int, **extra) -> int:
  """Writes FAILED {"reason", "step"} and says so last on stderr; returns EXIT_FAILED."""
  logging.error("Run failed at step %d: %s", step, reason)
  run_guards.write_json(failed_path, {"reason": reason, "step": step, **extra})
  return EXIT_FAILED


def _train(config, workdir: str, done_path: str, failed_path: str,
           progress: run_guards.Progress) -> int:
  progress.stage = "config"
  try:
    validate_config(config, num_devices=jax.device_count(), process_count=jax.process_count())
  except (ValueError, FileNotFoundError) as e:
    raise RunFailed(f"invalid config: {e}") from e
  t = config.train
  is_main = jax.process_index() == 0
  progress.stage = "start-up"
  env = environment.run_environment(jax.devices())  # recorded in config.json and metrics row 1
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(failed_path):
      os.remove(failed_path)  # a retry: the verdict of the previous attempt is stale
    # The config plus the software and devices it ran on (`environment`, not part of
    # the config: relaunch checks and `checkpointing.load_config` leave it out).
    record = {**json.loads(config.to_json_best_effort(sort_keys=True)),
              checkpointing.ENVIRONMENT_KEY: env}
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      json.dump(record, f, indent=2, sort_keys=True)
  writer = writers.MetricWriter(workdir)
  mesh = sharding_lib.make_mesh(config.mesh)
  logging.info("Building the data pipeline, networks and train state; mesh %s over %d devices "
               "in %d processes", dict(mesh.shape), jax.device_count(), jax.process_count())

  with jax.set_mesh(mesh):
    corrupt = run_guards.CorruptFiles()
    progress.stage = "data"
    try:
      data_iter = input_pipeline.make_train_iterator(
          config.data, global_batch_size=t.global_batch_size, image_size=t.image_size,
          seed=t.seed, sharding=sharding_lib.data_sharding(mesh), corrupt_counter=corrupt)
    except (ValueError, FileNotFoundError) as e:
      raise RunFailed(f"data: {e}") from e
    # The first batch, before the minutes of building and compiling: a
    # source of only corrupt or unreadable files fails here.
    try:
      pending = [next(data_iter)]
    except Exception as e:  # pylint: disable=broad-except
      raise RunFailed(run_guards.describe_failure(e, f"data ({config.data.source})")) from e
    progress.stage = "build"
    run = construction.build(config, mesh)
    state = run.state
    progress.stage = "resume"
    ckpt = checkpointing.Checkpointer(workdir, keep=t.keep_checkpoints)
    state, restored, skipped = ckpt.restore_latest(state, data_iter)
    start = int(state["step"])
    progress.step = start
    resuming = restored is not None and ckpt.has_train_state(restored)
    if resuming:
      pending = []  # the iterator now continues from the checkpoint's position
      logging.info("Resumed from the checkpoint of step %d", restored)
    elif restored is not None:
      # Imported (gsq-import) or exported weights: fine-tune them from a fresh train state.
      logging.info("Fine-tuning the weights of the weights-only checkpoint of step %d", restored)
    # Rows of steps after the checkpoint are replayed: one row per step stays.
    writer.discard_after(start if resuming else -1)
    logging.info("Compiling the train step (the first step includes it); parameters: %s",
                 ", ".join(f"{k} {v:,}" for k, v in run.num_params.items()))
    if is_main and logging.level_debug():
      logging.debug("Parameter table:\n%s", parameter_overview.get_parameter_overview(
          jax.device_get(state["params"]).to_pure_dict(), include_stats=False))
    run_info = {"num_devices": jax.device_count(), "num_processes": jax.process_count()}
    resumed = {}
    if not resuming:
      writer.write_config_text(config)
      writer.write_facts(start, {**paper_symbols(config), "num_params": run.num_params["total"],
                                 "image_size": t.image_size,
                                 "global_batch_size": t.global_batch_size,
                                 "batches_per_step": run.step_cfg.batches_per_step,
                                 **run_info, **env})
    else:  # marks the first row after a resume (its own row would repeat step `start`)
      resumed = {"resumed_from_step": start, "skipped_checkpoints": len(skipped), **run_info}

    def next_batch():
      batch = {"image": (pending.pop() if pending else next(data_iter))["image"]}
      if run.step_cfg.two_batches_per_step:
        batch["image_d"] = next(data_iter)["image"]
      return batch

    evaluate = Evaluator(run, config, mesh)

    def stop_now(signum):  # a second Ctrl-C: FAILED, then exit without cleanup
      run_guards.write_json(failed_path, {
          "reason": run_guards.interrupted_reason(signum, progress.step, saved=False),
          "step": progress.step, "interrupted": True})
      run_guards.exit_now(signum)

    watcher = run_guards.PreemptionWatcher(t.preemption_check_every_steps,
                                           on_second_interrupt=stop_now)
    watcher.install()
    nan_watch = run_guards.NonFiniteWatch()
    meter = writers.ProgressMeter(t.total_steps, t.global_batch_size, start_step=start)
    merge = collection = accumulated = None  # clu metrics, averaged between log steps
    step = start
    progress.stage = "train"
    try:
      while step < t.total_steps:
        if watcher.should_stop(step):
          ckpt.save(step, state, data_iter, wait=True)
          return _interrupted(failed_path, watcher.signal, step)
        batch = next_batch()
        images = batch["image"]
        state, metrics = run.train_step(state, run.consts, batch)
        step += 1
        progress.step = step
        if step == start + 1:  # the ETA leaves out the compiling first step
          jax.block_until_ready(metrics)
          meter.restart(step)
          logging.info("First step compiled and done after %.0f s; training to step %d",
                       meter.elapsed(), t.total_steps)
        nan_watch.add(step, metrics)
        if merge is None:  # the metric names are known after the first step
          collection = _metric_collection(metrics)
          merge = jax.jit(lambda acc, m: acc.merge(collection.single_from_model_output(**m)))
          accumulated = collection.empty()
        accumulated = merge(accumulated, metrics)

        last = step == t.total_steps
        if step % t.log_every_steps == 0 or last:
          bad = nan_watch.first_bad_step()
          if bad is not None:
            raise RunFailed(f"non-finite loss at step {bad}", bad)
          state, usage = run.usage_report(state)
          scalars = {k: float(v) for k, v in accumulated.compute().items()}
          scalars.update({k: float(v) for k, v in jax.device_get(usage).items()})
          scalars.update(corrupt.totals())
          progress_stats, line = meter.update(step)
          scalars.update(progress_stats)
          writer.write_scalars(step, {**scalars, **resumed})
          resumed = {}
          logging.info("%s | g_loss %.4g | rec %.4g | usage %.1f%%", line, scalars["g_loss"],
                       scalars["rec_loss"], scalars["usage"])
          accumulated = collection.empty()
        if t.image_every_steps and (step % t.image_every_steps == 0 or last):
          originals, recons = run.reconstruct(state["ema"], run.consts["g_rest"], images)
          writer.write_reconstructions(step, np.asarray(originals), np.asarray(recons))
        if step % t.checkpoint_every_steps == 0 or last:
          bad = nan_watch.first_bad_step()
          if bad is not None:
            raise RunFailed(f"non-finite loss at step {bad}", bad)
          ckpt.save(step, state, data_iter, wait=last)
        elif (jax.process_count() == 1 or step % t.log_every_steps == 0) and ckpt.pending_failed():
          ckpt.save(step, state, data_iter, wait=True)  # the one retry, now; fails -> FAILED
        if t.eval_every_steps and step % t.eval_every_steps == 0 and not last:
          # An interrupted periodic eval is dropped; the loop then saves and stops.
          progress.stage = "evaluation"
          results = evaluate(state, os.path.join(workdir, "evals", f"step_{step:07d}"), step,
                             should_stop=watcher.should_stop)
          progress.stage = "train"
          if results:
            writer.write_scalars(step, _scalars(results, "eval_"))
      ckpt.wait_until_finished()
      if t.final_eval:
        # The last checkpoint is complete, so a signal here can exit at once:
        # the restarted run finds step == total_steps and only evaluates.
        progress.stage = "evaluation"
        results = evaluate(state, workdir, step, should_stop=watcher.should_stop)
        if results is None:
          return _interrupted(failed_path, watcher.signal, step)
        writer.write_scalars(step, _scalars(results, "eval_"))
    finally:
      watcher.uninstall()
      ckpt.close()
      writer.close()
      data_iter.close()  # stops the read / prefetch threads
  run_guards.write_json(done_path, {"step": step, "time": time.time()})
  logging.info("Finished %d steps; wrote %s", step, done_path)
  return EXIT_OK


def _interrupted(failed_path: str, signum: int, step: int) -> int:
  """FAILED = interrupted (its checkpoint is complete); exit 75 so launchers resume it."""
  reason = run_guards.interrupted_reason(signum, step)
  logging.warning("Stopped: %s; exit %d", reason, EXIT_PREEMPTED)
  run_guards.write_json(failed_path, {"reason": reason, "step": step, "interrupted": True})
  return EXIT_PREEMPTED


# ============================================================================
# main
# ============================================================================
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and arg, e.g. configs/gsq.py:D=16,G=4,V=4096,f=8,tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumed if it exists).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for multi-process runs (default: $JAX_COORDINATOR_ADDRESS or "
    "the cluster's auto-detection; on JSC use the InfiniBand name, e.g. jwb0001i:12345).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes (default: auto-detected).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id (default: auto).")
_FORCE_NEW = flags.DEFINE_bool(
    "force_new", False, "Start over when --workdir already holds a trained run: the new run goes "
    "into a fresh subfolder WORKDIR/restart-N (the old run is left as it is).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Call jax.distributed.initialize(): auto = on clusters or "
                                 "when a coordinator/process count is given.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "Persistent XLA compilation cache: a directory or 'off' (default: "
    "$JAX_COMPILATION_CACHE_DIR, $GSQ_JAX_CACHE_DIR, ~/.cache/gsq_jax/xla).")


_FLAGS = (_CONFIG, _WORKDIR, _FORCE_NEW, _COORDINATOR, _NUM_PROCESSES, _PROCESS_ID, _DISTRIBUTED,
          _COMPILATION_CACHE)


def _main(argv) -> None:
  quiet_logs.install()
  logging.get_absl_handler().addFilter(run_guards.FailureNoiseFilter())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required")
  compilation_cache.enable(_COMPILATION_CACHE.value)
  try:
    if run_config.apply_memory_fraction(_CONFIG.value) is not None:
      logging.info("GPU memory fraction %s (train.gpu_memory_fraction)",
                   os.environ[run_config.MEMORY_FRACTION_ENV])
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  sharding_lib.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                      _PROCESS_ID.value, mode=_DISTRIBUTED.value)
  code = train_and_evaluate(_CONFIG.value, _WORKDIR.value, force_new=_FORCE_NEW.value)
  logging.flush()
  sys.exit(code)


def main() -> None:
  """Console-script entry point (`gsq-train`)."""
  if cli_help.wants_help(sys.argv):
    print(cli_help.help_text(__doc__.split("\n\n")[0].split(": `", 1)[0] + ".", _FLAGS, sys.argv))
    sys.exit(0)
  app.run(_main, flags_parser=cli_help.parse_flags)


if __name__ == "__main__":
  main()
