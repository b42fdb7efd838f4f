"""The analysis notebooks run top to bottom, in fresh kernels, on a table of real runs.

One module fixture launches a minimal combined sweep through the real launcher
and collector (`python -m gsq_jax.sweeps.launch` / `.collect`): four 2-step
tiny runs at V = 2^18 whose keys cover every notebook's axis —

  gsq f4 D8 G1   dim-vocab point, groups G = 1, the GSQ side of GSQ vs IBQ
  gsq f4 D8 G2   groups G = 2 (a power law in G is fitted), spatial d = 4
  gsq f4 D4 G1   dim-vocab D = 4, spatial d = 4 (a power law in D is fitted)
  ibq f4 D8      the IBQ side of GSQ vs IBQ

— and all four notebooks read its one table (running the four tiny sweeps of
sweeps/ would cost ~20 runs, far over the suite's budget). The dim-vocab law
needs >= 5 grid points, so the paper-scale path of that notebook (fit, residuals,
predictions) runs on the paper's own published Fig. 4 grid, written in the same
columns; it must recover the App. C.2 law.

Settings are injected papermill-style: a cell after the one tagged
"parameters" sets TABLE / OUT_DIR, so the notebooks themselves stay untouched.
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from gsq_jax import analysis  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "analysis"
PNG = b"\x89PNG\r\n\x1a\n"
V = 2**18

_SWEEP = '''"""Minimal combined grid of tests/test_notebooks.py (every notebook's axis, V = 2^18)."""
NAME = "analysis_ci"
TINY_CONFIG = "{config}:tiny"
TINY_OVERRIDES = {{
    "train.total_steps": 2, "train.global_batch_size": 2, "train.num_image_samples": 2,
    "train.log_every_steps": 1, "train.checkpoint_every_steps": 2, "train.image_every_steps": 0,
    "eval.num_images": 8, "eval.batch_size": 8, "eval.lpips": False, "eval.kid": False,
    "eval.fd_vgg16": False,
}}


def sweep(add, tiny=False):
  add(f=4, D=8, G=1, V={V})
  add(f=4, D=8, G=2, V={V})
  add(f=4, D=4, G=1, V={V})
  add(quantizer="ibq", f=4, D=8, G=1, V={V})
'''


@pytest.fixture(scope="module")
def ci_table(tmp_path_factory, trainer_env) -> pathlib.Path:
  """Launches the combined grid (2 runs at a time) and collects its table."""
  work = tmp_path_factory.mktemp("analysis_ci")
  sweep_file = work / "analysis_ci.py"
  sweep_file.write_text(_SWEEP.format(config=REPO / "configs" / "gsq.py", V=V))
  root = work / "root"
  env = trainer_env
  launch = subprocess.run(
      [sys.executable, "-m", "gsq_jax.sweeps.launch", str(sweep_file), "--tiny", "--backend",
       "local", "--jobs", "2", "--root", str(root), "--max-retries", "0"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
  assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
  collect = subprocess.run([sys.executable, "-m", "gsq_jax.sweeps.collect", str(root)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert collect.returncode == 0, collect.stdout[-3000:] + collect.stderr[-3000:]
  table = root / "tables" / "analysis_ci_tiny.csv"
  assert table.is_file(), collect.stdout
  return table


@pytest.fixture(scope="module")
def released_table(tmp_path_factory, trainer_env) -> pathlib.Path:
  """The shipped checkpoints in the released flex_gen / SEED-Voken formats, through the user's path:
  gsq-import, gsq-eval on the same 8 images (reconstruction and usage metrics), gsq-collect."""
  checkpoints = REPO.parent / "shared" / "reference" / "checkpoints"
  if not (checkpoints / "ibq_small.ckpt").is_file():
    pytest.skip(f"reference checkpoints not found in {checkpoints}")
  zoo = tmp_path_factory.mktemp("zoo")

  def run(*args, timeout=240):
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=trainer_env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

  from gsq_jax.importers import cli as import_cli  # pylint: disable=import-outside-toplevel
  for kind, name in (("flex_gen", "flex_gsq_agn_d2s.pt"), ("ibq", "ibq_small.ckpt")):
    workdir = zoo / name.split(".")[0]  # gsq-import, in this process (saves two JAX starts)
    assert import_cli.main([kind, str(checkpoints / name), "--workdir", str(workdir)]) == 0
    config = json.loads((workdir / "config.json").read_text())
    config["eval"].update(lpips=False, kid=False, fd_vgg16=False)  # the suite's time budget
    (workdir / "config.json").write_text(json.dumps(config))
  run("gsq_jax.evaluation.cli", "--workdir", str(zoo / "flex_gsq_agn_d2s"), "--workdir",
      str(zoo / "ibq_small"), "--data", f"folder:{REPO.parent / 'shared' / 'data' / 'imagenet-samples-256'}",
      "--num-images", "8", "--image-size", "64", "--crop", "center")
  run("gsq_jax.sweeps.collect", str(zoo))
  return zoo


def _execute(notebook: str, table: pathlib.Path, out_dir: pathlib.Path, **params):
  """Runs a notebook in a fresh kernel (cwd analysis/) with TABLE/OUT_DIR injected."""
  nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, f"{notebook}: exactly one cell must be tagged 'parameters'"
  first_code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
  assert tagged[0] == first_code, f"{notebook}: the settings must be the first code cell"
  assert "TABLE =" in nb.cells[first_code].source and "OUT_DIR =" in nb.cells[first_code].source
  values = {"TABLE": str(table), "OUT_DIR": str(out_dir), **params}
  nb.cells.insert(first_code + 1, nbformat.v4.new_code_cell(
      "\n".join(f"{k} = {v!r}" for k, v in values.items())))
  client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                   resources={"metadata": {"path": str(NOTEBOOKS)}})
  client.execute()
  return nb


def _text(nb) -> str:
  out = []
  for cell in nb.cells:
    for output in cell.get("outputs", []):
      if output.output_type == "stream":
        out.append(output.text)
      elif "text/plain" in output.get("data", {}):
        out.append(output["data"]["text/plain"])
  return "\n".join(out)


def _images(nb) -> int:
  return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def _assert_png(path: pathlib.Path):
  assert path.is_file(), path
  assert path.read_bytes()[:8] == PNG


def test_notebooks_are_clean_and_parametrised():
  """Committed without outputs or execution counts: nothing hidden from a previous run."""
  for path in sorted(NOTEBOOKS.glob("*.ipynb")):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, path.name
  assert {p.name for p in NOTEBOOKS.glob("*.ipynb")} == {
      "dim_vocab_scaling.ipynb", "group_scaling.ipynb", "spatial_scaling.ipynb",
      "gsq_vs_ibq_usage.ipynb"}


def test_ci_table_holds_the_real_runs(ci_table):
  df = analysis.load_table(ci_table)
  assert len(df) == 4 and (df["status"] == "done").all(), df[["run", "status", "reason"]]
  assert sorted(df["quantizer"]) == ["gsq", "gsq", "gsq", "ibq"] and (df["V"] == V).all()
  # eval.json counts: tokens = 8 images x (32/4)^2, lookups = tokens x G.
  np.testing.assert_array_equal(df["tokens"], 8 * 64)
  np.testing.assert_array_equal(df["lookups"], df["tokens"] * df["G"])
  np.testing.assert_allclose(df["usage_uniform_expectation"],
                             100 * -np.expm1(-df["lookups"] / V), rtol=1e-6)


def test_dim_vocab_notebook(ci_table, tmp_path):
  nb = _execute("dim_vocab_scaling.ipynb", ci_table, tmp_path)
  text = _text(nb)
  assert "using 'mse'" in text  # no rFID without the Inception weights: says so, falls back
  assert "not fitted to these runs" in text  # 2 (D, V) points < 5
  _assert_png(tmp_path / "dim_vocab_mse.png")
  assert _images(nb) == 1


def test_dim_vocab_notebook_on_the_paper_grid(tmp_path):
  """The paper-scale path: the published Fig. 4 grid as the table recovers App. C.2."""
  grid = analysis.paper_table("dim_vocab").assign(status="done", run=lambda d: [
      f"f8_D{D}_G1_V{V}" for D, V in zip(d["D"], d["V"])])
  grid.to_csv(tmp_path / "dim_vocab.csv", index=False)
  nb = _execute("dim_vocab_scaling.ipynb", tmp_path / "dim_vocab.csv", tmp_path / "figs")
  text = _text(nb)
  assert "fit: rfid ~ D, V; n=20" in text and "b = 2.83" in text
  assert "predicted rfid" in text  # predictions for unseen grid points
  _assert_png(tmp_path / "figs" / "dim_vocab_rfid.png")


def test_group_scaling_notebook(ci_table, tmp_path):
  nb = _execute("group_scaling.ipynb", ci_table, tmp_path)
  text = _text(nb)
  assert "using 'psnr'" in text  # PSNR is in Table 13, so the paper shares the axes
  assert "your runs, psnr = a * G^b" in text  # the (f4, D8, V256k) family has G = 1, 2
  assert "not fitted" in text  # the D4 family has a single G
  _assert_png(tmp_path / "groups_psnr.png")


def test_spatial_scaling_notebook(ci_table, tmp_path):
  nb = _execute("spatial_scaling.ipynb", ci_table, tmp_path)
  text = _text(nb)
  assert "using the runs at d = 4; left out: d = [8]" in text
  assert "your runs at d = 4, mse = a * D^b" in text
  _assert_png(tmp_path / "spatial_mse.png")


def test_gsq_vs_ibq_notebook(ci_table, released_table, tmp_path):
  nb = _execute("gsq_vs_ibq_usage.ipynb", ci_table, tmp_path, RELEASED=str(released_table))
  _assert_png(tmp_path / "gsq_vs_ibq_usage.png")
  _assert_png(tmp_path / "gsq_vs_ibq_training.png")
  assert _images(nb) == 2
  usage = pd.read_csv(tmp_path / "gsq_vs_ibq_usage.csv")
  runs = usage[usage["source"] == "run"]
  assert sorted(runs["quantizer"]) == ["gsq", "gsq", "gsq", "ibq"]
  for col in ("usage", "perplexity", "tokens", "lookups", "usage_uniform_expectation",
              "usage_vs_uniform", "entropy_bits"):
    assert runs[col].notna().all(), col
  np.testing.assert_allclose(runs["usage_uniform_expectation"],
                             100 * -np.expm1(-runs["lookups"] / V), rtol=1e-9)
  np.testing.assert_allclose(runs["entropy_bits"], np.log2(runs["perplexity"]))
  paper = usage[usage["source"] == "paper"].set_index("label")
  assert paper.loc["paper ibq f16 D256 V256k", "usage"] == 84
  assert paper.loc["paper gsq f16 D16 G1 V256k", "perplexity"] == 254_044
  assert (paper["tokens"] == 12_800_000).all()
  assert "tokens per window" in _text(nb)  # the training-curve windows state their count
  # The released checkpoints, side by side with the runs at their evaluated resolution.
  side = pd.read_csv(tmp_path / "released_vs_runs_usage.csv")
  released = side[side["source"] == "released"].set_index("imported_from")
  assert sorted(released.index) == ["flex_gsq_agn_d2s.pt", "ibq_small.ckpt"]
  assert (side["source"] == "run").sum() == 4
  # 8 images at 64²: flex f8 D16 G4 V1024 -> 64 tokens x 4 lookups; IBQ f4 V512 -> 256 x 1.
  assert released.loc["flex_gsq_agn_d2s.pt", "lookups"] == 8 * 64 * 4
  assert released.loc["ibq_small.ckpt", "lookups"] == 8 * 256
  assert released.loc["flex_gsq_agn_d2s.pt", "bits_per_image"] == 64 * 4 * 10
  assert released.loc["ibq_small.ckpt", "bits_per_image"] == 256 * 9
  np.testing.assert_allclose(released["usage_uniform_expectation"],
                             100 * -np.expm1(-released["lookups"] / released["V"]), rtol=1e-9)
  assert released["usage"].between(0, 100).all() and released["perplexity"].gt(1).all()
