"""gsq-plan: targets, FLOP counting, shapes-only construction, deviceless compilation.

The deviceless compile tests need a target's toolchain (`pip install
'gsq_jax[plan-gpu]'` / `[plan-tpu]`) and skip, saying so, without it; the
TPU one is `slow` (TPU compilation takes minutes on 2 cores).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import gsq as gsq_config
from gsq_jax import sharding
from gsq_jax.planning import flops as flops_lib
from gsq_jax.planning import targets as targets_lib
from gsq_jax.training import run_config
from gsq_jax.training import construction


def tiny_config(batch: int = 8, **train_fields):
  c = gsq_config.get_config("D=16,G=4,V=4096,f=8,tiny")
  c.train.global_batch_size = batch
  c.train.num_image_samples = min(c.train.num_image_samples, batch)
  for key, value in train_fields.items():
    c.train[key] = value
  return c


# ----------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------
def test_targets_parse_devices_hosts_and_topologies():
  t = targets_lib.parse_target("gpu:h100:8x4")
  assert (t.platform, t.topology, t.num_devices) == ("gpu", "1x4x8", 32)
  assert t.kind.memory == 84942979072  # from the shipped XLA target description
  assert targets_lib.parse_target("gpu:a100-80g:8").num_devices == 8
  assert targets_lib.parse_target("tpu:v5p:2x2x1").topology == "v5p:2x2x1"
  assert targets_lib.parse_target("tpu:v6e:4x4").num_devices == 16
  for bad in ("gpu:h100", "gpu:v5e:4", "tpu:h100:2x2", "tpu:v5e:two", "cuda:h100:8"):
    with pytest.raises(ValueError, match="expected gpu:KIND"):
      targets_lib.parse_target(bad)


def test_missing_toolchain_names_the_extra(monkeypatch):
  monkeypatch.setattr(targets_lib, "_find_spec", lambda name: None)
  with pytest.raises(targets_lib.ToolchainMissing, match=r"gsq_jax\[plan-tpu\]"):
    targets_lib.parse_target("tpu:v5e:2x2").devices()
  with pytest.raises(targets_lib.ToolchainMissing, match=r"gsq_jax\[plan-gpu\]"):
    targets_lib.check_toolchain("gpu")


def test_commands_refuse_bad_targets_and_missing_toolchains(monkeypatch, capsys):
  from gsq_jax.planning import cli  # pylint: disable=import-outside-toplevel
  from gsq_jax.sweeps import launch  # pylint: disable=import-outside-toplevel
  assert cli.main(["--config", "configs/gsq.py:tiny", "--target", "tpu:v5e-4"]) == 2
  assert "expected gpu:KIND" in capsys.readouterr().err
  monkeypatch.setattr(targets_lib, "_find_spec", lambda name: None)
  assert cli.main(["--config", "configs/gsq.py:tiny", "--target", "gpu:h100:8"]) == 2
  assert "gsq_jax[plan-gpu]" in capsys.readouterr().err
  assert launch.main(["sweeps/demo.py", "--tiny", "--plan"]) == 2
  assert "--target" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------
def test_flops_count_convs_matmuls_and_loop_trip_counts():
  x, k = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8, 4))
  conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")).sum()
  forward = 2 * 2 * 16 * 16 * 4 * 9 * 8
  assert flops_lib.count_program(conv, x, k).flops == forward
  # Input and weight gradients are one forward each.
  assert flops_lib.count_program(jax.grad(conv, argnums=(0, 1)), x, k).flops == 3 * forward
  # lax.map over 5 chunks: the body times its trip count (XLA counts it once).
  chunks = jnp.ones((5, 4, 3))
  assert flops_lib.count_program(lambda c: jax.lax.map(lambda r: r @ r.T, c),
                                 chunks).flops == 5 * 2 * 4 * 4 * 3
  # shard_map: the per-device body times the devices.
  mesh = jax.make_mesh((8,), ("data",))
  body = jax.shard_map(lambda a: a @ a.T, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
  rows = jax.ShapeDtypeStruct((64, 3), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  assert flops_lib.count_program(body, rows).flops == 8 * 2 * 8 * 8 * 3


def _analytic_tokenizer_forward_flops(config) -> float:
  """Convolutions of encoder + decoder (GSQ.md §2.3) and the code search, per image."""
  m, s = config.model, config.train.image_size
  c0, mult = m.hidden_channels, m.channel_multipliers
  conv = lambda res, k, cin, cout: 2 * res * res * k * k * cin * cout

  def resblocks(res, cin, cout, n):
    total, c = 0, cin
    if cin != cout:  # the channel-changing ResBlock with its 1x1 skip
      total += conv(res, 3, cin, cout) + conv(res, 3, cout, cout) + conv(res, 1, cin, cout)
    return total + n * 2 * conv(res, 3, cout, cout), c

  flops, res, c = conv(s, 3, 3, c0), s, c0
  for level, mm in enumerate(mult):  # encoder
    f, _ = resblocks(res, c, c0 * mm, m.encoder_layer_configs[level])
    flops, c = flops + f, c0 * mm
    if level < len(mult) - 1:
      flops += 2 * (res // 2) ** 2 * 9 * c * c  # stride-2 conv
      res //= 2
  flops += resblocks(res, c, c, m.encoder_layer_configs[-1])[0]
  flops += conv(res, 1, c, m.latent_dim)
  tokens = res * res * m.num_groups
  flops += 2 * tokens * m.codebook_size * (m.latent_dim // m.num_groups)  # code search
  flops += conv(res, 3, m.latent_dim, c)  # decoder
  flops += resblocks(res, c, c, m.decoder_layer_configs[0])[0]
  for level, mm in reversed(list(enumerate(mult))):
    f, _ = resblocks(res, c, c0 * mm, m.decoder_layer_configs[len(mult) - level])
    flops, c = flops + f, c0 * mm
    if level > 0:
      flops += conv(res, 3, c, 4 * c) if m.use_depth_to_space else conv(2 * res, 3, c, c)
      res *= 2
  return flops + conv(res, 3, c, 3)


@pytest.fixture(scope="module")
def dino_run_without_weights(tmp_path_factory):
  """The tiny recipe with the DINO discriminator and LPIPS, weight files absent, from shapes."""
  from gsq_jax.planning import programs  # pylint: disable=import-outside-toplevel
  absent = tmp_path_factory.mktemp("weights")
  config = tiny_config(fast_cpu_convs=False)
  config.disc.name = "dino"
  config.disc.dino_weights = str(absent / "absent.pth")
  config.loss.lpips_weights = str(absent / "absent_lpips")
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    run = construction.build(config, mesh, shapes_only=True)
    forward = programs.trace_programs(config, mesh, names=("tokenizer_forward",), run=run)
  return config, run, forward["tokenizer_forward"]


def test_planner_forward_flops_match_an_analytic_conv_count(dino_run_without_weights):
  config, _, forward = dino_run_without_weights
  counted = flops_lib.count_jaxpr(forward.jaxpr).flops / config.train.global_batch_size
  analytic = _analytic_tokenizer_forward_flops(config)
  assert counted == pytest.approx(analytic, rel=0.05), (counted, analytic)


# ----------------------------------------------------------------------------
# One construction path
# ----------------------------------------------------------------------------
def test_build_from_shapes_needs_no_device_and_no_weight_file(dino_run_without_weights):
  config, run, _ = dino_run_without_weights
  run_config.validate_config(config, num_devices=8, process_count=1, need_weights=False)
  with pytest.raises(FileNotFoundError):
    run_config.validate_config(config, num_devices=8, process_count=1)
  leaves = jax.tree.leaves((run.state, run.consts))
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  params = run.state["params"]
  assert all(isinstance(x.sharding, NamedSharding) for x in jax.tree.leaves(params))
  # DINO ViT-S/14 frozen weights: ~22M numbers known from the architecture.
  frozen = sum(math.prod(x.shape) for x in jax.tree.leaves(run.consts["d_frozen"]))
  assert 21e6 < frozen < 23e6
  batch = run.batch_shapes(8, config.train.image_size)
  assert set(batch) == {"image", "image_d"} and batch["image"].shape == (8, 32, 32, 3)


def test_gpu_memory_fraction_is_validated_and_applied_before_backends():
  config = tiny_config()
  config.train.gpu_memory_fraction = 1.5
  with pytest.raises(ValueError, match="train.gpu_memory_fraction"):
    run_config.validate_memory_fraction(config.train.gpu_memory_fraction)
  config.train.gpu_memory_fraction = 0.9
  with pytest.raises(RuntimeError, match="before JAX initialises"):
    run_config.apply_memory_fraction(config)  # the test process has a backend already
  config.train.gpu_memory_fraction = None
  assert run_config.apply_memory_fraction(config) is None


# ----------------------------------------------------------------------------
# Deviceless compilation
# ----------------------------------------------------------------------------
def _toolchain(platform: str) -> bool:
  try:
    targets_lib.check_toolchain(platform)
    return True
  except targets_lib.ToolchainMissing:
    return False


def _compile_small_and_overlarge_batch(target_spec: str, small: int, huge: int, monkeypatch):
  """Plans the tiny recipe (f = 4, 64², no LPIPS: the cheapest full train step) twice."""
  from gsq_jax.cpu_kernels import cpu_conv  # pylint: disable=import-outside-toplevel
  from gsq_jax.planning import plan as plan_lib  # pylint: disable=import-outside-toplevel

  def no_cpu_kernels(_):
    raise AssertionError("CPU-only convolutions entered an accelerator program")

  monkeypatch.setattr(cpu_conv, "use_fast_cpu_convs", no_cpu_kernels)
  targets_lib.configure_host_for_deviceless()
  target = targets_lib.parse_target(target_spec)
  devices = target.devices()
  plans = []
  for batch in (small, huge):
    config = gsq_config.get_config("D=16,G=4,V=4096,f=4,tiny")
    config.train.global_batch_size, config.train.image_size = batch, 64
    config.loss.perceptual_weight = 0.0
    plans.append(plan_lib.plan_run(config, target, devices=devices, include_eval=False,
                                   try_fixes=False))
  fitting, too_big = plans
  assert fitting.fits and not fitting.errors, fitting.errors
  assert fitting.flops_per_image > 0 and fitting.device_hours_roofline > 0
  assert not too_big.fits
  if not too_big.errors:  # GPU: compiles anyway; TPU: fails with RESOURCE_EXHAUSTED
    # Peak memory grows with the batch (XLA rematerialises, so less than linearly).
    assert too_big.need_bytes > 100 * fitting.need_bytes, (fitting.need_bytes,
                                                           too_big.need_bytes)
    assert too_big.need_bytes > target.kind.memory
  return plans


@pytest.mark.skipif(not _toolchain("gpu"), reason="GPU AOT toolchain absent: pip install "
                    "'gsq_jax[plan-gpu]' (jax[cuda12-local], nvidia-cuda-nvcc-cu12)")
def test_deviceless_gpu_compile_memory_grows_with_batch_and_overlarge_does_not_fit(monkeypatch):
  _compile_small_and_overlarge_batch("gpu:h100:8", 16, 8 * 8192, monkeypatch)


@pytest.mark.slow
@pytest.mark.skipif(not _toolchain("tpu"), reason="TPU AOT toolchain absent: pip install "
                    "'gsq_jax[plan-tpu]' (jax[tpu])")
def test_deviceless_tpu_compile_memory_grows_with_batch_and_overlarge_does_not_fit(monkeypatch):
  _compile_small_and_overlarge_batch("tpu:v5e:2x2", 8, 4 * 8192, monkeypatch)


@pytest.mark.skipif(not _toolchain("gpu"), reason="GPU AOT toolchain absent: pip install "
                    "'gsq_jax[plan-gpu]' (jax[cuda12-local], nvidia-cuda-nvcc-cu12)")
def test_dino_backward_compiles_for_h100_with_default_flags_and_remat_saves_memory():
  """The generator's path through DINO at 518 px (1374 tokens), XLA's default GPU flags.

  Unpadded, the Triton GEMM of the attention projection could not be tiled
  ("Couldn't find output tile sizes", #14); the blocks now run on 1376 tokens.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from gsq_jax.models import dino  # pylint: disable=import-outside-toplevel
  from gsq_jax.models import remat  # pylint: disable=import-outside-toplevel

  targets_lib.configure_host_for_deviceless()
  mesh = jax.sharding.Mesh(targets_lib.parse_target("gpu:h100:1").devices(), ("data",))
  replicated = NamedSharding(mesh, P())
  temp = {}
  for choice in ("none", "dino"):
    vit = nnx.eval_shape(lambda: dino.DinoViT(shapes_only=True, dtype=jnp.bfloat16, depth=3))
    assert remat.use_remat(vit, choice) == (3 if choice == "dino" else 0)
    graphdef, state = nnx.split(vit)

    def input_grad(state, x):
      vit = nnx.merge(graphdef, state)
      loss = lambda x: sum(jnp.mean(jnp.square(t.astype(jnp.float32))) for t in vit(x, (0, 1, 2)))
      return jax.grad(loss)(x)

    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                        (state, jax.ShapeDtypeStruct((4, 518, 518, 3), jnp.float32)))
    temp[choice] = jax.jit(input_grad).lower(*args).compile().memory_analysis().temp_size_in_bytes
  assert temp["dino"] < 0.6 * temp["none"], temp


