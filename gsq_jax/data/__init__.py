"""Image data for gsq_jax: where images come from and how they are cropped.

* `gsq_jax.data.sources`: random-access image sources (`demo`, `folder:`,
  `tfds:`), all returning `{"image": bytes | path | uint8 array, "name": ...}`.
* `gsq_jax.data.transforms`: Pillow decoding and the reference crops.

The grain pipeline that batches and shards them is `gsq_jax.input_pipeline`.
This folder may also hold package data files (JSON/CSV) owned by other modules.
"""
