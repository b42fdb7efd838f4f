"""Tests of gsq_jax.analysis: table loading, scaling-law fits, plots, paper data."""

import json

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from gsq_jax import analysis  # noqa: E402

PAPER_LAW = {"a": 411.63, "b": 2.8375, "c": 0.1601, "e": 0.1956}  # GSQ App. C.2


def _user_table() -> pd.DataFrame:
  """A small table in the gsq-collect layout (tiny dim-vocab sweep, 2 seeds)."""
  rows = []
  for D in (8, 16, 32):
    for V in (1024, 4096):
      for seed in (0, 1):
        rows.append(dict(
            quantizer="gsq", f=8, D=D, G=1, d=D, V=V, seed=seed, params=1e6, steps=200,
            images_seen=1600, wall_time_s=12.5, rfid=np.nan,
            fd_vgg16=10 + D / 8 - np.log2(V) / 4 + 0.1 * seed, psnr=20 + np.log2(V) / 4 - D / 32,
            ssim=0.5, lpips_vgg=0.3, lpips_alex=0.2, usage=90.0, perplexity=800.0,
            tokens=903 * 1024))
  return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- fits


def test_fit_paper_fig4_grid_recovers_published_law():
  grid = analysis.paper_table("fig4")
  fit = analysis.fit_dim_vocab_law(grid, metric="rfid")
  for name, published in PAPER_LAW.items():
    assert getattr(fit, name) == pytest.approx(published, rel=0.05), name
    lo, hi = fit.interval(name)
    assert lo <= published <= hi, name
  pred = fit.predict(grid["D"], grid["V"])
  assert np.max(np.abs(pred - grid["rfid"].to_numpy())) < 0.04
  assert np.max(np.abs(fit.residuals)) < 0.04
  assert fit.r2 > 0.95 and fit.dof == 16
  # The published law itself reproduces its grid within 0.04 (log base 2).
  law = analysis.paper_dim_vocab_law()
  assert law.params == PAPER_LAW
  assert np.max(np.abs(law.predict(grid["D"], grid["V"]) - grid["rfid"])) < 0.04
  # Predictions for unseen grid points come with a confidence band.
  lo, hi = fit.predict_interval(D=[128, 16], V=[2**20, 262144])
  center = fit.predict(D=[128, 16], V=[2**20, 262144])
  assert np.all(lo < center) and np.all(center < hi)
  table = fit.table()
  assert list(table["param"]) == ["a", "b", "c", "e"]
  resid = fit.residual_table()
  assert list(resid.columns) == ["D", "V", "rfid", "fitted", "residual"] and len(resid) == 20
  assert "b = 2.83" in fit.summary()


def test_fit_paper_fig4_free_exponents_find_the_other_optimum():
  """Documents why exponents default to >= 0: unconstrained, the same 20
  points have a lower-SSE optimum with a saturating (c<0, e<0) D-term."""
  grid = analysis.paper_table("fig4")
  paper_shape = analysis.fit_dim_vocab_law(grid)
  free = analysis.fit_dim_vocab_law(grid, exponents="free")
  assert np.sum(free.residuals**2) < np.sum(paper_shape.residuals**2)
  assert free.c < 0 and free.e < 0
  assert free.b == pytest.approx(0.764, abs=0.01)
  with pytest.raises(ValueError, match="exponents"):
    analysis.fit_dim_vocab_law(grid, exponents="negative")


def test_fit_dim_vocab_law_negative_coefficients_and_bootstrap():
  # A PSNR-like metric: improves with V (a < 0) and worsens with D (c < 0).
  D, V = np.meshgrid([4.0, 8, 16, 32, 64], [2.0**k for k in (10, 12, 14, 16)])
  truth = dict(a=-60.0, b=1.0, c=-0.8, e=0.5)
  rng = np.random.default_rng(0)
  y = analysis.dim_vocab_law(D, V, **truth) + rng.normal(0, 0.01, D.shape)
  df = pd.DataFrame({"D": D.ravel(), "V": V.ravel(), "psnr": y.ravel()})
  df.loc[len(df)] = {"D": 8, "V": 1024, "psnr": np.nan}  # missing metric: skipped
  fit = analysis.fit_dim_vocab_law(df, metric="psnr", bootstrap=20, seed=1)
  assert fit.n == 20
  for name, value in truth.items():
    assert getattr(fit, name) == pytest.approx(value, rel=0.05), name
  assert fit.boot_params.shape[1] == 4 and len(fit.boot_params) >= 15
  assert {"boot_low", "boot_high"} <= set(fit.table().columns)