def test_fix_search_takes_the_first_change_that_fits_and_says_what_the_others_needed(monkeypatch):
  """The search itself, with compiled needs stood in by a table (each real compile takes minutes)."""
  from gsq_jax.planning import plan as plan_lib  # pylint: disable=import-outside-toplevel
  from gsq_jax.planning import programs  # pylint: disable=import-outside-toplevel
  gib = 2 ** 30
  need = {("none", 1): 135 * gib, ("dino", 1): 97 * gib, ("blocks", 1): 99 * gib,
          ("none", 4): 134 * gib, ("dino", 4): 90 * gib}

  def fake_compile(config, mesh, **_):
    key = (config.train.remat, config.mesh.fsdp)
    fits = key in need and need[key] <= 95.7 * gib
    stats = {name: programs.ProgramStats(name, flops=1e15, need_bytes=need.get(key, 200 * gib))
             for name in ("train_step", "usage_report", "tokenizer_forward")}
    if not fits:
      stats["train_step"].error = "RESOURCE_EXHAUSTED: out of memory"
    return stats

  monkeypatch.setattr(programs, "compile_programs", fake_compile)
  target = targets_lib.parse_target("tpu:v5p:2x2x1")
  config = gsq_config.get_config("D=64,G=4,V=256k,f=16")
  plan = plan_lib.plan_run(config, target, devices=jax.devices()[:4], label="B512")
  assert not plan.fits and plan.alternative is not None
  assert plan.fix.startswith("train.remat=dino + mesh fsdp=4 (not enough: train.remat=dino: 97.0 GiB; "
                             "train.remat=blocks: 99.0 GiB; mesh fsdp=4: 134.0 GiB")
  assert plan.alternative.fits and plan.alternative.label == "B512 [train.remat=dino + mesh fsdp=4]"


