"""Importing a flex_gen (GSQ paper) `checkpoint.pt` into the flex Tokenizer.

The file (flex_gen `Basictokenizer.save`) is `{'model_state_dict': {name:
tensor}, 'config': bytes}`, where `config` pickles the 16 keyword arguments of
`FlexTokenizer.__init__` (possibly as omegaconf nodes; decoded by
gsq_jax/utils/config_pickle.py). Released files store the EMA weights under
the plain names. The arguments map to `config.model`:

  hidden_channels, channel_multipliers          -> same names
  encoder/decoder_layer_configs                 -> same names
  embedding_dim                                 -> latent_dim (D)
  use_adaptive_norm, mid_block_attn             -> same names
  use_learnable_up_down_sample                  -> use_depth_to_space
  dropout_probability                           -> dropout
  quantizer_config: quantize_type gsq|gvq|vq, num_group (G), num_embed (V),
    use_l2_norm, use_uniform_init, commitment_loss_weight, argmin_func
                                                -> model.quantizer (name "gsq")

All three flex quantizers are GSQ here: `gvq` is GSQ with its l2 switch and
first-index ties, `vq` is GSQ with G = 1 (same lookup, raw-row output, loss
`mse(c, sg(zn)) + beta mse(sg(c), zn)`). An option this code does not
implement (attention_resolutions, other kernel sizes, l1 norm, softmax
sampling, TCR/entropy losses) is an error naming it, never ignored.

State-dict names: `encoder.blocks.{i}` is the flat list of the encoder's
level blocks then its mid blocks; `decoder.blocks.{i}` is the mid blocks,
the mid AdaptiveGroupNorm (if any), then the up blocks -- the order in which
encoder.py / decoder.py build `down`/`mid` and `mid`/`mid_norm`/`up`.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from gsq_jax.importers import reader
from gsq_jax.models import tokenizer as tokenizer_lib
from gsq_jax.quantizers import default_quantizer_config
from gsq_jax.utils import config_pickle

SOURCE_KIND = "flex_gen"
CONSTRUCTOR_ARGS = (
    "input_channels", "hidden_channels", "encoder_layer_configs", "decoder_layer_configs",
    "channel_multipliers", "mid_block_attn", "attention_resolutions", "embedding_dim",
    "use_adaptive_norm", "use_learnable_up_down_sample", "residual_conv_kernel_size",
    "input_conv_kernel_size", "output_conv_kernel_size", "dropout_probability",
    "quantizer_aux_loss_weight", "quantizer_config")

# Quantizer options per quantize_type: option -> the only supported value (None = any).
_QUANTIZER_OPTIONS = {
    "gsq": dict(num_embed=None, embed_dim=None, num_group=None, use_uniform_init=None,
                commitment_loss_weight=None, use_l2_norm=None, use_l1_norm=False,
                force_1d_clip=False, argmin_func=None, argmin_softmax_tau=None),
    "gvq": dict(num_embed=None, embed_dim=None, num_group=None, use_uniform_init=None,
                commitment_loss_weight=None, use_l2_norm=None, use_l1_norm=False,
                argmin_func=None),  # gvq always takes torch.argmin; argmin_func is swallowed
    "vq": dict(num_embed=None, embed_dim=None, commitment_loss_weight=None,
               use_uniform_init=None, use_l1_norm=False, use_l2_norm=None, lambda_tcr_loss=0,
               norm_distirbution_radius=None, lambda_entropy_loss=0, entropy_loss_type=None,
               entropy_temperature=None),
}
_TIE_BREAKS = {None: "first", "default": "first", "argmin": "first", "random": "random"}

HINT = ("a flex_gen checkpoint is {'model_state_dict', 'config'} as written by "
        "Basictokenizer.save; an IBQ / Lightning checkpoint ('state_dict') is imported "
        "with `gsq-import ibq`")


def _unsupported(source: str, option: str, value: Any, why: str) -> reader.CheckpointError:
  return reader.CheckpointError(f"{source}: flex_gen option {option}={value!r} is not supported "
                                f"by gsq_jax ({why})")


def _quantizer_config(qc: dict, embedding_dim: int, source: str) -> tuple[ml_collections.ConfigDict, int, int]:
  """(model.quantizer, G, V) for flex_gen's quantizer_config."""
  if not isinstance(qc, dict) or "quantize_type" not in qc:
    raise reader.CheckpointError(f"{source}: flex_gen config quantizer_config must be a dict with "
                                 f"'quantize_type', got {qc!r}")
  kind = qc["quantize_type"]
  if kind not in _QUANTIZER_OPTIONS:
    raise _unsupported(source, "quantizer_config.quantize_type", kind,
                       f"importable types: {sorted(_QUANTIZER_OPTIONS)}")
  allowed = _QUANTIZER_OPTIONS[kind]
  for option, value in qc.items():
    if option == "quantize_type":
      continue
    if option not in allowed:
      raise _unsupported(source, f"quantizer_config.{option}", value,
                         f"not an option gsq_jax maps for quantize_type {kind!r}")
    if allowed[option] is not None and value != allowed[option]:
      raise _unsupported(source, f"quantizer_config.{option}", value,
                         f"only {allowed[option]!r} is implemented")
  embed_dim = qc.get("embed_dim", embedding_dim)
  if embed_dim != embedding_dim:
    raise reader.CheckpointError(f"{source}: quantizer_config.embed_dim={embed_dim} differs from "
                                 f"embedding_dim={embedding_dim}")
  argmin = qc.get("argmin_func", "random") if kind == "gsq" else "argmin"
  argmin = argmin.lower() if isinstance(argmin, str) else argmin
  if argmin not in _TIE_BREAKS:
    raise _unsupported(source, "quantizer_config.argmin_func", argmin,
                       "only argmin and random tie-breaking are implemented")
  q = default_quantizer_config("gsq")
  q.l2_normalize = bool(qc.get("use_l2_norm", False))
  q.init = "uniform" if qc.get("use_uniform_init", kind != "gsq") else "spherical"
  q.commitment_weight = float(qc.get("commitment_loss_weight", 0.25))
  q.tie_break = _TIE_BREAKS[argmin]
  groups = int(qc.get("num_group", 1)) if kind != "vq" else 1
  if "num_embed" not in qc:
    raise reader.CheckpointError(f"{source}: quantizer_config has no num_embed (codebook size)")
  return q, groups, int(qc["num_embed"])


