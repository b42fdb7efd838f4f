"""Config files: the arg string, the paper recipes, overrides, and validation messages."""

import json
import pathlib
import sys

from absl import flags
from flax import nnx
import ml_collections
from ml_collections import config_flags
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import common  # noqa: E402
from configs import gsq  # noqa: E402
from configs import gsq_gan_256  # noqa: E402
from configs import gsq_vae_128  # noqa: E402
from configs import ibq_262144  # noqa: E402
from gsq_jax.training import checkpointing  # noqa: E402
from gsq_jax.training import optim  # noqa: E402
from gsq_jax.training import train  # noqa: E402
from gsq_jax.models import Tokenizer  # noqa: E402
from gsq_jax.models import parameter_counts_from_config  # noqa: E402


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
  """No DINOv2 file anywhere (empty weights dir and torch hub)."""
  monkeypatch.setenv("GSQ_JAX_WEIGHTS_DIR", str(tmp_path / "weights"))
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def test_parse_arg_types_and_shorthands():
  arg = common.parse_arg("D=32,V=64k,tiny,quantizer=ibq,lr=0.5",
                         D=16, V=8192, tiny=False, quantizer="gsq", lr=1.0, G=1)
  assert (arg.D, arg.V, arg.tiny, arg.quantizer, arg.lr, arg.G) == (32, 65536, True, "ibq", 0.5, 1)
  assert common.parse_arg("V=256k", V=1).V == 2 ** 18
  assert common.parse_arg("tiny=false", tiny=True).tiny is False
  with pytest.raises(ValueError, match="'X' is unknown; known args: D$"):
    common.parse_arg("X=1", D=1)
  with pytest.raises(ValueError, match="'tyny' is unknown \\(did you mean 'tiny'\\?\\)"):
    common.parse_arg("tyny", D=1, tiny=False)
  assert common.closest("d", ["D", "G"]) == "D" and common.closest("zzz", ["D"]) is None
  with pytest.raises(ValueError, match="D='a': expected an integer"):
    common.parse_arg("D=a", D=1)
  with pytest.raises(ValueError, match="'D' needs a value"):
    common.parse_arg("D", D=1)


@pytest.mark.parametrize("f,multipliers", [(4, (1, 2, 4)), (8, (1, 2, 2, 4)),
                                           (16, (1, 1, 2, 2, 4)), (32, (1, 1, 2, 2, 4, 4))])
def test_structure_lives_in_one_model_block(f, multipliers):
  c = gsq.get_config(f"D=64,G=4,V=256k,f={f}")
  m = c.model
  assert (m.latent_dim, m.num_groups, m.codebook_size, m.downsample_factor) == (64, 4, 2 ** 18, f)
  assert tuple(m.channel_multipliers) == multipliers
  assert m.encoder_layer_configs == (2,) * (len(multipliers) + 1)
  assert train.paper_symbols(c) == {"D": 64, "G": 4, "V": 2 ** 18, "f": f, "d": 16,
                                    "quantizer": "gsq"}


def test_paper_f16_count_matches_fig3():
  # F16-D64-G4-V256k, cm 1-1-2-2-4: 77.53M parameters (GSQ.md §2.7, Fig. 3).
  counts = parameter_counts_from_config(gsq.get_config("D=64,G=4,V=256k,f=16").model)
  assert round(counts["total"] / 1e6, 2) == 77.53


def test_base_recipe_and_tiny():
  c = gsq.get_config("D=16,G=4,V=4096,f=8")
  assert (c.train.image_size, c.train.global_batch_size, c.train.total_steps) == (256, 512, 50_000)
  assert c.disc.name == "dino" and c.loss.perceptual_weight == 1.0
  assert optim.learning_rate(c.optim, "generator") == 2e-4
  assert optim.learning_rate(c.optim, "discriminator") == 2e-4
  assert c.model.dtype == "bfloat16" and c.train.two_batches_per_step
  t = gsq.get_config("D=16,G=4,V=4096,f=8,tiny")
  assert (t.train.image_size, t.model.hidden_channels, t.disc.name) == (32, 32, "none")
  assert t.data.source == "demo" and t.model.dtype == "float32"
  assert t.model.encoder_layer_configs == (1,) * 5
  # A discriminator can still be asked for on the tiny model.
  assert gsq.get_config("tiny,disc=patchgan,res=64").disc.name == "patchgan"
  with pytest.raises(ValueError, match="f=12: supported down-sampling factors"):
    gsq.get_config("f=12")


def test_compute_dtype_drives_the_model_dtype():
  c = gsq.get_config("tiny")
  c.train.compute_dtype = "bfloat16"
  assert c.model.dtype == "bfloat16"


