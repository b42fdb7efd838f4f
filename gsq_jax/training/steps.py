"""Pure train-step functions: generator and discriminator updates (GSQ.md §3.1).

Everything a step changes lives in one pytree, the train state (a dict):

  step     int32 scalar, the number of finished iterations (the iteration
           that starts from it is reported as step + 1)
  rng      uint32 key data; the step's key is fold_in(key, step), so a resumed
           run draws exactly the keys of an uninterrupted one
  params   generator (tokenizer) nnx.Param state, float32 master weights
  opt      its optax state;  ema  EMA of `params` (all of them, codebook too)
  counter  CodebookCounter of the codes picked since the last usage report
  d_params, d_stats, d_opt   discriminator Params, BatchNorm statistics, optax
           state (only when config.disc.name != "none")
  lecam    LeCam EMAs of the mean logits (only when disc.lecam_weight > 0)

and everything a step only reads is a second pytree, `consts`: the
non-parameter variables of the tokenizer (dropout RNG streams), the frozen
DINO backbone and the frozen LPIPS network (`gsq_jax.models.weights.Frozen`
variables: never optimised, never checkpointed), and the test hook
`inject_nan_at_step` (an int32 array, so that using it does not recompile). Networks enter the step as
`nnx.merge(graphdef, state...)`, never as closures, so XLA sees their weights
as arguments, not constants.

One iteration (`make_train_step`), in the reference order "g_then_d":
  1. generator step on batch 1: L = λrec·(rec + λq·L_q) + λp·LPIPS
     + λadv·L_G(D(x̂)) (adaptive λ optional); clip, AdamW, EMA.
  2. discriminator step on batch 2 (or batch 1 again when
     train.two_batches_per_step is off) with a *fresh* forward pass of the
     updated generator: λdisc·L_D(D(x), D(sg(x̂))) + LeCam + R1; clip, AdamW.
"d_then_g" (IBQ, QUANTIZERS.md §2.2) runs the discriminator step first on
the same batch. D's inputs are post(x) = 0.5·x + 0.5 for GSQ
(disc.input_range = "zero_one") or x itself ("minus_one_one", taming/IBQ).

Precision: parameters are float32; the model computes in config.model.dtype
(bfloat16 = mixed precision with fp32 master weights); losses, gradients
norms and optimiser updates are float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
import optax

from gsq_jax.training import losses
from gsq_jax.training import optim
from gsq_jax import sharding as sharding_lib
from gsq_jax.models import evaluation_view
from gsq_jax.quantizers import CodebookCounter, codebook_norm_stats, find_codebook

State = dict[str, Any]
Metrics = dict[str, jax.Array]

GD_ORDERS = ("g_then_d", "d_then_g")
DISC_NAMES = ("none", "patchgan", "dino")
RECONSTRUCTIONS = ("mse", "l1")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static (compile-time) choices of a train step, read from the config."""

  reconstruction: str = "mse"
  reconstruction_weight: float = 1.0
  quantizer_weight: float = 1.0
  perceptual_weight: float = 0.0
  perceptual_input_range: str = "zero_one"
  use_disc: bool = False
  disc_takes_key: bool = False  # DINO: DiffAugment needs a key per call
  adversarial_weight: float = 0.1
  discriminator_weight: float = 1.0
  adaptive_weight: bool = False
  adaptive_weight_max: float = 1e3
  gen_loss: str = "non_saturate"
  disc_loss: str = "hinge"
  disc_input_range: str = "zero_one"
  disc_start_step: int = 0
  lecam_weight: float = 0.0
  lecam_decay: float = 0.999
  r1_weight: float = 0.0
  gd_order: str = "g_then_d"
  two_batches_per_step: bool = True
  ema_decay: float = 0.999
  dropout: bool = False

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "StepConfig":
    disc = config.disc
    use_disc = disc.name != "none"
    return cls(
        reconstruction=config.loss.reconstruction,
        reconstruction_weight=float(config.loss.reconstruction_weight),
        quantizer_weight=float(config.loss.quantizer_weight),
        perceptual_weight=float(config.loss.perceptual_weight),
        perceptual_input_range=config.loss.perceptual_input_range,
        use_disc=use_disc,
        disc_takes_key=disc.name == "dino",
        adversarial_weight=float(config.loss.adversarial_weight),
        discriminator_weight=float(config.loss.discriminator_weight),
        adaptive_weight=bool(config.loss.adaptive_weight),
        adaptive_weight_max=float(config.loss.adaptive_weight_max),
        gen_loss=disc.gen_loss, disc_loss=disc.disc_loss,
        disc_input_range=disc.input_range,
        disc_start_step=int(disc.start_step),
        lecam_weight=float(disc.lecam_weight), lecam_decay=float(disc.lecam_decay),
        r1_weight=float(disc.r1_weight),
        gd_order=config.train.gd_order,
        two_batches_per_step=bool(config.train.two_batches_per_step) and use_disc,
        ema_decay=float(config.optim.ema_decay),
        dropout=float(config.model.dropout) > 0)

  @property
  def batches_per_step(self) -> int:
    return 2 if self.two_batches_per_step else 1


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the `loss`, `disc` and step-order fields; ValueError names the field."""
  loss, disc, train = config.loss, config.disc, config.train
  if loss.reconstruction not in RECONSTRUCTIONS:
    raise ValueError(f"loss.reconstruction must be one of {RECONSTRUCTIONS}, "
                     f"got {loss.reconstruction!r}")
  for field in ("reconstruction_weight", "quantizer_weight", "perceptual_weight",
                "adversarial_weight", "discriminator_weight"):
    if not isinstance(loss[field], (int, float)) or loss[field] < 0:
      raise ValueError(f"loss.{field} must be a number >= 0, got {loss[field]!r}")
  if loss.perceptual_input_range not in losses.INPUT_RANGES:
    raise ValueError(f"loss.perceptual_input_range must be one of {losses.INPUT_RANGES}, "
                     f"got {loss.perceptual_input_range!r}")
  if disc.name not in DISC_NAMES:
    raise ValueError(f"disc.name must be one of {DISC_NAMES}, got {disc.name!r}")
  for field in ("gen_loss", "disc_loss"):
    if disc[field] not in losses.LOSS_TYPES:
      raise ValueError(f"disc.{field} must be one of {losses.LOSS_TYPES}, got {disc[field]!r}")
  if disc.input_range not in losses.INPUT_RANGES:
    raise ValueError(f"disc.input_range must be one of {losses.INPUT_RANGES}, "
                     f"got {disc.input_range!r}")
  for field in ("lecam_weight", "r1_weight", "start_step"):
    if disc[field] < 0:
      raise ValueError(f"disc.{field} must be >= 0, got {disc[field]!r}")
  if not 0 <= disc.lecam_decay < 1:
    raise ValueError(f"disc.lecam_decay must be in [0, 1), got {disc.lecam_decay!r}")
  if disc.name == "none" and (loss.adaptive_weight or disc.lecam_weight or disc.r1_weight):
    raise ValueError("loss.adaptive_weight / disc.lecam_weight / disc.r1_weight need a "
                     "discriminator; set disc.name to 'patchgan' or 'dino' or turn them off")
  if train.gd_order not in GD_ORDERS:
    raise ValueError(f"train.gd_order must be one of {GD_ORDERS}, got {train.gd_order!r}")


# ----------------------------------------------------------------------------
# Networks as pure functions of their states.
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Networks:
  """Static halves of the networks (graphdefs) and the optimisers."""

  g_graphdef: Any
  g_tx: optax.GradientTransformation
  g_schedule: optax.Schedule
  d_graphdef: Any = None
  d_tx: optax.GradientTransformation | None = None
  d_schedule: optax.Schedule | None = None
  lpips_graphdef: Any = None
  mesh: jax.sharding.Mesh | None = None  # for FSDP's gather/scatter; None = no constraints


def split_tokenizer(model: nnx.Module):
  """(graphdef, params, rest): rest holds the non-trainable variables (RNG streams)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest


