"""Small helpers with no model code.

  files.py         atomic file writes
  torch_pickle.py  reading torch checkpoints without torch
  cli_args.py      argparse types shared by the console scripts
"""
