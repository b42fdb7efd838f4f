"""Small helpers with no model code.

* `files.py`: atomic file writes.
* `torch_pickle.py`: reading torch checkpoints without torch (no code execution).
* `config_pickle.py`: pickled omegaconf configs to plain dicts, without omegaconf.
* `compilation_cache.py`: JAX's persistent compilation cache, on for gsq-train, gsq-eval and sweeps.
* `environment.py`: package versions, backend and device kind a run records.
* `quiet_logs.py`: the filter that keeps orbax/grain/JAX chatter out of the console.
* `cli_args.py`: argparse types shared by the console scripts.
"""
