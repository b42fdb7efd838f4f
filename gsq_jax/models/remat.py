"""Rematerialisation: recompute a block's activations in the backward pass.

At the paper's scale the activations kept for the backward pass, not the
parameters, fill accelerator memory (spec/AOT.md: the GSQ-GAN step at 64
images per H100 needs 64 GiB, ~21 GiB of it the frozen DINO's). A block marked
`remat` keeps only its inputs and recomputes its inside when the gradient
passes through it: about one extra forward of the block for its memory.
`train.remat` chooses which blocks ("none", "dino", "blocks"); gsq-plan tries
these before changing the batch. The function computed is the same either
way, so a run may switch it on resume and checkpoints never depend on it.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

# train.remat -> the `remat_group`s it switches on, least recomputation first.
REMAT_CHOICES = {"none": (), "dino": ("dino",), "blocks": ("dino", "tokenizer")}


class Rematerializable(nnx.Module):
  """A block whose forward can run under `jax.checkpoint`; subclasses define `forward`."""

  remat_group = "tokenizer"  # encoder / decoder blocks; DINO's blocks say "dino"
  remat: bool = False

  def forward(self, *args):
    raise NotImplementedError

  def __call__(self, *args):
    if not self.remat:
      return self.forward(*args)
    # The block's state enters as an argument, so the recomputation sees the
    # same weights; nothing inside is mutated (train.remat needs dropout 0).
    graphdef, state = nnx.split(self)
    forward = lambda state, *args: nnx.merge(graphdef, state).forward(*args)
    return jax.checkpoint(forward)(state, *args)


def use_remat(model: Any, choice: str) -> int:
  """Marks the blocks of `model` that `choice` (a train.remat value) recomputes; returns how many."""
  if choice not in REMAT_CHOICES:
    raise ValueError(f"train.remat must be one of {tuple(REMAT_CHOICES)}, got {choice!r}")
  groups = REMAT_CHOICES[choice]
  count = 0
  for _, module in nnx.iter_graph(model):
    if isinstance(module, Rematerializable) and module.remat_group in groups:
      module.remat = True
      count += 1
  return count