def split_discriminator(model: nnx.Module):
  """(graphdef, params, batch stats, frozen rest)."""
  return nnx.split(model, nnx.Param, nnx.BatchStat, ...)


def tokenizer_apply(nets: Networks, params, rest, images, key, *, dropout: bool):
  """Tokenizer forward: (reconstruction, QuantizerOutput)."""
  model = nnx.merge(nets.g_graphdef, params, rest)
  k_quant, k_drop = jax.random.split(key)
  if dropout:
    nnx.reseed(model, dropout=k_drop)
  return model(images, rng=k_quant)


def _disc_apply(nets: Networks, cfg: StepConfig, d_params, d_stats, d_frozen, images, key):
  """Discriminator forward in train mode: (logits, updated batch statistics)."""
  model = nnx.merge(nets.d_graphdef, d_params, d_stats, d_frozen, copy=True)
  logits = model(images, key) if cfg.disc_takes_key else model(images)
  return logits, nnx.state(model, nnx.BatchStat)


def _to_disc(cfg: StepConfig, x):
  return 0.5 * x + 0.5 if cfg.disc_input_range == "zero_one" else x


# ----------------------------------------------------------------------------
# Initial state.
# ----------------------------------------------------------------------------
def init_state(nets: Networks, params, *, seed: int, num_groups: int, codebook_size: int,
               d_params=None, d_stats=None, lecam: bool = False) -> State:
  """The train state at step 0 (call under jax.jit with out_shardings to place it)."""
  state = {
      "step": jnp.zeros((), jnp.int32),
      "rng": jax.random.key_data(jax.random.key(seed)),
      "params": params,
      "opt": nets.g_tx.init(params),
      "ema": jax.tree.map(jnp.copy, params),
      "counter": CodebookCounter.create(num_groups, codebook_size),
  }
  if d_params is not None:
    state.update(d_params=d_params, d_stats=d_stats, d_opt=nets.d_tx.init(d_params))
  if lecam:
    state["lecam"] = losses.lecam_init()
  return state


