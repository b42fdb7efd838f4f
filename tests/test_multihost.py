"""Two JAX processes on this machine (CPU collectives over gloo, coordinator on
loopback) train like one process with the same global batch."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np

from gsq_jax import sharding
from gsq_jax.training import writers
from test_steps import ROOT, run_steps, small_config  # noqa: F401

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 4  # 8 devices in all, as the single-process reference

# Each process feeds only its rows of the (identical everywhere) global batch,
# then runs the real training loop on `demo` data for a few steps.
WORKER = textwrap.dedent("""
    import json, sys
    pid, port, workdir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    sys.path.insert(0, {tests!r})
    from gsq_jax import sharding
    assert sharding.initialize_distributed(f"127.0.0.1:{{port}}", {n}, pid)
    import jax
    from gsq_jax.data import input_pipeline
    from gsq_jax.training import construction
    from gsq_jax.training import train
    from test_steps import images, small_config
    assert jax.process_count() == {n} and jax.device_count() == 8
    config = small_config()
    mesh = sharding.make_mesh(config.mesh)
    losses = []
    with jax.set_mesh(mesh):
      run = construction.build(config, mesh)
      state = run.state
      rows = 8 // {n}
      for i in range(3):
        local = {{"image": images(i)[pid * rows:(pid + 1) * rows]}}
        batch = input_pipeline.make_global_batch(local, sharding.data_sharding(mesh))
        state, metrics = run.train_step(state, run.consts, batch)
        losses.append(float(metrics["g_loss"]))
    config = small_config(**{{"train.total_steps": 4, "train.log_every_steps": 2,
                             "train.checkpoint_every_steps": 4, "train.image_every_steps": 4,
                             "train.preemption_check_every_steps": 2,
                             "train.final_eval": False}})
    code = train.train_and_evaluate(config, workdir)
    json.dump({{"losses": losses, "code": code}}, open(out, "w"))
""")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
  port = free_port()
  code = WORKER.format(tests=str(ROOT / "tests"), n=NUM_PROCESSES)
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"}
  workdir = tmp_path / "run"
  procs = [subprocess.Popen([sys.executable, "-c", code, str(i), str(port), str(workdir),
                             str(tmp_path / f"out{i}.json")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(NUM_PROCESSES)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-4000:]
  results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(NUM_PROCESSES)]

  # One process, all 8 devices, the same global batches.
  config = small_config()
  _, _, metrics = run_steps(config, sharding.make_mesh(config.mesh))
  reference = [float(m["g_loss"]) for m in metrics]
  for r in results:
    assert r["code"] == 0
    np.testing.assert_allclose(r["losses"], reference, rtol=2e-5)

  # The training loop ran once across both processes: process 0 wrote the
  # logs, every process saved its data-iterator position in the checkpoint.
  rows = [r for r in writers.read_metrics(workdir / "metrics.jsonl") if "g_loss" in r]
  assert [r["step"] for r in rows] == [2, 4]
  assert all(np.isfinite(r["g_loss"]) for r in rows)
  first = writers.read_metrics(workdir / "metrics.jsonl")[0]
  assert first["num_processes"] == 2 and first["num_devices"] == 8
  data_iter = workdir / "checkpoints" / "4" / "data_iter"
  assert len([f for f in os.listdir(data_iter) if "process" in f]) == NUM_PROCESSES
  assert (workdir / "DONE").exists()
  assert jax.process_count() == 1  # this process was never part of it
