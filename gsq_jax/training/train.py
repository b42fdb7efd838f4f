r"""Trains a GSQ (or IBQ/VQ/FSQ/LFQ) tokenizer: `gsq-train` / `python -m gsq_jax.training.train`.

  python -m gsq_jax.training.train --config configs/gsq.py:D=16,G=4,V=4096,f=8,tiny \
      --workdir runs/gsq_tiny [--config.train.total_steps=100]

The same command runs on one CPU, one GPU node (one process per GPU) or a
multi-node SLURM / TPU allocation (`jax.distributed.initialize()` with cluster
auto-detection; `--coordinator_address` overrides, e.g. JSC's "<host>i").

Workdir (other commands rely on it; gsq_jax/training/checkpointing.py, API contract):
  config.json     resolved config, written at start
  metrics.jsonl   one JSON line per log step (first line: D, G, V, f, params, package
                  versions, backend, device kind)
  checkpoints/    orbax: params, EMA, optimisers, D, RNG, counter, data position
  images/         labelled original / reconstruction grids every train.image_every_steps
  tensorboard/    event files: scalars, image grids, the config and run facts as text
  eval.json       final evaluation (gsq_jax.evaluation.evaluator)
  DONE            written last, when every step and the final eval are done
  FAILED          {"reason", "step"} when the run stops on an error it detected

Exit codes: 0 finished (or already DONE), 1 failed (FAILED written), 75 stopped
by SIGTERM/SIGUSR1 after saving a checkpoint (SLURM preemption / time limit:
requeue it). A run started again in the same workdir resumes from its latest
checkpoint, exactly: parameters end bitwise equal to an uninterrupted run.

Sections: building networks and state | the loop (logging, images,
checkpoints, preemption, evaluation) | main. Config checks live in
run_config.py, the run's guards (signals, NaN, corrupt files) in run_guards.py.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
from clu import metrics as clu_metrics
from clu import parameter_overview
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
from flax import nnx

from gsq_jax.training import checkpointing
from gsq_jax.training import cli_help
from gsq_jax.cpu_kernels import cpu_conv
from gsq_jax.data import input_pipeline
from gsq_jax.training import optim
from gsq_jax.training import run_guards
from gsq_jax.training.run_config import paper_symbols, validate_config  # noqa: F401  (public here too)
from gsq_jax import sharding as sharding_lib
from gsq_jax.training import steps
from gsq_jax.training import writers
from gsq_jax.evaluation import evaluator
from gsq_jax.models import Tokenizer
from gsq_jax.models import discriminators as disc_lib
from gsq_jax.models import dino as dino_lib
from gsq_jax.models import lpips as lpips_lib
from gsq_jax.models import parameter_counts_from_config
from gsq_jax.models.tokenizer import COMPUTE_DTYPES
from gsq_jax.utils import environment
from gsq_jax.utils import quiet_logs

EXIT_OK, EXIT_FAILED, EXIT_PREEMPTED = 0, 1, 75


class RunFailed(Exception):
  """An error the run detected itself (bad config or data, NaN loss): FAILED + exit 1."""

  def __init__(self, reason: str, step: int = 0):
    super().__init__(reason)
    self.reason, self.step = reason, step


# ============================================================================
# Networks and the train state.
# ============================================================================
@dataclasses.dataclass
class Run:
  """Everything built for one run (jitted functions, shardings, constants)."""

  nets: steps.Networks
  step_cfg: steps.StepConfig
  state: dict[str, Any]
  state_shardings: Any
  consts: dict[str, Any]
  train_step: Callable
  usage_report: Callable
  reconstruct: Callable
  num_params: dict[str, int]


def build_discriminator(config: ml_collections.ConfigDict, dtype) -> nnx.Module | None:
  d = config.disc
  rngs = nnx.Rngs(config.train.seed + 1)
  if d.name == "patchgan":
    return disc_lib.PatchGAN(3, d.patchgan_filters, d.patchgan_layers,
                             output_weight_scale=d.patchgan_output_scale, rngs=rngs)
  if d.name == "dino":
    backbone = dino_lib.load_dino_backbone(
        d.dino_weights, expected=dino_lib.VITS14_REG if d.dino_require_vits14 else None,
        dtype=dtype)
    return disc_lib.DinoDiscriminator(backbone, rngs=rngs, diffaug=d.diffaug,
                                      aug_policy=d.aug_policy, resolution=d.dino_resolution,
                                      taps=tuple(d.dino_taps))
  return None


def state_shardings(state: Any, mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """FSDP layout for parameters, EMA and optimiser states; the rest replicated."""
  sharded = ("params", "ema", "opt", "d_params", "d_opt")
  return {k: (sharding_lib.tree_shardings(v, mesh) if k in sharded
              else jax.tree.map(lambda _: sharding_lib.replicated(mesh), v))
          for k, v in state.items()}


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Run:
  """Networks, optimisers, initial state (placed on the mesh) and jitted functions."""
  t = config.train
  dtype = COMPUTE_DTYPES[t.compute_dtype]
  step_cfg = steps.StepConfig.from_config(config)
  g_tx, g_schedule = optim.make_optimizer(config.optim, "generator", t.total_steps)
  d_tx, d_schedule = optim.make_optimizer(config.optim, "discriminator", t.total_steps)
  replicated = sharding_lib.replicated(mesh)

  # mesh.vocab > 1 swaps in the vocabulary-sharded quantizer (config.json keeps
  # the plain one: a checkpoint restores onto any mesh).
  model_cfg = config.model.copy_and_resolve_references()
  model_cfg.quantizer.update(sharding_lib.quantizer_axes(config.mesh, mesh.size))

  def new_tokenizer():
    return Tokenizer.from_config(model_cfg, rngs=nnx.Rngs(t.seed))

  abstract = nnx.eval_shape(new_tokenizer)
  disc = build_discriminator(config, dtype)
  if t.fast_cpu_convs and jax.default_backend() == "cpu":
    # Faster convolutions on XLA:CPU (Winograd, piecewise weight gradients); see cpu_conv.py.
    for model in (abstract, disc):
      if model is not None:
        cpu_conv.use_fast_cpu_convs(model)
  g_graphdef, _, _ = steps.split_tokenizer(abstract)
  frozen = {}  # pretrained, never trained, never checkpointed
  d_graphdef = d_params = d_stats = None
  if disc is not None:
    d_graphdef, d_params, d_stats, frozen["d_frozen"] = steps.split_discriminator(disc)
  lpips_graphdef = None
  if config.loss.perceptual_weight > 0:
    lpips_graphdef, frozen["lpips"] = nnx.split(
        lpips_lib.load_lpips("vgg16", config.loss.lpips_weights, dtype=dtype))
  if jax.process_count() > 1:
    # Arrays built on this host enter global computations as host data
    # (identical on every process), not as arrays committed to a local device.
    d_params, d_stats, frozen = jax.device_get((d_params, d_stats, frozen))
  nets = steps.Networks(g_graphdef, g_tx, g_schedule, d_graphdef, d_tx, d_schedule,
                        lpips_graphdef, mesh)

  def init(d_params, d_stats):
    _, params, rest = steps.split_tokenizer(new_tokenizer())
    state = steps.init_state(nets, params, seed=t.seed, num_groups=config.model.num_groups,
                             codebook_size=config.model.codebook_size, d_params=d_params,
                             d_stats=d_stats, lecam=step_cfg.lecam_weight > 0)
    return state, rest

  state_shape, rest_shape = jax.eval_shape(init, d_params, d_stats)
  shardings = state_shardings(state_shape, mesh)
  # One process: the initial state is computed by one jitted program on one
  # device, then laid out on the mesh; the same program serves every mesh (one
  # compilation, cached across runs; a tokenizer of 10^8 parameters fits one
  # device). Several processes: created directly in the global shards.
  # It runs once, so XLA's backend optimisations would only cost compile time.
  out_shardings = None
  if jax.process_count() > 1:
    out_shardings = (shardings, jax.tree.map(lambda _: replicated, rest_shape))
  init = jax.jit(init, out_shardings=out_shardings).lower(d_params, d_stats).compile(
      compiler_options={"xla_backend_optimization_level": 0,
                        "xla_llvm_disable_expensive_passes": True})
  state, g_rest = init(d_params, d_stats)
  state = jax.device_put(state, shardings)
  consts = jax.device_put({**frozen, "inject_nan_at_step": np.int32(t.inject_nan_at_step)},
                          replicated)
  consts["g_rest"] = jax.device_put(g_rest, replicated)

  train_step = jax.jit(steps.make_train_step(nets, step_cfg), donate_argnums=(0,),
                       out_shardings=(shardings, replicated))
  usage_report = jax.jit(steps.usage_report, donate_argnums=(0,),
                         out_shardings=(shardings, replicated))
  n = t.num_image_samples

  def samples(params, rest, images):
    images = jax.lax.with_sharding_constraint(images, replicated)[:n]
    return images, steps.reconstruct(nets, params, rest, images)

  reconstruct = jax.jit(samples, out_shardings=(replicated, replicated))
  return Run(nets, step_cfg, state, shardings, consts, train_step, usage_report, reconstruct,
             parameter_counts_from_config(config.model))


def tokenizer_from_state(run: Run, params) -> Tokenizer:
  """An nnx Tokenizer view of `params` (e.g. the EMA) for evaluation."""
  return nnx.merge(run.nets.g_graphdef, params, run.consts["g_rest"])


# ============================================================================
# The loop.
# ============================================================================
def _metric_collection(names):
  return clu_metrics.Collection.create(
      **{k: clu_metrics.Average.from_output(k) for k in sorted(names)})


class Evaluator:
  """Runs gsq_jax.evaluation.evaluator on the EMA (or raw) weights of the state."""

  def __init__(self, run: Run, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    self._run, self._config, self._mesh = run, config, mesh
    self._models = None  # LPIPS / Inception, loaded once per run

  def __call__(self, state: dict[str, Any], out_dir: str, step: int,
               should_stop=None) -> dict[str, Any] | None:
    """The eval.json content, or None when `should_stop` interrupted it."""
    use_ema = bool(self._config.eval.use_ema)
    tokenizer = tokenizer_from_state(self._run, state["ema"] if use_ema else state["params"])
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> int:
  """Trains (resuming from `workdir` if it holds checkpoints); returns the exit code."""
  workdir = os.path.abspath(workdir)
  done_path = os.path.join(workdir, "DONE")
  failed_path = os.path.join(workdir, "FAILED")
  if os.path.exists(done_path):
    logging.info("%s exists: the run is finished, nothing to do", done_path)
    return EXIT_OK
  try:
    return _train(config, workdir, done_path, failed_path)
  except RunFailed as e:
    logging.error("Run failed at step %d: %s", e.step, e.reason)
    run_guards.write_json(failed_path, {"reason": e.reason, "step": e.step})
    return EXIT_FAILED


def _train(config, workdir: str, done_path: str, failed_path: str) -> int:
  try:
    validate_config(config, num_devices=jax.device_count(), process_count=jax.process_count())
  except (ValueError, FileNotFoundError) as e:
    raise RunFailed(f"invalid config: {e}") from e
  t = config.train
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(failed_path):
      os.remove(failed_path)  # a retry: the verdict of the previous attempt is stale
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  writer = writers.MetricWriter(workdir)
  mesh = sharding_lib.make_mesh(config.mesh)
  logging.info("Building the data pipeline, networks and train state; mesh %s over %d devices "
               "in %d processes", dict(mesh.shape), jax.device_count(), jax.process_count())

  with jax.set_mesh(mesh):
    corrupt = run_guards.CorruptFiles()
    try:
      data_iter = input_pipeline.make_train_iterator(
          config.data, global_batch_size=t.global_batch_size, image_size=t.image_size,
          seed=t.seed, sharding=sharding_lib.data_sharding(mesh), corrupt_counter=corrupt)
    except (ValueError, FileNotFoundError) as e:
      raise RunFailed(f"data: {e}") from e
    run = build(config, mesh)
    state = run.state
    ckpt = checkpointing.Checkpointer(workdir, keep=t.keep_checkpoints)
    start = ckpt.latest_step()
    if start is not None:
      logging.info("Resuming from the checkpoint of step %d", start)
      state = ckpt.restore(start, state, data_iter)
    start = int(state["step"])
    logging.info("Compiling the train step (the first step includes it); parameters: %s",
                 ", ".join(f"{k} {v:,}" for k, v in run.num_params.items()))
    if is_main and logging.level_debug():
      logging.debug("Parameter table:\n%s", parameter_overview.get_parameter_overview(
          jax.device_get(state["params"]).to_pure_dict(), include_stats=False))
    writer.write_config_text(config)
    writer.write_facts(start, {**paper_symbols(config), "num_params": run.num_params["total"],
                               "image_size": t.image_size,
                               "global_batch_size": t.global_batch_size,
                               "batches_per_step": run.step_cfg.batches_per_step,
                               "num_devices": jax.device_count(),
                               "num_processes": jax.process_count(),
                               **environment.run_environment(mesh.devices.flat)})

    def next_batch():
      batch = {"image": next(data_iter)["image"]}
      if run.step_cfg.two_batches_per_step:
        batch["image_d"] = next(data_iter)["image"]
      return batch

    evaluate = Evaluator(run, config, mesh)
    watcher = run_guards.PreemptionWatcher(t.preemption_check_every_steps)
    watcher.install()
    nan_watch = run_guards.NonFiniteWatch()
    meter = writers.ProgressMeter(t.total_steps, t.global_batch_size, start_step=start)
    merge = collection = accumulated = None  # clu metrics, averaged between log steps
    step = start
    try:
      while step < t.total_steps:
        if watcher.should_stop(step):
          if step not in ckpt.all_steps():
            ckpt.save(step, state, data_iter)
          ckpt.close()
          logging.warning("Stopped by signal %s at step %d after saving; exit %d",
                          watcher.signal, step, EXIT_PREEMPTED)
          return EXIT_PREEMPTED
        batch = next_batch()
        images = batch["image"]
        state, metrics = run.train_step(state, run.consts, batch)
        step += 1
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
          progress, line = meter.update(step)
          scalars.update(progress)
          writer.write_scalars(step, scalars)
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
          ckpt.save(step, state, data_iter)
        if t.eval_every_steps and step % t.eval_every_steps == 0 and not last:
          # An interrupted periodic eval is dropped; the loop then saves and stops.
          results = evaluate(state, os.path.join(workdir, "evals", f"step_{step:07d}"), step,
                             should_stop=watcher.should_stop)
          if results:
            writer.write_scalars(step, _scalars(results, "eval_"))
      ckpt.wait_until_finished()
      if t.final_eval:
        # The last checkpoint is complete, so a signal here can exit at once:
        # the restarted run finds step == total_steps and only evaluates.
        results = evaluate(state, workdir, step, should_stop=watcher.should_stop)
        if results is None:
          logging.warning("Stopped by signal %s during the final evaluation; exit %d",
                          watcher.signal, EXIT_PREEMPTED)
          return EXIT_PREEMPTED
        writer.write_scalars(step, _scalars(results, "eval_"))
    finally:
      watcher.uninstall()
      ckpt.close()
      writer.close()
      data_iter.close()  # stops the read / prefetch threads
  run_guards.write_json(done_path, {"step": step, "time": time.time()})
  logging.info("Finished %d steps; wrote %s", step, done_path)
  return EXIT_OK


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
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Call jax.distributed.initialize(): auto = on clusters or "
                                 "when a coordinator/process count is given.")


_FLAGS = (_CONFIG, _WORKDIR, _COORDINATOR, _NUM_PROCESSES, _PROCESS_ID, _DISTRIBUTED)


def _main(argv) -> None:
  quiet_logs.install()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required")
  sharding_lib.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                      _PROCESS_ID.value, mode=_DISTRIBUTED.value)
  code = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
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
