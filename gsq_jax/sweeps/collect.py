"""`gsq-collect ROOT`: tidy scaling tables from a sweep's run workdirs.

One row per run, keyed by (quantizer, f, D, G, d, V, seed), with the run's
status, size and cost (params, steps, images_seen, wall_time_s,
device_hours) and every metric of its eval.json (the protocol block as
eval_* columns). Runs come from every ROOT/**/sweep.json manifest (so pending
runs show up too) and from any other folder holding a config.json.

The rFID status is a short code per row (`ok` or `unavailable`); why it is
unavailable and the fix are printed once below the table (and in each run's
eval.json). Package versions, backend and device kind come from each run's
first metrics row (`version_*`, `backend`, `device_kind` columns); a table
mixing versions gets a warning.

Written as ROOT/tables/NAME.csv and NAME.md (and NAME.parquet when pyarrow is
installed), each atomically (temp file + os.replace): reading half-written
files of running trainers is tolerated, so it is safe to run while the sweep
is going. The CSV loads with `gsq_jax.analysis.load_table`.

  gsq-collect runs/demo                 # tables + a compact table on stdout
  gsq-collect runs/demo --plot psnr     # + PSNR against D, one line per (f, G)
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from gsq_jax.analysis import tables as tables_lib
from gsq_jax.sweeps import manifest as manifest_lib
from gsq_jax.utils import environment
from gsq_jax.utils import files
from gsq_jax.sweeps import runner

KEY_COLUMNS = ("quantizer", "f", "D", "G", "d", "V", "seed")
RUN_COLUMNS = ("res", "run", "sweep", "status", "imported_from", "reason", "steps", "total_steps",
               "images_seen", "params", "wall_time_s", "device_hours")
IMPORTED = "imported"  # status of a workdir written by gsq-import (a released checkpoint)
PROVENANCE_FILE = "imported_from.json"  # = importers.run_dir.PROVENANCE_FILE (kept light: no flax)
# Preferred order of eval.json metrics; any other key follows alphabetically.
METRIC_ORDER = ("psnr", "ssim", "lpips_alex", "lpips_vgg", "rfid", "rfid_status", "kid_mean",
                "kid_std", "fd_vgg16", "usage", "perplexity", "bits_per_image",
                "group_usage_mean", "product_usage", "tokens", "lookups",
                "usage_uniform_expectation", "mse", "psnr_per_image")
ENVIRONMENT_COLUMNS = (*(environment.version_key(p) for p in environment.PINNED),
                       "version_python", "backend", "device_kind")
TAIL_COLUMNS = (*ENVIRONMENT_COLUMNS, "config_hash", "git_commit", "workdir")
# Shown on stdout (when present); the files hold every column.
SUMMARY_COLUMNS = ("run", "f", "D", "G", "V", "status", "steps", "psnr", "ssim", "lpips_alex",
                   "lpips_vgg", "rfid", "usage", "usage_uniform_expectation", "lookups",
                   "perplexity", "wall_time_s")
RFID_OK, RFID_UNAVAILABLE = "ok", "unavailable"
_PARAM_KEYS = ("params", "num_params", "params/total", "param_count", "parameters",
               "params_total", "generator_params")


def _metrics_summary(path: pathlib.Path) -> dict[str, Any]:
  """Last step and any parameter count of a metrics.jsonl (partial lines skipped)."""
  out: dict[str, Any] = {}
  try:
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line still being written
        if not isinstance(row, dict):
          continue
        if isinstance(row.get("step"), (int, float)):
          out["steps"] = max(int(row["step"]), out.get("steps", 0))
        for key in ("batches_per_step", "global_batch_size", *ENVIRONMENT_COLUMNS):
          if isinstance(row.get(key), (int, str)) and key not in out:
            out[key] = row[key]  # as the trainer ran it (first metrics line)
        for key in _PARAM_KEYS:
          if isinstance(row.get(key), (int, float)) and "params" not in out:
            out["params"] = int(row[key])
  except FileNotFoundError:
    pass
  return out


# Codebook health of the last logged training window (metrics.jsonl) -> table column.
TRAINING_HEALTH = {"usage": "train_usage", "lookups": "train_usage_lookups",
                   "uniform_usage": "train_usage_uniform_expectation",
                   "perplexity": "train_perplexity", "effective_bits": "train_effective_bits",
                   "dead_codes": "train_dead_codes", "codebook_norm_cv": "train_codebook_norm_cv"}


def quantizer_variant(config: Mapping[str, Any] | None) -> dict[str, Any]:
  """`init` and `norm` columns of a GSQ/VQ run (paper Table 1's two axes)."""
  quantizer = _get(config or {}, "model.quantizer") or {}
  out = {}
  if "init" in quantizer:
    out["init"] = quantizer["init"]
  if "l2_normalize" in quantizer:
    out["norm"] = "l2" if quantizer["l2_normalize"] else "none"
  return out


def training_health(path: pathlib.Path) -> dict[str, Any]:
  """The TRAINING_HEALTH columns from the last metrics.jsonl line that has usage."""
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except FileNotFoundError:
    return {}
  for line in reversed(lines):  # the last line may be half written: skipped
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict) and "usage" in row:
      return {column: row[key] for key, column in TRAINING_HEALTH.items() if key in row}
  return {}


