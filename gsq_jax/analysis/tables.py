"""Reading the scaling tables of `gsq-collect`, and the uniform-usage expectation.

A scaling table is tidy: one row per run, keyed by (quantizer, f, D, G, d, V,
seed), with the run's size and cost (params, steps, images_seen, wall_time_s)
and every metric of its eval.json. `load_table` reads one into pandas with the
numeric columns really numeric, so fits and plots never see strings such as
"nan" or "unavailable" (rFID without the Inception weights).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import numpy as np
import pandas as pd

# Columns every scaling table must have; `load_table(required=...)` overrides.
REQUIRED_COLUMNS = ("quantizer", "f", "D", "G", "V")

# Columns forced to numbers (anything else there becomes NaN): the grid keys,
# the run's size/cost and the metrics eval.json writes.
NUMERIC_COLUMNS = frozenset({
    "f", "D", "G", "d", "V", "seed", "res", "params", "steps", "images_seen",
    "wall_time_s", "compute", "flops", "tokens", "eval_images",
    "rfid", "fd_vgg16", "kid", "inception_score", "psnr", "ssim", "mse",
    "lpips", "lpips_vgg", "lpips_alex", "usage", "perplexity",
    "usage_uniform_expectation",
})

# Columns never coerced, even when every value looks like a number.
TEXT_COLUMNS = frozenset({
    "quantizer", "method", "model", "source", "note", "variant", "name", "run",
    "workdir", "status", "reason", "config_hash", "git_commit",
    "channel_multipliers",
})

_MISSING = frozenset({"", "nan", "none", "null", "na", "n/a", "-", "–"})
_TABLE_SUFFIXES = (".parquet", ".csv")


def load_table(
    path: str | os.PathLike,
    *,
    required: Sequence[str] = REQUIRED_COLUMNS,
) -> pd.DataFrame:
  """Reads a scaling table (CSV or Parquet, or a folder holding one).

  Args:
    path: a `.csv` or `.parquet` file, or a folder with exactly one table in
      it (the same table in both formats counts as one; Parquet is preferred).
    required: columns the table must have.

  Returns:
    The table with numeric columns coerced (see `coerce_numeric`) and the
    group width `d = D / G` added when absent.

  Raises:
    FileNotFoundError: `path` (or a table inside the folder) does not exist.
    ValueError: unknown file type, ambiguous folder, or missing columns.
    ImportError: a Parquet file but no Parquet engine (pyarrow) installed.
  """
  file = _resolve_table_file(pathlib.Path(path))
  if file.suffix == ".parquet":
    try:
      df = pd.read_parquet(file)
    except ImportError as err:
      raise ImportError(
          f"load_table: reading {file} needs pyarrow; install it "
          "(pip install pyarrow, or the project's [notebooks] extra) or pass "
          "the CSV version of the table") from err
  else:
    df = pd.read_csv(file, keep_default_na=True)
  missing = [c for c in required if c not in df.columns]
  if missing:
    raise ValueError(
        f"load_table: {file} lacks required column(s) {missing}; it has "
        f"{list(df.columns)}")
  df = coerce_numeric(df)
  if "d" not in df.columns and {"D", "G"} <= set(df.columns):
    df["d"] = df["D"] / df["G"]
    if df["d"].notna().all() and (df["d"] % 1 == 0).all():
      df["d"] = df["d"].astype("int64")
  return df


def _resolve_table_file(path: pathlib.Path) -> pathlib.Path:
  if not path.exists():
    raise FileNotFoundError(
        f"load_table: no table at {path}; pass the .csv/.parquet written by "
        "gsq-collect or the folder it wrote them to")
  if path.is_file():
    if path.suffix not in _TABLE_SUFFIXES:
      raise ValueError(
          f"load_table: `path` must be a .csv or .parquet file, got {path}")
    return path
  tables = sorted(p for p in path.iterdir()
                  if p.is_file() and p.suffix in _TABLE_SUFFIXES)
  stems = sorted({p.stem for p in tables})
  if not stems:
    raise FileNotFoundError(
        f"load_table: the folder {path} holds no .csv or .parquet table; "
        "run gsq-collect on the sweep root first")
  if len(stems) > 1:
    raise ValueError(
        f"load_table: the folder {path} holds several tables {stems}; pass "
        "one file")
  by_suffix = {p.suffix: p for p in tables}
  if ".parquet" in by_suffix and (_has_parquet_engine() or
                                  ".csv" not in by_suffix):
    return by_suffix[".parquet"]
  return by_suffix[".csv"]


def _has_parquet_engine() -> bool:
  try:
    import pyarrow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def coerce_numeric(df: pd.DataFrame) -> pd.DataFrame:
  """Returns a copy with numeric columns as numbers.

  Known numeric columns (`NUMERIC_COLUMNS`) are forced: a value that is not a
  number (e.g. "unavailable") becomes NaN. Other non-text columns are
  converted only when every non-missing value parses, so a genuine string
  column stays a string column.
  """
  out = df.copy()
  for col in out.columns:
    series = out[col]
    if col in TEXT_COLUMNS or pd.api.types.is_numeric_dtype(series):
      continue
    if pd.api.types.is_bool_dtype(series):
      continue
    cleaned = series.map(
        lambda v: np.nan if isinstance(v, str) and v.strip().lower() in _MISSING
        else v)
    numbers = pd.to_numeric(cleaned, errors="coerce")
    if col in NUMERIC_COLUMNS or numbers.notna().sum() == cleaned.notna().sum():
      out[col] = numbers
  return out


def uniform_usage_expectation(tokens, V, *, percent: bool = False):
  """Expected codebook coverage if T tokens were drawn uniformly from V codes.

  Coverage (codes used at least once / V) = 1 − exp(−T/V), computed as
  −expm1(−T/V) so tiny T/V keeps full precision. It bounds what a usage
  number measured on T tokens can show: e.g. 1k images at f=16 give
  T = 256k, so even perfectly uniform usage of 2^18 codes reads ≈ 62%.

  Args:
    tokens: T, the number of indices counted into the histogram (for a
      histogram pooled over G groups this includes the factor G). Scalar,
      array or Series.
    V: codebook size K (scalar, array or Series).
    percent: False returns a fraction in [0, 1]; True returns percent
      [0, 100], the unit of the paper's "Usage" column.

  Returns:
    A float for scalar inputs, else an array/Series of the broadcast shape.
  """
  t = np.asarray(tokens, dtype=np.float64)
  v = np.asarray(V, dtype=np.float64)
  if np.any(t < 0) or np.any(~np.isfinite(t) & ~np.isnan(t)):
    raise ValueError(f"uniform_usage_expectation: `tokens` must be finite and >= 0, got {tokens}")
  if np.any(v < 1):
    raise ValueError(f"uniform_usage_expectation: `V` must be >= 1, got {V}")
  value = -np.expm1(-t / v) * (100.0 if percent else 1.0)
  if isinstance(tokens, pd.Series):
    return pd.Series(value, index=tokens.index, name="usage_uniform_expectation")
  return float(value) if value.ndim == 0 else value


def add_uniform_usage_expectation(
    df: pd.DataFrame,
    *,
    tokens: str = "tokens",
    vocab: str = "V",
    column: str = "usage_uniform_expectation",
    percent: bool = True,
) -> pd.DataFrame:
  """Returns a copy of `df` with the uniform-usage expectation as `column`.

  Defaults to percent, the unit of the paper's and IBQ's usage columns, so the
  new column sits next to `usage` on the same scale; pass percent=False for
  fractions. Rows with a missing token count get NaN.
  """
  for name, col in (("tokens", tokens), ("vocab", vocab)):
    if col not in df.columns:
      raise ValueError(
          f"add_uniform_usage_expectation: `{name}` column {col!r} not in the "
          f"table; it has {list(df.columns)}")
  out = df.copy()
  t = pd.to_numeric(out[tokens], errors="coerce")
  known = t.notna()
  values = np.full(len(out), np.nan)
  values[known.to_numpy()] = uniform_usage_expectation(
      t[known].to_numpy(), pd.to_numeric(out.loc[known, vocab]).to_numpy(),
      percent=percent)
  out[column] = values
  return out
