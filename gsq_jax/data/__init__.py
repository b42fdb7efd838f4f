"""The data pipeline: where images come from, how they are cropped and batched.

Read in this order:

* `sources.py`: random-access image sources named by one string (`demo`,
  `folder:`, `tfds:`), all returning `{"image": bytes | path | uint8 array, "name": ...}`.
* `transforms.py`: Pillow decoding and the reference crops.
* `input_pipeline.py`: the grain pipelines that batch per host and assemble
  global, sharded `jax.Array`s (train: infinite and checkpointable; eval: one pass).
* `prepare.py`: `gsq-prepare`, an image folder -> tfds ArrayRecord data set, without TensorFlow.

This folder also holds package data files (JSON/CSV) owned by other modules.
"""
