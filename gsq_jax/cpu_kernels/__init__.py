"""CPU-only convolution kernels. Accelerators never enter here.

XLA:CPU's own convolutions bound the CPU training step; these replace them when
`config.train.fast_cpu_convs` is on and the run's devices are CPUs. GPU and TPU
programs always keep XLA's kernels. Read in this order:

* `cpu_conv.py`: the drop-in `lax.conv_general_dilated` that `nnx.Conv` calls:
  which convolutions go where, and the piecewise weight gradient.
* `winograd_conv.py`: 3x3 convolutions by Winograd F(m x m, 3 x 3), forward and backward.
"""
