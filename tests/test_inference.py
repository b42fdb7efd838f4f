"""`gsq_jax.load_tokenizer` and `gsq-tokenize` on a tiny saved run directory.

The run is built and saved directly (no training), as in test_evaluator.py;
the API must agree with the tokenizer module it wraps, on 1 and 8 devices and
for a batch that does not divide the device count.
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
import pytest

import gsq_jax
from gsq_jax.data import input_pipeline
from gsq_jax.inference import tokenize_cli
from gsq_jax.models import Tokenizer
from test_evaluator import _model_config, save_run

S, N = 32, 6  # image size; images in the run's data folder


@pytest.fixture(scope="module")
def image_folder(shared_dir, tmp_path_factory):
  folder = tmp_path_factory.mktemp("tokenize_images")
  for path in sorted((shared_dir / "data" / "imagenet-samples-256").glob("*.jpg"))[:N]:
    (folder / path.name).symlink_to(path)
  return folder


@pytest.fixture(scope="module")
def run(image_folder, tmp_path_factory):
  config = ml_collections.ConfigDict(dict(
      model=_model_config(),  # f = 2, D = 8, G = 2, V = 64
      train=dict(image_size=S),
      data=dict(source=f"folder:{image_folder}", num_threads=2, prefetch=0),
      eval=dict(batch_size=8, num_images=4)))  # gsq-tokenize must still read all N
  tokenizer = Tokenizer.from_config(config.model, rngs=nnx.Rngs(0))
  workdir = tmp_path_factory.mktemp("run")
  save_run(workdir, config, tokenizer, step=5)
  return workdir, config, tokenizer


@pytest.fixture(scope="module")
def images(run):
  _, config, _ = run
  (batch,) = list(input_pipeline.make_eval_iterator(dict(config.data), global_batch_size=N,
                                                    image_size=S))
  return batch["image"]


@pytest.fixture(scope="module")
def tok(run):
  return gsq_jax.load_tokenizer(run[0])  # all 8 devices


@pytest.fixture(scope="module")
def reference(run, images):
  """The wrapped module's own forward pass, unsharded."""
  view = nnx.view(run[2], deterministic=True, raise_if_not_found=False)
  recon, quantized = jax.jit(lambda x: view(x))(jnp.asarray(images))
  return recon, quantized


def test_reconstruct_is_the_model_forward(tok, images, reference):
  assert (tok.step, tok.ema, tok.mesh.size, tok.tie_break) == (5, True, 8, "first")
  recon, codes = tok.reconstruct(images[:5])  # 5 rows on 8 devices: padded, cut back
  assert recon.shape == (5, S, S, 3) and codes.shape == (5, S // 2, S // 2, 2)
  assert codes.dtype == jnp.int32
  np.testing.assert_array_equal(codes, reference[1].indices[:5])
  np.testing.assert_allclose(recon, reference[0][:5], rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(recon - jnp.asarray(images[:5])).mean()) > 0  # not the identity


def test_decode_codes_decodes_the_quantized_latent(tok, images, reference, run):
  codes = tok.tokenize(images)
  np.testing.assert_array_equal(codes, reference[1].indices)
  decoded_latent = jax.jit(lambda zq: run[2].decode(zq))(reference[1].quantized)
  np.testing.assert_allclose(tok.decode_codes(codes), decoded_latent, rtol=1e-5, atol=1e-5)
  z = tok.encode(images)
  assert z.shape == (N, S // 2, S // 2, 8)
  np.testing.assert_allclose(z, jax.jit(run[2].encode)(jnp.asarray(images)), rtol=1e-5,
                             atol=1e-6)


def test_one_and_eight_devices_give_the_same_codes(run, tok, images):
  one = gsq_jax.load_tokenizer(run[0], devices=jax.devices()[:1])
  assert one.mesh.size == 1
  np.testing.assert_array_equal(one.tokenize(images[:5]), tok.tokenize(images[:5]))


def test_bad_inputs_name_the_fix(tok, tmp_path):
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\) in \[-1, 1\].*divisible by f = 2"):
    tok.tokenize(np.zeros((2, 31, 32, 3), np.float32))
  with pytest.raises(ValueError, match="x / 127.5 - 1"):
    tok.tokenize(np.zeros((2, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match=r"\[0, V = 64\), got values in \[64, 64\]"):
    tok.decode_codes(np.full((1, 4, 4, 2), 64, np.int32))
  with pytest.raises(ValueError, match="G = 2"):
    tok.decode_codes(np.zeros((1, 4, 4, 1), np.int32))
  with pytest.raises(FileNotFoundError, match="run directory"):
    gsq_jax.load_tokenizer(tmp_path / "absent")


def test_gsq_tokenize_writes_readable_shards(run, tok, images, image_folder, tmp_path, capsys):
  out = tmp_path / "codes"
  argv = ["--workdir", str(run[0]), "--data", f"folder:{image_folder}", "--out", str(out),
          "--shard-size", "4"]
  assert tokenize_cli.main(argv) == 0
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed["num_images"] == N and printed["shards"] == 2
  manifest = json.loads((out / tokenize_cli.MANIFEST).read_text())
  assert [s["num_images"] for s in manifest["shards"]] == [4, 2]
  assert (manifest["G"], manifest["V"], manifest["codes_dtype"], manifest["tie_break"]) == (
      2, 64, "uint16", "first")
  first = np.load(out / "codes-00000-of-00002.npy")
  assert first.shape == (4, S // 2, S // 2, 2) and first.dtype == np.uint16
  codes, index = tokenize_cli.load_codes(out)
  np.testing.assert_array_equal(index, np.arange(N))
  np.testing.assert_array_equal(codes, tok.tokenize(images))
  # A second run into the same folder must not mix shards silently.
  assert tokenize_cli.main(argv) == 1
  assert "--overwrite" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    tokenize_cli.main(["--workdir", str(tmp_path / "absent"), "--data", "demo", "--out",
                       str(out)])
  assert e.value.code == 2


def test_import_gsq_jax_stays_cheap():
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  # (the lazy attribute itself is what every other test here calls)
  code = "import sys, gsq_jax; assert 'jax' not in sys.modules, 'import gsq_jax loaded jax'"
  subprocess.run([sys.executable, "-c", code], check=True)