def test_power_law_recovers_synthetic_parameters_with_covering_intervals():
  rng = np.random.default_rng(0)
  x = np.geomspace(1, 1000, 25)
  truth = {"a": 2.5, "b": -0.7, "c": 0.3}
  y = analysis.power_law(x, **truth) * (1 + rng.normal(0, 0.01, x.size))
  fits = analysis.fit_power_law(pd.DataFrame({"D": x, "rfid": y}), "D", "rfid", offset=True)
  assert list(fits) == [None]
  fit = fits[None]
  for name, value in truth.items():
    lo, hi = fit.interval(name)
    assert lo <= value <= hi, (name, lo, hi)
    assert getattr(fit, name) == pytest.approx(value, rel=0.05)
  assert fit.predict(D=2000.0) == pytest.approx(analysis.power_law(2000.0, **truth), rel=0.02)


def test_power_law_intervals_are_calibrated():
  """Over repeated noisy draws, the 95% t-intervals cover the truth ~95% of the time."""
  rng = np.random.default_rng(42)
  x = np.geomspace(2, 256, 10)
  clean = analysis.power_law(x, 1.5, -0.5)
  hits, estimates, stderrs = np.zeros(2), [], []
  trials = 200
  for _ in range(trials):
    y = clean + rng.normal(0, 0.02, x.size)
    fit = analysis.fit_power_law(pd.DataFrame({"G": x, "m": y}), "G", "m")[None]
    hits += [lo <= v <= hi for v, (lo, hi) in zip((1.5, -0.5), map(fit.interval, "ab"))]
    estimates.append(fit.params)
    stderrs.append(fit.stderr)
  assert np.all(hits / trials >= 0.9), hits / trials
  # Not trivially wide: reported stderr matches the spread of the estimates.
  ratio = np.mean(stderrs, axis=0) / np.std(estimates, axis=0)
  assert np.all((ratio > 0.8) & (ratio < 1.25)), ratio


def test_power_law_per_group_and_huge_x():
  rng = np.random.default_rng(0)
  truth = {8: (0.05, -0.6), 16: (3.0, 0.4)}
  rows = []
  for f, (a, b) in truth.items():
    xs = np.geomspace(1e15, 1e19, 12)  # compute-like magnitudes
    clean = a * xs**b
    noisy = clean + rng.normal(0, 0.01 * np.median(clean), xs.size)  # homoscedastic noise
    rows += [{"f": f, "compute": x, "rfid": y} for x, y in zip(xs, noisy)]
  df = pd.DataFrame(rows)
  fits = analysis.fit_power_law(df, x="compute", y="rfid", by="f")
  assert sorted(fits) == [8, 16]
  for f, (a, b) in truth.items():
    assert fits[f].b == pytest.approx(b, abs=0.01)
    assert fits[f].a == pytest.approx(a, rel=0.2)
    lo, hi = fits[f].interval("b")
    assert lo <= b <= hi
  table = fits.table()
  assert list(table["f"]) == [8, 16]
  assert {"a", "a_low", "a_high", "b", "b_low", "b_high", "r2", "n"} <= set(table.columns)
  assert np.all(table["n"] == 12)
  # Two grouping columns give tuple keys.
  df["V"] = 4096
  assert sorted(analysis.fit_power_law(df, "compute", "rfid", by=["f", "V"])) == [
      (8, 4096), (16, 4096)]