def _get(tree: Any, dotted: str, default: Any = None) -> Any:
  for part in dotted.split("."):
    if not isinstance(tree, Mapping) or part not in tree:
      return default
    tree = tree[part]
  return tree


def _keys_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
  D, G = _get(config, "model.latent_dim"), _get(config, "model.num_groups", 1)
  return {"quantizer": _get(config, "model.quantizer.name", "gsq"),
          "f": _get(config, "model.downsample_factor"), "D": D, "G": G,
          "d": D // G if isinstance(D, int) and isinstance(G, int) and G else None,
          "V": _get(config, "model.codebook_size"), "seed": _get(config, "train.seed"),
          "res": _get(config, "train.image_size")}


class _ParamCounter:
  """Parameter counts from config.json when the trainer did not log them (cached)."""

  def __init__(self):
    self.cache: dict[str, int | None] = {}

  def __call__(self, config: Mapping[str, Any] | None) -> int | None:
    model = _get(config, "model") if config else None
    if not isinstance(model, Mapping):
      return None
    key = json.dumps(model, sort_keys=True, default=str)
    if key not in self.cache:
      try:
        import ml_collections  # pylint: disable=import-outside-toplevel
        from gsq_jax.models import tokenizer  # pylint: disable=import-outside-toplevel
        counts = tokenizer.parameter_counts_from_config(ml_collections.ConfigDict(dict(model)))
        self.cache[key] = int(counts["total"])
      except Exception:  # pylint: disable=broad-except
        self.cache[key] = None  # a config this version cannot build: leave params empty
    return self.cache[key]


def _flat_metric(value: Any) -> Any:
  if isinstance(value, (dict, list)):
    return json.dumps(value, sort_keys=True)
  return value


