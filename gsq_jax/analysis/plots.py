"""Plots of the paper's figure types, with the user's runs next to the paper's.

Every helper returns a matplotlib Figure (built without pyplot, so nothing is
shown twice in a notebook and no global state changes) and writes a PNG when
given `save`. Styles: the user's runs are filled circles on solid lines,
published points hollow squares on dashed lines labelled "paper ...", fitted
curves thin dotted/dash-dotted lines labelled by the fit's label.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.figure
import matplotlib.lines
import matplotlib.ticker
import numpy as np
import pandas as pd

from gsq_jax.analysis import paper as paper_lib
from gsq_jax.analysis import tables as tables_lib
from gsq_jax.analysis import usage as usage_lib

_FIT_STYLES = (":", "-.", (0, (5, 1, 1, 1, 1, 1)))


def _fmt_value(col: str, value: Any) -> str:
  if isinstance(value, (int, float, np.integer, np.floating)) and float(value).is_integer():
    v = int(value)
    if col == "V" and v >= 1024 and v % 1024 == 0:
      return f"V={v // 1024}k"
    return f"{col}={v}"
  return f"{col}={value}"


def _group_label(by: Sequence[str], key: Any) -> str:
  keys = key if isinstance(key, tuple) else (key,)
  return ", ".join(_fmt_value(c, k) for c, k in zip(by, keys))


def _groups(df: pd.DataFrame, by: Sequence[str]) -> dict[Any, pd.DataFrame]:
  if not by:
    return {None: df}
  out = {}
  for key, part in df.groupby(list(by), sort=True):
    out[key[0] if len(by) == 1 else key] = part
  return out


def _check_columns(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
  missing = [c for c in cols if c not in df.columns]
  if missing:
    raise ValueError(f"plot: the {what} table lacks column(s) {missing}; it has {list(df.columns)}")


def _mean_std(part: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
  """Mean and std of y over repeats (seeds) at each x, NaN metrics dropped."""
  part = part[[x, y]].apply(pd.to_numeric, errors="coerce").dropna()
  return part.groupby(x)[y].agg(["mean", "std", "count"]).reset_index().sort_values(x)


def _predictor(fit: Any, key: Any, by: Sequence[str], x: str):
  """Returns xgrid -> prediction for one group, or None if `fit` has no curve for it."""
  if isinstance(fit, Mapping):  # FitGroups: one law per group
    fit = fit.get(key)
    if fit is None:
      return None
  inputs = tuple(getattr(fit, "inputs", (x,)))
  if x not in inputs:
    raise ValueError(f"plot: the fit's inputs {inputs} do not include the x column {x!r}")
  keys = dict(zip(by, key if isinstance(key, tuple) else (key,)))
  if any(name != x and name not in keys for name in inputs):
    raise ValueError(f"plot: the fit needs inputs {inputs}; the plot only fixes {[x, *by]}")
  return lambda grid: fit.predict(**{n: grid if n == x else keys[n] for n in inputs})


def _save(fig: matplotlib.figure.Figure, save: str | os.PathLike | None) -> None:
  if save is not None:
    path = pathlib.Path(save)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_scaling(
    df: pd.DataFrame | None,
    *,
    x: str,
    y: str,
    by: str | Sequence[str] = (),
    paper: pd.DataFrame | None = None,
    fit: Any = None,
    ax: Any = None,
    logx: bool = True,
    logy: bool = False,
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> matplotlib.figure.Figure:
  """y against x, one series per group of `by`, for the user's and the paper's rows.

  Args:
    df: the user's table (None to plot only the paper). Repeated rows at one
      point (seeds) are averaged, with their std as error bars.
    x, y: columns for the axes.
    by: column(s) whose values make the series (one colour each).
    paper: published points in the same columns (e.g. `paper_table(...)`).
    fit: a FitResult / FixedLaw whose inputs are `x` plus `by` columns, a
      FitGroups keyed like the groups of `by`, or a list of those; drawn as
      curves over the plotted x range.
    ax: axes to draw into (its figure is returned); a new figure otherwise.
    logx: log2 x axis with ticks at the plotted x values.
    logy: log10 y axis.
    title: axes title.
    save: PNG path to write.
  """
  by = (by,) if isinstance(by, str) else tuple(by)
  frames = [(f, name) for f, name in ((df, "user"), (paper, "paper")) if f is not None]
  if not frames:
    raise ValueError("plot: pass a user table `df`, a `paper` table, or both")
  for frame, name in frames:
    if not isinstance(frame, pd.DataFrame):
      raise ValueError(f"plot: the {name} table must be a DataFrame, got {type(frame).__name__}")
    _check_columns(frame, [x, y, *by], name)
  if ax is None:
    fig = matplotlib.figure.Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
  else:
    fig = ax.figure
  user_groups = _groups(df, by) if df is not None else {}
  paper_groups = _groups(paper, by) if paper is not None else {}
  keys = list(set(user_groups) | set(paper_groups))
  try:
    keys.sort()
  except TypeError:  # mixed key types: any stable order will do
    keys.sort(key=str)
  colors = {k: f"C{i % 10}" for i, k in enumerate(keys)}
  xs_all, styles, x_range = [], {}, {}
  for key in keys:
    label = _group_label(by, key)
    if key in user_groups:
      stats = _mean_std(user_groups[key], x, y)
      if len(stats):
        yerr = stats["std"].fillna(0).to_numpy() if (stats["count"] > 1).any() else None
        ax.errorbar(stats[x], stats["mean"], yerr=yerr, color=colors[key], marker="o",
                    linestyle="-", capsize=3, label=label or "runs")
        xs_all.append(stats[x].to_numpy())
        x_range.setdefault(key, []).append(stats[x].to_numpy())
        styles["runs"] = dict(marker="o", linestyle="-")
    if key in paper_groups:
      stats = _mean_std(paper_groups[key], x, y)
      if len(stats):
        ax.plot(stats[x], stats["mean"], color=colors[key], marker="s", markerfacecolor="none",
                linestyle="--", alpha=0.8, label=f"paper {label}".strip())
        xs_all.append(stats[x].to_numpy())
        x_range.setdefault(key, []).append(stats[x].to_numpy())
        styles["paper"] = dict(marker="s", markerfacecolor="none", linestyle="--")
  if fit is not None and xs_all:
    for i, one in enumerate(fit if isinstance(fit, (list, tuple)) else [fit]):
      name = getattr(one, "label", "fit")
      style = _FIT_STYLES[i % len(_FIT_STYLES)]
      for key in keys:
        predict = _predictor(one, key, by, x)
        if predict is not None:
          xv = np.concatenate(x_range.get(key) or xs_all)  # the group's own x span
          lo, hi = float(np.min(xv)), float(np.max(xv))
          grid = np.geomspace(lo, hi, 128) if logx and lo > 0 else np.linspace(lo, hi, 128)
          ax.plot(grid, np.broadcast_to(predict(grid), grid.shape), color=colors[key],
                  linestyle=style, linewidth=1.2, label=f"{name} {_group_label(by, key)}".strip())
          styles[name] = dict(linestyle=style)
  if logx:
    ax.set_xscale("log", base=2)
    if xs_all:
      ticks = np.unique(np.concatenate(xs_all))
      ticks = ticks[ticks > 0]
      ax.set_xticks(ticks)
      ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
      ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  if logy:
    ax.set_yscale("log")
  ax.set_xlabel(tables_lib.column_label(x))
  ax.set_ylabel(tables_lib.column_label(y))
  if title:
    ax.set_title(title)
  ax.grid(True, alpha=0.3)
  order = ["runs", "paper"] + [n for n in styles if n not in ("runs", "paper")]
  _compact_legend(ax, [(_group_label(by, k), colors[k]) for k in keys if by],
                  {n: styles[n] for n in order if n in styles})
  _save(fig, save)
  return fig


def _compact_legend(ax, groups: list[tuple[str, str]], styles: dict[str, dict[str, Any]]) -> None:
  """One entry per group colour and one per source style, outside the axes.

  The plotted artists keep their full labels ("paper V=8k", "fit V=8k", ...)
  for programmatic inspection; the legend stays short for many groups. A
  single source (only the user's runs) gets no style entry: it would explain
  nothing.
  """
  handles = [matplotlib.lines.Line2D([], [], color=c, linewidth=6, label=l) for l, c in groups]
  if len(styles) > 1:
    handles += [matplotlib.lines.Line2D([], [], color="0.3", label=name, **kw)
                for name, kw in styles.items()]
  if not handles:
    return
  ax.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0),
            borderaxespad=0.0)


def _paper_points(paper: bool | pd.DataFrame | None, name: str, metric: str
                  ) -> pd.DataFrame | None:
  """The paper's table for a figure, or None where it has no such metric."""
  if paper is None or paper is False:
    return None
  table = paper_lib.paper_table(name) if paper is True else paper
  if metric not in table.columns or table[metric].isna().all():
    return None  # e.g. fd_vgg16: the paper never measured it
  if "variant" in table.columns and paper is True:
    table = table[table["variant"].isna()]  # the main grid only (drops "16×1* clip")
  return table


def plot_dim_vocab(df: pd.DataFrame | None, metric: str = "rfid", *,
                   paper: bool | pd.DataFrame | None = True, fit: Any = None, ax: Any = None,
                   logy: bool = False, save: str | os.PathLike | None = None
                   ) -> matplotlib.figure.Figure:
  """Fig. 4: metric against latent dimension D, one series per codebook size V.

  `paper=True` overlays the paper's Fig. 4 grid (rFID only); `fit` takes
  `fit_dim_vocab_law(...)` and/or `paper_dim_vocab_law()`.
  """
  return plot_scaling(df, x="D", y=metric, by="V", fit=fit, ax=ax, logy=logy, save=save,
                      paper=_paper_points(paper, "dim_vocab", metric),
                      title=f"{metric} vs D per V (Fig. 4: f8, G=1)")


def plot_groups(df: pd.DataFrame | None, metric: str = "rfid", *,
                paper: bool | pd.DataFrame | None = True, fit: Any = None, ax: Any = None,
                logy: bool = False, save: str | os.PathLike | None = None
                ) -> matplotlib.figure.Figure:
  """Table 13: metric against group count G at fixed (f, D, V), one series each.

  `paper=True` overlays Table 13 (rfid, psnr, ssim, lpips_alex, usage [%],
  perplexity, inception_score); `fit` takes `fit_power_law(df, "G", metric,
  by=["f", "D", "V"])`.
  """
  return plot_scaling(df, x="G", y=metric, by=("f", "D", "V"), fit=fit, ax=ax, logy=logy,
                      save=save, paper=_paper_points(paper, "groups", metric),
                      title=f"{metric} vs G at fixed D (Table 13)")


def plot_spatial(df: pd.DataFrame | None, metric: str = "rfid", *,
                 paper: bool | pd.DataFrame | None = True, fit: Any = None, ax: Any = None,
                 logy: bool = True, save: str | os.PathLike | None = None
                 ) -> matplotlib.figure.Figure:
  """Fig. 1b: metric against D per down-sampling factor f (d = 16 in the paper).

  Log y by default: rFID spans two decades across f. `fit` takes
  `fit_power_law(df, "D", metric, by="f")`.
  """
  return plot_scaling(df, x="D", y=metric, by="f", fit=fit, ax=ax, logy=logy, save=save,
                      paper=_paper_points(paper, "spatial", metric),
                      title=f"{metric} vs D per f (Fig. 1b: d=16)")


def read_metrics(workdir: str | os.PathLike) -> pd.DataFrame:
  """A run's `metrics.jsonl` as a DataFrame sorted by step.

  Blank lines and a torn last line (a run still writing) are skipped. The
  trainer's usage report (gsq_jax.training.steps.usage_report: usage, perplexity,
  tokens, uniform_usage, ... of the codes picked since the previous log step)
  gets `entropy_bits` = log2(perplexity) added.
  """
  path = pathlib.Path(workdir)
  path = path if path.name == "metrics.jsonl" else path / "metrics.jsonl"
  if not path.is_file():
    raise FileNotFoundError(f"read_metrics: no metrics.jsonl at {path}; pass a run workdir")
  records = []
  lines = path.read_text("utf-8").splitlines()
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i == len(lines) - 1:
        continue
      raise ValueError(f"read_metrics: {path} line {i + 1} is not JSON: {line[:80]!r}") from None
  df = pd.DataFrame.from_records(records)
  if "step" not in df.columns:
    raise ValueError(f"read_metrics: {path} has no 'step' field")
  if "perplexity" in df.columns and "entropy_bits" not in df.columns:
    with np.errstate(divide="ignore", invalid="ignore"):
      df["entropy_bits"] = usage_lib.entropy_bits(pd.to_numeric(df["perplexity"],
                                                                errors="coerce"))
  return df.sort_values("step", kind="stable").reset_index(drop=True)


def plot_training_curves(
    runs: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
    metrics: Sequence[str] = ("usage", "perplexity", "entropy_bits"),
    *,
    paper: Mapping[str, Mapping[str, float]] | None = None,
    reference: Mapping[str, str] | None = None,
    logy: Sequence[str] = ("perplexity",),
    save: str | os.PathLike | None = None,
) -> matplotlib.figure.Figure:
  """Usage / perplexity / entropy over training, one panel per metric, one line per run.

  The trainer logs the usage of the codes picked since the previous log step
  (`log_every_steps` × batch × latent positions tokens), so each point's
  uniform-usage expectation (`uniform_usage`, from that window's lookups) is
  drawn next to it as a dotted line of the run's colour.

  Args:
    runs: {label: workdir} or workdirs (labelled by folder name).
    metrics: metric names as logged in metrics.jsonl (plus `entropy_bits`,
      see `read_metrics`).
    paper: published reference values per metric, {metric: {label: value}},
      drawn as dashed horizontal lines labelled "paper <label>", e.g.
      {"usage": {"IBQ V=2^18 (50k val.)": 84.0}}; mind the units and the
      sample size (a published number over 12.8M tokens is not comparable
      with a window of a few thousand).
    reference: {metric: column} drawn dotted per run and labelled
      "<label> <column>"; default {"usage": "uniform_usage"}. Runs that did
      not log the column are skipped.
    logy: metrics drawn on a log y axis.
    save: PNG path to write.
  """
  if isinstance(runs, Mapping):
    items = [(str(k), pathlib.Path(v)) for k, v in runs.items()]
  else:
    items = [(pathlib.Path(v).name, pathlib.Path(v)) for v in runs]
  if not items:
    raise ValueError("plot_training_curves: `runs` is empty")
  if isinstance(metrics, str) or not metrics:
    raise ValueError("plot_training_curves: `metrics` must be a non-empty list of names")
  reference = {"usage": "uniform_usage"} if reference is None else dict(reference)
  logs = {label: read_metrics(path) for label, path in items}
  fig = matplotlib.figure.Figure(figsize=(5.0 * len(metrics), 3.8))
  axes = fig.subplots(1, len(metrics), squeeze=False)[0]
  for ax, metric in zip(axes, metrics):
    drawn = False
    for i, (label, log) in enumerate(logs.items()):
      if metric not in log.columns:
        continue
      part = log[["step", metric]].apply(pd.to_numeric, errors="coerce").dropna()
      part = part.drop_duplicates("step", keep="last")  # a resumed run re-logs steps
      ax.plot(part["step"], part[metric], color=f"C{i % 10}", label=label)
      drawn = drawn or len(part) > 0
      column = reference.get(metric)
      if column and column in log.columns:
        ref = log[["step", column]].apply(pd.to_numeric, errors="coerce").dropna()
        ref = ref.drop_duplicates("step", keep="last")
        ax.plot(ref["step"], ref[column], color=f"C{i % 10}", linestyle=":", linewidth=1.0,
                label=f"{label} {column}")
    for j, (label, value) in enumerate((paper or {}).get(metric, {}).items()):
      ax.axhline(value, color=f"C{(len(logs) + j) % 10}", linestyle="--",
                 label=f"paper {label}")
      drawn = True
    if not drawn:
      raise ValueError(f"plot_training_curves: no run logged {metric!r}")
    if metric in logy:
      ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(tables_lib.column_label(metric))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small")
  fig.tight_layout()
  _save(fig, save)
  return fig


def plot_usage(summary: pd.DataFrame, *, save: str | os.PathLike | None = None
               ) -> matplotlib.figure.Figure:
  """Evaluation usage next to what uniform use would show at its token count.

  One bar per row of `usage_summary(...)` (the user's runs and, e.g., the
  published IBQ / GSQ rows; rows with source "paper" are hatched). Left:
  usage [%] with a black tick at the uniform-usage expectation
  100·(1 − exp(−T/V)) and T under each bar. Right: entropy of the code
  histogram in bits with a tick at its maximum log2 V.
  """
  if not isinstance(summary, pd.DataFrame) or summary.empty:
    raise ValueError("plot_usage: pass the non-empty table of usage_summary(...)")
  _check_columns(summary, ["usage", "usage_uniform_expectation", "lookups"], "usage summary")
  labels = (list(summary["label"]) if "label" in summary.columns
            else tables_lib.run_labels(summary))
  paper = (summary["source"] == "paper").to_numpy() if "source" in summary.columns else (
      np.zeros(len(summary), bool))
  has_entropy = "entropy_bits" in summary.columns and summary["entropy_bits"].notna().any()
  fig = matplotlib.figure.Figure(figsize=(5.0 + 0.9 * len(summary), 4.4))
  axes = fig.subplots(1, 2 if has_entropy else 1, squeeze=False)[0]
  xs = np.arange(len(summary))
  panels = [("usage", "usage_uniform_expectation", "usage [%] (codes used / V)",
             "uniform expectation 1-exp(-T/V)")]
  if has_entropy:
    panels.append(("entropy_bits", "max_entropy_bits", "entropy [bits]", "max log2 V"))
  for ax, (value, ref, ylabel, ref_label) in zip(axes, panels):
    for i, (x, v) in enumerate(zip(xs, summary[value])):
      ax.bar(x, v, color=f"C{i % 10}", hatch="//" if paper[i] else None,
             edgecolor="0.2", alpha=0.85)
    ax.scatter(xs, summary[ref], marker="_", s=900, color="k", linewidths=2.5, label=ref_label,
               zorder=3)
    ax.set_xticks(xs)
    draws = [f"T={_short_count(t)}" for t in summary["lookups"]]
    ax.set_xticklabels([f"{l}\n{d}" for l, d in zip(labels, draws)], rotation=30, ha="right",
                       fontsize="small")
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    top = np.nanmax(np.concatenate([summary[value].to_numpy(float), summary[ref].to_numpy(float)]))
    ax.set_ylim(0, 1.18 * top if np.isfinite(top) and top > 0 else 1.0)
    ax.legend(fontsize="small", loc="upper right")
  axes[0].set_title("codebook usage at evaluation (hatched: published)")
  if has_entropy:
    axes[1].set_title("entropy of the code histogram")
  fig.tight_layout()
  _save(fig, save)
  return fig


def _short_count(value: Any) -> str:
  if value is None or not np.isfinite(value):
    return "?"
  for unit, size in (("M", 1e6), ("k", 1e3)):
    if value >= size:
      return f"{value / size:.3g}{unit}"
  return f"{value:.0f}"