def test_fit_errors_name_the_problem():
  df = pd.DataFrame({"D": [8, 16], "V": [1024, 4096], "rfid": [1.0, 2.0]})
  with pytest.raises(ValueError, match="at least 5 rows"):
    analysis.fit_dim_vocab_law(df)
  with pytest.raises(ValueError, match=r"\['psnr'\]"):
    analysis.fit_dim_vocab_law(df, metric="psnr")
  with pytest.raises(ValueError, match="`D` must be > 0"):
    analysis.fit_power_law(df.assign(D=[0, 16]), "D", "rfid")
  with pytest.raises(ValueError, match="at least 3 rows"):
    analysis.fit_power_law(df, "D", "rfid", offset=True)
  with pytest.raises(ValueError, match="`by` column"):
    analysis.fit_power_law(df, "D", "rfid", by="G")


# ----------------------------------------------------------------------------- tables


def test_load_table_csv_roundtrip_and_coercion(tmp_path):
  df = _user_table()
  path = tmp_path / "scaling.csv"
  raw = df.drop(columns=["d"]).astype({"rfid": object})
  raw.loc[0, "rfid"] = "unavailable"
  raw.to_csv(path, index=False)
  loaded = analysis.load_table(path)
  assert len(loaded) == len(df)
  for col in ("f", "D", "G", "V", "seed", "steps", "psnr", "usage", "rfid", "fd_vgg16"):
    assert pd.api.types.is_numeric_dtype(loaded[col]), col
  assert loaded["rfid"].isna().all()
  assert list(loaded["d"]) == list(df["D"])  # derived d = D / G
  np.testing.assert_allclose(loaded["psnr"], df["psnr"])
  assert loaded["quantizer"].eq("gsq").all()
  # A folder holding one table works too.
  assert analysis.load_table(tmp_path).shape == loaded.shape


def test_load_table_parquet_roundtrip(tmp_path):
  pytest.importorskip("pyarrow")
  df = _user_table()
  df.to_parquet(tmp_path / "scaling.parquet")
  df.to_csv(tmp_path / "scaling.csv", index=False)  # same table, both formats
  loaded = analysis.load_table(tmp_path)
  pd.testing.assert_frame_equal(loaded, df, check_dtype=False)


def test_load_table_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.csv"):
    analysis.load_table(tmp_path / "nope.csv")
  with pytest.raises(FileNotFoundError, match="no .csv or .parquet"):
    analysis.load_table(tmp_path)
  _user_table().drop(columns=["V"]).to_csv(tmp_path / "a.csv", index=False)
  with pytest.raises(ValueError, match=r"lacks required column\(s\) \['V'\]"):
    analysis.load_table(tmp_path / "a.csv")
  assert len(analysis.load_table(tmp_path / "a.csv", required=("D",))) == 12
  _user_table().to_csv(tmp_path / "b.csv", index=False)
  with pytest.raises(ValueError, match="several tables"):
    analysis.load_table(tmp_path)
  (tmp_path / "c.md").write_text("| a |")
  with pytest.raises(ValueError, match="must be a .csv or .parquet"):
    analysis.load_table(tmp_path / "c.md")