def test_a_tpu_program_that_does_not_fit_still_reports_its_need():
  from gsq_jax.planning import programs  # pylint: disable=import-outside-toplevel

  class Traced:  # what jax.jit(...).trace() gives, with TPU's out-of-memory compile error
    jaxpr = jax.make_jaxpr(lambda x: x @ x)(jnp.ones((4, 4)))

    def lower(self):
      return self

    def compile(self, options):
      del options
      raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
                         "for HLO temporaries (135.56G) exceeds available HBM (95.74G).")

  stats = programs.compile_traced("train_step", Traced(), None)
  assert stats.error.startswith("RuntimeError: RESOURCE_EXHAUSTED")
  assert stats.need_bytes == int(135.56 * 2 ** 30) and stats.flops == 2 * 4 ** 3
  Traced.compile = lambda self, options: (_ for _ in ()).throw(RuntimeError(
      "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of "
      "memory in memory space hbm. Used 95.87G of 95.74G hbm. Exceeded hbm capacity by 128.90M."))
  assert programs.compile_traced("train_step", Traced(), None).need_bytes == int(95.87 * 2 ** 30)


def test_planner_tries_remat_before_changing_the_mesh_or_the_batch():
  from gsq_jax.planning import plan as plan_lib  # pylint: disable=import-outside-toplevel
  config = gsq_config.get_config("D=64,G=4,V=256k,f=16")  # GSQ-GAN with DINO
  changes = [change for change, _ in plan_lib._fixes(config, 8)]  # pylint: disable=protected-access
  assert changes[:8] == ["train.remat=dino", "train.remat=blocks", "mesh fsdp=8", "mesh vocab=8",
                         "train.remat=dino + mesh fsdp=8", "train.remat=dino + mesh vocab=8",
                         "train.remat=blocks + mesh fsdp=8", "train.remat=blocks + mesh vocab=8"]
  assert changes[8].startswith("global batch 256")
  combined = dict(plan_lib._fixes(config, 8))["train.remat=dino + mesh fsdp=8"]  # pylint: disable=protected-access
  assert (combined.train.remat, combined.mesh.fsdp, combined.mesh.data) == ("dino", 8, 1)
  assert config.train.remat == "none" and config.mesh.fsdp != 8  # the config itself is untouched
  config.train.remat, config.disc.name = "dino", "patchgan"
  assert [c for c, _ in plan_lib._remat_fixes(config)] == ["train.remat=blocks"]  # pylint: disable=protected-access
  config = tiny_config()
  config.train.remat = "everything"
  with pytest.raises(ValueError, match="train.remat must be one of"):
    run_config.validate_config(config, num_devices=8, process_count=1, need_weights=False)
  config.train.remat, config.model.dropout = "blocks", 0.1
  with pytest.raises(ValueError, match="model.dropout = 0"):
    run_config.validate_config(config, num_devices=8, process_count=1, need_weights=False)


