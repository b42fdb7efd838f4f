"""gsq_jax: Grouped Spherical Quantization (GSQ) image tokenizers and scaling studies in JAX/Flax.

Paper symbols, used throughout the code and the configs (documented once, here):

  D  latent dimension per latent pixel         config.model.latent_dim
  G  number of groups the D channels split into config.model.num_groups
  d  group width, d = D / G                    (derived)
  V  codebook size (entries of the one shared codebook)  config.model.codebook_size
  f  spatial down-sampling factor, f = 2**(len(channel_multipliers) - 1)
                                               config.model.downsample_factor
"""

__version__ = "0.1.0"
