"""run_evaluation end to end on a tiny tokenizer and 13 real 32x32 images.

The same evaluation runs on 1 device (one batch of 13) and on 8 devices
(batches of 8: the second is padded with 3 masked rows), and both must agree
with each other and with a direct, unbatched computation of the metrics.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd
from flax import nnx
from PIL import Image
import pytest

from gsq_jax.data import input_pipeline
from gsq_jax.data import transforms
from gsq_jax.evaluation import evaluator
from gsq_jax.evaluation import inception as inception_lib
from gsq_jax.models import Tokenizer, default_model_config
from gsq_jax.quantizers import codebook_stats
from gsq_jax.training import writers

S = 32  # image size
N = 13  # images: 8 + 5 on the 8-device mesh, so one batch is padded
GRID = 4
CONTRACT_KEYS = {
    "psnr", "psnr_per_image", "ssim", "mse", "lpips_vgg", "lpips_alex", "rfid_status",
    "kid_mean", "kid_std", "fd_vgg16", "usage", "perplexity", "group_usage_mean",
    "product_usage", "tokens", "lookups", "usage_uniform_expectation", "protocol",
    "effective_bits", "unused_codes", "codebook_norm_mean", "codebook_norm_cv",
    "codebook_norm_min", "codebook_norm_max"}


def _model_config() -> ml_collections.ConfigDict:
  cfg = default_model_config()
  cfg.hidden_channels = 32
  cfg.channel_multipliers = (1, 2)
  cfg.encoder_layer_configs = cfg.decoder_layer_configs = (1, 1, 1)
  cfg.downsample_factor = 2
  cfg.latent_dim, cfg.num_groups, cfg.codebook_size = 8, 2, 64
  return cfg


@pytest.fixture(scope="module")
def image_folder(shared_dir, tmp_path_factory) -> pathlib.Path:
  real = sorted((shared_dir / "data" / "imagenet-samples-256").glob("*.jpg"))[:N]
  folder = tmp_path_factory.mktemp("eval_images")
  for path in real:
    (folder / path.name).symlink_to(path)
  return folder


@pytest.fixture(scope="module")
def config(image_folder) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      model=_model_config(),
      train=dict(image_size=S),
      data=dict(source=f"folder:{image_folder}", num_threads=2, prefetch=0),
      eval=dict(batch_size=8, grid_images=GRID, kid_num_subsets=10)))


@pytest.fixture(scope="module")
def tokenizer(config):
  # Eager init, like `restore_tokenizer`: the CLI test then reuses its compilations.
  return Tokenizer.from_config(config.model, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def models(config):
  return evaluator.load_metric_models(config.eval)


def save_run(workdir, config, tokenizer, *, step: int, ema_scale: float = 1.0):
  """A run directory without training: config.json + an orbax checkpoint at `step`.

  EMA = the tokenizer's weights x `ema_scale`; the raw weights are x 1.1, so
  --no-ema must change the numbers.
  """
  from gsq_jax.training import checkpointing
  from gsq_jax.training import writers
  writers.MetricWriter(workdir, tensorboard=False).write_config(config)
  params = nnx.state(tokenizer, nnx.Param)
  scaled = lambda scale: jax.tree.map(lambda p: np.asarray(p) * scale, params)  # host maths
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  ckpt.save(step, {"params": scaled(1.1), "ema": scaled(ema_scale), "step": jnp.int32(step)})
  ckpt.close()


def _mesh(n: int):
  return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=jax.devices()[:n])


@pytest.fixture(scope="module")
def eval8(tokenizer, config, models, tmp_path_factory):
  out = tmp_path_factory.mktemp("eval8")
  result = evaluator.run_evaluation(tokenizer, config, out_dir=out, mesh=_mesh(8), step=7,
                                    metric_models=models)
  return out, result


@pytest.fixture(scope="module")
def eval1(tokenizer, config, models, tmp_path_factory):
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval.batch_size = N  # one unpadded batch
  out = tmp_path_factory.mktemp("eval1")
  return evaluator.run_evaluation(tokenizer, config, out_dir=out, mesh=_mesh(1), step=7,
                                  metric_models=models)


@pytest.fixture(scope="module")
def images(config) -> np.ndarray:
  """The 13 eval images in [-1, 1], read through the unsharded pipeline."""
  data = input_pipeline.make_eval_iterator(dict(config.data), global_batch_size=N,
                                           image_size=S)
  (batch,) = list(data)
  assert batch["mask"].all()
  return batch["image"]


def test_eval_json_grid_and_protocol(eval8, image_folder, images):
  out, result = eval8
  written = json.loads((out / evaluator.EVAL_FILENAME).read_text())
  assert CONTRACT_KEYS <= set(written)
  assert written == evaluator.json_safe(result)
  # No Inception weights here: rFID is absent, with the reason and the fix.
  assert "rfid" not in written
  assert inception_lib.FID_WEIGHTS_FILENAME in written["rfid_status"]
  assert "Fix:" in written["rfid_status"] and "GSQ_JAX_WEIGHTS_DIR" in written["rfid_status"]
  assert written["kid_features"] == "vgg16" and written["kid_subset_size"] == N
  assert written["kid_num_subsets"] == 1 and written["kid_std"] == 0  # subsets = the set
  protocol = written["protocol"]
  assert protocol["num_images"] == N and protocol["requested_num_images"] == N
  assert (protocol["resolution"], protocol["crop"], protocol["ema"], protocol["step"],
          protocol["devices"]) == (S, "center", True, 7, 8)
  assert protocol["source"] == f"folder:{image_folder}"
  assert (protocol["tie_break"], protocol["distance_dtype"]) == ("first", "float32")
  assert written["bits_per_image"] == (S // 2) ** 2 * 2 * 6  # h * w * G * log2(64)
  tokens = N * (S // 2) ** 2
  assert written["tokens"] == protocol["usage_tokens"] == tokens
  assert written["lookups"] == 2 * tokens
  expected = 100 * (1 - np.exp(-2 * tokens / 64))
  np.testing.assert_allclose(written["usage_uniform_expectation"], expected, rtol=1e-9)
  for name in ("psnr", "psnr_per_image", "ssim", "mse", "lpips_vgg", "lpips_alex",
               "fd_vgg16", "kid_mean", "usage", "perplexity", "product_usage"):
    assert np.isfinite(written[name]), name
  assert written["fd_vgg16"] > 0 and 0 < written["lpips_alex"] < 2
  assert len(written["per_group"]["usage"]) == 2
  np.testing.assert_allclose(written["group_usage_mean"],
                             np.mean(written["per_group"]["usage"]), rtol=1e-9)
  np.testing.assert_allclose(written["effective_bits"], np.log2(written["perplexity"]),
                             rtol=1e-6)
  used = round(written["usage"] * 64 / 100)
  assert written["unused_codes"] == 64 - used
  assert written["codebook_norm_min"] <= written["codebook_norm_mean"] <= written[
      "codebook_norm_max"]
  # The rank-frequency curve of the code histogram.
  assert protocol["code_frequency_plot"] == "code_frequency.png"
  plot = np.asarray(Image.open(out / "code_frequency.png"))
  assert plot.ndim == 3 and plot.shape[0] > 100 and plot.std() > 0
  # Grid: labelled originals (top row) over reconstructions, GRID images, >= 512 px wide.
  grid = np.asarray(Image.open(out / evaluator.GRID_FILENAME))
  layout = writers.grid_layout(GRID, S, S)
  k, top, left = layout.scale, layout.top, layout.left
  assert grid.shape[1] == left + k * (GRID * (S + 2) + 2) >= 512
  first = np.round((images[0] * 0.5 + 0.5) * 255)
  cell = grid[top + 2 * k:top + (2 + S) * k:k, left + 2 * k:left + (2 + S) * k:k]
  np.testing.assert_allclose(cell, first, atol=1)


def test_same_metrics_on_1_and_8_devices(eval1, eval8):
  _, result8 = eval8
  assert eval1["protocol"]["devices"] == 1 and result8["protocol"]["devices"] == 8
  for key, value in eval1.items():
    if key in ("tokens", "lookups", "kid_features", "rfid_status", "kid_subset_size"):
      assert result8[key] == value, key
    elif key == "per_group":
      np.testing.assert_allclose(result8[key]["usage"], value["usage"], rtol=1e-6)
      np.testing.assert_allclose(result8[key]["perplexity"], value["perplexity"], rtol=1e-5)
    elif key != "protocol":
      np.testing.assert_allclose(result8[key], value, rtol=2e-5, atol=1e-7, err_msg=key)


def test_metrics_match_direct_computation(eval1, tokenizer, models, images):
  model = nnx.view(tokenizer, deterministic=True, raise_if_not_found=False)
  graph, state = nnx.split(model)

  @jax.jit
  def reconstruct(state, x):
    recon, quantized = nnx.merge(graph, state)(x)
    return jnp.clip(recon, -1, 1), quantized.indices

  recon, indices = reconstruct(state, jnp.asarray(images))
  x01 = np.clip(images * 0.5 + 0.5, 0, 1).astype(np.float64)
  r01 = np.clip(np.asarray(recon) * 0.5 + 0.5, 0, 1).astype(np.float64)
  mse = np.mean((x01 - r01) ** 2)
  np.testing.assert_allclose(eval1["mse"], mse, rtol=1e-5)
  np.testing.assert_allclose(eval1["psnr"], -10 * np.log10(mse), rtol=1e-5)
  per_image = -10 * np.log10(np.mean((x01 - r01) ** 2, axis=(1, 2, 3)))
  np.testing.assert_allclose(eval1["psnr_per_image"], per_image.mean(), rtol=1e-5)
  stats = codebook_stats(indices, 64)
  np.testing.assert_allclose(eval1["usage"], stats["usage"], rtol=1e-6)
  np.testing.assert_allclose(eval1["perplexity"], stats["perplexity"], rtol=1e-5)
  np.testing.assert_allclose(eval1["product_usage"], stats["product_usage"], rtol=1e-6)
  alex = jax.jit(lambda a, b: models.lpips_alex(a, b))(2 * x01 - 1, 2 * r01 - 1)
  np.testing.assert_allclose(eval1["lpips_alex"], np.mean(alex), rtol=1e-4)


def test_inception_weights_status(tmp_path, monkeypatch):
  monkeypatch.delenv("GSQ_JAX_WEIGHTS_DIR", raising=False)
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  bad = tmp_path / inception_lib.FID_WEIGHTS_FILENAME
  bad.write_bytes(b"not the FID weights")
  for path, reason in ((bad, "sha256"), (tmp_path / "absent.pth", "not found")):
    models = evaluator.load_metric_models(
        {"inception_weights": str(path), "lpips": False, "fd_vgg16": False, "kid": False})
    assert models.inception is None and not models.inception_status.available
    assert reason in models.inception_status.reason
    assert models.lpips_vgg is None and models.lpips_alex is None


def test_eval_crop_is_wired_to_the_pipeline(config, image_folder):
  eval_cfg = evaluator.resolve_eval_config({"crop": "crop_pct"})
  data_cfg = evaluator.eval_data_config(config, eval_cfg, num_images=2)
  assert (data_cfg["eval_crop"], data_cfg["eval_num_images"]) == ("crop_pct", 2)
  (batch,) = list(input_pipeline.make_eval_iterator(data_cfg, global_batch_size=2,
                                                    image_size=S))
  first = sorted(image_folder.iterdir())[0]
  img = transforms.decode_image(first)
  np.testing.assert_array_equal(batch["image"][0],
                                transforms.preprocess(img, S, "crop_pct"))
  assert not np.array_equal(batch["image"][0], transforms.preprocess(img, S, "center"))
  # Explicit source / count arguments win over the config.
  data_cfg = evaluator.eval_data_config(config, eval_cfg, source="demo:5", num_images=3)
  assert (data_cfg["eval_source"], data_cfg["eval_num_images"]) == ("demo:5", 3)


@pytest.mark.parametrize("eval_cfg, field", [
    ({"crop": "random"}, "eval.crop"),
    ({"batch_size": 0}, "eval.batch_size"),
    ({"inception_preprocess": "tf"}, "eval.inception_preprocess"),
    ({"lpips": "yes"}, "eval.lpips"),
    ({"every_steps": 5}, "eval.every_steps"),
])
def test_bad_eval_config_names_the_field(eval_cfg, field):
  with pytest.raises(ValueError, match=field):
    evaluator.resolve_eval_config(eval_cfg)


def test_missing_image_size_is_reported(tokenizer, config, tmp_path):
  bad = ml_collections.ConfigDict(config.to_dict())
  del bad.train
  with pytest.raises(ValueError, match="config.train.image_size"):
    evaluator.run_evaluation(tokenizer, bad, out_dir=tmp_path)


def test_cli_rejects_bad_arguments(tmp_path, capsys):
  from gsq_jax.evaluation import cli as eval_cli
  for argv in (["--workdir", str(tmp_path / "missing")],
               ["--workdir", str(tmp_path), "--num-images", "0"],
               ["--num-images", "3"]):
    with pytest.raises(SystemExit) as e:
      eval_cli.main(argv)
    assert e.value.code == 2
  err = capsys.readouterr().err
  assert "--workdir" in err and "positive integer" in err


@pytest.mark.slow
def test_rfid_with_weights_in_the_official_layout(tokenizer, config, images, tmp_path):
  """rFID path end to end with random Inception weights in the official file format."""
  from gsq_jax.evaluation import frechet
  from gsq_jax.utils import torch_pickle
  rng = np.random.default_rng(0)
  state_dict = {}
  for key, shape in inception_lib.official_state_dict_shapes().items():
    if key.endswith("conv.weight"):
      value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
    elif key.endswith(("running_var", "bn.weight")):
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = rng.normal(0, 0.05, shape)
    state_dict[key] = value.astype(np.float32)
  path = tmp_path / inception_lib.FID_WEIGHTS_FILENAME
  torch_pickle.save_state_dict_legacy(path, state_dict)
  # The hash check is waived only because these are not the official weights.
  net = inception_lib.load_inception(path, expected_sha256_prefix=None)
  models = evaluator.MetricModels(
      lpips_vgg=None, lpips_alex=None, inception=net, report_lpips=False,
      inception_status=inception_lib.rfid_status(path, expected_sha256_prefix=None))
  mesh = _mesh(8)
  data = input_pipeline.make_eval_iterator(dict(config.data), global_batch_size=8,
                                           image_size=S,
                                           sharding=evaluator.batch_sharding(mesh))
  result, _, info = evaluator.evaluate(tokenizer, data, models, mesh=mesh, fd_vgg16=False,
                                       kid_num_subsets=5)
  assert info["num_images"] == N
  assert result["rfid_status"] == "ok" and result["kid_features"] == "inception"
  assert "lpips_alex" not in result and "fd_vgg16" not in result
  # The same FD from features computed directly, without batching or masks.
  model = nnx.view(tokenizer, deterministic=True, raise_if_not_found=False)
  recon = jax.jit(lambda x: jnp.clip(model(x)[0], -1, 1))(jnp.asarray(images))
  features = inception_lib.make_feature_fn(net, "torch_fidelity")
  real = frechet.FeatureStats(2048).update(features(jnp.asarray(images) * 0.5 + 0.5))
  fake = frechet.FeatureStats(2048).update(features(recon * 0.5 + 0.5))
  np.testing.assert_allclose(result["rfid"], frechet.frechet_distance_from_stats(real, fake),
                             rtol=1e-3)


def test_gsq_eval_cli_on_a_saved_run(tokenizer, config, tmp_path, capsys):
  """A run directory (config.json + orbax checkpoint) -> gsq-eval -> eval.json + grid."""
  from gsq_jax.evaluation import cli as eval_cli
  save_run(tmp_path, config, tokenizer, step=3)

  assert eval_cli.main(["--workdir", str(tmp_path)]) == 0
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  written = json.loads((tmp_path / evaluator.EVAL_FILENAME).read_text())
  assert (tmp_path / evaluator.GRID_FILENAME).is_file()
  assert CONTRACT_KEYS <= set(written)
  assert written["protocol"]["step"] == printed["step"] == 3
  assert written["protocol"]["ema"] is True and written["protocol"]["num_images"] == N
  assert printed["psnr"] == pytest.approx(written["psnr"])

  out = tmp_path / "raw"
  assert eval_cli.main(["--workdir", str(tmp_path), "--no-ema", "--num-images", "5",
                        "--out-dir", str(out)]) == 0
  raw = json.loads((out / evaluator.EVAL_FILENAME).read_text())
  assert raw["protocol"]["ema"] is False and raw["protocol"]["num_images"] == 5
  assert raw["psnr"] != pytest.approx(written["psnr"], rel=1e-3)


def test_gsq_eval_compares_several_runs_on_the_same_images(tokenizer, config, tmp_path, capsys):
  """Two run directories -> one table; the second trains with random ties + bf16 distances."""
  from gsq_jax.evaluation import cli as eval_cli
  cheap = ml_collections.ConfigDict(config.to_dict())
  cheap.eval.update(lpips=False, kid=False, fd_vgg16=False, grid_images=0)
  reference_like = ml_collections.ConfigDict(cheap.to_dict())
  reference_like.model.quantizer.update(tie_break="random", distance_dtype="bfloat16")
  save_run(tmp_path / "a", cheap, tokenizer, step=3)
  save_run(tmp_path / "b", reference_like, tokenizer, step=4, ema_scale=0.9)
  argv = ["--workdir", str(tmp_path / "a"), "--workdir", str(tmp_path / "b"),
          "--num-images", "4", "--table", str(tmp_path / "tables")]
  assert eval_cli.main(argv) == 0
  table = capsys.readouterr().out  # Markdown; the header may use display labels
  assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["a", "b"]
  csv = pd.read_csv(tmp_path / "tables" / "compare.csv")
  for column in ("run", "psnr", "ssim", "usage", "perplexity", "bits_per_image", "tie_break",
                 "distance_dtype"):
    assert column in csv.columns, column
  assert list(csv["run"]) == ["a", "b"] and list(csv["step"]) == [3, 4]
  assert list(csv["images"]) == [4, 4] and list(csv["bits_per_image"]) == [3072, 3072]
  # Evaluation ties are first-index whatever the run trains with; the dtype is the run's.
  assert list(csv["tie_break"]) == ["first", "first"]
  assert list(csv["distance_dtype"]) == ["float32", "bfloat16"]
  written = json.loads((tmp_path / "b" / evaluator.EVAL_FILENAME).read_text())
  assert written["psnr"] == pytest.approx(csv["psnr"][1])
  assert csv["psnr"][0] != pytest.approx(csv["psnr"][1], rel=1e-4)  # other weights

  # Runs that would see different images are refused before any evaluation.
  other = ml_collections.ConfigDict(cheap.to_dict())
  other.train.image_size = 16
  save_run(tmp_path / "c", other, tokenizer, step=1)
  assert eval_cli.main(["--workdir", str(tmp_path / "a"), "--workdir", str(tmp_path / "c")]) == 1
  err = capsys.readouterr().err
  assert "image_size is 32 for a but 16 for c" in err and "--image-size" in err
  # --crop / --image-size make the settings equal; a crop difference names --crop.
  from gsq_jax.evaluation import compare
  cropped = ml_collections.ConfigDict(cheap.to_dict())
  cropped.eval.crop = "crop_pct"
  with pytest.raises(ValueError, match="crop is 'center' for a but 'crop_pct' for d.*--crop"):
    compare.check_same_images({"a": compare.image_settings(cheap),
                               "d": compare.image_settings(cropped)})
