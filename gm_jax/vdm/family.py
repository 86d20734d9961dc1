"""The variational diffusion model (Kingma et al., 2021) as a gm_jax family.

``make(model_config)`` builds the Family from the ``VDMConfig``:

* ``loss``: the negative ELBO in bits/dim of the 8-bit data, averaged over
  the batch: prior + reconstruction + diffusion term (``bound``), the
  diffusion term at one t per example, drawn antithetically over the batch,
  in continuous time (``train_timesteps`` = 0) or with T steps. A learned
  schedule's endpoints get the gradient of the bound; with
  ``schedule_gradient`` = "variance" the shape of the "learned" schedule
  between them gets the gradient of the squared diffusion term, i.e. it is
  trained to minimise the estimator's variance (``bound.variance_gradient``).
  That is exact in continuous time, where the bound does not depend on the
  shape; with T steps it does, and "variance" then trades some bound for
  variance ("bound" is the choice for T-step training).
  Logged: bpd, prior_bpd, recon_bpd, diffusion_bpd and the endpoints
  gamma_0 = -log SNR_max, gamma_1 = -log SNR_min.
* ``evaluate``: the same bound per example (``bound.variational_bound``),
  continuous (``eval_timesteps`` = 0) or T-step, with
  ``eval_time_samples`` draws of t per example (two independent stratified
  halves); the three terms in bits/dim sum to ``bpd``. With more than one
  draw the diffusion term's estimator variance is reported
  (``*_estimator_var``, unbiased from the halves' difference).
* ``sample``: ``sample_steps``-step ancestral sampling, then the decoder's
  most likely level (``sample_decode`` = "argmax") or a draw of it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from gm_jax import losses, schema
from gm_jax.diffusion import layers
from gm_jax.family import Family
from gm_jax.vdm import bound
from gm_jax.vdm.network import ScoreNet

SCHEDULES = ("fixed_linear", "learned_linear", "learned")
SCHEDULE_GRADIENTS = ("variance", "bound")
DECODES = ("argmax", "sample")


@dataclasses.dataclass(frozen=True)
class VDMConfig(schema.ModelConfig):
  """``config.model`` of the VDM family; the defaults are the paper's
  CIFAR-10 model (Kingma et al., 2021, Appendix B).

  Attributes:
    image_shape: (H, W, C) of the data.
    schedule: gamma(t) = -log SNR(t): "fixed_linear" (gamma_min +
      (gamma_max - gamma_min) t), "learned_linear" (linear with learned
      endpoints) or "learned" (the monotone network with learned
      endpoints, ``bound.monotone_shape``).
    gamma_min, gamma_max: gamma(0) and gamma(1) of the fixed schedule, the
      learned ones' initial endpoints, and the range the network's time
      embedding maps to [0, 1].
    schedule_units: sigmoid units of the "learned" schedule's network.
    schedule_gradient: "variance": the "learned" schedule's shape is
      trained to minimise the diffusion term's variance (its endpoints
      follow the bound); "bound": every parameter follows the bound.
    width: channels of the network's blocks.
    num_blocks: ResNet blocks before the middle (num_blocks + 1 after).
    num_groups: GroupNorm groups; must divide width.
    num_heads: heads of the middle attention; must divide width.
    dropout: dropout rate in the ResNet blocks.
    fourier_exponents: n of the Fourier features sin / cos(2 pi 2^n z_t)
      appended to the network's input; () for none.
    antithetic_time: draw the batch's t with the low-discrepancy sampler.
    train_timesteps: 0 trains the continuous-time bound, T > 0 the T-step.
    eval_timesteps: 0 evaluates the continuous-time bound, T > 0 the
      T-step one.
    eval_time_samples: draws of t per example in ``evaluate``: 1, or an
      even number (two independent stratified halves, whose difference
      estimates the estimator's variance).
    sample_steps: steps of the ancestral sampler.
    sample_decode: "argmax" (the decoder's most likely level) or "sample".
    scan_layers: the blocks before and after the middle as two
      ``flax.linen.scan``s with stacked parameters (``ScoreNet.scan_blocks``):
      the same function and parameter count, compiled once per scan.
    dtype: the network's computation dtype, "float32" or "bfloat16"
      (parameters, the schedule and the bound stay float32).
  """

  image_shape: tuple[int, int, int] = (32, 32, 3)
  schedule: str = schema.choice("learned", SCHEDULES)
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  schedule_units: int = 1024
  schedule_gradient: str = schema.choice("variance", SCHEDULE_GRADIENTS)
  width: int = 128
  num_blocks: int = 32
  num_groups: int = 32
  num_heads: int = 1
  dropout: float = 0.1
  fourier_exponents: tuple[int, ...] = (6, 7)
  antithetic_time: bool = True
  train_timesteps: int = 0
  eval_timesteps: int = 0
  eval_time_samples: int = 1
  sample_steps: int = 1000
  sample_decode: str = schema.choice("argmax", DECODES)
  scan_layers: bool = False
  dtype: str = schema.choice("float32", tuple(layers.DTYPES))

  def validate(self):
    schema.require(self.gamma_max > self.gamma_min, "gamma_max",
                   self.gamma_max, f"must exceed gamma_min={self.gamma_min}")
    schema.require(self.schedule_units >= 1, "schedule_units",
                   self.schedule_units, "must be >= 1")
    schema.require(self.width >= 1 and self.width % self.num_groups == 0,
                   "width", self.width,
                   f"must be a positive multiple of num_groups="
                   f"{self.num_groups}")
    schema.require(self.width % self.num_heads == 0, "num_heads",
                   self.num_heads, f"must divide width={self.width}")
    schema.require(self.num_blocks >= 0, "num_blocks", self.num_blocks,
                   "must be >= 0")
    schema.require(not self.scan_layers or self.num_blocks >= 1,
                   "scan_layers", self.scan_layers,
                   "needs num_blocks >= 1 (there is nothing to scan)")
    schema.require(0.0 <= self.dropout < 1.0, "dropout", self.dropout,
                   "must be in [0, 1)")
    schema.require(all(isinstance(n, int) for n in self.fourier_exponents),
                   "fourier_exponents", self.fourier_exponents,
                   "must be integers")
    for key in ("train_timesteps", "eval_timesteps"):
      schema.require(getattr(self, key) >= 0, key, getattr(self, key),
                     "must be >= 0 (0 = continuous time)")
    schema.require(
        self.eval_time_samples == 1 or (self.eval_time_samples >= 2
                                        and self.eval_time_samples % 2 == 0),
        "eval_time_samples", self.eval_time_samples,
        "must be 1 or even (two independent halves)")
    schema.require(self.sample_steps >= 1, "sample_steps", self.sample_steps,
                   "must be >= 1")


def default_model_config() -> ml_collections.ConfigDict:
  """``config.model`` of the VDM family with every key at its default."""
  return schema.default_config(VDMConfig, family="vdm")


class VDM:
  """The model's functions for one ``VDMConfig``. Parameters are
  {"net": the ScoreNet's, "schedule": the learned schedule's (absent for
  "fixed_linear")}."""

  def __init__(self, cfg: VDMConfig):
    self.cfg = cfg
    self.num_dims = (cfg.image_shape[0] * cfg.image_shape[1]
                     * cfg.image_shape[2])
    self.net = ScoreNet(width=cfg.width, num_blocks=cfg.num_blocks,
                        num_groups=cfg.num_groups, num_heads=cfg.num_heads,
                        dropout=cfg.dropout,
                        fourier_exponents=cfg.fourier_exponents,
                        gamma_range=(cfg.gamma_min, cfg.gamma_max),
                        scan_blocks=cfg.scan_layers,
                        dtype=layers.DTYPES[cfg.dtype])

  @property
  def variance_trained(self) -> bool:
    """Whether the schedule's shape follows the variance's gradient."""
    return (self.cfg.schedule == "learned"
            and self.cfg.schedule_gradient == "variance")

  def init(self, key, batch):
    """Parameters; the batch fixes the image shape."""
    key_net, key_schedule = jax.random.split(key)
    z = jnp.zeros((1,) + tuple(batch["image"].shape[1:]), jnp.float32)
    params = {"net": self.net.init({"params": key_net}, z,
                                   jnp.zeros((1,), jnp.float32))["params"]}
    if self.cfg.schedule != "fixed_linear":
      params["schedule"] = bound.init_schedule(
          key_schedule, self.cfg.schedule, self.cfg.gamma_min,
          self.cfg.gamma_max, self.cfg.schedule_units)
    return params

  def gamma_fn(self, params) -> bound.GammaFn:
    """t -> gamma(t) under ``params``."""
    if self.cfg.schedule == "fixed_linear":
      return lambda t: bound.fixed_linear_gamma(t, self.cfg.gamma_min,
                                                self.cfg.gamma_max)
    return lambda t: bound.learned_gamma(params["schedule"], t)

  def eps_fn(self, net_params, dropout_key=None) -> bound.EpsFn:
    """(z_t, gamma_t) -> eps_hat; dropout on when a key is given."""
    train = dropout_key is not None
    rngs = {"dropout": dropout_key} if train else None
    return lambda z, gamma_t: self.net.apply(
        {"params": net_params}, z, gamma_t, train=train, rngs=rngs)

  def _endpoint_gammas(self, params):
    if self.cfg.schedule == "fixed_linear":
      return jnp.float32(self.cfg.gamma_min), jnp.float32(self.cfg.gamma_max)
    return bound.endpoints(params["schedule"])

  def _diffusion_nats(self, net_params, gammas, x, eps, dropout_key):
    """The diffusion term [B] from gamma values: (gamma_t, gamma'(t)) in
    continuous time, (gamma_t, gamma_s) with T steps."""
    first, second = gammas
    eps_hat = self.eps_fn(net_params, dropout_key)(
        bound.diffuse(x, first, eps), first)
    T = self.cfg.train_timesteps  # noqa: N806
    if T > 0:
      return bound.discrete_diffusion_loss(eps, eps_hat, first, second, T)
    return bound.continuous_diffusion_loss(eps, eps_hat, second)

  def diffusion_bpd(self, params, x, t, eps, dropout_key):
    """The training diffusion term per example [B] in bits/dim at times t.

    Its value is the bound's term; with ``variance_trained`` its gradient
    for the schedule's shape parameters is that of the squared term.
    """
    T = self.cfg.train_timesteps  # noqa: N806
    if T > 0:
      t = bound.discretize_times(t, T)
    if not self.variance_trained:
      gamma_fn = self.gamma_fn(params)
      gammas = (gamma_fn(t), gamma_fn(t - 1.0 / T)) if T > 0 else (
          bound.gamma_and_rate(gamma_fn, t))
      nats = self._diffusion_nats(params["net"], gammas, x, eps, dropout_key)
      return losses.bits_per_dim(nats, self.num_dims)

    schedule = params["schedule"]
    shape_fn = lambda u: bound.monotone_shape(schedule["shape"], u)  # noqa: E731
    # Per example: (s(t), s'(t)) in continuous time, (s(t), s(t - 1/T)).
    shape_values = (shape_fn(t), shape_fn(t - 1.0 / T)) if T > 0 else (
        jax.jvp(shape_fn, (t,), (jnp.ones_like(t),)))
    plain = {"net": params["net"],
             "ends": {"gamma_0": schedule["gamma_0"],
                      "gap": schedule["gap"]}}

    def loss_fn(plain, shape_values, aux):
      x, eps, dropout_data = aux
      gamma_0, gamma_1 = bound.endpoints(plain["ends"])
      span = gamma_1 - gamma_0
      first = gamma_0 + span * shape_values[0]
      second = (gamma_0 + span * shape_values[1] if T > 0
                else span * shape_values[1])
      nats = self._diffusion_nats(
          plain["net"], (first, second), x, eps,
          None if dropout_data is None
          else jax.random.wrap_key_data(dropout_data))
      return losses.bits_per_dim(nats, self.num_dims)

    dropout_data = (None if dropout_key is None
                    else jax.random.key_data(dropout_key))
    return bound.variance_gradient(loss_fn, plain, shape_values,
                                   (x, eps, dropout_data))

  def loss(self, params, batch, key, step):
    """The batch's mean negative ELBO in bits/dim, and its terms."""
    del step  # no schedule over training steps
    x_int = batch["image"]
    x = losses.scale_to_symmetric(x_int)
    batch_size = x.shape[0]
    key_0, key_t, key_eps, key_drop = jax.random.split(key, 4)
    gamma_0, gamma_1 = self._endpoint_gammas(params)
    prior = bound.prior_kl(x, gamma_1)
    z_0 = bound.diffuse(x, jnp.broadcast_to(gamma_0, (batch_size,)),
                        jax.random.normal(key_0, x.shape))
    recon = bound.reconstruction_nll(x_int, z_0, gamma_0)
    t = bound.diffusion_times(key_t, batch_size, self.cfg.antithetic_time)
    eps = jax.random.normal(key_eps, x.shape)
    diffusion = self.diffusion_bpd(params, x, t, eps, key_drop)
    prior_bpd = losses.bits_per_dim(prior, self.num_dims)
    recon_bpd = losses.bits_per_dim(recon, self.num_dims)
    value = jnp.mean(prior_bpd + recon_bpd + diffusion)
    return value, {
        "bpd": value, "prior_bpd": jnp.mean(prior_bpd),
        "recon_bpd": jnp.mean(recon_bpd),
        "diffusion_bpd": jnp.mean(diffusion),
        "gamma_0": gamma_0, "gamma_1": gamma_1}

  def evaluate(self, params, batch, key):
    """Per-example bound and its terms ({name: [B]})."""
    cfg = self.cfg
    terms = bound.variational_bound(
        self.eps_fn(params["net"]), self.gamma_fn(params), batch["image"],
        key, cfg.eval_timesteps, cfg.eval_time_samples)
    bpd = lambda nats: losses.bits_per_dim(nats, self.num_dims)  # noqa: E731
    batch_size = batch["image"].shape[0]
    gamma_0, gamma_1 = self._endpoint_gammas(params)
    out = {"nll_nats": terms["nll_nats"], "bpd": bpd(terms["nll_nats"]),
           "prior_bpd": bpd(terms["prior_nats"]),
           "recon_bpd": bpd(terms["recon_nats"]),
           "diffusion_bpd": bpd(terms["diffusion_nats"]),
           "gamma_0": jnp.broadcast_to(gamma_0, (batch_size,)),
           "gamma_1": jnp.broadcast_to(gamma_1, (batch_size,))}
    if "diffusion_var_nats" in terms:
      var = terms["diffusion_var_nats"]
      out["nll_nats_estimator_var"] = var
      out["bpd_estimator_var"] = var / (self.num_dims * losses.LN2) ** 2
    return out

  def sample(self, params, key, num):
    """[num, H, W, C] float32 images in [0, 1]."""
    levels = bound.ancestral_sample(
        self.eps_fn(params["net"]), self.gamma_fn(params), key,
        (num,) + tuple(self.cfg.image_shape), self.cfg.sample_steps,
        self.cfg.sample_decode)
    return levels.astype(jnp.float32) / (losses.PIXEL_VALUES - 1)


def make(model_config: ml_collections.ConfigDict) -> Family:
  """Builds the VDM Family from ``config.model`` (see ``VDMConfig``)."""
  model = VDM(schema.parse(VDMConfig, model_config))
  return Family(init=model.init, loss=model.loss, evaluate=model.evaluate,
                sample=model.sample)
