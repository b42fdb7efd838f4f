"""Small helpers with no model code.

  files.py              atomic file writes
  torch_pickle.py       reading torch checkpoints without torch
  compilation_cache.py  JAX's persistent compilation cache, on for gsq-train, gsq-eval and sweeps
"""
