"""Analysis of scaling studies: tables, scaling-law fits, plots, paper numbers.

Typical notebook use:

  from gsq_jax import analysis
  df = analysis.load_table("runs/dim_vocab_tiny")
  fit = analysis.fit_dim_vocab_law(df, metric="rfid")
  print(fit.summary())
  analysis.plot_dim_vocab(df, fit=[fit, analysis.paper_dim_vocab_law()], save="fig4.png")

Notebooks using it: analysis/*.ipynb (see analysis/README.md).

Tables and fits need pandas and scipy; the plot helpers also need matplotlib,
which is imported only when one of them is first used.
"""

import importlib

from gsq_jax.analysis.fits import FitGroups
from gsq_jax.analysis.fits import FitResult
from gsq_jax.analysis.fits import FixedLaw
from gsq_jax.analysis.fits import dim_vocab_law
from gsq_jax.analysis.fits import fit_dim_vocab_law
from gsq_jax.analysis.fits import fit_power_law
from gsq_jax.analysis.fits import power_law
from gsq_jax.analysis.paper import paper_dim_vocab_law
from gsq_jax.analysis.paper import paper_table
from gsq_jax.analysis.paper import paper_table_info
from gsq_jax.analysis.paper import paper_table_names
from gsq_jax.analysis.tables import add_uniform_usage_expectation
from gsq_jax.analysis.tables import coerce_numeric
from gsq_jax.analysis.tables import finished_runs
from gsq_jax.analysis.tables import imported_runs
from gsq_jax.analysis.tables import load_table
from gsq_jax.analysis.tables import pick_metric
from gsq_jax.analysis.tables import run_label
from gsq_jax.analysis.tables import run_labels
from gsq_jax.analysis.tables import run_workdirs
from gsq_jax.analysis.tables import uniform_usage_expectation
from gsq_jax.analysis.tables import usage_draws
from gsq_jax.analysis.usage import entropy_bits
from gsq_jax.analysis.usage import matched_bits
from gsq_jax.analysis.usage import usage_summary

_PLOTS = ("plot_dim_vocab", "plot_groups", "plot_scaling", "plot_spatial",
          "plot_training_curves", "plot_usage", "read_metrics")


def __getattr__(name: str):
  if name in _PLOTS:
    return getattr(importlib.import_module("gsq_jax.analysis.plots"), name)
  raise AttributeError(f"module 'gsq_jax.analysis' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_PLOTS))
