"""`gsq-import`: released PyTorch tokenizers (flex_gen GSQ, SEED-Voken IBQ) as gsq_jax runs.

Read in this order:
  reader.py    reader glue: opening a checkpoint with the torch-free allow-listed
               reader (gsq_jax/utils/torch_pickle.py), errors naming the file,
               streaming tensors by name into an NNX model, leftover checks
  flex_gen.py  flex_gen checkpoint.pt -> the flex Tokenizer (config from the
               pickled constructor arguments)
  ibq.py       SEED-Voken IBQ .ckpt -> the IBQ network (config from the shapes;
               EMA or raw weights)
  run_dir.py   writing config.json + the orbax checkpoint + imported_from.json
  cli.py       the `gsq-import` command
"""

from gsq_jax.importers.flex_gen import import_flex_gen
from gsq_jax.importers.ibq import import_ibq
from gsq_jax.importers.reader import CheckpointError

__all__ = ["CheckpointError", "import_flex_gen", "import_ibq"]
