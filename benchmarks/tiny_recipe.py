r"""The CPU-scale recipe of issue 17: codebook usage against init x norm, G, lr, warm-up, LPIPS.

Trains tiny GSQ tokenizers (configs/gsq.py:tiny, D = 16, V = 1024, f = 4 at
16², i.e. 16 tokens per image) on one third of the shipped ImageNet samples
(`folder:DIR[i%3==0]`, 301 images) and evaluates their EMA weights on the 602
images never trained on (`folder:DIR[i%3!=0]`: 9,632 lookups per group into
V = 1,024, where uniform use would cover 1 - exp(-9632/1024) = 99.99 %). Each
study is a list of named runs that differ from the recipe by a few fields;
the script launches `python -m gsq_jax.training.train` per run (finished runs
are kept), then prints one markdown row per run from its eval.json and the
last logged training window.

  python benchmarks/tiny_recipe.py --study table1 --study groups --root runs/tiny_recipe --jobs 2
  python benchmarks/tiny_recipe.py --study long --study long_d8 --root runs/tiny_recipe --jobs 2
  python benchmarks/tiny_recipe.py --study all --root runs/tiny_recipe --table-only

Studies (numbers in benchmarks/RESULTS.md, "Tiny recipe"; `--study all` runs
them in this order); the recipe run itself (spherical init, l2 lookup, G = 1,
300 steps) is in several:
  table1   paper Table 1: init {uniform, spherical} x lookup norm {none, l2}
  d8       spherical + l2 and uniform + none at the paper's D = 8
  lr       lr 1e-3 (the earlier tiny default) against the recipe's 1e-4
  warmup   100 linear warm-up steps
  groups   paper Table 13 at D = 16: G in {1, 2, 4}
  steps    1200 steps
  long     2400 steps: spherical + l2, uniform + none, G = 2, 4
  long_d8  2400 steps at D = 8: spherical + l2 (82 %), uniform + none
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imagenet-samples-256"

# Fields every run of this script shares (the split and a cheap evaluation);
# the optimisation recipe itself comes from configs/gsq.py:tiny.
BASE = {
    "eval.num_images": 602,
    "eval.batch_size": 43,
    "eval.lpips": False,
    "eval.kid": False,
    "eval.fd_vgg16": False,
    "train.image_every_steps": 0,
    # The recipe (configs/gsq.py:tiny has the same lr and steps; pinned here so
    # the table does not move if those defaults do).
    "optim.lr": 1e-4,
    "train.total_steps": 300,
}
ARG = "D=16,G=1,V=1024,f=4,res=16,tiny"


def _run(name, arg=ARG, **overrides):
  return name, arg, overrides


# The recipe run itself (spherical init, l2 lookup, G = 1) is shared by every
# study: it is Table 1's last row, Table 13's G = 1 and the lr curve's recipe point.
RECIPE = _run("init_spherical_l2")
STUDIES = {
    "table1": [
        _run(f"init_{init}_{'l2' if l2 else 'none'}",
             **{"model.quantizer.init": init, "model.quantizer.l2_normalize": l2})
        for init in ("uniform", "spherical") for l2 in (False, True)],
    "d8": [_run(f"d8_{init}_{'l2' if l2 else 'none'}", ARG.replace("D=16", "D=8"), **{
        "model.quantizer.init": init, "model.quantizer.l2_normalize": l2})
           for init, l2 in (("spherical", True), ("uniform", False))],
    "lr": [_run("lr_0.001", **{"optim.lr": 1e-3}), RECIPE],
    "warmup": [_run("warmup_100", **{"optim.warmup_steps": 100}), RECIPE],
    "groups": [RECIPE, *(_run(f"groups_G{g}", ARG.replace("G=1", f"G={g}")) for g in (2, 4))],
    "steps": [RECIPE, _run("steps_1200", **{"train.total_steps": 1200})],
    # The recipe at 2400 steps: usage keeps rising with steps at lr 1e-4.
    "long": [_run("long_spherical_l2", **{"train.total_steps": 2400}),
             _run("long_uniform_none", **{"train.total_steps": 2400,
                                          "model.quantizer.init": "uniform",
                                          "model.quantizer.l2_normalize": False}),
             *(_run(f"long_G{g}", ARG.replace("G=1", f"G={g}"), **{"train.total_steps": 2400})
               for g in (2, 4))],
    # The same two Table 1 rows at the paper's D = 8.
    "long_d8": [_run(f"long_d8_{init}_{'l2' if l2 else 'none'}", ARG.replace("D=16", "D=8"),
                     **{"train.total_steps": 2400, "model.quantizer.init": init,
                        "model.quantizer.l2_normalize": l2})
                for init, l2 in (("spherical", True), ("uniform", False))],
}
ALL = ("table1", "d8", "lr", "warmup", "groups", "steps", "long", "long_d8")


def _flag(value) -> str:
  return str(value).lower() if isinstance(value, bool) else str(value)


def command(name, arg, overrides, *, root: pathlib.Path, data: pathlib.Path) -> list[str]:
  fields = {"data.source": f"folder:{data}[i%3==0]",
            "data.eval_source": f"folder:{data}[i%3!=0]", **BASE, **overrides}
  return [sys.executable, "-m", "gsq_jax.training.train",
          f"--config={ROOT / 'configs' / 'gsq.py'}:{arg}", f"--workdir={root / name}",
          *(f"--config.{k}={_flag(v)}" for k, v in fields.items())]


def train(run, *, root, data, timeout):
  name = run[0]
  workdir = root / name
  if (workdir / "DONE").exists():
    return name, 0.0
  workdir.mkdir(parents=True, exist_ok=True)
  lock = workdir / "tiny_recipe.lock"  # two invocations may share a root
  try:
    os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
  except FileExistsError:
    print(f"{name}: {lock} exists (another invocation trains it); skipped", flush=True)
    return name, 0.0
  start = time.time()
  try:
    with open(workdir / "train.log", "w") as log:
      subprocess.run(command(*run, root=root, data=data), cwd=ROOT, stdout=log,
                     stderr=subprocess.STDOUT, timeout=timeout, check=True,
                     env={**os.environ, "PYTHONPATH": str(ROOT)})
  finally:
    lock.unlink()
  return name, time.time() - start


def row(name: str, root: pathlib.Path) -> str:
  path = root / name / "eval.json"
  if not path.exists():
    return f"| {name} | (no eval.json) |"
  ev = json.loads(path.read_text())
  cfg = json.loads((root / name / "config.json").read_text())
  m = cfg["model"]
  return (f"| {name} | {m['quantizer']['init']} | {'l2' if m['quantizer']['l2_normalize'] else 'none'} | "
          f"{m['num_groups']} | {m['downsample_factor']} | {cfg['optim']['lr']:g} | "
          f"{cfg['train']['total_steps']} | "
          f"{ev['psnr']:.2f} | {ev['ssim']:.3f} | {ev['usage']:.1f} % | "
          f"{ev['perplexity']:.0f} | {ev['lookups']:.0f} | "
          f"{ev['usage_uniform_expectation']:.2f} % | {_last_logged(root / name, 'dead_codes')} |")


def _last_logged(workdir: pathlib.Path, key: str):
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl") if line.strip()]
  values = [r[key] for r in rows if key in r]
  return f"{values[-1]:.0f}" if values else "-"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--study", action="append", choices=[*sorted(STUDIES), "all"],
                      required=True)
  parser.add_argument("--root", type=pathlib.Path, default=pathlib.Path("runs/tiny_recipe"))
  parser.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA)
  parser.add_argument("--jobs", type=int, default=1)
  parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
  parser.add_argument("--table-only", action="store_true", help="print the table, train nothing")
  args = parser.parse_args()
  studies = [s for study in args.study for s in (ALL if study == "all" else (study,))]
  runs = list({run[0]: run for study in studies for run in STUDIES[study]}.values())
  if not args.table_only:
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
      for name, seconds in pool.map(
          lambda r: train(r, root=args.root, data=args.data, timeout=args.timeout), runs):
        print(f"{name}: {seconds:.0f} s", flush=True)
  print("| run | init | norm | G | f | lr | steps | PSNR | SSIM | usage | perplexity | lookups | "
        "uniform expectation | dead codes (train) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for name, _, _ in runs:
    print(row(name, args.root))


if __name__ == "__main__":
  main()
