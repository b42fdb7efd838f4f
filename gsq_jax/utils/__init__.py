"""Small helpers with no model code.

  files.py          atomic file writes
  torch_pickle.py   reading torch checkpoints without torch (allow-listed, lazy tensors)
  config_pickle.py  decoding pickled (omegaconf) configs into plain dicts without omegaconf
"""
