"""Optimisers for the generator and the discriminator, LR schedules and the EMA.

The GSQ recipe (GSQ.md §3.5, pitfall 13) is AdamW on *all* parameters
(codebook, norms and biases included, no exclusion masks), the gradient norm
clipped before the AdamW step, a constant learning rate without warm-up, and
an EMA (0.999) of all generator parameters. IBQ (QUANTIZERS.md §2.3) uses Adam
without weight decay or clipping and two x0.1 drops of the learning rate,
which `decay="piecewise"` expresses.

Config block (`config.optim`):
  lr                     base learning rate of both networks ...
  generator / discriminator: lr (None = optim.lr), b1, b2, eps, weight_decay
                         (AdamW).
  grad_clip_norm         global-norm clip per network; 0 = off.
  warmup_steps           linear warm-up from 0 to lr.
  decay                  "none" | "linear" | "cosine" | "piecewise".
  decay_steps            length of the linear/cosine decay after warm-up;
                         0 = until train.total_steps.
  end_lr_factor          final lr / lr for linear and cosine.
  piecewise_boundaries   steps at which "piecewise" multiplies the lr ...
  piecewise_factor       ... by this factor (IBQ: 0.1).
  ema_decay              EMA of the generator parameters; 0 = EMA is a copy.
  encoder_lr_factor      multiplies the generator's lr for the encoder's
                         parameters only (1 = the paper's one lr for all).
                         The 100-step CPU demo uses 0.05: see `encoder_lr_scaling`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

DECAYS = ("none", "linear", "cosine", "piecewise")
ADAMW_FIELDS = ("lr", "b1", "b2", "eps", "weight_decay")


def default_config() -> ml_collections.ConfigDict:
  """The GSQ scaling recipe (GSQ.md §3.6 (C)): AdamW(2e-4, 0.9, 0.99, wd 0.05)."""
  cfg = ml_collections.ConfigDict()
  cfg.lr = 2e-4
  for name in ("generator", "discriminator"):
    cfg[name] = ml_collections.ConfigDict(dict(
        lr=ml_collections.FieldReference(None, field_type=float),
        b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.05))
  cfg.grad_clip_norm = 2.0
  cfg.warmup_steps = 0
  cfg.decay = "none"
  cfg.decay_steps = 0
  cfg.end_lr_factor = 0.0
  cfg.piecewise_boundaries = ()
  cfg.piecewise_factor = 0.1
  cfg.ema_decay = 0.999
  cfg.encoder_lr_factor = 1.0
  return cfg


def _fail(field: str, message: str) -> None:
  raise ValueError(f"optim.{field}: {message}")


def validate_config(cfg: ml_collections.ConfigDict, total_steps: int) -> None:
  """Raises ValueError naming the first bad `optim` field and the fix."""
  if not isinstance(cfg.get("lr"), (int, float)) or cfg.lr < 0:
    _fail("lr", f"must be a number >= 0, got {cfg.get('lr')!r}")
  for name in ("generator", "discriminator"):
    if name not in cfg:
      _fail(name, "is missing; see gsq_jax.training.optim.default_config()")
    block = cfg[name]
    for field in ADAMW_FIELDS:
      if field not in block:
        _fail(f"{name}.{field}", "is missing; see gsq_jax.training.optim.default_config()")
      if field == "lr" and block.lr is None:
        continue  # optim.lr
      if not isinstance(block[field], (int, float)) or block[field] < 0:
        _fail(f"{name}.{field}", f"must be a number >= 0, got {block[field]!r}")
    for field in ("b1", "b2"):
      if not block[field] < 1:
        _fail(f"{name}.{field}", f"must be in [0, 1), got {block[field]!r}")
    if block.eps <= 0:
      _fail(f"{name}.eps", f"must be > 0, got {block.eps!r}")
  if not isinstance(cfg.grad_clip_norm, (int, float)) or cfg.grad_clip_norm < 0:
    _fail("grad_clip_norm", f"must be >= 0 (0 = no clipping), got {cfg.grad_clip_norm!r}")
  if not isinstance(cfg.warmup_steps, int) or cfg.warmup_steps < 0:
    _fail("warmup_steps", f"must be an integer >= 0, got {cfg.warmup_steps!r}")
  if cfg.decay not in DECAYS:
    _fail("decay", f"must be one of {DECAYS}, got {cfg.decay!r}")
  if not isinstance(cfg.decay_steps, int) or cfg.decay_steps < 0:
    _fail("decay_steps", f"must be an integer >= 0 (0 = until train.total_steps), "
          f"got {cfg.decay_steps!r}")
  if cfg.decay in ("linear", "cosine") and cfg.warmup_steps >= total_steps and not cfg.decay_steps:
    _fail("warmup_steps", f"= {cfg.warmup_steps} leaves no steps to decay over "
          f"(train.total_steps = {total_steps}); shorten it or set optim.decay_steps")
  if not 0 <= cfg.end_lr_factor <= 1:
    _fail("end_lr_factor", f"must be in [0, 1], got {cfg.end_lr_factor!r}")
  bounds = list(cfg.piecewise_boundaries)
  if any(not isinstance(b, int) or b <= 0 for b in bounds) or bounds != sorted(bounds):
    _fail("piecewise_boundaries", f"must be increasing positive step numbers, got {bounds!r}")
  if not 0 <= cfg.ema_decay < 1:
    _fail("ema_decay", f"must be in [0, 1), got {cfg.ema_decay!r}")
  factor = cfg.get("encoder_lr_factor", 1.0)
  if not isinstance(factor, (int, float)) or not 0 < factor <= 1:
    _fail("encoder_lr_factor", f"must be in (0, 1] (1 = one lr for all parameters), "
          f"got {factor!r}")


def lr_schedule(cfg: ml_collections.ConfigDict, base_lr: float,
                total_steps: int) -> optax.Schedule:
  """Warm-up then constant / linear / cosine / piecewise-constant learning rate."""
  warmup = cfg.warmup_steps
  if cfg.decay == "piecewise":
    after = optax.piecewise_constant_schedule(
        base_lr, {b - warmup: cfg.piecewise_factor for b in cfg.piecewise_boundaries
                  if b > warmup})
  elif cfg.decay in ("linear", "cosine"):
    steps = cfg.decay_steps or max(total_steps - warmup, 1)
    after = (optax.linear_schedule(base_lr, base_lr * cfg.end_lr_factor, steps)
             if cfg.decay == "linear"
             else optax.cosine_decay_schedule(base_lr, steps, alpha=cfg.end_lr_factor))
  else:
    after = optax.constant_schedule(base_lr)
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, base_lr, warmup), after], [warmup])


def learning_rate(cfg: ml_collections.ConfigDict, which: str) -> float:
  """The base lr of `which` network: its own `lr`, else optim.lr."""
  lr = cfg[which].lr
  return float(cfg.lr if lr is None else lr)


def make_optimizer(cfg: ml_collections.ConfigDict, which: str,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Clip-by-global-norm (if on) -> AdamW for `which` in {"generator", "discriminator"}.

  Returns the transformation and its schedule (for logging the current lr).
  """
  if which not in ("generator", "discriminator"):
    raise ValueError(f"make_optimizer: `which` must be 'generator' or 'discriminator', "
                     f"got {which!r}")
  block = cfg[which]
  schedule = lr_schedule(cfg, learning_rate(cfg, which), total_steps)
  chain = [optax.adamw(schedule, b1=block.b1, b2=block.b2, eps=block.eps,
                       weight_decay=block.weight_decay)]
  factor = cfg.get("encoder_lr_factor", 1.0)
  if which == "generator" and factor != 1:
    chain.append(encoder_lr_scaling(factor))
  if cfg.grad_clip_norm:
    chain.insert(0, optax.clip_by_global_norm(cfg.grad_clip_norm))
  return (chain[0] if len(chain) == 1 else optax.chain(*chain)), schedule


def _top_level_name(path) -> str:
  key = path[0]
  return str(getattr(key, "key", getattr(key, "name", key)))


def encoder_lr_scaling(factor: float) -> optax.GradientTransformation:
  """Scales the AdamW update of the `encoder` subtree: its lr (and decay) times `factor`.

  Why: Adam moves every weight by about lr per step whatever its gradient's
  size. In a model's first steps the encoder's gradient is nearly the same at
  every latent position (the decoder cannot yet use their differences), so
  all latents drift towards one direction, and a codebook of V spread-out
  rows loses most of its users within ~50 steps; one group of d = 16 is hit
  hardest (benchmarks/RESULTS.md, "One group in the 100-step demo"). A run
  that long training lets recover does not need this; a 100-step demo does.
  """
  def is_encoder(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: _top_level_name(path) == "encoder",
                                            params)
  return optax.masked(optax.scale(factor), is_encoder)


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf, in the leaves' dtype."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def global_norm(tree: Any) -> jax.Array:
  """L2 norm over all leaves, in float32 (the value clipping compares with)."""
  return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
