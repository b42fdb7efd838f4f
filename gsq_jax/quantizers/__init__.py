"""Quantizers: GSQ, IBQ, VQ, FSQ, LFQ as pure functions, NNX modules, and usage statistics.

Functional core (channels-last arrays in, `QuantizerOutput` out):
  gsq_quantize, vq_quantize (vector.py), ibq_quantize (ibq.py),
  fsq_quantize (fsq.py), lfq_quantize (lfq.py), codebook_stats (stats.py).
Memory-bounded code search shared by GSQ/VQ/IBQ: search.py; the same
quantizers with the codebook sharded over a `vocab` mesh axis: sharded.py.
Modules and the name registry used by the model and the sweeps: modules.py.
"""

from gsq_jax.quantizers.base import QuantizerOutput
from gsq_jax.quantizers.fsq import fsq_codes_from_indices, fsq_quantize
from gsq_jax.quantizers.ibq import ibq_indices, ibq_quantize
from gsq_jax.quantizers.lfq import lfq_codes_from_indices, lfq_quantize
from gsq_jax.quantizers.modules import (
    FiniteScalarQuantizer,
    GroupedSphericalQuantizer,
    IndexBackpropQuantizer,
    LookupFreeQuantizer,
    VectorQuantizer,
    default_quantizer_config,
    make_quantizer,
)
from gsq_jax.quantizers.search import merge_best, nearest_code, search_best
from gsq_jax.quantizers.sharded import (sharded_codes_from_indices, sharded_gsq_quantize,
                                        sharded_ibq_indices, sharded_ibq_quantize, sharded_vq_quantize)
from gsq_jax.quantizers.stats import (CodebookCounter, code_counts, codebook_norm_stats,
                                      codebook_stats, find_codebook, stats_from_counts)
from gsq_jax.quantizers.vector import codes_from_indices, gsq_quantize, vq_quantize

__all__ = [
    "CodebookCounter", "FiniteScalarQuantizer", "GroupedSphericalQuantizer",
    "IndexBackpropQuantizer", "LookupFreeQuantizer", "QuantizerOutput", "VectorQuantizer",
    "code_counts", "codebook_norm_stats", "codebook_stats", "codes_from_indices", "default_quantizer_config",
    "fsq_codes_from_indices", "fsq_quantize", "gsq_quantize", "ibq_indices", "ibq_quantize",
    "lfq_codes_from_indices", "lfq_quantize", "make_quantizer", "merge_best", "nearest_code",
    "search_best", "sharded_codes_from_indices", "sharded_gsq_quantize", "sharded_ibq_indices",
    "sharded_ibq_quantize", "sharded_vq_quantize", "stats_from_counts", "vq_quantize",
]
