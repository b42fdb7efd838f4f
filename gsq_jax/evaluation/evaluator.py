"""Evaluation of a tokenizer over a whole evaluation set: every metric, one pass.

`run_evaluation` (the API the trainer and `gsq-eval` call) reads the eval
settings, streams the evaluation images once and writes `eval.json` plus a PNG
grid of originals over reconstructions. Per global batch one jitted step,
sharded over the mesh's batch axes, does all device work:

  x in [-1, 1] -> tokenizer -> x'      (deterministic view: no dropout and
                                         first-index ties even when the run
                                         trains with random ones)
  clamp both to [-1, 1], map to [0, 1]  (GSQ.md §4.1)
  PSNR/SSIM/MSE sums (`image_metrics`), LPIPS AlexNet + VGG16 sums (inputs in
  [-1, 1]), masked so padded rows add nothing
  code histogram += counts of the code indices (stays on device)
  VGG16 relu5_3 pooled features of x and x' (from the LPIPS VGG pass) and,
  with the weights file, FID-Inception pool features of x and x'

Sums and features come back replicated, i.e. already reduced over devices and
hosts inside the step, so every host ends with the same numbers. The host
merges the sums in float64 and streams the features into float64 mean/Gram
statistics (`frechet.FeatureStats`) for rFID and FD-VGG16; KID keeps the
features themselves. The next batch is dispatched before the host consumes the
current one, so device and host work overlap.

rFID needs `pt_inception-2015-12-05-6726825d.pth` (`eval.inception_weights`,
else `$GSQ_JAX_WEIGHTS_DIR` / the torch hub cache). Without a usable file
`rfid` is absent and `rfid_status` holds the reason and the fix; it is never
replaced by another number. `fd_vgg16` (an in-project stand-in, not rFID) and
KID are always available; `kid_features` says which features KID used.
"""

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Mapping

from clu import metrics as clu_metrics
from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
from PIL import Image

from gsq_jax.data import input_pipeline
from gsq_jax.training import writers
from gsq_jax.data import transforms
from gsq_jax.evaluation import code_frequency
from gsq_jax.evaluation import frechet
from gsq_jax.evaluation.eval_config import (  # noqa: F401  (public here too)
    _block, _image_size, default_eval_config, eval_data_config, resolve_eval_config)
from gsq_jax.evaluation import image_metrics
from gsq_jax.evaluation import inception as inception_lib
from gsq_jax.models import evaluation_view
from gsq_jax.models import lpips as lpips_lib
from gsq_jax.quantizers import code_counts, codebook_norm_stats, find_codebook, stats_from_counts
from gsq_jax.utils.files import atomic_write_json

EVAL_FILENAME = "eval.json"
GRID_FILENAME = "eval_grid.png"
# A (G, V) int32 histogram above this many bins would not fit comfortably.
_MAX_HISTOGRAM_BINS = 2**28


# ----------------------------------------------------------------------------
# Metric networks
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class MetricModels:
  """The frozen networks behind the metrics (load once, reuse across evals).

  Attributes:
    lpips_vgg: LPIPS-VGG16 (also the FD-VGG16 feature extractor), or None.
    lpips_alex: LPIPS-AlexNet (GSQ's eval LPIPS), or None.
    inception: the FID Inception, or None when rFID is unavailable.
    inception_status: why rFID is (un)available (`inception.rfid_status`).
    report_lpips: whether the LPIPS values are reported.
    inception_preprocess: the Inception input convention.
  """
  lpips_vgg: lpips_lib.LPIPS | None
  lpips_alex: lpips_lib.LPIPS | None
  inception: inception_lib.InceptionV3 | None
  inception_status: Any
  report_lpips: bool = True
  inception_preprocess: str = "torch_fidelity"