def collect_run(workdir: pathlib.Path, record: Mapping[str, Any] | None = None, *,
                sweep: Mapping[str, Any] | None = None,
                count_params: _ParamCounter | None = None) -> dict[str, Any]:
  """One table row for a run workdir (its manifest record gives the key when known)."""
  config = manifest_lib.read_json(workdir / "config.json")
  keys = dict(record["keys"]) if record else _keys_from_config(config or {})
  if keys.get("d") is None and keys.get("D") and keys.get("G"):
    keys["d"] = keys["D"] // keys["G"]
  if keys.get("res") is None and config:
    keys["res"] = _get(config, "train.image_size")
  state, status = runner.current_state(workdir)
  provenance = manifest_lib.read_json(workdir / PROVENANCE_FILE)
  if state == runner.PENDING and (workdir / "config.json").exists() and not status["starts"]:
    state = IMPORTED if isinstance(provenance, dict) else "unknown"  # not started by gsq-sweep
  row: dict[str, Any] = {**keys, "run": workdir.name,
                         "sweep": (sweep or {}).get("sweep", ""), "status": state,
                         "imported_from": (provenance or {}).get("file") if state == IMPORTED
                                          else None,
                         "reason": status.get("reason", "") if state != runner.DONE else ""}
  summary = _metrics_summary(workdir / "metrics.jsonl")
  row.update(training_health(workdir / "metrics.jsonl"))
  row.update(quantizer_variant(config))
  evaluation = manifest_lib.read_json(workdir / "eval.json")
  evaluation = evaluation if isinstance(evaluation, dict) else {}
  protocol = evaluation.get("protocol") if isinstance(evaluation.get("protocol"), dict) else {}
  steps = summary.get("steps")
  if steps is None and isinstance(protocol.get("step"), int):
    steps = protocol["step"]
  row["steps"] = steps
  row["total_steps"] = _get(config, "train.total_steps")
  batch = summary.get("global_batch_size") or _get(config, "train.global_batch_size")
  per_step = summary.get("batches_per_step") or (
      2 if _get(config, "train.two_batches_per_step", False) else 1)
  row["images_seen"] = steps * batch * per_step if steps is not None and batch else None
  params = summary.get("params")
  if params is None and count_params is not None and config:
    params = count_params(config)
  row["params"] = params
  history = status.get("history", [])
  wall = float(status.get("wall_time_s") or 0.0)
  if state == runner.RUNNING and status.get("started"):
    wall += max(0.0, time.time() - float(status["started"]))
  row["wall_time_s"] = round(wall, 1) if (wall or history) else None
  device_s = sum(float(h.get("device_seconds", (h["end"] - h["start"]))) for h in history
                 if "end" in h and "start" in h)
  row["device_hours"] = round(device_s / 3600.0, 6) if history else None
  for key in ENVIRONMENT_COLUMNS:
    row[key] = summary.get(key)
  for key, value in evaluation.items():
    if key == "rfid_status":  # a paragraph (reason + fix): said once, by `rfid_notes`
      row[key] = RFID_OK if value == RFID_OK else RFID_UNAVAILABLE
    elif key != "protocol":
      row[key] = _flat_metric(value)
  for key, value in protocol.items():
    if isinstance(value, dict):
      continue  # documentation (e.g. metric_conventions), not a per-run value
    column = "eval_images" if key == "num_images" else f"eval_{key.removeprefix('eval_')}"
    row[column] = _flat_metric(value)
  row["config_hash"] = (record or {}).get("config_hash") or status.get("config_hash")
  row["git_commit"] = (sweep or {}).get("git_commit")
  row["workdir"] = str(workdir)
  return row


def rfid_notes(df: pd.DataFrame) -> list[str]:
  """Why rFID is unavailable, once per distinct reason (from the runs' eval.json)."""
  if "rfid_status" not in df.columns:
    return []
  reasons: dict[str, int] = {}
  for _, row in df[df["rfid_status"] == RFID_UNAVAILABLE].iterrows():
    evaluation = manifest_lib.read_json(pathlib.Path(row["workdir"]) / "eval.json")
    reason = evaluation.get("rfid_status") if isinstance(evaluation, dict) else None
    if isinstance(reason, str):
      reasons[reason] = reasons.get(reason, 0) + 1
  return [f"rfid_status {RFID_UNAVAILABLE} ({n} run{'s' * (n > 1)}): {reason}"
          for reason, n in reasons.items()]


def version_warning(df: pd.DataFrame) -> str | None:
  """A warning when the table's runs ran on different package versions, else None."""
  mixed = environment.mixed_versions(df.to_dict("records"))
  if not mixed:
    return None
  parts = "; ".join(f"{k.removeprefix(environment.VERSION_PREFIX)} {' / '.join(v)}"
                    for k, v in mixed.items())
  return (f"warning: this table mixes package versions ({parts}); compare its rows with care "
          "(columns version_*)")


def _find_runs(root: pathlib.Path) -> list[tuple[pathlib.Path, dict | None, dict | None]]:
  """(workdir, manifest record, manifest) for every run under root."""
  found: dict[pathlib.Path, tuple[dict | None, dict | None]] = {}
  manifests = sorted(root.rglob(manifest_lib.MANIFEST_NAME))
  for path in manifests:
    value = manifest_lib.read_json(path)
    if not isinstance(value, dict) or not isinstance(value.get("runs"), list):
      continue
    for record in value["runs"]:
      workdir = pathlib.Path(record["workdir"])
      if not workdir.is_absolute() or not workdir.exists():
        workdir = path.parent / record["name"]  # a moved sweep folder
      found[workdir.resolve()] = (record, value)
  for config in sorted(root.rglob("config.json")):
    workdir = config.parent.resolve()
    if workdir not in found and "checkpoints" not in config.parts:
      found[workdir] = (None, None)
  return [(w, r, m) for w, (r, m) in found.items()]