def model_config(args: dict, source: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """(config.model, loss settings) from FlexTokenizer's constructor arguments."""
  if not isinstance(args, dict):
    raise reader.CheckpointError(f"{source}: the pickled flex_gen config is a "
                                 f"{type(args).__name__}, expected a dict of constructor arguments")
  unknown = sorted(set(args) - set(CONSTRUCTOR_ARGS))
  if unknown:
    raise reader.CheckpointError(f"{source}: unknown FlexTokenizer arguments {unknown} "
                                 "(a newer flex_gen?); gsq_jax maps only " + ", ".join(CONSTRUCTOR_ARGS))
  missing = [k for k in ("hidden_channels", "channel_multipliers", "encoder_layer_configs",
                         "decoder_layer_configs", "embedding_dim", "quantizer_config")
             if k not in args]
  if missing:
    raise reader.CheckpointError(f"{source}: the flex_gen config lacks {missing}")
  fixed = dict(input_channels=3, residual_conv_kernel_size=3, input_conv_kernel_size=3,
               output_conv_kernel_size=3)
  for option, value in fixed.items():
    if args.get(option, value) != value:
      raise _unsupported(source, option, args[option], f"only {value} is implemented")
  if args.get("attention_resolutions"):
    raise _unsupported(source, "attention_resolutions", args["attention_resolutions"],
                       "attention inside the levels; only mid_block_attn is implemented")

  m = tokenizer_lib.default_model_config()
  m.architecture = "flex"
  m.hidden_channels = int(args["hidden_channels"])
  m.channel_multipliers = tuple(int(v) for v in args["channel_multipliers"])
  m.encoder_layer_configs = tuple(int(v) for v in args["encoder_layer_configs"])
  m.decoder_layer_configs = tuple(int(v) for v in args["decoder_layer_configs"])
  m.downsample_factor = 2 ** (len(m.channel_multipliers) - 1)
  m.latent_dim = int(args["embedding_dim"])
  m.use_adaptive_norm = bool(args.get("use_adaptive_norm", True))
  m.use_depth_to_space = bool(args.get("use_learnable_up_down_sample", True))
  m.mid_block_attn = bool(args.get("mid_block_attn", False))
  m.dropout = float(args.get("dropout_probability", 0.0))
  m.dtype = "float32"
  m.quantizer, m.num_groups, m.codebook_size = _quantizer_config(
      args["quantizer_config"], m.latent_dim, source)
  try:
    tokenizer_lib.validate_model_config(m)
  except ValueError as e:
    raise reader.CheckpointError(f"{source}: the flex_gen config gives an invalid model: {e}") from e
  loss = {"quantizer_weight": float(args.get("quantizer_aux_loss_weight", 1.0))}
  return m, loss


_RESBLOCK = {"norm1": "net.0", "conv1": "net.2", "norm2": "net.3", "conv2": "net.6",
             "skip": "skip", "norm": "norm", "qkv": "qkv_conv", "proj": "proj_conv",
             "to_scale": "gamma", "to_bias": "beta", "conv": "conv"}


def torch_namer(model: tokenizer_lib.Tokenizer):
  """path of a Param in the flex Tokenizer -> its flex_gen state-dict name."""
  n_down = len(model.encoder.down)
  n_mid = len(model.decoder.mid.layers)
  n_mid_norm = int(model.decoder.mid_norm is not None)

  def name(path: tuple) -> str:
    *module, leaf = path
    leaf = reader.TORCH_LEAF.get(leaf, leaf)
    if module == ["quantizer"] and leaf == "codebook":
      return "quantizers.codebook.weight"
    part, rest = module[0], module[1:]
    ends = {("encoder", "norm_out"): "fianl_layers.0", ("encoder", "conv_out"): "fianl_layers.2",
            ("decoder", "norm_out"): "final_layers.0", ("decoder", "conv_out"): "final_layers.2",
            ("encoder", "conv_in"): "conv_in", ("decoder", "conv_in"): "conv_in"}
    if (part, rest[0]) in ends:
      return f"{part}.{ends[(part, rest[0])]}.{leaf}"
    if rest[:2] == ["mid", "layers"]:
      index, sub = rest[2] + (n_down if part == "encoder" else 0), rest[3:]
    elif rest[0] == "mid_norm":
      index, sub = n_mid, rest[1:]
    elif rest[0] in ("down", "up"):
      index, sub = rest[1] + (n_mid + n_mid_norm if part == "decoder" else 0), rest[2:]
    else:
      raise reader.CheckpointError(f"no flex_gen name for parameter {'/'.join(map(str, path))}")
    return ".".join([part, "blocks", str(index), *(_RESBLOCK[s] for s in sub), leaf])

  return name


def import_flex_gen(path: str | os.PathLike) -> reader.ImportedModel:
  """Reads a flex_gen checkpoint into a flex Tokenizer (float32) with its config."""
  source = os.fspath(path)
  with reader.open_tensors(source) as top:
    top = reader.top_level_dict(top, source, ("model_state_dict", "config"), HINT)
    try:
      args = config_pickle.loads_config(top["config"], source=source)
    except reader.CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise reader.CheckpointError(f"{source}: cannot decode the pickled flex_gen config: {e}") from e
    cfg, loss = model_config(args, source)
    tokenizer = reader.empty_tokenizer(cfg)
    tensors = reader.TensorSet(top["model_state_dict"], source)
    reader.load_params(tokenizer, torch_namer(tokenizer), tensors)
    reader.require_all_taken(tensors)
  flex_type = args["quantizer_config"]["quantize_type"]
  return reader.ImportedModel(cfg, tokenizer, SOURCE_KIND,
                              {"quantize_type": flex_type, "loss": loss,
                               "flex_gen_config": _jsonable(args)})


def _jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)