# ----------------------------------------------------------------------------
# Generator step.
# ----------------------------------------------------------------------------
def _apply_updates(nets: Networks, tx, grads, opt_state, params):
  grads = sharding_lib.scatter_like(grads, nets.mesh)  # FSDP: back onto the shards
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def generator_step(nets: Networks, cfg: StepConfig, state: State, consts: State,
                   images: jax.Array, key: jax.Array) -> tuple[State, Metrics]:
  """One generator update on `images` (NHWC in [-1, 1])."""
  step = state["step"]
  k_model, k_disc = jax.random.split(key)
  adversarial = cfg.use_disc and cfg.adversarial_weight > 0
  lpips = (nnx.merge(nets.lpips_graphdef, consts["lpips"])
           if cfg.perceptual_weight > 0 else None)
  d_params = sharding_lib.gather(state["d_params"], nets.mesh) if adversarial else None

  def components(params):
    x_hat, q = tokenizer_apply(nets, params, consts["g_rest"], images, k_model,
                               dropout=cfg.dropout)
    rec = losses.reconstruction_loss(images, x_hat, cfg.reconstruction)
    nll = cfg.reconstruction_weight * rec
    aux = {"rec_loss": rec, "quant_loss": q.loss.astype(jnp.float32)}
    if lpips is not None:
      perc = losses.perceptual_loss(lpips, images, x_hat, cfg.perceptual_input_range)
      nll = nll + cfg.perceptual_weight * perc
      aux["perceptual_loss"] = perc
    parts = {"nll": nll,
             "quant": cfg.reconstruction_weight * cfg.quantizer_weight * q.loss,
             "gen": jnp.zeros((), jnp.float32)}
    d_stats = state.get("d_stats")
    if adversarial:
      logits, d_stats = _disc_apply(nets, cfg, d_params, d_stats, consts["d_frozen"],
                                    _to_disc(cfg, x_hat), k_disc)
      parts["gen"] = losses.generator_loss(logits, cfg.gen_loss)
      aux["g_adv_loss"] = parts["gen"]
    aux.update({f"q_{k}": v.astype(jnp.float32) for k, v in q.aux.items()
                if jnp.ndim(v) == 0})
    return parts, (aux, q.indices, d_stats)

  params = sharding_lib.gather(state["params"], nets.mesh)
  parts, vjp_fn, (aux, indices, d_stats) = jax.vjp(components, params, has_aux=True)
  ones = lambda **on: {k: jnp.asarray(float(k in on), v.dtype) for k, v in parts.items()}
  (grads,) = vjp_fn(ones(nll=1, quant=1))
  adv_coef = jnp.zeros((), jnp.float32)
  if adversarial:
    (gen_grads,) = vjp_fn(ones(gen=1))
    adv_coef = jnp.asarray(cfg.adversarial_weight, jnp.float32)
    if cfg.adaptive_weight:
      # ||grad_last(nll)|| / ||grad_last(L_G)|| at the decoder's output conv
      # (the quantiser loss does not reach the decoder, so `grads` there is nll's).
      last = lambda g: g["decoder"]["conv_out"]
      adaptive = losses.adaptive_weight(last(grads), last(gen_grads), cfg.adaptive_weight_max)
      adv_coef = adv_coef * adaptive
      aux["adaptive_weight"] = adaptive
    if cfg.disc_start_step:
      adv_coef = jnp.where(step >= cfg.disc_start_step, adv_coef, 0.0)
    grads = jax.tree.map(lambda g, h: g + (adv_coef * h).astype(g.dtype), grads, gen_grads)
  loss = parts["nll"] + parts["quant"] + adv_coef * parts["gen"]
  if "inject_nan_at_step" in consts:  # test hook (api contract): the loss of step N
    loss = jnp.where(step + 1 == consts["inject_nan_at_step"], jnp.nan, loss)  # turns NaN

  grad_norm = optim.global_norm(grads)
  new_params, opt = _apply_updates(nets, nets.g_tx, grads, state["opt"], state["params"])
  new_state = dict(state, params=new_params, opt=opt,
                   ema=optim.ema_update(state["ema"], new_params, cfg.ema_decay),
                   counter=state["counter"].update(indices))
  if adversarial:
    new_state["d_stats"] = d_stats  # the reference's G step runs D in train mode too
  metrics = {"g_loss": loss, "g_grad_norm": grad_norm, "g_lr": nets.g_schedule(step), **aux}
  return new_state, metrics


