"""Reading the scaling tables of `gsq-collect`, and the uniform-usage expectation.

A scaling table is tidy: one row per run, keyed by (quantizer, f, D, G, d, V,
seed), with the run's size and cost (params, steps, images_seen, wall_time_s)
and every metric of its eval.json. `load_table` reads one into pandas with the
numeric columns really numeric, so fits and plots never see strings such as
"nan" or "unavailable" (rFID without the Inception weights).

Also here: the uniform-usage expectation with the right draw count (`lookups`
for the usage pooled over groups, `tokens` for one group's), and the small
row helpers the notebooks share (finished_runs, pick_metric, run_label(s),
run_workdirs).
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
    "f", "D", "G", "d", "V", "seed", "res", "params", "steps", "total_steps", "images_seen",
    "wall_time_s", "device_hours", "compute", "flops", "tokens", "lookups", "eval_images",
    "rfid", "fd_vgg16", "kid", "kid_mean", "kid_std", "inception_score", "psnr",
    "psnr_per_image", "ssim", "mse", "lpips", "lpips_vgg", "lpips_alex", "usage", "perplexity",
    "group_usage_mean", "group_perplexity_mean", "product_usage", "usage_uniform_expectation",
    "group_usage_uniform_expectation",
    # Compute- and bit-aware columns (gsq_jax.sweeps.collect.add_compute_and_bits).
    "flops_per_image", "forward_flops_per_image", "train_flops", "nominal_bits_per_image",
    "effective_bits_per_image", "bits_per_pixel", "nominal_bits_per_pixel",
})

# Columns never coerced, even when every value looks like a number.
TEXT_COLUMNS = frozenset({
    "quantizer", "method", "model", "source", "note", "variant", "name", "run",
    "workdir", "status", "reason", "config_hash", "git_commit", "sweep",
    "channel_multipliers", "rfid_status", "kid_features", "eval_source", "eval_crop",
})

# How a column is shown to people (table headers, plot axes): name and unit.
# The files keep the plain column names, which code reads.
COLUMN_LABELS = {
    "psnr": "PSNR [dB]", "psnr_per_image": "PSNR per image [dB]", "ssim": "SSIM",
    "lpips_alex": "LPIPS Alex", "lpips_vgg": "LPIPS VGG", "lpips": "LPIPS", "rfid": "rFID",
    "fd_vgg16": "FD VGG16", "usage": "usage [%]", "group_usage_mean": "group usage [%]",
    "product_usage": "product usage [%]", "usage_uniform_expectation": "uniform usage [%]",
    "wall_time_s": "time [s]", "device_hours": "device [h]", "params": "params",
}


def column_label(column: str) -> str:
  """'psnr' -> 'PSNR [dB]', 'usage' -> 'usage [%]'; other columns as they are."""
  return COLUMN_LABELS.get(column, column)


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
      it (the same table in both formats counts as one; Parquet is preferred),
      or a sweep root whose `tables/` folder (gsq-collect's default output)
      holds one.
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
  if not stems and (path / "tables").is_dir():
    return _resolve_table_file(path / "tables")  # a sweep root: gsq-collect's default --out
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


def uniform_usage_expectation(draws, V, *, percent: bool = False):
  """Expected codebook coverage if `draws` indices were drawn uniformly from V codes.

  Coverage (codes used at least once / V) = 1 − exp(−T/V), computed as
  −expm1(−T/V) so tiny T/V keeps full precision. It bounds what a usage
  number measured on T draws can show: e.g. 1k images at f=16 give
  T = 256k, so even perfectly uniform usage of 2^18 codes reads ≈ 62%.

  Which count is T (gsq_jax.quantizers.stats, eval.json): `tokens` is the
  number of latent positions N, `lookups` = N·G the number of indices.
  The *shared* usage (the paper's "Usage": one histogram pooled over the G
  groups) saw T = lookups draws; one group's usage (`group_usage_mean`) saw
  T = tokens. For G = 1 they agree. `add_uniform_usage_expectation` picks the
  right column.

  Args:
    draws: T, the number of indices counted into the histogram. Scalar,
      array or Series.
    V: codebook size K (scalar, array or Series).
    percent: False returns a fraction in [0, 1]; True returns percent
      [0, 100], the unit of the paper's "Usage" column.

  Returns:
    A float for scalar inputs, else an array/Series of the broadcast shape.
  """
  t = np.asarray(draws, dtype=np.float64)
  v = np.asarray(V, dtype=np.float64)
  if np.any(t < 0) or np.any(~np.isfinite(t) & ~np.isnan(t)):
    raise ValueError(f"uniform_usage_expectation: `draws` (tokens or lookups) must be finite "
                     f"and >= 0, got {draws}")
  if np.any(v < 1):
    raise ValueError(f"uniform_usage_expectation: `V` must be >= 1, got {V}")
  value = -np.expm1(-t / v) * (100.0 if percent else 1.0)
  if isinstance(draws, pd.Series):
    return pd.Series(value, index=draws.index, name="usage_uniform_expectation")
  return float(value) if value.ndim == 0 else value


USAGE_KINDS = ("shared", "group")


def usage_draws(df: pd.DataFrame, kind: str = "shared") -> pd.Series:
  """The number of draws T behind each row's usage (see `uniform_usage_expectation`).

  kind="shared" (the pooled histogram of `usage`): the `lookups` column, or
  `tokens`·G where a table has no lookups (tables written before eval.json
  had them; published tables). kind="group" (`group_usage_mean`): `tokens`.
  Rows without the needed counts get NaN.
  """
  if kind not in USAGE_KINDS:
    raise ValueError(f"usage_draws: `kind` must be one of {USAGE_KINDS}, got {kind!r}")
  nan = pd.Series(np.nan, index=df.index, dtype=np.float64)
  tokens = pd.to_numeric(df["tokens"], errors="coerce") if "tokens" in df.columns else nan
  if kind == "group":
    draws = tokens
  else:
    groups = pd.to_numeric(df["G"], errors="coerce") if "G" in df.columns else nan
    draws = tokens * groups
    if "lookups" in df.columns:
      lookups = pd.to_numeric(df["lookups"], errors="coerce")
      draws = lookups.where(lookups.notna(), draws)
  if len(df) and draws.isna().all():
    needed = "`tokens`" if kind == "group" else "`lookups`, or `tokens` and `G`"
    raise ValueError(f"usage_draws: the table has no {needed} column with values, so the "
                     f"number of draws behind its usage is unknown; it has {list(df.columns)}")
  return draws.astype(np.float64)


def add_uniform_usage_expectation(
    df: pd.DataFrame,
    *,
    kind: str = "shared",
    vocab: str = "V",
    column: str | None = None,
    percent: bool = True,
) -> pd.DataFrame:
  """Returns a copy of `df` with the uniform-usage expectation of each row.

  Args:
    df: a table with `V` and the draw counts (`usage_draws`).
    kind: "shared" — the expectation for `usage` (the histogram pooled over
      groups, T = lookups = tokens·G), column `usage_uniform_expectation`
      (what eval.json writes); "group" — for one group's usage
      (`group_usage_mean`, T = tokens), column
      `group_usage_uniform_expectation`.
    vocab: the codebook-size column.
    column: output column name (default by `kind`, see above).
    percent: percent (default; the unit of the paper's and IBQ's usage
      columns, so the new column sits next to `usage` on the same scale) or
      fractions with False.

  Rows with missing counts get NaN.
  """
  if vocab not in df.columns:
    raise ValueError(
        f"add_uniform_usage_expectation: `vocab` column {vocab!r} not in the table; it has "
        f"{list(df.columns)}")
  draws = usage_draws(df, kind)
  column = column or ("usage_uniform_expectation" if kind == "shared"
                      else "group_usage_uniform_expectation")
  out = df.copy()
  known = draws.notna().to_numpy()
  values = np.full(len(out), np.nan)
  values[known] = uniform_usage_expectation(
      draws[known].to_numpy(), pd.to_numeric(out.loc[known, vocab]).to_numpy(), percent=percent)
  out[column] = values
  return out


def run_workdirs(
    df: pd.DataFrame,
    table: str | os.PathLike | None = None,
) -> dict[str, pathlib.Path]:
  """{run name: workdir} of the rows whose workdir holds a metrics.jsonl.

  The `workdir` column of `gsq-collect` is absolute; when the sweep folder
  was moved (or the table copied elsewhere) the run is looked up next to the
  table instead: `table` is ROOT/tables/NAME.csv, so ROOT/<run> (or the
  table's own folder/<run>). Rows found nowhere are left out; compare the
  result's length with the table's to notice.
  """
  if "run" not in df.columns and "workdir" not in df.columns:
    raise ValueError(f"run_workdirs: the table needs a `run` or `workdir` column (gsq-collect "
                     f"writes both); it has {list(df.columns)}")
  roots = []
  if table is not None:
    table = pathlib.Path(table)
    folder = table.parent if table.suffix in _TABLE_SUFFIXES else table
    roots = [folder.parent, folder]
  found: dict[str, pathlib.Path] = {}
  for _, row in df.iterrows():
    name = row.get("run")
    name = str(name) if isinstance(name, str) and name else None
    candidates = []
    if isinstance(row.get("workdir"), str) and row["workdir"]:
      candidates.append(pathlib.Path(row["workdir"]))
      name = name or candidates[0].name
    candidates += [root / name for root in roots if name]
    for path in candidates:
      if (path / "metrics.jsonl").is_file():
        found[name] = path
        break
  return found


def finished_runs(df: pd.DataFrame) -> pd.DataFrame:
  """The rows of finished runs (status "done"); every row of a table without `status`.

  `gsq-collect` lists pending, running and failed runs too, with empty
  metrics; fits and plots want the finished ones. Imported released
  checkpoints (status "imported") are kept apart: see `imported_runs`.
  """
  if "status" not in df.columns:
    return df.copy()
  return df[df["status"].astype(str).str.lower() == "done"].copy()


def imported_runs(df: pd.DataFrame) -> pd.DataFrame:
  """The rows of released checkpoints brought in by gsq-import and evaluated by gsq-eval."""
  if "status" not in df.columns:
    return df.iloc[:0].copy()
  rows = df[df["status"].astype(str).str.lower() == "imported"]
  return rows[rows["usage"].notna()].copy() if "usage" in rows else rows.iloc[:0].copy()


def pick_metric(df: pd.DataFrame, preferred: str, fallbacks: Sequence[str] = ()) -> str:
  """`preferred` if the table has a value for it, else the best-covered fallback.

  Tiny runs have no rFID unless the FID Inception weights are installed
  (eval.json says why in `rfid_status`), so a notebook asking for rFID falls
  back to a metric that was measured instead of plotting an empty figure: the
  fallback with values in the most rows, the earlier one on ties (runs with
  different eval settings may have measured different metrics).
  """
  def count(name: str) -> int:
    if name not in df.columns:
      return 0
    return int(pd.to_numeric(df[name], errors="coerce").notna().sum())

  if count(preferred):
    return preferred
  counts = [count(name) for name in fallbacks]
  if not counts or max(counts) == 0:
    raise ValueError(f"pick_metric: none of {[preferred, *fallbacks]} has a value in the "
                     f"table; it has {list(df.columns)}")
  return fallbacks[counts.index(max(counts))]


def run_label(row: pd.Series | dict) -> str:
  """A short legend label of a table row: 'ibq f4 D32 V256k', 'paper gsq f16 D16 G4 V256k'.

  G is shown for GSQ rows only (other quantizers have one group).
  """
  row = dict(row)
  parts = ["paper"] if row.get("source") == "paper" else []
  quantizer = row.get("quantizer")
  if isinstance(quantizer, str):
    parts.append(quantizer)
  for col in ("f", "D", "G"):
    value = row.get(col)
    if col == "G" and quantizer not in ("gsq", None):
      continue
    if value is not None and pd.notna(value):
      parts.append(f"{col}{int(value)}")
  V = row.get("V")
  if V is not None and pd.notna(V):
    V = int(V)
    parts.append(f"V{V // 1024}k" if V >= 1024 and V % 1024 == 0 else f"V{V}")
  return " ".join(parts)


def run_labels(df: pd.DataFrame) -> list[str]:
  """`run_label` of every row, made unique: repeated labels get the run name (or row number)."""
  labels = [run_label(row) for _, row in df.iterrows()]
  counts = pd.Series(labels).value_counts()
  out = []
  for i, (label, (_, row)) in enumerate(zip(labels, df.iterrows())):
    if counts[label] > 1:
      name = row.get("run")
      label = f"{label} {name if isinstance(name, str) and name else f'#{i}'}"
    out.append(label)
  return out