def _column_order(columns: Iterable[str]) -> list[str]:
  columns = list(dict.fromkeys(columns))
  head = [c for c in (*KEY_COLUMNS, *RUN_COLUMNS) if c in columns]
  metrics = [c for c in METRIC_ORDER if c in columns]
  tail = [c for c in TAIL_COLUMNS if c in columns]
  evals = sorted(c for c in columns if c.startswith("eval_") and c not in head)
  rest = sorted(c for c in columns if c not in {*head, *metrics, *tail, *evals})
  return head + metrics + rest + evals + tail


def collect(root: str | os.PathLike, *, count_params: bool = True) -> pd.DataFrame:
  """The scaling table of every run under `root`, sorted by its key."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise ValueError(f"gsq-collect: ROOT {root} is not a folder; pass the sweep root "
                     "(e.g. runs/demo)")
  counter = _ParamCounter() if count_params else None
  rows = [collect_run(w, r, sweep=m, count_params=counter) for w, r, m in _find_runs(root)]
  if not rows:
    raise ValueError(f"gsq-collect: no runs under {root} (no sweep.json or config.json found)")
  df = pd.DataFrame(rows)
  df = df[_column_order(df.columns)]
  sort = [c for c in ("sweep", *KEY_COLUMNS, "run") if c in df.columns]
  df = df.sort_values(sort, kind="stable", na_position="last", key=_sort_key).reset_index(drop=True)
  return add_compute_and_bits(df, root / PLAN_NAME)


PLAN_NAME = "plan.json"  # `gsq-sweep SWEEP --plan --target T` writes it into the sweep root
COMPUTE_COLUMNS = ("flops_per_image", "forward_flops_per_image", "train_flops")
BIT_COLUMNS = ("nominal_bits_per_image", "effective_bits_per_image", "bits_per_pixel",
               "nominal_bits_per_pixel")


def add_compute_and_bits(df: pd.DataFrame, plan_json: str | os.PathLike | None) -> pd.DataFrame:
  """Compute- and bit-aware columns (scaling tables against FLOPs or bits, not only D/V).

  From the planner's plan.json (matched by run name; NaN without one):
  flops_per_image (training FLOPs per image of the global batch),
  forward_flops_per_image (the tokenizer's encode + decode) and train_flops
  (per-step FLOPs x steps done). From the run's keys and eval.json: nominal
  bits per image h*w*G*log2 V (h = w = res / f), effective bits per image
  tokens x log2(perplexity) and both per pixel.
  """
  df = df.copy()
  plans = {}
  record = manifest_lib.read_json(pathlib.Path(plan_json)) if plan_json else None
  if isinstance(record, dict):
    plans = {p.get("label"): p for p in record.get("plans", []) if isinstance(p, dict)}
  run_plan = [plans.get(name, {}) for name in df.get("run", pd.Series([None] * len(df)))]
  number = lambda values: pd.to_numeric(pd.Series(values, index=df.index), errors="coerce")
  df["flops_per_image"] = number([p.get("flops_per_image") for p in run_plan])
  df["forward_flops_per_image"] = number([p.get("forward_flops_per_image") for p in run_plan])
  steps = number(df["steps"]) if "steps" in df else np.nan
  df["train_flops"] = number([p.get("flops_per_step") for p in run_plan]) * steps
  column = lambda name: number(df[name]) if name in df else pd.Series(np.nan, index=df.index)
  side = column("res") / column("f")
  tokens = side * side * column("G")
  pixels = column("res") ** 2
  df["nominal_bits_per_image"] = tokens * np.log2(column("V"))
  df["effective_bits_per_image"] = tokens * np.log2(column("perplexity"))
  df["bits_per_pixel"] = df["effective_bits_per_image"] / pixels
  df["nominal_bits_per_pixel"] = df["nominal_bits_per_image"] / pixels
  return df


def _sort_key(series: pd.Series) -> pd.Series:
  if series.dtype == object:
    return series.astype(str)
  return series


def _format_cell(value: Any) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return ""
  if isinstance(value, float):
    if value.is_integer() and abs(value) < 1e15:
      return str(int(value))
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.4e}"
  return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(df: pd.DataFrame, columns: Sequence[str] | None = None,
                notes: Sequence[str] = ()) -> str:
  """A GitHub Markdown table (4 significant digits; headers with units), then `notes`."""
  columns = [c for c in (columns or df.columns) if c in df.columns]
  lines = ["| " + " | ".join(tables_lib.column_label(c) for c in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  for _, row in df[columns].iterrows():
    lines.append("| " + " | ".join(_format_cell(row[c]) for c in columns) + " |")
  lines += ["", *notes] if notes else []
  return "\n".join(lines) + "\n"


def _has_pyarrow() -> bool:
  try:
    import pyarrow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def write_tables(df: pd.DataFrame, out_dir: str | os.PathLike, name: str,
                 notes: Sequence[str] = ()) -> list[pathlib.Path]:
  """NAME.csv, NAME.md (with `notes` below it; NAME.parquet with pyarrow) in out_dir, atomically."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  written = []
  csv = io.StringIO()
  df.to_csv(csv, index=False)
  files.atomic_write_text(out_dir / f"{name}.csv", csv.getvalue())
  written.append(out_dir / f"{name}.csv")
  files.atomic_write_text(out_dir / f"{name}.md", to_markdown(df, notes=notes))
  written.append(out_dir / f"{name}.md")
  if _has_pyarrow():
    tmp = out_dir / f".{name}.parquet.tmp"
    frame = df.copy()
    for col in frame.columns:  # mixed object columns (e.g. rfid_status) as text
      if frame[col].dtype == object:
        frame[col] = frame[col].map(lambda v: None if v is None or
                                    (isinstance(v, float) and math.isnan(v)) else str(v))
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, out_dir / f"{name}.parquet")
    written.append(out_dir / f"{name}.parquet")
  return written