# ----------------------------------------------------------------------------
# Discriminator step.
# ----------------------------------------------------------------------------
def discriminator_step(nets: Networks, cfg: StepConfig, state: State, consts: State,
                       images: jax.Array, key: jax.Array) -> tuple[State, Metrics]:
  """One discriminator update on real `images` and a fresh reconstruction of them."""
  k_model, k_real, k_fake = jax.random.split(key, 3)
  params = sharding_lib.gather(state["params"], nets.mesh)
  x_hat, _ = tokenizer_apply(nets, params, consts["g_rest"], images, k_model,
                             dropout=cfg.dropout)
  real_in = _to_disc(cfg, images)
  fake_in = _to_disc(cfg, jax.lax.stop_gradient(x_hat))
  d_frozen = consts["d_frozen"]

  def loss_fn(d_params):
    real, d_stats = _disc_apply(nets, cfg, d_params, state["d_stats"], d_frozen, real_in, k_real)
    fake, d_stats = _disc_apply(nets, cfg, d_params, d_stats, d_frozen, fake_in, k_fake)
    adv = losses.discriminator_loss(real, fake, cfg.disc_loss)
    loss = cfg.discriminator_weight * adv
    aux = {"d_adv_loss": adv, "d_real_logit": jnp.mean(real.astype(jnp.float32)),
           "d_fake_logit": jnp.mean(fake.astype(jnp.float32))}
    lecam = state.get("lecam")
    if cfg.lecam_weight > 0:
      reg, lecam = losses.lecam_loss(real, fake, lecam, cfg.lecam_decay)
      loss = loss + cfg.lecam_weight * reg
      aux["lecam_loss"] = reg
    if cfg.r1_weight > 0:
      # Batch statistics of this extra pass are not kept (the fake pass's are).
      d_fn = lambda x: _disc_apply(nets, cfg, d_params, state["d_stats"], d_frozen, x, k_real)[0]
      penalty, _ = losses.r1_penalty(d_fn, real_in)
      loss = loss + cfg.r1_weight * penalty
      aux["r1_penalty"] = penalty
    return loss, (aux, d_stats, lecam)

  d_params = sharding_lib.gather(state["d_params"], nets.mesh)
  (loss, (aux, d_stats, lecam)), grads = jax.value_and_grad(loss_fn, has_aux=True)(d_params)
  grad_norm = optim.global_norm(grads)
  new_params, d_opt = _apply_updates(nets, nets.d_tx, grads, state["d_opt"], state["d_params"])
  new_state = dict(state, d_params=new_params, d_opt=d_opt, d_stats=d_stats)
  if cfg.lecam_weight > 0:
    new_state["lecam"] = lecam
  metrics = {"d_loss": loss, "d_grad_norm": grad_norm,
             "d_lr": nets.d_schedule(state["step"]), **aux}
  if cfg.disc_start_step:
    active = state["step"] >= cfg.disc_start_step
    new_state = jax.tree.map(lambda new, old: jnp.where(active, new, old), new_state, state)
  return new_state, metrics