# ----------------------------------------------------------------------------
# Compute- and bit-aware scaling tables
# ----------------------------------------------------------------------------
def test_collect_adds_compute_and_bit_columns_and_fits_take_them(tmp_path):
  import json  # pylint: disable=import-outside-toplevel
  import pandas as pd  # pylint: disable=import-outside-toplevel
  from gsq_jax.analysis import fits  # pylint: disable=import-outside-toplevel
  from gsq_jax.sweeps import collect  # pylint: disable=import-outside-toplevel
  runs = [f"f8_D{d}_G1_V{v}_s0" for d, v in ((8, 256), (16, 1024), (32, 4096))]
  plan = [{"label": r, "flops_per_image": 1e9 * (i + 1), "flops_per_step": 8e9 * (i + 1),
           "forward_flops_per_image": 3e8} for i, r in enumerate(runs)]
  (tmp_path / "plan.json").write_text(json.dumps({"plans": plan}))
  df = pd.DataFrame({"run": runs + ["unplanned"], "res": 256, "f": 8, "G": [1, 1, 1, 4],
                     "V": [256, 1024, 4096, 4096], "perplexity": [128.0, 512.0, 2048.0, 16.0],
                     "steps": 100, "psnr": [20.0, 22.0, 24.0, 21.0]})
  out = collect.add_compute_and_bits(df, tmp_path / "plan.json")
  assert out["nominal_bits_per_image"].tolist() == [32 * 32 * 8, 32 * 32 * 10, 32 * 32 * 12,
                                                    32 * 32 * 4 * 12]
  assert out["effective_bits_per_image"].tolist() == [32 * 32 * 7, 32 * 32 * 9, 32 * 32 * 11,
                                                      32 * 32 * 4 * 4]
  assert out["bits_per_pixel"][0] == pytest.approx(7 / 64)
  assert out["train_flops"].tolist()[:3] == [8e11, 16e11, 24e11]
  assert np.isnan(out["flops_per_image"][3])  # no plan for that run
  fit = fits.fit_power_law(out.iloc[:3], "bits", "psnr")[None]
  assert fit.params[1] > 0  # PSNR rises with bits
  assert fits.fit_power_law(out.iloc[:3], "compute", "psnr")[None].params[1] > 0