def plot(table_csv: pathlib.Path, metric: str, save: pathlib.Path) -> pathlib.Path:
  """`metric` against D, one line per (f, G), from the written table (via load_table)."""
  from gsq_jax import analysis  # pylint: disable=import-outside-toplevel
  df = analysis.load_table(table_csv)
  if metric not in df.columns:
    raise ValueError(f"gsq-collect --plot: no column {metric!r} in the table; it has "
                     f"{sorted(df.columns)}")
  done = df[(df["status"] == runner.DONE) & df[metric].notna()]
  if done.empty:
    raise ValueError(f"gsq-collect --plot: no finished run has {metric!r} yet")
  by = [c for c in ("quantizer", "f", "G", "V") if c in done.columns and done[c].nunique() > 1]
  analysis.plot_scaling(done, x="D", y=metric, by=by or ["G"], title=f"{tables_lib.column_label(metric)} vs D",
                        save=save)
  return save


def _table_name(root: pathlib.Path) -> str:
  value = manifest_lib.read_json(root / manifest_lib.MANIFEST_NAME)
  if isinstance(value, dict) and value.get("sweep"):
    return str(value["sweep"]) + ("_tiny" if value.get("tiny") else "")
  return root.resolve().name or "scaling"


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="gsq-collect", description=__doc__.split("\n\n")[0])
  parser.add_argument("root", help="sweep root (the --root of gsq-sweep, e.g. runs/demo)")
  parser.add_argument("--out", default=None, help="output folder (default ROOT/tables)")
  parser.add_argument("--name", default=None,
                      help="table file name without suffix (default: the sweep's name)")
  parser.add_argument("--plot", nargs="?", const="psnr", default=None, metavar="METRIC",
                      help="also plot METRIC (default psnr) against D and G as a PNG")
  parser.add_argument("--all-columns", action="store_true", help="print every column")
  parser.add_argument("--no-params", action="store_true",
                      help="do not build models to count parameters the trainer did not log")
  args = parser.parse_args(argv)
  root = pathlib.Path(args.root)
  try:
    df = collect(root, count_params=not args.no_params)
  except ValueError as err:
    print(err, file=sys.stderr)
    return 2
  out_dir = pathlib.Path(args.out) if args.out else root / "tables"
  name = args.name or _table_name(root)
  warning = version_warning(df)
  notes = [*rfid_notes(df), *([warning] if warning else [])]
  written = write_tables(df, out_dir, name, notes=notes)
  columns = list(df.columns) if args.all_columns else [c for c in SUMMARY_COLUMNS
                                                        if c in df.columns]
  print(to_markdown(df, columns), end="")
  for note in notes:
    print(f"\n{note}", file=sys.stderr if note is warning else sys.stdout)
  counts = df["status"].value_counts().to_dict()
  print(f"\n{len(df)} runs ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))})")
  for path in written:
    print(f"wrote {path}")
  if args.plot:
    try:
      print(f"plot: {plot(written[0], args.plot, out_dir / f'{name}_{args.plot}.png')}")
    except ValueError as err:
      print(err, file=sys.stderr)
      return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