def load_metric_models(eval_cfg: Mapping[str, Any] | None, *,
                       shapes_only: bool = False) -> MetricModels:
  """Loads LPIPS (VGG16, AlexNet) and, if its weights are usable, the FID Inception.

  `shapes_only`: the same networks with shape-only weights and no files read
  (gsq-plan compiles the eval step with them, assuming the run has them all).
  """
  cfg = resolve_eval_config(eval_cfg)
  if shapes_only:
    inception, status = inception_lib.abstract_model(), "shapes only"
    lpips = lambda net: lpips_lib.abstract_lpips(net)
  else:
    lpips = lpips_lib.load_lpips
    try:
      inception = inception_lib.load_inception(cfg.inception_weights)
      status = inception_lib.rfid_status(cfg.inception_weights)
    except inception_lib.InceptionWeightsError as e:
      inception, status = None, e.status
  need_vgg = cfg.lpips or cfg.fd_vgg16 or (cfg.kid and inception is None)
  return MetricModels(
      lpips_vgg=lpips("vgg16") if need_vgg else None,
      lpips_alex=lpips("alexnet") if cfg.lpips else None,
      inception=inception, inception_status=status, report_lpips=cfg.lpips,
      inception_preprocess=cfg.inception_preprocess)


# ----------------------------------------------------------------------------
# The jitted step
# ----------------------------------------------------------------------------
_LPIPS_KEYS = ("lpips_vgg", "lpips_alex")


@functools.cache  # One class per name set, so repeated evaluations reuse the jit cache.
def _sum_collection(names: tuple[str, ...]):
  """clu Collection: reconstruction sums plus masked averages of `names`."""
  return clu_metrics.Collection.create(
      **image_metrics.RECONSTRUCTION_METRICS,
      **{n: clu_metrics.Average.from_output(n) for n in names})


def _step_impl(graphs, states, counts, images, mask, rng, *, mesh: jax.sharding.Mesh,
               codebook_size: int, lpips_names: tuple[str, ...], inception_mode: str):
  """One global batch: metric sums, histogram update, features (see module doc).

  `graphs`/`states` are the split (tokenizer, LPIPS-VGG16, LPIPS-AlexNet,
  Inception); an absent network is None in both.
  """
  tok_graph, vgg_graph, alex_graph, inc_graph = graphs
  tok_state, vgg_state, alex_state, inc_state = states
  tokenizer = nnx.merge(tok_graph, tok_state)
  recon, quantized = tokenizer(images, rng=rng)
  x = jnp.clip(images.astype(jnp.float32), -1.0, 1.0)
  r = jnp.clip(recon.astype(jnp.float32), -1.0, 1.0)
  x01, r01 = jnp.clip(x * 0.5 + 0.5, 0.0, 1.0), jnp.clip(r * 0.5 + 0.5, 0.0, 1.0)
  outputs = image_metrics.reconstruction_outputs(x01, r01, mask)
  features = {}
  if vgg_graph is not None:
    dist, features["vgg16_real"], features["vgg16_fake"] = nnx.merge(
        vgg_graph, vgg_state).distance_and_pooled(x, r)
    outputs["lpips_vgg"] = dist
  if alex_graph is not None:
    outputs["lpips_alex"] = nnx.merge(alex_graph, alex_state)(x, r)
  if inc_graph is not None:
    net = nnx.merge(inc_graph, inc_state)
    features["inception_real"] = net(inception_lib.preprocess(x01, inception_mode))
    features["inception_fake"] = net(inception_lib.preprocess(r01, inception_mode))
  sums = _sum_collection(lpips_names).single_from_model_output(
      **{k: v for k, v in outputs.items() if k not in _LPIPS_KEYS or k in lpips_names})
  indices = quantized.indices
  position_mask = jnp.broadcast_to(mask.reshape((-1,) + (1,) * (indices.ndim - 2)),
                                   indices.shape[:-1])
  counts = counts + code_counts(indices, codebook_size, mask=position_mask)
  # Replicated outputs = the cross-device (and cross-host) reduction/gather.
  replicated = jax.lax.with_sharding_constraint((sums, counts, features, mask),
                                                NamedSharding(mesh, P()))
  return replicated + (r01,)


_eval_step = jax.jit(
    _step_impl,
    static_argnames=("graphs", "mesh", "codebook_size", "lpips_names", "inception_mode"),
    donate_argnames=("counts",))