# ----------------------------------------------------------------------------
# One iteration.
# ----------------------------------------------------------------------------
def make_train_step(nets: Networks, cfg: StepConfig
                    ) -> Callable[[State, State, dict[str, jax.Array]], tuple[State, Metrics]]:
  """train_step(state, consts, batch) -> (state, metrics); jit it with donate_argnums=0.

  `batch` is {"image": (B, H, W, 3)} and, with two batches per step,
  {"image", "image_d"}: the second one feeds the discriminator step.
  """

  def train_step(state: State, consts: State, batch: dict[str, jax.Array]):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    k_g, k_d = jax.random.split(key)
    x_g = batch["image"]
    x_d = batch["image_d"] if cfg.two_batches_per_step else x_g
    metrics = {}
    if cfg.use_disc and cfg.gd_order == "d_then_g":
      state, m = discriminator_step(nets, cfg, state, consts, x_d, k_d)
      metrics.update(m)
    state, m = generator_step(nets, cfg, state, consts, x_g, k_g)
    metrics.update(m)
    if cfg.use_disc and cfg.gd_order == "g_then_d":
      state, m = discriminator_step(nets, cfg, state, consts, x_d, k_d)
      metrics.update(m)
    state = dict(state, step=state["step"] + 1)
    return state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

  return train_step


def usage_report(state: State, *, dead_after: int) -> tuple[State, Metrics]:
  """Codebook health since the last report, and the state with the counter reset.

  The window is the steps since the last report (train.log_every_steps): its
  usage comes with its `lookups` and their uniform expectation
  1 - exp(-lookups / V), so windows of different sizes are never compared
  blindly. Also: perplexity and effective bits, codes unused for `dead_after`
  steps (`dead_codes`), each group's usage and perplexity, and the spread of
  the codebook's raw row norms.
  """
  counter = state["counter"]
  stats = counter.stats()
  report = {k: stats[k] for k in ("usage", "perplexity", "effective_bits", "product_usage",
                                  "mean_group_perplexity", "tokens", "lookups",
                                  "uniform_usage")}
  report["group_usage_mean"] = jnp.mean(stats["group_usage"])
  for g in range(counter.counts.shape[0]):
    report[f"usage_group{g}"] = stats["group_usage"][g]
    report[f"perplexity_group{g}"] = stats["group_perplexity"][g]
  report["dead_codes"] = counter.dead_codes(dead_after)
  codebook = find_codebook(state["params"])
  if codebook is not None:
    report.update(codebook_norm_stats(codebook))
  return dict(state, counter=counter.reset()), report


def reconstruct(nets: Networks, params, rest, images: jax.Array) -> jax.Array:
  """Reconstruction of `images` with the given params (`evaluation_view`: first-index ties, no key)."""
  model = evaluation_view(nnx.merge(nets.g_graphdef, params, rest))
  x_hat, _ = model(images)
  return x_hat