def test_uniform_usage_expectation():
  # EVALUATION_AND_DATA.md §3.1 and QUANTIZERS.md §1.6 numbers.
  assert analysis.uniform_usage_expectation(903 * 256, 2**18) == pytest.approx(0.586, abs=5e-4)
  assert analysis.uniform_usage_expectation(903 * 1024, 2**18, percent=True) == pytest.approx(
      97.1, abs=0.05)
  assert analysis.uniform_usage_expectation(256_000, 2**18) == pytest.approx(0.62, abs=0.01)
  assert analysis.uniform_usage_expectation(12.8e6, 2**18) > 0.9999
  assert analysis.uniform_usage_expectation(1, 1e12) == pytest.approx(1e-12, rel=1e-6)
  np.testing.assert_allclose(
      analysis.uniform_usage_expectation(np.array([0, 2**18]), 2**18), [0, 1 - np.exp(-1)])
  with pytest.raises(ValueError, match="`draws`"):
    analysis.uniform_usage_expectation(-1, 10)
  with pytest.raises(ValueError, match="`V`"):
    analysis.uniform_usage_expectation(10, 0)
  df = _user_table().assign(V=2**18, tokens=[903 * 64] * 11 + [np.nan])
  out = analysis.add_uniform_usage_expectation(df)
  assert out["usage_uniform_expectation"].iloc[0] == pytest.approx(19.8, abs=0.05)  # percent
  assert np.isnan(out["usage_uniform_expectation"].iloc[-1])
  assert "usage_uniform_expectation" not in df.columns
  frac = analysis.add_uniform_usage_expectation(df, percent=False, column="cov")
  assert frac["cov"].iloc[0] == pytest.approx(0.198, abs=5e-4)
  with pytest.raises(ValueError, match="`kind`"):
    analysis.add_uniform_usage_expectation(df, kind="pooled")
  with pytest.raises(ValueError, match="no `tokens` column"):
    analysis.add_uniform_usage_expectation(df.drop(columns=["tokens"]), kind="group")