def _metric_nets(models: MetricModels, *, fd_vgg16: bool, kid: bool):
  """(LPIPS-VGG16, LPIPS-AlexNet, Inception) as the step uses them, and the reported LPIPS."""
  inception_ok = models.inception is not None
  want_vgg_features = models.lpips_vgg is not None and (fd_vgg16 or (kid and not inception_ok))
  nets = (models.lpips_vgg if (models.report_lpips or want_vgg_features) else None,
          models.lpips_alex if models.report_lpips else None,
          models.inception)
  lpips_names = tuple(n for n, net in zip(_LPIPS_KEYS, nets[:2])
                      if net is not None and models.report_lpips)
  return nets, lpips_names


def _split_nets(tokenizer: nnx.Module, nets):
  """(graphs, states) of the tokenizer as evaluated (`evaluation_view`) and the metric networks."""
  split = [nnx.split(m) if m is not None else (None, None)
           for m in (evaluation_view(tokenizer),) + tuple(nets)]
  return tuple(g for g, _ in split), tuple(s for _, s in split)


def trace_eval_step(tokenizer: nnx.Module, models: MetricModels, mesh: jax.sharding.Mesh, *,
                    batch_size: int, image_size: int, fd_vgg16: bool = True,
                    kid: bool = True) -> jax.stages.Traced:
  """One eval batch's step traced for abstract inputs (gsq-plan compiles it deviceless).

  `tokenizer` and `models` may hold ShapeDtypeStructs (`load_metric_models(...,
  shapes_only=True)`); the layout is the one `evaluate` uses.
  """
  mesh = _auto_mesh(mesh)
  nets, lpips_names = _metric_nets(models, fd_vgg16=fd_vgg16, kid=kid)
  graphs, states = _split_nets(tokenizer, nets)
  replicated, batch = NamedSharding(mesh, P()), batch_sharding(mesh)
  spec = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  states = jax.tree.map(lambda x: spec(x.shape, x.dtype, replicated), states)
  quantizer = tokenizer.quantizer
  codebook_size = int(quantizer.codebook_size)
  counts = spec((int(quantizer.num_groups), codebook_size), jnp.int32, replicated)
  images = spec((batch_size, image_size, image_size, 3), jnp.float32, batch)
  mask = spec((batch_size,), jnp.bool_, batch)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  return _eval_step.trace(graphs, states, counts, images, mask, rng, mesh=mesh,
                          codebook_size=codebook_size, lpips_names=lpips_names,
                          inception_mode=models.inception_preprocess)


# ----------------------------------------------------------------------------
# The evaluation loop
# ----------------------------------------------------------------------------
def _local(x: jax.Array) -> np.ndarray:
  """Host copy of a replicated (possibly multi-host) array."""
  return np.asarray(x.addressable_data(0))


def _default_mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def _auto_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
  """The same devices and axes with Auto axis types.

  Evaluation only splits the batch, so it lets the compiler propagate
  shardings instead of requiring explicit-sharding rules of every op inside
  the tokenizer and the metric networks (a trainer's Explicit mesh is fine).
  """
  auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
  if tuple(mesh.axis_types) == auto:
    return mesh
  return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Eval batch layout: batch axis split over every mesh axis, Auto axis types."""
  mesh = _auto_mesh(mesh)
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


class _Accumulator:
  """Host-side merge of one pass: float64 sums, feature statistics, grid rows."""

  def __init__(self, feature_dims: Mapping[str, int], keep_for_kid: str | None,
               grid_images: int):
    self.sums = None
    self.stats = {name: frechet.FeatureStats(dim) for name, dim in feature_dims.items()}
    self.keep_for_kid = keep_for_kid
    self.kid_rows: dict[str, list[np.ndarray]] = {"real": [], "fake": []}
    self.grid_images = grid_images
    self.grid: tuple[np.ndarray, np.ndarray] | None = None

  def add(self, sums, features, mask) -> None:
    host = jax.tree.map(lambda v: np.asarray(_local(v), np.float64), sums)
    self.sums = host if self.sums is None else self.sums.merge(host)
    mask = _local(mask).astype(bool)
    for name, value in features.items():
      net, side = name.rsplit("_", 1)
      rows = _local(value)
      self.stats[name].update(rows, mask)
      if net == self.keep_for_kid:
        self.kid_rows[side].append(np.asarray(rows[mask], np.float32))

  def add_grid(self, images: jax.Array, recon01: jax.Array, mask: jax.Array) -> None:
    """Keeps the first batch's valid images (gathered from all hosts)."""
    if self.grid_images == 0 or self.grid is not None:
      return
    images, recon01, mask = multihost_utils.process_allgather((images, recon01, mask),
                                                              tiled=True)
    keep = np.flatnonzero(np.asarray(mask))[:self.grid_images]
    self.grid = (np.clip(np.asarray(images)[keep] * 0.5 + 0.5, 0, 1), np.asarray(recon01)[keep])


