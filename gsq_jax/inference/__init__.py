"""Using a trained or imported tokenizer: the Python API and gsq-tokenize.

Files, in reading order:
  api.py           `gsq_jax.load_tokenizer(path, ema=True)` -> PretrainedTokenizer with
                   jitted, batch-sharded encode / tokenize / decode_codes / reconstruct
  tokenize_cli.py  `gsq-tokenize --workdir DIR --data SOURCE --out OUT`: a data set's
                   codes as .npy shards + tokens.json, with a progress bar
"""
