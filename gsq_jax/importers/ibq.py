"""Importing a SEED-Voken IBQ Lightning `.ckpt` into the IBQ network (architecture "ibq").

The file is `{'epoch', 'global_step', 'state_dict', ...}`; only `state_dict`
is read. It holds no config, so the network is read off the tensor shapes:
ch = conv_in's outputs, ch_mult from each level's first ResnetBlock,
num_res_blocks from level 0, attention where a level has `attn.*`,
z_channels = conv_out's outputs, D = quant_conv's outputs, V = codebook rows.
The nominal `resolution` only names the attention levels, so it is a choice
(default 256, the released models), and attn_resolutions follows from it.

Weights: official inference runs inside `ema_scope`, i.e. with the EMA
shadows `model_ema.<name without dots>`; that is the default here, the raw
`encoder.*` / `decoder.*` / `quantize.*` / `quant_conv.*` / `post_quant_conv.*`
with `ema=False`. `loss.*` (LPIPS, discriminator) and the discriminator's
shadows are ignored; any other tensor left over, or any missing, is an error
listing them.

The quantizer options (beta 0.25 on the codebook term as the code has it,
entropy loss 0.05 at T = 0.01) are not in the file; they are the released
recipe's (configs/IBQ/gpu/imagenet_ibqgan_*.yaml).
"""

from __future__ import annotations

import os
import re

import ml_collections
from flax import nnx

from gsq_jax.importers import reader
from gsq_jax.models import tokenizer as tokenizer_lib

SOURCE_KIND = "ibq"
EMA_PREFIX = "model_ema."
_EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")
HINT = ("an IBQ checkpoint is a Lightning .ckpt with 'state_dict' (SEED-Voken); a flex_gen "
        "checkpoint ('model_state_dict' + 'config') is imported with `gsq-import flex_gen`")


def _count(names, pattern: str) -> int:
  found = {int(m.group(1)) for n in names if (m := re.fullmatch(pattern, n))}
  if found != set(range(len(found))):
    raise reader.CheckpointError(f"non-contiguous indices for {pattern}: {sorted(found)}")
  return len(found)


def model_config(shapes: dict[str, tuple[int, ...]], source: str,
                 resolution: int = 256) -> ml_collections.ConfigDict:
  """The IBQ model block that fits the raw tokenizer tensors' shapes."""
  def shape(name):
    if name not in shapes:
      raise reader.CheckpointError(f"{source}: missing tensor {name!r}; {HINT}")
    return shapes[name]

  names = list(shapes)
  ch = shape("encoder.conv_in.weight")[0]
  levels = _count(names, r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight")
  if levels == 0:
    raise reader.CheckpointError(f"{source}: no encoder.down.* blocks; {HINT}")
  mult = [shape(f"encoder.down.{l}.block.0.conv1.weight")[0] // ch for l in range(levels)]
  blocks = _count(names, r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight")
  attn_levels = [l for l in range(levels) if f"encoder.down.{l}.attn.0.q.weight" in shapes]
  z_channels = shape("encoder.conv_out.weight")[0]
  latent_dim, quant_in = shape("quant_conv.weight")[:2]
  if quant_in != z_channels:
    raise reader.CheckpointError(
        f"{source}: encoder.conv_out gives {z_channels} channels but quant_conv takes {quant_in} "
        "(double_z=True is not supported: IBQ's released configs use double_z=False)")
  codebook_size, code_dim = shape("quantize.embedding.weight")
  if code_dim != latent_dim:
    raise reader.CheckpointError(f"{source}: codebook width {code_dim} != quant_conv outputs "
                                 f"{latent_dim}")
  if resolution % 2 ** (levels - 1):
    raise reader.CheckpointError(f"resolution {resolution} must be divisible by "
                                 f"2^{levels - 1} for {levels} levels")
  m = tokenizer_lib.ibq_model_config(
      hidden_channels=ch, channel_multipliers=tuple(mult), latent_dim=latent_dim,
      codebook_size=codebook_size, num_res_blocks=blocks, resolution=resolution,
      z_channels=z_channels, attn_resolutions=tuple(resolution // 2 ** l for l in attn_levels))
  m.dtype = "float32"
  try:
    tokenizer_lib.validate_model_config(m)
  except ValueError as e:
    raise reader.CheckpointError(f"{source}: the tensors give an invalid IBQ model: {e}") from e
  return m


def raw_name(path: tuple) -> str:
  """path of a Param in the IBQ Tokenizer -> SEED-Voken's state-dict name."""
  *module, leaf = path
  leaf = reader.TORCH_LEAF.get(leaf, leaf)
  if module == ["quantizer"] and leaf == "codebook":
    return "quantize.embedding.weight"
  if module[:2] in (["encoder", "quant_conv"], ["decoder", "post_quant_conv"]):
    module = module[1:]
  parts = [str(p) for p in module]
  if "resample" in parts:
    parts[parts.index("resample")] = "downsample" if parts[0] == "encoder" else "upsample"
  return ".".join(parts + [leaf])


def ema_name(path: tuple) -> str:
  return EMA_PREFIX + raw_name(path).replace(".", "")


def import_ibq(path: str | os.PathLike, *, ema: bool = True,
               resolution: int = 256) -> reader.ImportedModel:
  """Reads an IBQ checkpoint into the IBQ network (EMA weights unless `ema=False`)."""
  source = os.fspath(path)
  with reader.open_tensors(source) as top:
    top = reader.top_level_dict(top, source, ("state_dict",), HINT)
    return from_state_dict(top["state_dict"], source, ema=ema, resolution=resolution)


def from_state_dict(state_dict, source: str, *, ema: bool = True,
                    resolution: int = 256) -> reader.ImportedModel:
  """`import_ibq` on an already opened state dict {name: tensor} (lazy or numpy)."""
  tensors = reader.TensorSet(state_dict, source)
  shapes = {n: tensors.shape(n) for n in tensors.names()}
  cfg = model_config(shapes, source, resolution)
  tokenizer = reader.empty_tokenizer(cfg)
  if ema and not any(n.startswith(EMA_PREFIX) for n in shapes):
    raise reader.CheckpointError(f"{source}: no {EMA_PREFIX}* weights (trained with "
                                 "use_ema=False?); import the raw weights with --no-ema")
  reader.load_params(tokenizer, ema_name if ema else raw_name, tensors)
  # The weight set not chosen must be exactly the other copy of the same parameters.
  params = [tuple(p) for p, v in nnx.iter_graph(tokenizer) if isinstance(v, nnx.Param)]
  other = {(raw_name if ema else ema_name)(p) for p in params}
  reader.require_all_taken(tensors, ignored=lambda n: (
      n.startswith("loss.") or n.startswith(EMA_PREFIX + "loss") or n in _EMA_BOOKKEEPING
      or n in other))
  return reader.ImportedModel(cfg, tokenizer, SOURCE_KIND,
                              {"weights": "ema" if ema else "raw", "resolution": resolution})
