"""Scaling-law fits with uncertainty.

Two laws are fitted by unweighted non-linear least squares (scipy
`curve_fit`: Levenberg–Marquardt, or trust-region-reflective where exponents
are bounded):

  * the GSQ paper's dimension–vocabulary law (App. C.2)
      metric = a / (log2 V)^b + c · D^e
  * power laws  y = a · x^b  (+ c with offset=True), optionally per group.

Both are linear in (a, c) once the exponents are fixed, so the starting point
comes from a grid over the exponents with the coefficients solved exactly at
each grid point (variable projection). That makes convergence independent of
the metric's scale and sign.

Uncertainty: the covariance of the least-squares estimate (Jacobian at the
optimum, scaled by the residual variance) gives standard errors and
t-distribution confidence intervals; an optional residual bootstrap gives
percentile intervals that do not assume the estimate is normal — useful for
the paper's law, whose a and b are strongly correlated (a ≈ const·(log2 V)^b
over the fitted V range), so the t-interval of a alone is very wide (on the
Fig. 4 grid ±2500 around 412) while the curve itself is tight.

Which optimum (GSQ Fig. 4 grid, checked by tests/test_analysis.py): the
sum of squares of the dimension–vocabulary law has two minima on the paper's
20 points.
  * exponents b, e >= 0 (the law's stated shape: a vocabulary term that decays
    in log2 V, a dimension term that grows as a power of D): a=412.6, b=2.839,
    c=0.1599, e=0.1962, SSE 0.00513, max residual 0.036 — the published law
    (411.63, 2.8375, 0.1601, 0.1956) within 0.3%. scipy's default curve_fit
    start (all ones) also lands here, which is probably how it was fitted.
  * unconstrained: a=5.29, b=0.764, c=-0.493, e=-0.353, SSE 0.00478 (7%
    lower), a dimension term that saturates instead of growing.
`fit_dim_vocab_law(exponents="positive")` (default) fits the first, "free"
the second. Relative or log-space residuals give neither (a≈199–239), so the
paper fitted plain absolute residuals on all 20 points.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize, stats


def dim_vocab_law(D, V, a, b, c, e):
  """The paper's law a / (log2 V)^b + c · D^e (App. C.2; the log is base 2)."""
  return a / np.power(np.log2(V), b) + c * np.power(D, e)


def power_law(x, a, b, c=0.0):
  """a · x^b + c."""
  return a * np.power(x, b) + c


