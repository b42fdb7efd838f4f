"""The published numbers (GSQ paper §5, IBQ README) as tidy tables.

The numbers live in `gsq_jax/data/paper_results.json`, transcribed from the
project specs GSQ.md §5 and QUANTIZERS.md §3.1 with the README corrections
applied (the as-printed values are in each row's `note`). Tables use the same
column names as the scaling tables of `gsq-collect` (quantizer, f, D, G, d, V,
metric columns) plus `source="paper"`, so a user's runs and the paper's points
can be concatenated, plotted and fitted together. Usage is in percent.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from typing import Any

import numpy as np
import pandas as pd

from gsq_jax.analysis import fits
from gsq_jax.analysis import tables

_DATA_FILE = "paper_results.json"

# Short names by figure / table number.
ALIASES = {
    "fig4": "dim_vocab", "fig1b": "spatial", "table13": "groups",
    "fig3": "network_capacity", "table14": "sota", "ibq": "ibq_usage",
    "app_c2": "dim_vocab_fit", "table1": "init_norm",
}

_KEY_ORDER = ("source", "method", "model", "quantizer", "variant", "f", "D", "G", "d", "V", "res",
              "steps")


@functools.lru_cache(maxsize=1)
def _raw() -> dict[str, Any]:
  data = importlib.resources.files("gsq_jax").joinpath("data").joinpath(_DATA_FILE)
  text = data.read_text("utf-8")
  return json.loads(text)["tables"]


def paper_table_names() -> tuple[str, ...]:
  """Names accepted by `paper_table` (aliases in `ALIASES`)."""
  return tuple(_raw())


def paper_table_info(name: str) -> dict[str, str]:
  """Title, spec section and description (units, protocol, caveats) of a table."""
  raw = _raw()[_resolve(name)]
  return {k: raw[k] for k in ("title", "spec", "description")}


def _resolve(name: str) -> str:
  key = ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
  if key not in _raw():
    raise ValueError(
        f"paper_table: `name` must be one of {list(_raw())} or an alias in "
        f"{sorted(ALIASES)}, got {name!r}")
  return key


def paper_table(name: str) -> pd.DataFrame:
  """A table of published numbers as a tidy DataFrame (a fresh copy).

  Args:
    name: dim_vocab (Fig. 4), spatial (Fig. 1b), groups (Table 13), fig1a,
      sota (Table 14), network_capacity (Fig. 3), ibq_usage (IBQ README
      usage table), dim_vocab_fit (App. C.2 parameters), init_norm (Table 1), or an alias such as
      "fig4" / "table13".

  Returns:
    One row per published point with `source="paper"`, the grid keys
    (f, D, G, d = D/G, V where known) and metric columns named as in
    eval.json (rfid, psnr, ssim, lpips_alex, usage [%], perplexity, tokens,
    lookups, ...); tables with usage and counts also get
    `usage_uniform_expectation` [%] for their number of lookups.
  """
  key = _resolve(name)
  raw = _raw()[key]
  df = pd.DataFrame(raw["rows"], columns=raw["columns"])
  for col, value in raw.get("constants", {}).items():
    df[col] = value
  df["source"] = "paper"
  if {"D", "G"} <= set(df.columns) and "d" not in df.columns:
    df["d"] = df["D"] / df["G"]
  df = tables.coerce_numeric(df.replace({None: np.nan}))
  if "lookups" in df.columns and "tokens" not in df.columns and "G" in df.columns:
    df["tokens"] = df["lookups"] / df["G"]  # latent positions N (lookups = N·G)
  if {"usage", "lookups", "V"} <= set(df.columns):
    df = tables.add_uniform_usage_expectation(df)  # what the published usage can show
  for col in ("f", "D", "G", "d", "V", "res", "steps", "tokens", "lookups", "params",
              "tokens_per_image", "eval_images"):
    if col in df.columns and df[col].notna().all() and (df[col] % 1 == 0).all():
      df[col] = df[col].astype("int64")
  order = [c for c in _KEY_ORDER if c in df.columns]
  return df[order + [c for c in df.columns if c not in order]]


def paper_dim_vocab_law() -> fits.FixedLaw:
  """The App. C.2 law rFID = 411.63/(log2 V)^2.8375 + 0.1601·D^0.1956, plottable."""
  params = paper_table("dim_vocab_fit").set_index("param")["value"].to_dict()
  return fits.FixedLaw(model=fits.dim_vocab_law, inputs=("D", "V"),
                       params={k: float(v) for k, v in params.items()}, label="paper fit")