def lookup_settings(tokenizer: nnx.Module) -> dict[str, str | None]:
  """How the tokenizer's quantizer picks codes (None: no nearest-code search)."""
  quantizer = tokenizer.quantizer
  return {"tie_break": getattr(quantizer, "tie_break", None),
          "distance_dtype": getattr(quantizer, "distance_dtype", None)}


def bits_per_image(tokens_per_image: float, groups: int, codebook_size: int) -> float:
  """Code length of one image: h * w positions x G codes x log2(V) bits."""
  return float(tokens_per_image * groups * math.log2(codebook_size))


class EvaluationInterrupted(Exception):
  """`should_stop` asked the evaluation to end early (a preemption signal)."""


def evaluate(tokenizer: nnx.Module, eval_data: input_pipeline.EvalData,
             models: MetricModels, *, mesh: jax.sharding.Mesh, seed: int = 0,
             kid: bool = True, kid_subset_size: int = 1000, kid_num_subsets: int = 100,
             fd_vgg16: bool = True, grid_images: int = 8, grid_step: int | None = None,
             should_stop: Callable[[int], bool] | None = None
             ) -> tuple[dict[str, Any], np.ndarray | None, dict[str, Any]]:
  """One pass over `eval_data`, whose batches are laid out by `batch_sharding(mesh)`.

  `should_stop(batch_index)` is asked before every batch (every process asks at
  the same indices, so it may synchronise hosts); True raises
  `EvaluationInterrupted` -- a 50k-image evaluation must not outlive SLURM's
  grace period after SIGTERM.

  Returns:
    (metrics, grid, info): the flat eval.json entries plus `per_group` (no
    protocol block); a uint8 grid image (originals over reconstructions) or
    None; and `num_images`, `eval_seconds`, `images_per_second`, `tie_break`,
    `distance_dtype` (`lookup_settings` of the evaluated view).
  """
  mesh = _auto_mesh(mesh)
  quantizer = tokenizer.quantizer
  groups, codebook_size = int(quantizer.num_groups), int(quantizer.codebook_size)
  if groups * codebook_size > _MAX_HISTOGRAM_BINS:
    raise ValueError(f"model.codebook_size (V) = {codebook_size} with G = {groups} groups "
                     f"needs a {groups} x {codebook_size} usage histogram, more than "
                     f"{_MAX_HISTOGRAM_BINS} bins")
  inception_ok = models.inception is not None
  nets, lpips_names = _metric_nets(models, fd_vgg16=fd_vgg16, kid=kid)
  feature_dims = {}
  if nets[0] is not None:
    feature_dims.update(vgg16_real=frechet.VGG16_FEATURE_DIM,
                        vgg16_fake=frechet.VGG16_FEATURE_DIM)
  if inception_ok:
    feature_dims.update(inception_real=inception_lib.FEATURE_DIM,
                        inception_fake=inception_lib.FEATURE_DIM)
  kid_net = ("inception" if inception_ok else "vgg16" if nets[0] is not None else None)
  kid_net = kid_net if kid else None

  replicated = NamedSharding(mesh, P())
  graphs, states = _split_nets(tokenizer, nets)
  states = jax.device_put(states, replicated)
  counts = jax.device_put(jnp.zeros((groups, codebook_size), jnp.int32), replicated)
  base_key = jax.random.key(seed)
  acc = _Accumulator(feature_dims, kid_net, grid_images)

  start = time.perf_counter()
  pending = None
  for i, batch in enumerate(eval_data):
    if should_stop is not None and should_stop(i):
      raise EvaluationInterrupted(f"stopped before eval batch {i}")
    sums, counts, features, mask, recon01 = _eval_step(
        graphs, states, counts, batch["image"], batch["mask"],
        jax.random.fold_in(base_key, i), mesh=mesh, codebook_size=codebook_size,
        lpips_names=lpips_names, inception_mode=models.inception_preprocess)
    if i == 0:
      acc.add_grid(batch["image"], recon01, batch["mask"])
    if pending is not None:
      acc.add(*pending)  # The host works on batch i-1 while batch i runs.
    pending = (sums, features, mask)
  if pending is not None:
    acc.add(*pending)
  counts = np.asarray(_local(counts), np.int64)
  seconds = time.perf_counter() - start

  if acc.sums is None:
    raise ValueError("evaluate: `eval_data` yielded no batches")
  recon = image_metrics.finalize(acc.sums)
  num_images = int(recon["num_images"])
  result: dict[str, Any] = {
      "psnr": recon["psnr_global_mse"],
      "psnr_per_image": recon["psnr_mean_per_image"],
      "ssim": recon["ssim"],
      "mse": recon["mse"],
  }
  for name in lpips_names:
    result[name] = recon[name]
  if num_images < 2 and (fd_vgg16 or kid or inception_ok):
    raise ValueError(f"evaluate: FD/KID/rFID need >= 2 images, got num_images={num_images}; "
                     "evaluate more images or turn eval.fd_vgg16 and eval.kid off")
  if inception_ok:
    result["rfid"] = frechet.frechet_distance_from_stats(acc.stats["inception_real"],
                                                         acc.stats["inception_fake"])
    result["rfid_status"] = "ok"
  else:
    result["rfid_status"] = str(models.inception_status)
  if kid_net is not None:
    real, fake = np.concatenate(acc.kid_rows["real"]), np.concatenate(acc.kid_rows["fake"])
    # A subset as large as the set is the set itself (the unbiased MMD ignores
    # order), so every subset would give the same value: compute it once.
    subsets = 1 if kid_subset_size >= min(len(real), len(fake)) else kid_num_subsets
    kid_result = frechet.kernel_inception_distance(real, fake, num_subsets=subsets,
                                                   subset_size=kid_subset_size)
    result.update(kid_mean=kid_result["kid_mean"], kid_std=kid_result["kid_std"],
                  kid_features=kid_net, kid_subset_size=int(kid_result["subset_size"]),
                  kid_num_subsets=subsets)
  if fd_vgg16 and "vgg16_real" in acc.stats:
    result["fd_vgg16"] = frechet.frechet_distance_from_stats(acc.stats["vgg16_real"],
                                                             acc.stats["vgg16_fake"])
  result.update(_usage(counts))
  result["bits_per_image"] = bits_per_image(result["tokens"] / num_images, groups,
                                            codebook_size)
  info = {"num_images": num_images, "eval_seconds": seconds,
          "images_per_second": num_images / seconds if seconds > 0 else math.nan,
          "code_counts": counts, **lookup_settings(evaluation_view(tokenizer))}
  grid = None
  if acc.grid is not None and len(acc.grid[0]):
    originals, reconstructions = acc.grid
    grid = writers.reconstruction_grid(originals, reconstructions, step=grid_step,
                                       value_range=(0.0, 1.0))
  return result, grid, info