@dataclasses.dataclass(frozen=True, eq=False)
class FitResult:
  """A fitted law: parameters, their uncertainty, residuals and predictions.

  Attributes:
    model: f(*inputs, *params) -> prediction.
    inputs: names of the model's inputs (table columns), in call order.
    param_names: names of the parameters, in call order.
    params: fitted values.
    cov: covariance of the estimate (NaN where it cannot be estimated).
    x: the input columns the fit used, in `inputs` order.
    y: the observed values.
    level: confidence level of the intervals (e.g. 0.95).
    boot_params: (n, len(params)) parameters of the bootstrap refits, or None.
    label: legend label used by the plot helpers.
    metric: name of the fitted column.
  Parameters are also attributes: `fit.a`, `fit.b`, ...
  """

  model: Callable[..., Any]
  inputs: tuple[str, ...]
  param_names: tuple[str, ...]
  params: np.ndarray
  cov: np.ndarray
  x: tuple[np.ndarray, ...]
  y: np.ndarray
  level: float = 0.95
  boot_params: np.ndarray | None = None
  label: str = "fit"
  metric: str = ""

  def __getattr__(self, name: str) -> float:
    names = self.__dict__.get("param_names", ())
    if name in names:
      return float(self.__dict__["params"][names.index(name)])
    raise AttributeError(name)

  @property
  def n(self) -> int:
    return int(self.y.size)

  @property
  def dof(self) -> int:
    """Residual degrees of freedom, n − number of parameters."""
    return self.n - len(self.params)

  @property
  def fitted(self) -> np.ndarray:
    return np.asarray(self.model(*self.x, *self.params), dtype=np.float64)

  @property
  def residuals(self) -> np.ndarray:
    """Observed minus fitted, in the order of the rows used."""
    return self.y - self.fitted

  @property
  def r2(self) -> float:
    ss_tot = float(np.sum((self.y - self.y.mean()) ** 2))
    ss_res = float(np.sum(self.residuals ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")

  @property
  def rmse(self) -> float:
    return float(np.sqrt(np.mean(self.residuals ** 2)))

  @property
  def stderr(self) -> np.ndarray:
    with np.errstate(invalid="ignore"):
      return np.sqrt(np.diag(self.cov))

  def _t(self, level: float | None) -> float:
    level = self.level if level is None else level
    if not 0 < level < 1:
      raise ValueError(f"FitResult: `level` must be in (0, 1), got {level}")
    return float(stats.t.ppf(0.5 + level / 2, self.dof)) if self.dof > 0 else float("nan")

  def interval(self, name: str, level: float | None = None) -> tuple[float, float]:
    """t-distribution confidence interval of one parameter."""
    if name not in self.param_names:
      raise ValueError(
          f"FitResult.interval: `name` must be one of {self.param_names}, got {name!r}")
    i = self.param_names.index(name)
    half = self._t(level) * self.stderr[i]
    return float(self.params[i] - half), float(self.params[i] + half)

  def boot_interval(self, name: str, level: float | None = None) -> tuple[float, float]:
    """Percentile interval of one parameter over the bootstrap refits."""
    if self.boot_params is None or not len(self.boot_params):
      raise ValueError("FitResult.boot_interval: fit again with `bootstrap` > 0")
    level = self.level if level is None else level
    samples = self.boot_params[:, self.param_names.index(name)]
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)

  def table(self) -> pd.DataFrame:
    """One row per parameter: value, stderr, CI (and bootstrap CI)."""
    rows = []
    for name, value, se in zip(self.param_names, self.params, self.stderr):
      lo, hi = self.interval(name)
      row = {"param": name, "value": float(value), "stderr": float(se),
             "ci_low": lo, "ci_high": hi}
      if self.boot_params is not None and len(self.boot_params):
        row["boot_low"], row["boot_high"] = self.boot_interval(name)
      rows.append(row)
    return pd.DataFrame(rows)

  def _inputs(self, args, kwargs, fn: str) -> list[np.ndarray]:
    if args and kwargs:
      raise ValueError(
          f"FitResult.{fn}: pass inputs {self.inputs} positionally or by name, not both")
    if kwargs:
      missing = [k for k in self.inputs if k not in kwargs]
      if missing or set(kwargs) - set(self.inputs):
        raise ValueError(f"FitResult.{fn}: expected inputs {self.inputs}, got {sorted(kwargs)}")
      args = [kwargs[k] for k in self.inputs]
    if len(args) != len(self.inputs):
      raise ValueError(
          f"FitResult.{fn}: expected {len(self.inputs)} inputs {self.inputs}, got {len(args)}")
    return [np.asarray(a, dtype=np.float64) for a in args]

  def predict(self, *args, **kwargs) -> np.ndarray:
    """The law at new points, e.g. `fit.predict(D, V)` or `fit.predict(D=.., V=..)`.

    Inputs broadcast against each other (numpy rules).
    """
    return np.asarray(self.model(*self._inputs(args, kwargs, "predict"), *self.params))

  def predict_interval(self, *args, level: float | None = None, **kwargs
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Confidence band of the fitted mean at new points (delta method)."""
    xs = self._inputs(args, kwargs, "predict_interval")
    center = np.asarray(self.model(*xs, *self.params), dtype=np.float64)
    grads = []
    for i, p in enumerate(self.params):
      h = 1e-6 * max(abs(p), 1e-3)
      up, dn = self.params.copy(), self.params.copy()
      up[i] += h
      dn[i] -= h
      grads.append((np.asarray(self.model(*xs, *up)) - np.asarray(self.model(*xs, *dn))) / (2 * h))
    jac = np.stack(np.broadcast_arrays(*grads), axis=-1)
    var = np.einsum("...i,ij,...j->...", jac, self.cov, jac)
    half = self._t(level) * np.sqrt(np.maximum(var, 0.0))
    return center - half, center + half

  def residual_table(self) -> pd.DataFrame:
    """The rows the fit used: inputs, observed, fitted and residual."""
    out = pd.DataFrame(dict(zip(self.inputs, self.x)))
    out[self.metric or "y"] = self.y
    out["fitted"] = self.fitted
    out["residual"] = self.residuals
    return out

  def summary(self) -> str:
    """A short human-readable report."""
    lines = [f"{self.label}: {self.metric or 'y'} ~ {', '.join(self.inputs)}; "
             f"n={self.n}, R²={self.r2:.4f}, RMSE={self.rmse:.4g}, "
             f"max|residual|={np.max(np.abs(self.residuals)):.4g}"]
    for row in self.table().itertuples():
      lines.append(f"  {row.param} = {row.value:.6g}  "
                   f"[{row.ci_low:.4g}, {row.ci_high:.4g}] ({self.level:.0%} CI)")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class FixedLaw:
  """A law with given parameters (e.g. the paper's published fit), plottable like a FitResult."""

  model: Callable[..., Any]
  inputs: tuple[str, ...]
  params: Mapping[str, float]
  label: str = "law"

  def predict(self, *args, **kwargs) -> np.ndarray:
    if kwargs:
      args = tuple(kwargs[k] for k in self.inputs)
    if len(args) != len(self.inputs):
      raise ValueError(f"FixedLaw.predict: expected inputs {self.inputs}, got {len(args)} values")
    return np.asarray(self.model(*(np.asarray(a, dtype=np.float64) for a in args), **self.params))


class FitGroups(dict):
  """Per-group fits: {group key: FitResult}. The key is the value of the single
  `by` column, a tuple for several columns, or None without `by`.

  `skipped` maps the keys of groups left out (fit_power_law(skip_small=True))
  to the reason.
  """

  def __init__(self, fits: Mapping[Any, FitResult], by: tuple[str, ...],
               skipped: Mapping[Any, str] | None = None):
    super().__init__(fits)
    self.by = by
    self.skipped = dict(skipped or {})

  def table(self) -> pd.DataFrame:
    """One row per group: keys, n, R², RMSE and each parameter with its CI."""
    rows = []
    for key, fit in self.items():
      keys = key if isinstance(key, tuple) else (key,)
      row = dict(zip(self.by, keys))
      row.update(n=fit.n, r2=fit.r2, rmse=fit.rmse)
      for prow in fit.table().itertuples():
        row[prow.param] = prow.value
        row[f"{prow.param}_low"] = prow.ci_low
        row[f"{prow.param}_high"] = prow.ci_high
      rows.append(row)
    return pd.DataFrame(rows)


def _numeric_columns(df: pd.DataFrame, cols: Sequence[str], fn: str
                     ) -> tuple[list[np.ndarray], np.ndarray]:
  """Float arrays of `cols` with rows holding any NaN dropped (and a mask)."""
  if not isinstance(df, pd.DataFrame):
    raise ValueError(f"{fn}: `df` must be a pandas DataFrame, got {type(df).__name__}")
  missing = [c for c in cols if c not in df.columns]
  if missing:
    raise ValueError(f"{fn}: column(s) {missing} not in the table; it has {list(df.columns)}")
  arrays = [pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=np.float64) for c in cols]
  keep = np.all([np.isfinite(a) for a in arrays], axis=0)
  return [a[keep] for a in arrays], keep


def _grid_start(bases: Callable[[np.ndarray], np.ndarray], grid: np.ndarray,
                y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Best (exponents, linear coefficients) over a grid of exponent vectors.

  `bases(exponents)` returns the (n, k) design matrix of the terms that are
  linear in the coefficients; these are solved by least squares.
  """
  with np.errstate(all="ignore"):
    designs = np.stack([bases(expo) for expo in grid])  # (grid, n, k)
  ok = np.all(np.isfinite(designs), axis=(1, 2))
  if not ok.any():
    raise ValueError("no finite starting point on the exponent grid; check the inputs")
  designs, grid = designs[ok], grid[ok]
  coefs = np.linalg.pinv(designs) @ y  # batched least squares, (grid, k)
  sse = np.sum((np.einsum("gnk,gk->gn", designs, coefs) - y) ** 2, axis=1)
  best = int(np.nanargmin(sse))
  return grid[best], coefs[best]


def _curve_fit(model, x: list[np.ndarray], y: np.ndarray, p0: np.ndarray,
               bounds: tuple[Any, Any] = (-np.inf, np.inf)) -> tuple[np.ndarray, np.ndarray]:
  """Unweighted least squares (LM, or TRF with bounds); covariance scaled by residual variance."""
  bounded = np.any(np.isfinite(bounds[0])) or np.any(np.isfinite(bounds[1]))
  budget = {"max_nfev": 20000} if bounded else {"maxfev": 20000}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optimize.OptimizeWarning)
    with np.errstate(all="ignore"):
      params, cov = optimize.curve_fit(
          lambda _, *p: model(*x, *p), np.zeros_like(y), y, p0=p0, bounds=bounds, **budget)
  if len(y) <= len(params):
    cov = np.full((len(params), len(params)), np.nan)
  return params, np.where(np.isfinite(cov), cov, np.nan)


def _bootstrap(model, x, y, params, n: int, seed: int, refit) -> np.ndarray:
  """Residual bootstrap: refit on fitted + resampled residuals."""
  rng = np.random.default_rng(seed)
  fitted = model(*x, *params)
  resid = y - fitted
  samples = []
  for _ in range(n):
    y_star = fitted + rng.choice(resid, size=resid.size, replace=True)
    try:
      samples.append(refit(y_star))
    except (RuntimeError, ValueError):  # a failed refit is dropped, not fatal
      continue
  return np.asarray(samples).reshape(-1, len(params))


def fit_dim_vocab_law(
    df: pd.DataFrame,
    metric: str = "rfid",
    *,
    exponents: str = "positive",
    level: float = 0.95,
    bootstrap: int = 0,
    seed: int = 0,
) -> FitResult:
  """Fits metric = a / (log2 V)^b + c · D^e (GSQ App. C.2) to a table.

  Args:
    df: table with columns `D`, `V` and `metric`; rows where any is missing
      (e.g. rFID unavailable) are skipped.
    metric: the column to model.
    exponents: "positive" keeps b, e >= 0, the paper's shape (this reproduces
      the published law, see the module docstring); "free" leaves them
      unconstrained. a and c are free either way, so metrics that improve
      with V or D (PSNR) fit with negative coefficients.
    level: confidence level of the reported intervals.
    bootstrap: number of residual-bootstrap refits (0 = none).
    seed: bootstrap RNG seed.

  Returns:
    A FitResult with params (a, b, c, e) and `predict(D, V)`.
  """
  fn = "fit_dim_vocab_law"
  (D, V, y), _ = _numeric_columns(df, ["D", "V", metric], fn)
  if y.size < 5:
    raise ValueError(
        f"{fn}: need at least 5 rows with `D`, `V` and `{metric}` for 4 parameters, got {y.size}")
  if np.unique(D).size < 2 or np.unique(V).size < 2:
    raise ValueError(f"{fn}: need at least 2 distinct `D` and 2 distinct `V` values")
  if np.any(D <= 0) or np.any(V <= 2):
    raise ValueError(f"{fn}: `D` must be > 0 and `V` > 2 (log2 V > 1)")
  if exponents == "positive":
    bounds = ([-np.inf, 0.0, -np.inf, 0.0], np.inf)
    e_grid = np.linspace(0.05, 2.0, 40)
  elif exponents == "free":
    bounds = (-np.inf, np.inf)
    e_grid = np.linspace(-2.0, 2.0, 81)
  else:
    raise ValueError(f"{fn}: `exponents` must be 'positive' or 'free', got {exponents!r}")
  lv = np.log2(V)
  grid = np.array([(b, e) for b in np.linspace(0.25, 8.0, 32) for e in e_grid])

  def fit(y_obs: np.ndarray, p0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    if p0 is None:
      (b, e), (a, c) = _grid_start(
          lambda p: np.stack([lv ** -p[0], D ** p[1]], axis=1), grid, y_obs)
      p0 = np.array([a, b, c, e])
    return _curve_fit(dim_vocab_law, [D, V], y_obs, p0, bounds)

  params, cov = fit(y)
  boot = None
  if bootstrap:
    boot = _bootstrap(dim_vocab_law, [D, V], y, params, bootstrap, seed,
                      lambda ys: fit(ys, params)[0])
  return FitResult(model=dim_vocab_law, inputs=("D", "V"), param_names=("a", "b", "c", "e"),
                   params=params, cov=cov, x=(D, V), y=y, level=level, boot_params=boot,
                   label="fit", metric=metric)


def _fit_power_law_arrays(x, y, offset, level, bootstrap, seed, xname, metric) -> FitResult:
  """Power-law fit in x/x_ref (x_ref = geometric mean), reported in raw x.

  Scaling keeps x^b finite for inputs such as compute (~1e18); a = a'·x_ref^-b
  and the covariance is mapped through the Jacobian of that transform.
  """
  x_ref = float(np.exp(np.mean(np.log(x))))
  xs = x / x_ref
  names = ("a", "b", "c") if offset else ("a", "b")
  grid = np.linspace(-4.0, 4.0, 161)
  grid = grid[np.abs(grid) > 1e-9].reshape(-1, 1)

  def bases(p):
    cols = [xs ** p[0]] + ([np.ones_like(xs)] if offset else [])
    return np.stack(cols, axis=1)

  def fit_scaled(y_obs):
    (b,), coef = _grid_start(bases, grid, y_obs)
    p0 = np.array([coef[0], b] + ([coef[1]] if offset else []))
    return _curve_fit(power_law, [xs], y_obs, p0)

  def to_raw(p):
    out = np.array(p, dtype=np.float64)
    out[0] = p[0] * x_ref ** -p[1]
    return out

  p_s, cov_s = fit_scaled(y)
  jac = np.eye(len(names))
  jac[0, 0] = x_ref ** -p_s[1]
  jac[0, 1] = -p_s[0] * x_ref ** -p_s[1] * np.log(x_ref)
  cov = jac @ cov_s @ jac.T
  boot = None
  if bootstrap:
    boot = _bootstrap(power_law, [xs], y, p_s, bootstrap, seed,
                      lambda ys: _curve_fit(power_law, [xs], ys, p_s)[0])
    boot = np.array([to_raw(p) for p in boot]).reshape(-1, len(names))
  return FitResult(model=power_law, inputs=(xname,), param_names=names, params=to_raw(p_s),
                   cov=cov, x=(x,), y=y, level=level, boot_params=boot, label="fit",
                   metric=metric)


# x-axes by what they measure: `fit_power_law(df, "compute", "rfid")` fits
# against total training FLOPs, "bits" against effective bits per image
# (columns of gsq_jax.sweeps.collect.add_compute_and_bits).
X_AXES = {
    "compute": "train_flops",
    "flops": "flops_per_image",
    "bits": "effective_bits_per_image",
    "nominal_bits": "nominal_bits_per_image",
    "bpp": "bits_per_pixel",
}


def fit_power_law(
    df: pd.DataFrame,
    x: str,
    y: str,
    by: str | Sequence[str] | None = None,
    offset: bool = False,
    *,
    level: float = 0.95,
    bootstrap: int = 0,
    seed: int = 0,
    skip_small: bool = False,
) -> FitGroups:
  """Fits y = a · x^b (+ c if `offset`) separately for each group of `by`.

  Args:
    df: the table.
    x: input column (> 0), e.g. "D", "G", "f", "params", or an X_AXES name:
      "compute" (train_flops), "flops", "bits", "nominal_bits", "bpp".
    y: metric column; rows with x or y missing are skipped.
    by: column(s) defining groups (e.g. "V" or ["f", "V"]); None fits all rows.
    offset: add the constant c (an irreducible floor).
    level: confidence level of the intervals.
    bootstrap: residual-bootstrap refits per group (0 = none).
    seed: bootstrap RNG seed.
    skip_small: leave out groups with too few rows or distinct `x` values
      (listed with the reason in `.skipped`) instead of raising; for tables
      where only some series are complete (e.g. a sweep still running).

  Returns:
    FitGroups {key: FitResult} (key None without `by`); `.table()` gives one
    row per group with each parameter and its interval. With exactly as many
    rows as parameters the curve interpolates them and the intervals are NaN.
  """
  fn = "fit_power_law"
  x = X_AXES.get(x, x) if x not in df.columns else x
  by_cols = () if by is None else ((by,) if isinstance(by, str) else tuple(by))
  _numeric_columns(df, [x, y], fn)
  missing = [c for c in by_cols if c not in df.columns]
  if missing:
    raise ValueError(f"{fn}: `by` column(s) {missing} not in the table; it has {list(df.columns)}")
  n_params = 3 if offset else 2
  groups = df.groupby(list(by_cols), sort=True, dropna=False) if by_cols else [(None, df)]
  fits, skipped = {}, {}
  for key, part in groups:
    if by_cols and len(by_cols) == 1 and isinstance(key, tuple):
      key = key[0]
    (xv, yv), _ = _numeric_columns(part, [x, y], fn)
    keys = key if isinstance(key, tuple) else (key,)
    where = "" if key is None else f" for {dict(zip(by_cols, keys))}"
    if np.any(xv <= 0):
      raise ValueError(f"{fn}: `{x}` must be > 0 for a power law{where}")
    problem = None
    if xv.size < n_params:
      problem = f"need at least {n_params} rows with `{x}` and `{y}`{where}, got {xv.size}"
    elif np.unique(xv).size < 2:
      problem = f"need at least 2 distinct `{x}` values{where}"
    if problem and skip_small:
      skipped[key] = problem
      continue
    if problem:
      raise ValueError(f"{fn}: {problem}")
    fits[key] = _fit_power_law_arrays(xv, yv, offset, level, bootstrap, seed, x, y)
  return FitGroups(fits, by_cols, skipped)