def test_leaf_overrides_from_the_command_line():
  argv = ["prog", "--config", f"{ROOT}/configs/gsq.py:D=8,G=2,V=1k,tiny",
          "--config.optim.lr=0.5", "--config.train.total_steps=7",
          "--config.optim.discriminator.lr=0.25"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  c = fv.config
  assert (c.model.latent_dim, c.model.num_groups, c.model.codebook_size) == (8, 2, 1024)
  assert optim.learning_rate(c.optim, "generator") == 0.5
  assert optim.learning_rate(c.optim, "discriminator") == 0.25
  assert c.train.total_steps == 7


def test_paper_recipes():
  vae = gsq_vae_128.get_config()
  assert (vae.train.image_size, vae.train.global_batch_size, vae.train.total_steps) == (
      128, 256, 100_000)
  assert (vae.model.latent_dim, vae.model.codebook_size, vae.model.num_groups) == (8, 8192, 1)
  assert vae.disc.name == "none" and optim.learning_rate(vae.optim, "generator") == 1e-4
  assert vae.model.quantizer.l2_normalize and vae.model.quantizer.init == "spherical"

  gan = gsq_gan_256.get_config("D=32,G=2,V=256k,f=8")
  assert (gan.train.image_size, gan.disc.name, gan.disc.gen_loss, gan.disc.disc_loss) == (
      256, "dino", "non_saturate", "hinge")
  assert (gan.model.latent_dim, gan.model.num_groups) == (32, 2)
  with pytest.raises(ValueError, match="pins the paper recipe"):
    gsq_gan_256.get_config("res=128")

  ibq = ibq_262144.get_config()
  m = ibq.model
  assert (m.quantizer.name, m.latent_dim, m.codebook_size, m.downsample_factor) == (
      "ibq", 256, 2 ** 18, 16)
  # IBQ's own network, sized as the released 2^18 tokenizer (SEED-Voken ddconfig).
  assert m.architecture == "ibq" and tuple(m.channel_multipliers) == (1, 1, 2, 2, 4)
  assert (m.hidden_channels, m.ibq.num_res_blocks, tuple(m.ibq.attn_resolutions),
          m.ibq.resolution, m.ibq.z_channels) == (128, 4, (16,), 256, 256)
  assert parameter_counts_from_config(m) == {
      "encoder": 46_818_048, "decoder": 59_969_667, "quantizer": 2 ** 18 * 256,
      "total": 173_896_579}
  assert ibq.train.gd_order == "d_then_g" and not ibq.train.two_batches_per_step
  assert ibq.optim.grad_clip_norm == 0 and ibq.optim.generator.weight_decay == 0
  assert (ibq.optim.generator.b1, ibq.optim.generator.b2) == (0.5, 0.9)
  assert ibq.optim.piecewise_boundaries == (1_251_250, 1_501_500)
  assert ibq.disc.lecam_weight == 0.05 and ibq.loss.reconstruction == "l1"
  for c in (vae, ibq):  # (the GAN recipe needs the DINOv2 file, next test)
    train.validate_config(c, num_devices=8, process_count=1)


def test_paper_recipes_tokenize_like_the_reference():
  from gsq_jax.quantizers import make_quantizer  # pylint: disable=import-outside-toplevel
  for c in (gsq_gan_256.get_config("D=16,G=4,V=1024,f=8"), gsq_vae_128.get_config()):
    q = c.model.quantizer
    assert (c.train.compute_dtype, q.tie_break, q.distance_dtype) == (
        "bfloat16", "random", "bfloat16")
    # What a run writes to config.json and gsq-eval / load_tokenizer rebuild from it.
    saved = json.loads(json.dumps(c.to_dict()))["model"]["quantizer"]
    module = make_quantizer(saved, latent_dim=16, num_groups=4, codebook_size=1024,
                            rngs=nnx.Rngs(0))
    assert (module.tie_break, module.distance_dtype) == ("random", "bfloat16")
    # "under bf16 compute": a float32 run of the recipe keeps float32 distances.
    c.train.compute_dtype = "float32"
    assert (q.tie_break, q.distance_dtype) == ("random", "float32")
  base = gsq.get_config("D=16,G=4,V=1024,f=8").model.quantizer
  assert (base.tie_break, base.distance_dtype) == ("first", "float32")
  # flex_gen's VQ uses torch.argmin: other quantizers keep their defaults.
  vq = gsq_gan_256.get_config("quantizer=vq").model.quantizer
  assert (vq.tie_break, vq.distance_dtype) == ("first", "float32")


def test_dino_runs_refuse_to_start_without_weights(no_weights):
  c = gsq_gan_256.get_config("D=16,G=1,V=8192,f=8")
  with pytest.raises(FileNotFoundError, match="dinov2_vits14_reg4_pretrain.pth"):
    train.validate_config(c, num_devices=8, process_count=1)
  c.disc.dino_weights = "/nonexistent/dino.pth"
  with pytest.raises(FileNotFoundError, match="/nonexistent/dino.pth"):
    train.validate_config(c, num_devices=8, process_count=1)


def _tiny(**overrides):
  c = gsq.get_config("D=16,G=4,V=4096,f=8,tiny")
  for key, value in overrides.items():
    block, _, field = key.rpartition(".")
    target = c
    for part in block.split("."):
      target = target[part]
    with target.ignore_type():
      target[field] = value
  return c


@pytest.mark.parametrize("overrides,message", [
    ({"model.num_groups": 3}, r"model.num_groups: latent_dim D = 16 must be divisible by "
                              r"num_groups G = 3"),
    ({"model.downsample_factor": 6}, r"model.downsample_factor: must be a power of two"),
    ({"model.downsample_factor": 16}, r"is 16 but channel_multipliers \(1, 2, 2, 4\) give "
                                      r"f = 2 \*\* \(len - 1\) = 8"),
    ({"train.image_size": 36}, r"train.image_size = 36 must be divisible by "
                               r"model.downsample_factor f = 8; use e.g. 32 or 40"),
    ({"train.image_size": 8}, r"1x1 latent, but model.use_adaptive_norm needs"),
    ({"train.global_batch_size": 12}, r"train.global_batch_size = 12 must be divisible by the "
                                      r"number of devices mesh.data \* mesh.fsdp \* mesh.vocab = "
                                      r"8 \* 1 \* 1 = 8"),
    ({"mesh.data": 1, "mesh.vocab": 8, "model.codebook_size": 100},
     r"model.codebook_size V = 100 must be divisible by mesh.vocab = 8"),
    ({"mesh.fsdp": 3}, r"mesh.data = .* does not divide the 8 devices|mesh.fsdp"),
    ({"disc.name": "stylegan"}, r"disc.name must be one of \('none', 'patchgan', 'dino'\)"),
    ({"loss.reconstruction": "l2"}, r"loss.reconstruction must be one of \('mse', 'l1'\)"),
    ({"optim.decay": "exp"}, r"optim.decay: must be one of"),
    ({"optim.generator.b2": 1.5}, r"optim.generator.b2: must be in \[0, 1\)"),
    ({"train.gd_order": "both"}, r"train.gd_order must be one of"),
    ({"train.total_steps": 0}, r"train.total_steps must be an integer >= 1"),
])
def test_validation_names_the_field_and_the_fix(overrides, message):
  with pytest.raises(ValueError, match=message):
    train.validate_config(_tiny(**overrides), num_devices=8, process_count=1)


def test_quantizer_options_are_checked_before_compiling():
  c = gsq.get_config("D=16,G=4,V=4096,f=8,tiny,quantizer=vq")
  with pytest.raises(ValueError, match=r"model.num_groups \(G\) must be 1 for the 'vq'"):
    train.validate_config(c, num_devices=8, process_count=1)


def test_model_dtype_must_follow_compute_dtype():
  c = ml_collections.ConfigDict(_tiny().to_dict())  # e.g. read back from config.json
  c.model.dtype = "bfloat16"
  with pytest.raises(ValueError, match="model.dtype = 'bfloat16' differs from "
                                       "train.compute_dtype = 'float32'"):
    train.validate_config(c, num_devices=8, process_count=1)


def test_tiny_config_is_valid_and_round_trips_through_config_json(tmp_path):
  c = _tiny()
  train.validate_config(c, num_devices=8, process_count=1)
  (tmp_path / "config.json").write_text(c.to_json_best_effort(indent=2))
  back = checkpointing.load_config(tmp_path)
  assert isinstance(back, ml_collections.ConfigDict)
  assert json.loads(back.to_json()) == json.loads(c.to_json_best_effort())
  abstract = nnx.eval_shape(lambda: Tokenizer.from_config(back.model, rngs=nnx.Rngs(0)))
  assert abstract.quantizer.num_groups == 4


def test_vocab_mesh_needs_a_quantizer_with_a_searched_codebook():
  config = gsq.get_config("D=8,G=1,f=8,quantizer=lfq,tiny")
  config.mesh.data, config.mesh.vocab = 1, 8
  with pytest.raises(ValueError, match=r"mesh.vocab = 8 shards the codebook, which only "
                                       r"\('gsq', 'vq', 'ibq'\) quantizers support; the 'lfq'"):
    train.validate_config(config, num_devices=8, process_count=1)


def test_either_quantizer_in_either_architecture():
  """`arch` (model.architecture) and `quantizer` are independent config choices."""
  counts = {}
  for arch in ("flex", "ibq"):
    for quantizer in ("gsq", "ibq"):
      m = gsq.get_config(f"D=16,V=1024,f=8,tiny,quantizer={quantizer},arch={arch}").model
      assert (m.architecture, m.quantizer.name) == (arch, quantizer)
      model = nnx.eval_shape(lambda m=m: Tokenizer.from_config(m, rngs=nnx.Rngs(0)))
      assert type(model.encoder).__name__ == ("Encoder" if arch == "flex" else "IBQEncoder")
      counts[arch, quantizer] = parameter_counts_from_config(m)
  # The quantizer does not change the network, and the two networks differ.
  assert counts["ibq", "gsq"]["encoder"] == counts["ibq", "ibq"]["encoder"]
  assert counts["flex", "gsq"]["decoder"] != counts["ibq", "gsq"]["decoder"]
  m = gsq.get_config("tiny").model
  m.architecture = "vit"
  with pytest.raises(ValueError, match="model.architecture: must be one of"):
    Tokenizer.from_config(m, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="arch='vit'"):
    gsq.get_config("tiny,arch=vit")
