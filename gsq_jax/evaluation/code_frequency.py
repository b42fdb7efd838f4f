"""The code-frequency curve of an evaluation: rank vs. frequency, log-log (PNG).

Usage and perplexity are two numbers; the curve shows where the lookups go.
A healthy codebook gives a flat curve near the uniform level lookups / V over
all V ranks; a collapsed one a few heavy codes and then nothing (on log axes
the unused codes simply end the line, at the rank that equals the used count).
One line for the histogram pooled over groups (the GSQ usage), one per group
when G is small enough to read.
"""

from __future__ import annotations

import os

import matplotlib.figure  # a Figure without pyplot: no global backend switch
import numpy as np

FILENAME = "code_frequency.png"
_MAX_GROUP_LINES = 8


def rank_frequency(counts: np.ndarray) -> np.ndarray:
  """Counts sorted in decreasing order, the zeros dropped (log axes)."""
  ranked = np.sort(np.asarray(counts).reshape(-1))[::-1]
  return ranked[ranked > 0]


def write_plot(counts: np.ndarray, path: str | os.PathLike, *, title: str = "") -> str:
  """Writes the rank-frequency PNG of a (G, V) code histogram to `path`."""
  counts = np.asarray(counts, np.int64)
  groups, codebook_size = counts.shape
  pooled = counts.sum(axis=0)
  lookups = int(pooled.sum())
  fig = matplotlib.figure.Figure(figsize=(5.5, 4), dpi=100)
  ax = fig.add_subplot()
  ranked = rank_frequency(pooled)
  if len(ranked):
    ax.loglog(np.arange(1, len(ranked) + 1), ranked, lw=2, color="k",
              label=f"all groups: {len(ranked)} of {codebook_size} codes used")
  if 1 < groups <= _MAX_GROUP_LINES:
    for g in range(groups):
      ranked_g = rank_frequency(counts[g])
      if len(ranked_g):
        ax.loglog(np.arange(1, len(ranked_g) + 1), ranked_g, lw=1, alpha=0.7,
                  label=f"group {g}: {len(ranked_g)} used")
  if lookups:
    ax.axhline(lookups / codebook_size, ls="--", color="gray",
               label=f"uniform: lookups / V = {lookups / codebook_size:.3g}")
  ax.set_xlim(1, codebook_size)
  ax.set_xlabel("code rank")
  ax.set_ylabel("lookups of the code")
  ax.set_title(title or f"code frequency ({lookups:,} lookups, V = {codebook_size:,})",
               fontsize=10)
  ax.legend(fontsize=7, loc="lower left")
  ax.grid(True, which="major", alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.fspath(path))
  return os.fspath(path)