def _usage(counts: np.ndarray) -> dict[str, Any]:
  """Usage entries of eval.json from the (G, V) code histogram."""
  stats = {k: np.asarray(v, np.float64) for k, v in stats_from_counts(counts).items()}
  codebook_size = counts.shape[1]
  lookups = int(counts.sum())
  return {
      "usage": float(stats["usage"]),
      "perplexity": float(stats["perplexity"]),
      "group_usage_mean": float(stats["group_usage"].mean()),
      "group_perplexity_mean": float(stats["mean_group_perplexity"]),
      "product_usage": float(stats["product_usage"]),
      "effective_bits": float(stats["effective_bits"]),
      "unused_codes": int(np.sum(counts.sum(axis=0) == 0)),
      "tokens": int(counts[0].sum()),
      "lookups": lookups,
      "usage_uniform_expectation": float(-100.0 * math.expm1(-lookups / codebook_size)),
      "per_group": {"usage": stats["group_usage"].tolist(),
                    "perplexity": stats["group_perplexity"].tolist()},
  }


# ----------------------------------------------------------------------------
# The API
# ----------------------------------------------------------------------------
def _protocol(config: Any, data_cfg: Mapping[str, Any], *, image_size: int,
              eval_data: input_pipeline.EvalData, models: MetricModels,
              result: Mapping[str, Any], info: Mapping[str, Any], use_ema_note: bool,
              step: int | None, mesh: jax.sharding.Mesh,
              grid_file: str | None) -> dict[str, Any]:
  """What was measured, how: enough to decide whether two numbers compare."""
  data = {**input_pipeline.default_config().to_dict(), **data_cfg}
  crop = data["eval_crop"]
  resize = transforms.eval_resize_size(image_size, data["crop_pct"])
  crop_note = (f"crop_pct: resize shorter side to {resize} "
               f"(= {image_size} / {data['crop_pct']}), center crop {image_size}"
               if crop == "crop_pct" else
               f"center: resize shorter side to {image_size}, center crop {image_size}")
  model = _block(config, "model")
  conventions = {
      "reconstruction": "x' = decode(quantize(encode(x))); x and x' clamped to [-1, 1], "
                        "then mapped to [0, 1]",
      "psnr": "PSNR of the MSE over all pixels of all images, data range 1 (GSQ)",
      "psnr_per_image": "mean over images of per-image PSNR, data range 1",
      "ssim": "dm-pix SSIM on RGB in [0, 1], float32: Gaussian window 11, sigma 1.5, "
              "k1 0.01, k2 0.03, mean over images",
      "mse": "mean squared error over all values in [0, 1]",
      "lpips_alex": "LPIPS v0.1 AlexNet on [-1, 1] inputs (GSQ's eval LPIPS)",
      "lpips_vgg": "LPIPS v0.1 VGG16 on [-1, 1] inputs",
      "fd_vgg16": "Frechet distance (float64, eigh) between LPIPS-VGG16 relu5_3 "
                  "global-average features (512-d) of originals and reconstructions; "
                  "NOT rFID, comparable only within this project at equal N",
      "rfid": (f"FID Inception ({inception_lib.FID_WEIGHTS_FILENAME}) pool features, "
               f"uint8 truncation, {models.inception_preprocess} resize to 299; real "
               "statistics from the same images; float64 eigh Frechet distance"),
      "kid": "unbiased cubic polynomial-kernel MMD^2 over random subsets (torch-fidelity)",
      "usage": "100 * codes used at least once / V, one histogram shared by all groups "
               "(GSQ); perplexity natural log on the same histogram; product_usage = "
               "100 * prod_g(group usage fraction); usage_uniform_expectation = "
               "100 * (1 - exp(-lookups / V)); effective_bits = log2(perplexity); "
               "unused_codes = codes no evaluation lookup picked; codebook_norm_* = "
               "row norms of the raw codebook (cv = std / mean)",
      "bits_per_image": "h * w * G * log2(V): the fixed-length code of one image",
      "tie_break": "code choice among exactly tied distances during evaluation: 'first' = "
                   "lowest index, always, whatever the run trains with; null = no "
                   "nearest-code search (IBQ takes the first maximal logit, FSQ/LFQ round)",
      "distance_dtype": "dtype the lookup's inner products are rounded to (the run's "
                        "model.quantizer.distance_dtype); null = no nearest-code search",
  }
  return {
      "num_images": info["num_images"],
      "resolution": image_size,
      "crop": crop,
      "crop_detail": crop_note,
      "ema": bool(use_ema_note),
      "step": step,
      "source": data["eval_source"] or data["source"],
      "requested_num_images": eval_data.num_images,
      "corrupt_images_skipped": eval_data.corrupt_counter.count,
      "batch_size": eval_data.batch_size * jax.process_count(),
      "devices": int(mesh.size),
      "processes": jax.process_count(),
      "compute_dtype": _block(model, "dtype") if model is not None else None,
      "tie_break": info["tie_break"],
      "distance_dtype": info["distance_dtype"],
      "usage_tokens": result["tokens"],
      "eval_seconds": info["eval_seconds"],
      "images_per_second": info["images_per_second"],
      "rfid_available": models.inception is not None,
      "metric_conventions": conventions,
      "grid": grid_file,
  }


