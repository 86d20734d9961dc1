"""Gaussian diffusion (DDPM / improved DDPM / DDIM) as a gm_jax family.

``make(model_config)`` builds the Family from the ``DiffusionConfig``:

* ``loss``: at a uniform timestep, per ``loss_type``: L_simple (eps, x0
  or v prediction), logged as ``simple_loss``; improved DDPM's L_hybrid =
  L_simple + 0.001 L_vlb with the bound's term training only the learned
  variance; or L_vlb alone (``objectives.training_terms``; the term is
  logged as ``vlb_term_bpd``).
* ``loss_state`` (only with ``timestep_sampler`` "importance"): the same
  objective at importance-sampled timesteps (improved DDPM, sec. 3.3;
  ``timestep_sampling``), which the trainer uses instead of ``loss``: t is
  drawn with p_t proportional to the root mean square of the last
  ``importance_history`` per-example objectives recorded at t (uniform
  until every timestep has that many), each example weighted by
  1 / (T p_t). Its state, the loss history, lives in the train state and
  the checkpoints. ``loss`` itself keeps uniform timesteps (it has no
  state).
* ``evaluate``: the variational bound in nats and bits/dim of the 8-bit
  data, an upper bound on the NLL. ``eval_timesteps`` = 0 sums all T - 1 KL
  terms (one network call each); n > 0 uses the stratified unbiased
  estimate of that sum with n calls (``objectives.variational_bound``):
  timesteps 1..``eval_exact_timesteps`` one call each (they carry most of
  the bound), the rest in n - that many strata. The prior term is exact;
  the decoder term at t = 0, like every L_t, uses one draw of x_1 per
  example. ``bpd_estimator_sd`` / ``_stderr`` report the timestep draws'
  share of the noise (a conservative estimate). The per-term split is returned as prior_bpd, diffusion_bpd and
  decoder_bpd, and the per-example training terms (``simple_loss`` and,
  unless ``loss_type`` is "simple", ``vlb_term_bpd``; one more call, at a
  uniform timestep) overlay the training curve.
* ``sample``: ``sampler`` "ddpm" (ancestral, ``variance``) or "ddim"
  (``ddim_eta``), each with ``sample_steps`` steps spaced by
  ``timestep_spacing``.
* ``visualize``: the same starting noise through both samplers, as one
  "samplers" grid (row 0 ddpm, row 1 ddim).

``variance`` = "learned_range" is improved DDPM's learned variance: the
U-Net has 2C output channels [prediction, v] and the reverse variance is
exp(frac log beta_t + (1 - frac) log beta~_t), frac = (v + 1) / 2, in the
bound, in ``evaluate`` and in the ancestral sampler (respaced: the respaced
chain's beta and beta~); DDIM and the ODE likelihood use the prediction
channels only.

With ``num_classes`` > 0 the network is class-conditional, trained with
labels dropped to a null token with probability ``label_dropout``, and
``sample`` uses classifier-free guidance with weight ``guidance_scale``
(eps = (1 + w) eps(x, y) - w eps(x, null)) on labels 0, 1, 2, ... in turn;
``evaluate`` bounds the unconditional model (null label), so its bits/dim
stay comparable with unconditional models.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from gm_jax import losses, schema
from gm_jax.diffusion import (
  layers,
  objectives,
  ode,
  samplers,
  schedules,
  timestep_sampling,
)
from gm_jax.diffusion.unet import UNet
from gm_jax.family import Family, LossState

SAMPLERS = ("ddpm", "ddim")
DTYPES = layers.DTYPES


@dataclasses.dataclass(frozen=True)
class DiffusionConfig(schema.ModelConfig):
  """``config.model`` of the diffusion family; the defaults are DDPM's
  CIFAR-10 model (Ho et al., 2020).

  Attributes:
    image_shape: (H, W, C) of the data (see ``schema.ModelConfig``).
    schedule: the noise schedule, "linear" or "cosine".
    num_timesteps: T.
    beta_start, beta_end: the linear schedule's first and last beta.
    prediction: what the network predicts: "eps", "x0" or "v".
    width: the U-Net's base channel count.
    width_mult: per-level multipliers of ``width``; H and W must be
      divisible by 2^(len(width_mult) - 1).
    num_res_blocks: ResNet blocks per level.
    attn_resolutions: resolutions (H) with self-attention.
    dropout: dropout rate in the ResNet blocks.
    num_groups: GroupNorm groups; must divide every width * width_mult.
    num_heads: attention heads.
    resample_with_conv: learned convolutions in down- and up-sampling.
    dtype: computation dtype, "float32" or "bfloat16" (params stay f32).
    num_classes: 0 for an unconditional model; else class-conditional with
      classifier-free guidance.
    label_dropout: probability of training on the null label.
    guidance_scale: w of the classifier-free guidance when sampling.
    variance: the reverse process's variance, "fixed_small" (beta~_t),
      "fixed_large" (beta_t) or "learned_range" (improved DDPM: the U-Net
      outputs 2C channels, the last C interpolate log beta_t and
      log beta~_t; needs ``loss_type`` "hybrid" or "vlb" to train them).
    loss_type: the training objective at a uniform timestep t:
      "simple": L_simple (DDPM), the mean squared error of the prediction;
      "hybrid": L_simple + 0.001 L_vlb (improved DDPM), per example the
        squared error plus T / 1000 times L_t in bits/dim with
        stop_gradient on the mean, so L_vlb trains only the variance (needs
        "learned_range"); "vlb": T L_t in bits/dim, an unbiased estimate
        of the bound less its constant prior term, training everything
        (with uniform timesteps, or importance-sampled ones with
        ``timestep_sampler`` "importance"). See
        ``objectives.training_terms``.
    timestep_sampler: how training draws t: "uniform" (the ``loss``), or
      "importance", improved DDPM's importance sampling (needs
      ``loss_type`` "vlb" or "hybrid"; see ``timestep_sampling``): p_t
      proportional to sqrt(mean of the squared per-example objectives last
      recorded at t), mixed with 0.001 of the uniform distribution,
      uniform until every timestep has ``importance_history`` of them;
      each example's objective is weighted by 1 / (T p_t), so the loss
      and the logged ``simple_loss`` / ``vlb_term_bpd`` stay unbiased
      estimates of their uniform-timestep values. The recorded objective
      is the per-example value being trained, unweighted: T L_t in
      bits/dim for "vlb", simple_loss + 0.001 T L_t for "hybrid" (as
      improved-diffusion records its "loss" term). Logged:
      ``importance_warm`` (the fraction of timesteps with a full history)
      and ``importance_ess`` (the effective sample size per example of
      the weights, 1 while uniform).
    importance_history: how many recent losses per timestep the importance
      sampler keeps (the paper's 10).
    eval_timesteps: 0 for the exact bound (all T terms), n for a stratified
      estimate with n network calls.
    eval_exact_timesteps: of those n calls, how many evaluate timesteps
      1, 2, ... exactly (at most n - 2 are used; see
      ``objectives.timestep_strata``).
    eval_likelihood: what ``evaluate`` reports as nll_nats / bpd: "bound"
      (the variational bound above) or "ode" (the probability-flow ODE's
      likelihood of the uniformly dequantized data, ``ode.dequantized_nll``,
      also a bound on the discrete NLL; an adaptive solve per batch).
    ode_divergence: the ODE's divergence, "hutchinson_rademacher",
      "hutchinson_gaussian" (one probe per example) or "exact" (tiny
      images only: one Jacobian-vector product per dimension).
    ode_tolerance: relative and absolute tolerance of the ODE solver.
    sampler: "ddpm" or "ddim".
    sample_steps: steps of the sampler, in 1..T.
    timestep_spacing: "linspace", "leading" or "trailing": which
      ``sample_steps`` of the T timesteps the sampler visits.
    ddim_eta: DDIM's stochasticity (0: deterministic).
    clip_x0: clip the predicted x_0 to [-1, 1] when sampling.
  """

  image_shape: tuple[int, int, int] = (32, 32, 3)
  schedule: str = schema.choice("linear", schedules.SCHEDULES)
  num_timesteps: int = 1000
  beta_start: float = 1e-4
  beta_end: float = 0.02
  prediction: str = schema.choice("eps", objectives.PREDICTIONS)
  width: int = 128
  width_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (16,)
  dropout: float = 0.1
  num_groups: int = 32
  num_heads: int = 1
  resample_with_conv: bool = True
  dtype: str = schema.choice("float32", tuple(DTYPES))
  num_classes: int = 0
  label_dropout: float = 0.1
  guidance_scale: float = 1.0
  variance: str = schema.choice("fixed_small", schedules.VARIANCES)
  loss_type: str = schema.choice("simple", objectives.LOSS_TYPES)
  timestep_sampler: str = schema.choice("uniform",
                                        timestep_sampling.SAMPLERS)
  importance_history: int = timestep_sampling.DEFAULT_HISTORY
  eval_timesteps: int = 0
  eval_exact_timesteps: int = 15
  eval_likelihood: str = schema.choice("bound", ("bound", "ode"))
  ode_divergence: str = schema.choice("hutchinson_rademacher",
                                      ode.DIVERGENCES)
  ode_tolerance: float = 1e-5
  sampler: str = schema.choice("ddim", SAMPLERS)
  sample_steps: int = 50
  timestep_spacing: str = schema.choice("linspace",
                                        samplers.TIMESTEP_SPACINGS)
  ddim_eta: float = 0.0
  clip_x0: bool = True

  def validate(self):
    schema.require(self.num_timesteps >= 2, "num_timesteps",
                   self.num_timesteps, "must be >= 2")
    schema.require(1 <= self.sample_steps <= self.num_timesteps,
                   "sample_steps", self.sample_steps,
                   f"must be in 1..num_timesteps ({self.num_timesteps})")
    schema.require(self.ddim_eta >= 0, "ddim_eta", self.ddim_eta,
                   "must be >= 0")
    schema.require(self.eval_timesteps >= 0, "eval_timesteps",
                   self.eval_timesteps, "must be >= 0 (0 = all T)")
    schema.require(self.eval_exact_timesteps >= 0, "eval_exact_timesteps",
                   self.eval_exact_timesteps, "must be >= 0")
    schema.require(0.0 <= self.dropout < 1.0, "dropout", self.dropout,
                   "must be in [0, 1)")
    schema.require(len(self.width_mult) >= 1, "width_mult", self.width_mult,
                   "must be non-empty")
    factor = 2 ** (len(self.width_mult) - 1)
    schema.require(
        self.image_shape[0] % factor == 0 and
        self.image_shape[1] % factor == 0, "image_shape", self.image_shape,
        f"must have H and W divisible by 2^(len(width_mult)-1) = {factor}"
        f" for width_mult={self.width_mult}")
    widths = sorted({self.width * m for m in self.width_mult})
    schema.require(all(w % self.num_groups == 0 for w in widths),
                   "num_groups", self.num_groups,
                   f"must divide every width * width_mult = {widths}")
    schema.require(self.num_classes >= 0, "num_classes", self.num_classes,
                   "must be >= 0")
    schema.require(0.0 <= self.label_dropout <= 1.0, "label_dropout",
                   self.label_dropout, "must be in [0, 1]")
    learned = self.variance == "learned_range"
    schema.require(not (learned and self.loss_type == "simple"), "loss_type",
                   self.loss_type,
                   'must be "hybrid" or "vlb" with variance "learned_range"'
                   " (L_simple does not train the variance)")
    schema.require(learned or self.loss_type != "hybrid", "loss_type",
                   self.loss_type,
                   'needs variance "learned_range" (the hybrid\'s bound term'
                   " trains only a learned variance)")
    schema.require(
        self.timestep_sampler != "importance" or self.loss_type != "simple",
        "timestep_sampler", self.timestep_sampler,
        'needs loss_type "vlb" or "hybrid", not "simple" (it samples'
        " the timesteps of the variational bound's terms)")
    schema.require(self.importance_history >= 1, "importance_history",
                   self.importance_history, "must be >= 1")


def default_model_config() -> ml_collections.ConfigDict:
  """``config.model`` of the diffusion family with every key at its
  default."""
  return schema.default_config(DiffusionConfig, family="diffusion")


def make_unet(cfg: DiffusionConfig) -> UNet:
  """The U-Net that a ``DiffusionConfig`` describes."""
  return UNet(width=cfg.width, width_mult=cfg.width_mult,
              num_res_blocks=cfg.num_res_blocks,
              attn_resolutions=cfg.attn_resolutions,
              dropout=cfg.dropout, num_groups=cfg.num_groups,
              num_heads=cfg.num_heads,
              resample_with_conv=cfg.resample_with_conv,
              out_channels=cfg.image_shape[-1] * (
                  2 if cfg.variance == "learned_range" else 1),
              num_classes=cfg.num_classes, dtype=DTYPES[cfg.dtype])


def make(model_config: ml_collections.ConfigDict) -> Family:
  """Builds the diffusion Family from ``config.model`` (see
  ``DiffusionConfig``)."""
  cfg = schema.parse(DiffusionConfig, model_config)
  image_shape = cfg.image_shape
  num_dims = image_shape[0] * image_shape[1] * image_shape[2]
  schedule = schedules.noise_schedule(cfg.schedule, cfg.num_timesteps,
                                      cfg.beta_start, cfg.beta_end)
  net = make_unet(cfg)
  conditional = cfg.num_classes > 0
  null_label = cfg.num_classes
  learned = cfg.variance == "learned_range"

  def model_fn(params, labels, train=False, dropout_key=None):
    """The raw network: [B, H, W, C], or [B, H, W, 2C] when learned."""
    rngs = {"dropout": dropout_key} if train else None
    return lambda x, t: net.apply({"params": params}, x, t, labels,
                                  train=train, rngs=rngs)

  def prediction_fn(params, labels):
    """The prediction channels alone (eps, x0 or v): [B, H, W, C]."""
    net_fn = model_fn(params, labels)
    return lambda x, t: objectives.split_output(net_fn(x, t),
                                                cfg.variance)[0]

  def mean_eps_fn(params, labels):
    """eps from the prediction channels (DDIM)."""
    return objectives.eps_fn_from_model(prediction_fn(params, labels),
                                        schedule, cfg.prediction)

  def eps_fn(params, labels):
    """eps, or (eps, v) with a learned variance (bound, DDPM sampler)."""
    if not learned:
      return mean_eps_fn(params, labels)
    net_fn = model_fn(params, labels)

    def fn(x, t):
      pred, v = objectives.split_output(net_fn(x, t), cfg.variance)
      eps = objectives.eps_fn_from_model(lambda *_: pred, schedule,
                                         cfg.prediction)(x, t)
      return eps, v
    return fn

  def init(key, batch):
    x = jnp.zeros((batch["image"].shape[0],) + image_shape, jnp.float32)
    t = jnp.zeros(x.shape[:1], jnp.int32)
    labels = jnp.zeros(x.shape[:1], jnp.int32) if conditional else None
    return net.init({"params": key}, x, t, labels)["params"]

  def uniform_timesteps(key, batch_size):
    return jax.random.randint(key, (batch_size,), 0, cfg.num_timesteps)

  def train_terms(params, x0, labels, t, key_noise, dropout_key=None):
    """Per-example [B] training terms at timesteps t [B] (one network
    call): "simple_loss", plus "vlb_term_bpd" unless ``loss_type`` is
    "simple"; dropout if a key."""
    noise = jax.random.normal(key_noise, x0.shape, jnp.float32)
    net_fn = model_fn(params, labels, dropout_key is not None, dropout_key)
    if cfg.loss_type == "simple":
      return {"simple_loss": objectives.simple_loss(
          net_fn, schedule, x0, t, noise, cfg.prediction)}
    return objectives.training_terms(
        net_fn, schedule, x0, t, noise, cfg.prediction, cfg.variance,
        stop_mean_gradient=cfg.loss_type == "hybrid")

  def batch_terms(params, batch, key, draw_timesteps):
    """(drawn, terms): ``drawn = draw_timesteps(key, B)``, a tuple that
    starts with the timesteps t [B], and the training terms {name: [B]} of
    the batch at t."""
    x0 = losses.scale_to_symmetric(batch["image"])  # [B, H, W, C]
    key_t, key_noise, key_drop, key_label = jax.random.split(key, 4)
    labels = None
    if conditional:
      drop = jax.random.bernoulli(key_label, cfg.label_dropout, x0.shape[:1])
      labels = jnp.where(drop, null_label, batch["label"].astype(jnp.int32))
    drawn = draw_timesteps(key_t, x0.shape[0])
    return drawn, train_terms(params, x0, labels, drawn[0], key_noise,
                              key_drop)

  def loss(params, batch, key, step):
    del step  # No schedule over training steps.
    _, terms = batch_terms(params, batch, key,
                           lambda k, n: (uniform_timesteps(k, n),))
    metrics = {name: jnp.mean(value) for name, value in terms.items()}
    if cfg.loss_type == "simple":
      value = metrics["simple_loss"]
    elif cfg.loss_type == "hybrid":
      value = (metrics["simple_loss"] +
               objectives.HYBRID_VLB_WEIGHT * metrics["vlb_term_bpd"])
    else:
      value = metrics["vlb_term_bpd"]
    return value, metrics

  def evaluate(params, batch, key):
    x0 = losses.scale_to_symmetric(batch["image"])
    labels = (jnp.full(x0.shape[:1], null_label, jnp.int32)
              if conditional else None)
    if cfg.eval_likelihood == "ode":
      out = ode.dequantized_nll(
          prediction_fn(params, labels), schedule, x0, key,
          prediction=cfg.prediction, divergence=cfg.ode_divergence,
          rtol=cfg.ode_tolerance, atol=cfg.ode_tolerance)
      return {"nll_nats": out["nll_nats"],
              "bpd": losses.bits_per_dim(out["nll_nats"], num_dims),
              "ode_steps": out["num_steps"]}
    terms = objectives.variational_bound(
        eps_fn(params, labels), schedule, x0, key, cfg.eval_timesteps,
        cfg.variance, num_exact_timesteps=cfg.eval_exact_timesteps)
    # Its own stream, so the bound's draws stay those of ``key``.
    key_t, key_noise = jax.random.split(jax.random.fold_in(key, 1))
    t = uniform_timesteps(key_t, x0.shape[0])
    return {
        **train_terms(params, x0, labels, t, key_noise),
        "nll_nats": terms["nll_nats"],
        "bpd": losses.bits_per_dim(terms["nll_nats"], num_dims),
        "prior_bpd": losses.bits_per_dim(terms["prior_nats"], num_dims),
        "diffusion_bpd": losses.bits_per_dim(terms["diffusion_nats"],
                                             num_dims),
        "decoder_bpd": losses.bits_per_dim(terms["decoder_nats"], num_dims),
        "nll_nats_estimator_var": terms["timestep_var_nats"],
        "bpd_estimator_var": terms["timestep_var_nats"] / (
            num_dims * losses.LN2) ** 2,
    }

  def guided_eps_fn(params, num, with_variance):
    """The sampler's eps_fn; (eps, v) if ``with_variance``. Guidance mixes
    eps only; v is the conditional model's."""
    make_fn = eps_fn if with_variance else mean_eps_fn
    if not conditional:
      return make_fn(params, None)
    labels = jnp.arange(num, dtype=jnp.int32) % cfg.num_classes
    cond = make_fn(params, labels)
    uncond = mean_eps_fn(params, jnp.full((num,), null_label, jnp.int32))
    w = cfg.guidance_scale

    def fn(x, t):
      out = cond(x, t)
      eps, v = out if with_variance else (out, None)
      guided = (1.0 + w) * eps - w * uncond(x, t)
      return (guided, v) if with_variance else guided
    return fn

  def run_sampler(name, params, key, num):
    shape = (num,) + image_shape
    if name == "ddpm":
      fn = guided_eps_fn(params, num, learned)
      x = samplers.ddpm_sample(fn, schedule, key, shape, cfg.sample_steps,
                               cfg.variance, cfg.clip_x0,
                               timestep_spacing=cfg.timestep_spacing)
    else:
      fn = guided_eps_fn(params, num, False)
      x = samplers.ddim_sample(fn, schedule, key, shape, cfg.sample_steps,
                               cfg.ddim_eta, cfg.clip_x0,
                               timestep_spacing=cfg.timestep_spacing)
    return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)

  def sample(params, key, num):
    return run_sampler(cfg.sampler, params, key, num)

  def visualize(params, batch, key):
    """"samplers" [len(SAMPLERS), n, H, W, C]: row i holds n <= 16 samples
    of sampler SAMPLERS[i] (ddpm, then ddim), all rows from the same x_T."""
    num = min(batch["image"].shape[0], 16)
    # The same key gives both samplers the same x_T.
    return {"samplers": jnp.stack([run_sampler(name, params, key, num)
                                   for name in SAMPLERS])}

  def importance_loss(params, loss_history, batch, key, step):
    """``loss`` at importance-sampled timesteps; stats: the timesteps and
    the unweighted per-example objectives."""
    del step
    probs = timestep_sampling.timestep_probabilities(loss_history)  # [T]
    (t, weights), terms = batch_terms(  # weights [B]: 1 / (T p_t)
        params, batch, key,
        lambda k, n: timestep_sampling.sample_timesteps(k, probs, n))
    if cfg.loss_type == "hybrid":
      objective = (terms["simple_loss"] +
                   objectives.HYBRID_VLB_WEIGHT * terms["vlb_term_bpd"])
    else:
      objective = terms["vlb_term_bpd"]
    metrics = {name: jnp.mean(weights * value)
               for name, value in terms.items()}
    metrics.update(
        importance_warm=timestep_sampling.warm_fraction(loss_history),
        importance_ess=timestep_sampling.effective_sample_fraction(probs))
    stats = {"t": t, "loss": jax.lax.stop_gradient(objective)}
    return jnp.mean(weights * objective), (metrics, stats)

  loss_state = None
  if cfg.timestep_sampler == "importance":
    loss_state = LossState(
        init=lambda: timestep_sampling.init_loss_history(
            cfg.num_timesteps, cfg.importance_history),
        loss=importance_loss,
        update=lambda loss_history, stats: (
            timestep_sampling.update_loss_history(loss_history, stats["t"],
                                                  stats["loss"])))

  return Family(init=init, loss=loss, evaluate=evaluate, sample=sample,
                visualize=visualize, loss_state=loss_state)
