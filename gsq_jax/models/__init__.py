"""Tokenizer networks: encoder -> quantizer -> decoder (channels-last NHWC).

Read in this order: `layers.py` (blocks and init), `encoder.py`, `decoder.py`
(the GSQ paper's "flex" network), `ibq_network.py` (IBQ's Open-MAGVIT2/taming
network, `model.architecture = "ibq"`), then `tokenizer.py` (the assembled
model, its config block and checks).
Frozen pretrained networks used by the losses and metrics: `weights.py`
(finding weight files offline, holding them frozen), `lpips.py`, `dino.py`,
and the GAN discriminators in `discriminators.py`.
"""

from gsq_jax.models.decoder import Decoder
from gsq_jax.models.encoder import Encoder
from gsq_jax.models.tokenizer import Tokenizer
from gsq_jax.models.tokenizer import build_tokenizer
from gsq_jax.models.tokenizer import default_model_config
from gsq_jax.models.tokenizer import evaluation_view
from gsq_jax.models.tokenizer import ibq_model_config
from gsq_jax.models.tokenizer import parameter_counts
from gsq_jax.models.tokenizer import parameter_counts_from_config
from gsq_jax.models.tokenizer import validate_model_config

__all__ = [
    "Decoder", "Encoder", "Tokenizer", "build_tokenizer", "default_model_config", "evaluation_view",
    "ibq_model_config",
    "parameter_counts", "parameter_counts_from_config", "validate_model_config",
]