def json_safe(tree: Any) -> Any:
  """Nested metrics -> JSON values (non-finite floats as "nan"/"inf", as writers)."""
  if isinstance(tree, Mapping):
    return {str(k): json_safe(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [json_safe(v) for v in tree]
  if tree is None:
    return None
  return writers.to_json_value(tree)


def scalar_metrics(result: Mapping[str, Any]) -> dict[str, Any]:
  """The flat number/string entries of an eval result (for `MetricWriter.write_scalars`)."""
  return {k: v for k, v in result.items()
          if isinstance(v, (str, int, float, np.integer, np.floating))}


def run_evaluation(tokenizer: nnx.Module, config: Any, *, out_dir: str | os.PathLike,
                   source: str | None = None, num_images: int | None = None,
                   use_ema_note: bool = True, mesh: jax.sharding.Mesh | None = None,
                   step: int | None = None,
                   metric_models: MetricModels | None = None,
                   should_stop: Callable[[int], bool] | None = None) -> dict[str, Any]:
  """Evaluates `tokenizer` per `config.eval`; writes eval.json and the grid to `out_dir`.

  Args:
    tokenizer: the (EMA) `gsq_jax.models.Tokenizer` to evaluate; not modified.
    config: the run config (blocks `eval`, `data`, `train.image_size`, `model`).
    out_dir: folder for `eval.json` and `eval_grid.png` (written by process 0).
    source: eval data source overriding `eval.source` / `data.eval_source`.
    num_images: evaluate only the first N images (overrides `eval.num_images`).
    use_ema_note: recorded as `protocol.ema` (whether `tokenizer` holds EMA weights).
    mesh: device mesh; the batch is split over all its axes. None = every
      device on one "data" axis.
    step: training step of the weights, recorded as `protocol.step`.
    metric_models: preloaded `load_metric_models(config.eval)` to reuse across
      calls (periodic evaluation); None loads them.
    should_stop: see `evaluate`; raises `EvaluationInterrupted`, nothing is written.

  Returns:
    The eval.json content: flat metrics, `per_group` usage lists and `protocol`.
  """
  eval_cfg = resolve_eval_config(_block(config, "eval"))
  image_size = _image_size(config)
  data_cfg = eval_data_config(config, eval_cfg, source=source, num_images=num_images)
  mesh = _auto_mesh(mesh or _default_mesh())
  models = metric_models or load_metric_models(eval_cfg)
  eval_data = input_pipeline.make_eval_iterator(
      data_cfg, global_batch_size=eval_cfg.batch_size, image_size=image_size,
      sharding=batch_sharding(mesh))
  result, grid, info = evaluate(
      tokenizer, eval_data, models, mesh=mesh, seed=eval_cfg.seed, kid=eval_cfg.kid,
      kid_subset_size=eval_cfg.kid_subset_size, kid_num_subsets=eval_cfg.kid_num_subsets,
      fd_vgg16=eval_cfg.fd_vgg16, grid_images=eval_cfg.grid_images, grid_step=step,
      should_stop=should_stop)
  out_dir = os.fspath(out_dir)
  result["protocol"] = _protocol(
      config, data_cfg, image_size=image_size, eval_data=eval_data, models=models,
      result=result, info=info, use_ema_note=use_ema_note, step=step, mesh=mesh,
      grid_file=GRID_FILENAME if grid is not None else None)
  codebook = find_codebook(nnx.state(tokenizer, nnx.Param))
  if codebook is not None:
    result.update({k: float(v) for k, v in codebook_norm_stats(codebook).items()})
  counts = info["code_counts"]
  result["protocol"]["code_frequency_plot"] = code_frequency.FILENAME
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    code_frequency.write_plot(counts, os.path.join(out_dir, code_frequency.FILENAME))
    if grid is not None:
      Image.fromarray(grid).save(os.path.join(out_dir, GRID_FILENAME))
    atomic_write_json(os.path.join(out_dir, EVAL_FILENAME), json_safe(result))
  return result
