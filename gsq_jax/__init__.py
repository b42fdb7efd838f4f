"""gsq_jax: Grouped Spherical Quantization (GSQ) image tokenizers and scaling studies in JAX/Flax.

Paper symbols, used throughout the code and the configs (documented once, here):

  D  latent dimension per latent pixel         config.model.latent_dim
  G  number of groups the D channels split into config.model.num_groups
  d  group width, d = D / G                    (derived)
  V  codebook size (entries of the one shared codebook)  config.model.codebook_size
  f  spatial down-sampling factor, f = 2**(len(channel_multipliers) - 1)
                                               config.model.downsample_factor

Using a trained or imported run (gsq_jax/inference/api.py):

  tok = gsq_jax.load_tokenizer("runs/my_run")   # ema=True
  codes = tok.tokenize(images)                  # NHWC in [-1, 1] -> (B, h, w, G)
  images = tok.decode_codes(codes)
"""

__version__ = "0.1.0"

from gsq_jax.utils import quiet_logs as _quiet_logs  # logging only: no JAX imported

_quiet_logs.condense_cuda_plugin_error()

__all__ = ["load_tokenizer"]


def __getattr__(name: str):
  # Lazy: `import gsq_jax` stays cheap (no JAX, orbax or model code until used).
  if name == "load_tokenizer":
    from gsq_jax.inference.api import load_tokenizer  # pylint: disable=import-outside-toplevel
    return load_tokenizer
  raise AttributeError(f"module 'gsq_jax' has no attribute {name!r}")