def test_uniform_expectation_uses_lookups_for_shared_and_tokens_for_group_usage():
  """Shared usage pools N·G indices (lookups); one group's usage sees N (tokens)."""
  V, n = 2**18, 65_536
  df = pd.DataFrame({"quantizer": "gsq", "f": 16, "D": 16, "G": [1, 4, 16], "V": V,
                     "tokens": n, "usage": [20.0, 50.0, 90.0], "perplexity": 1000.0,
                     "group_usage_mean": [20.0, 15.0, 10.0]})
  shared = analysis.add_uniform_usage_expectation(df)["usage_uniform_expectation"]
  np.testing.assert_allclose(shared, 100 * (1 - np.exp(-n * df["G"] / V)))
  group = analysis.add_uniform_usage_expectation(df, kind="group")
  np.testing.assert_allclose(group["group_usage_uniform_expectation"], 100 * (1 - np.exp(-n / V)))
  # An explicit lookups column wins over tokens·G (eval.json writes both).
  with_lookups = df.assign(lookups=[n, 2 * n, 3 * n])
  np.testing.assert_allclose(analysis.usage_draws(with_lookups), [n, 2 * n, 3 * n])
  # The paper's Table 13: lookups = 50k·(256/f)²·G, tokens = 50k·(256/f)².
  groups = analysis.paper_table("groups")
  assert (groups["lookups"] == groups["tokens"] * groups["G"]).all()
  assert (groups["tokens"] == 50_000 * (256 // groups["f"]) ** 2).all()


def test_usage_summary_reports_counts_expectation_and_entropy():
  V = 2**18
  df = pd.DataFrame({"quantizer": ["gsq", "ibq"], "f": 4, "D": 32, "G": [2, 1], "V": V,
                     "tokens": [V // 4, V // 4], "lookups": [V // 2, V // 4],
                     "usage": [30.0, 11.0], "perplexity": [2.0**14, 2.0**10],
                     "group_usage_mean": [20.0, 11.0]})
  out = analysis.usage_summary(df)
  np.testing.assert_allclose(out["draws_per_code"], [0.5, 0.25])
  np.testing.assert_allclose(out["usage_uniform_expectation"],
                             [100 * (1 - np.exp(-0.5)), 100 * (1 - np.exp(-0.25))])
  np.testing.assert_allclose(out["usage_vs_uniform"], out["usage"] / out["usage_uniform_expectation"])
  np.testing.assert_allclose(out["entropy_bits"], [14.0, 10.0])
  np.testing.assert_allclose(out["max_entropy_bits"], [18.0, 18.0])
  np.testing.assert_allclose(out["group_usage_uniform_expectation"], 100 * (1 - np.exp(-0.25)))
  assert list(out["quantizer"]) == ["gsq", "ibq"]
  # Published tables work too: IBQ's 84% at 2^18 was measured on 12.8M tokens.
  ibq = analysis.usage_summary(analysis.paper_table("ibq_usage"))
  row = ibq[ibq["V"] == V].iloc[0]
  assert row["usage"] == 84 and row["tokens"] == 12_800_000
  assert row["usage_uniform_expectation"] > 99.99 and row["usage_vs_uniform"] == pytest.approx(0.84)
  with pytest.raises(ValueError, match="number of draws"):
    analysis.usage_summary(df.drop(columns=["tokens", "lookups"]))
  with pytest.raises(ValueError, match="'usage'"):
    analysis.usage_summary(df.drop(columns=["usage"]))


def test_load_table_from_sweep_root_and_run_workdirs(tmp_path):
  root = tmp_path / "sweep"
  (root / "tables").mkdir(parents=True)
  df = _user_table().head(3).assign(run=["a", "b", "c"])
  df["workdir"] = ["/nonexistent/a", str(tmp_path / "elsewhere" / "b"), ""]
  df.to_csv(root / "tables" / "demo_tiny.csv", index=False)
  loaded = analysis.load_table(root)  # the sweep root, as gsq-collect's default --out
  assert len(loaded) == 3
  for name in ("a", "c"):  # moved sweep: found next to the table
    (root / name).mkdir()
    (root / name / "metrics.jsonl").write_text('{"step": 0}\n')
  (tmp_path / "elsewhere" / "b").mkdir(parents=True)
  (tmp_path / "elsewhere" / "b" / "metrics.jsonl").write_text('{"step": 0}\n')
  found = analysis.run_workdirs(loaded, root / "tables" / "demo_tiny.csv")
  assert found == {"a": root / "a", "b": tmp_path / "elsewhere" / "b", "c": root / "c"}
  assert analysis.run_workdirs(loaded) == {"b": tmp_path / "elsewhere" / "b"}


# ----------------------------------------------------------------------------- paper data


def _cell(df, column, **keys):
  mask = np.logical_and.reduce([df[k] == v for k, v in keys.items()])
  (value,) = df.loc[mask, column]
  return value


def test_paper_tables_spot_checks():
  fig4 = analysis.paper_table("dim_vocab")
  assert len(fig4) == 20 and (fig4["source"] == "paper").all()
  assert (fig4["f"] == 8).all() and (fig4["G"] == 1).all() and (fig4["d"] == fig4["D"]).all()
  assert _cell(fig4, "rfid", D=16, V=262144) == 0.389
  assert _cell(fig4, "rfid", D=64, V=8192) == 0.637
  spatial = analysis.paper_table("fig1b")
  assert len(spatial) == 12 and (spatial["d"] == 16).all() and (spatial["V"] == 262144).all()
  assert _cell(spatial, "rfid", f=32, D=16) == 7.09
  assert _cell(spatial, "G", f=16, D=128) == 8
  groups = analysis.paper_table("table13")
  main = groups[groups["variant"].isna()]
  assert len(main) == 15
  assert _cell(main, "rfid", f=16, D=16, G=8) == 0.50
  assert _cell(main, "usage", f=16, D=16, G=8) == 46.83  # percent
  assert _cell(main, "perplexity", f=16, D=16, G=8) == 22181
  assert _cell(main, "ssim", f=8, D=64, G=4) == 0.83  # README fix
  assert _cell(main, "usage", f=32, D=32, G=32) == 0.54  # README fix
  assert _cell(main, "rfid", f=16, D=16, G=1) == 1.63  # v2 / README
  assert _cell(main, "d", f=32, D=32, G=8) == 4
  assert _cell(main, "lookups", f=16, D=16, G=4) == 50_000 * 256 * 4
  assert _cell(main, "tokens", f=16, D=16, G=4) == 50_000 * 256
  assert _cell(groups, "usage", variant="clip") == 0.526
  ibq = analysis.paper_table("ibq_usage")
  assert _cell(ibq, "usage", V=262144) == 84 and _cell(ibq, "rfid", V=16384) == 1.37
  assert (ibq["quantizer"] == "ibq").all() and (ibq["tokens"] == 12_800_000).all()
  fig1a = analysis.paper_table("fig1a")
  assert _cell(fig1a, "rfid", method="GSQ G=16") == 0.52
  assert _cell(fig1a, "rfid", method="MAGVIT2") == 1.15
  capacity = analysis.paper_table("fig3")
  assert _cell(capacity, "params", model="f16-12244-deeper") == 166_260_000
  assert _cell(capacity, "rfid", model="f8-1224-attn") == 0.369
  sota = analysis.paper_table("table14")
  assert _cell(sota, "rfid", method="Open-MAGVIT2", f=8) == 0.34
  assert _cell(sota, "V", method="BSQ") == 2**36
  fit = analysis.paper_table("dim_vocab_fit").set_index("param")["value"].to_dict()
  assert fit == PAPER_LAW
  assert "percent" in analysis.paper_table_info("groups")["description"].lower()
  # A fresh copy each time: editing one does not leak into the next call.
  fig4.loc[0, "rfid"] = 99.0
  assert analysis.paper_table("dim_vocab")["rfid"].iloc[0] == 0.488
  with pytest.raises(ValueError, match="dim_vocab"):
    analysis.paper_table("fig9")


# ----------------------------------------------------------------------------- plots


def _labels(fig, axis=0):
  return fig.axes[axis].get_legend_handles_labels()[1]


def _assert_png(path):
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_dim_vocab_user_paper_and_fits(tmp_path):
  user = analysis.paper_table("fig4").assign(source="run", rfid=lambda d: d["rfid"] * 1.2)
  user = user[user["V"].isin([8192, 262144])]
  fit = analysis.fit_dim_vocab_law(user)
  out = tmp_path / "figs" / "fig4.png"
  fig = analysis.plot_dim_vocab(user, fit=[fit, analysis.paper_dim_vocab_law()], save=out)
  labels = _labels(fig)
  assert {"V=8k", "V=256k"} <= set(labels)  # the user's series
  assert {"paper V=8k", "paper V=16k", "paper V=512k"} <= set(labels)
  assert {"fit V=8k", "paper fit V=512k"} <= set(labels)
  _assert_png(out)
  # A metric the paper never measured: user points only, no error.
  fig = analysis.plot_dim_vocab(_user_table(), metric="fd_vgg16")
  assert not any(l.startswith("paper") for l in _labels(fig))
  assert "V=1k" in _labels(fig)


def test_plot_groups_and_spatial(tmp_path):
  user = analysis.paper_table("groups")
  user = user[user["variant"].isna() & (user["f"] == 16)].assign(source="run")
  fit = analysis.fit_power_law(user, "G", "usage", by=["f", "D", "V"])
  fig = analysis.plot_groups(user, metric="usage", fit=fit, save=tmp_path / "groups.png")
  labels = _labels(fig)
  assert "f=16, D=16, V=256k" in labels and "paper f=32, D=32, V=256k" in labels
  assert "fit f=16, D=16, V=256k" in labels
  _assert_png(tmp_path / "groups.png")
  spatial = analysis.paper_table("spatial").assign(rfid=lambda d: d["rfid"] * 0.9)
  fits = analysis.fit_power_law(spatial, "D", "rfid", by="f")
  fig = analysis.plot_spatial(spatial, fit=fits, save=tmp_path / "spatial.png")
  assert {"f=8", "paper f=8", "fit f=32"} <= set(_labels(fig))
  _assert_png(tmp_path / "spatial.png")
  with pytest.raises(ValueError, match=r"\['G'\]"):
    analysis.plot_groups(spatial.drop(columns=["G"]))


def test_plot_training_curves(tmp_path):
  """The trainer's usage report keys (gsq_jax.training.steps.usage_report) as metrics.jsonl holds them."""
  runs = {}
  for name, scale in (("gsq", 1.0), ("ibq", 0.5)):
    workdir = tmp_path / name
    workdir.mkdir()
    lines = [json.dumps({"step": s, "usage": scale * min(100, s), "perplexity": 2.0 ** (s / 20),
                         "tokens": 512.0, "uniform_usage": 1.9, "g_loss": 1.0 / (s + 1)})
             for s in range(20, 220, 20)]
    lines.insert(3, json.dumps({"step": 50, "eval_psnr": 20.0}))  # other records interleave
    lines.insert(0, json.dumps({"step": 0, "D": 32, "V": 2**18}))  # the first line: symbols
    lines.append('{"step": 200, "us')  # torn last line of a running job
    (workdir / "metrics.jsonl").write_text("\n".join(lines))
    runs[name] = workdir
  metrics = analysis.read_metrics(runs["gsq"])
  assert list(metrics["step"]) == sorted(metrics["step"]) and len(metrics) == 12
  logged = metrics.dropna(subset=["perplexity"])
  np.testing.assert_allclose(logged["entropy_bits"], logged["step"] / 20)  # log2(perplexity)
  fig = analysis.plot_training_curves(
      runs, paper={"usage": {"IBQ V=2^18": 84.0}}, save=tmp_path / "curves.png")
  assert len(fig.axes) == 3  # usage, perplexity, entropy_bits
  assert set(_labels(fig, 0)) == {"gsq", "ibq", "gsq uniform_usage", "ibq uniform_usage",
                                  "paper IBQ V=2^18"}
  assert set(_labels(fig, 1)) == {"gsq", "ibq"}
  assert fig.axes[1].get_yscale() == "log" and fig.axes[2].get_yscale() == "linear"
  usage_line = fig.axes[0].get_lines()[0]
  assert usage_line.get_xdata().size == 10
  np.testing.assert_allclose(fig.axes[2].get_lines()[0].get_ydata(), np.arange(1, 11))
  _assert_png(tmp_path / "curves.png")
  fig = analysis.plot_training_curves(runs, metrics=["usage"], reference={})
  assert set(_labels(fig, 0)) == {"gsq", "ibq"}
  with pytest.raises(ValueError, match="entropy"):
    analysis.plot_training_curves(runs, metrics=["entropy"])
  with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
    analysis.read_metrics(tmp_path)


def test_finished_runs_pick_metric_and_labels():
  df = _user_table().head(4).assign(status=["done", "failed", "done", "running"],
                                    run=["a", "b", "c", "d"])
  assert list(analysis.finished_runs(df)["run"]) == ["a", "c"]
  assert len(analysis.finished_runs(df.drop(columns=["status"]))) == 4
  assert analysis.pick_metric(df, "fd_vgg16", ("psnr",)) == "fd_vgg16"
  # rfid is all NaN: the best-covered fallback wins, the earlier one on ties.
  partial = df.assign(lpips_vgg=[0.3, np.nan, np.nan, np.nan])
  assert analysis.pick_metric(partial, "rfid", ("lpips_vgg", "psnr", "ssim")) == "psnr"
  assert analysis.pick_metric(partial, "kid", ("lpips_vgg",)) == "lpips_vgg"
  with pytest.raises(ValueError, match="none of"):
    analysis.pick_metric(df, "rfid", ("kid",))
  row = {"quantizer": "gsq", "f": 16, "D": 16, "G": 4, "V": 2**18, "source": "paper"}
  assert analysis.run_label(row) == "paper gsq f16 D16 G4 V256k"
  assert analysis.run_label({"quantizer": "ibq", "f": 8, "D": 32, "G": 1, "V": 1000}) == (
      "ibq f8 D32 V1000")
  # Rows 0 and 1 differ only in the seed: the run name tells them apart.
  assert analysis.run_labels(df.head(3)) == ["gsq f8 D8 G1 V1k a", "gsq f8 D8 G1 V1k b",
                                             "gsq f8 D8 G1 V4k"]


def test_power_law_skip_small_groups():
  df = pd.DataFrame({"f": [4, 4, 4, 8, 16, 16], "D": [4, 8, 16, 8, 8, 8],
                     "m": [4.0, 2.0, 1.0, 3.0, 1.0, 2.0]})
  fits = analysis.fit_power_law(df, "D", "m", by="f", skip_small=True)
  assert list(fits) == [4] and fits[4].b == pytest.approx(-1.0)
  assert set(fits.skipped) == {8, 16}
  assert "2 rows" in fits.skipped[8] and "distinct `D`" in fits.skipped[16]
  with pytest.raises(ValueError, match="at least 2 rows"):
    analysis.fit_power_law(df, "D", "m", by="f")
  # Exactly as many rows as parameters: the curve interpolates, intervals are undefined.
  two = analysis.fit_power_law(df[df["f"] == 4].head(2), "D", "m")[None]
  assert two.b == pytest.approx(-1.0) and np.isnan(two.interval("b")).all()


def test_plot_usage(tmp_path):
  runs = pd.DataFrame({"quantizer": ["gsq", "ibq"], "f": 8, "D": 32, "G": 1, "V": 2**18,
                       "tokens": 2**16, "lookups": 2**16, "usage": [20.0, 9.0],
                       "perplexity": [2.0**15, 2.0**12], "run": ["g", "i"]})
  table = pd.concat([analysis.usage_summary(runs.assign(source="run")),
                     analysis.usage_summary(analysis.paper_table("ibq_usage").tail(1))],
                    ignore_index=True)
  fig = analysis.plot_usage(table, save=tmp_path / "usage.png")
  _assert_png(tmp_path / "usage.png")
  usage_ax, entropy_ax = fig.axes
  assert [p.get_height() for p in usage_ax.patches] == [20.0, 9.0, 84.0]
  assert usage_ax.patches[2].get_hatch() == "//" and usage_ax.patches[0].get_hatch() is None
  ticks = [t.get_text() for t in usage_ax.get_xticklabels()]
  assert ticks[0] == "gsq f8 D32 G1 V256k\nT=65.5k" and ticks[2].startswith("paper ibq")
  expected = usage_ax.collections[0].get_offsets()[:, 1]
  np.testing.assert_allclose(expected[:2], 100 * (1 - np.exp(-0.25)))
  # IBQ published no perplexity: its entropy bar is NaN (not drawn), the maximum still is.
  assert [p.get_height() for p in entropy_ax.patches][:2] == [15.0, 12.0]
  with pytest.raises(ValueError, match="non-empty"):
    analysis.plot_usage(table.iloc[:0])


def test_matched_bits_against_ibq_and_paper_table1():
  df = pd.DataFrame({"quantizer": ["ibq", "gsq", "gsq", "gsq"], "res": 256, "f": [16, 16, 16, 8],
                     "D": [256, 16, 16, 16], "G": [1, 1, 4, 1], "V": 2**18,
                     "usage": [84.0, 100.0, 62.46, 100.0], "lookups": 2**18,
                     "perplexity": [2.0**16, 2.0**17, 2.0**15, 2.0**17]})
  bits = analysis.matched_bits(analysis.usage_summary(df))
  np.testing.assert_allclose(bits["bits_per_image"], [4608, 4608, 4 * 4608, 4 * 4608])
  np.testing.assert_allclose(bits["bits_multiple"], [1, 1, 4, 4])
  np.testing.assert_allclose(bits["effective_bits_per_image"], [256 * 16, 256 * 17,
                                                                4 * 256 * 15, 1024 * 17])
  np.testing.assert_allclose(bits["usage_uniform_expectation"], 100 * (1 - np.exp(-1)))
  assert analysis.matched_bits(bits[bits["quantizer"] == "gsq"])["bits_multiple"].isna().all()
  with pytest.raises(ValueError, match="lacks the 'res' column"):
    analysis.matched_bits(df.drop(columns="res"))
  table1 = analysis.paper_table("table1").set_index(["init", "norm"])
  assert table1.loc[("uniform", "none"), "usage"] == 3.38
  assert (table1["lookups"] == 50_000 * 16 * 16).all() and (table1["G"] == 1).all()
