"""Gaussian diffusion (DDPM / improved DDPM / DDIM) as a gm_jax family.

``make(model_config)`` builds the Family:

* ``loss``: L_simple (eps, x0 or v prediction) at a uniform timestep.
* ``evaluate``: the variational bound in nats and bits/dim of the 8-bit
  data, an upper bound on the NLL. ``model.eval_timesteps`` = 0 sums all
  T - 1 KL terms (one network call each); n > 0 uses the stratified unbiased
  estimate of that sum with n calls (``objectives.variational_bound``). The
  prior term and the discretized-Gaussian decoder term at t = 0 are always
  exact. The per-term split is returned as prior_bpd, diffusion_bpd and
  decoder_bpd.
* ``sample``: ``model.sampler`` "ddpm" (ancestral, ``model.variance``) or
  "ddim" (``model.ddim_eta``), each with ``model.sample_steps`` steps.
* ``visualize``: the same starting noise through both samplers.

With ``model.num_classes`` > 0 the network is class-conditional, trained
with labels dropped to a null token with probability ``model.label_dropout``,
and ``sample`` uses classifier-free guidance with weight
``model.guidance_scale`` (eps = (1 + w) eps(x, y) - w eps(x, null)) on labels
0, 1, 2, ... in turn; ``evaluate`` bounds the unconditional model (null
label), so its bits/dim stay comparable with unconditional models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from gm_jax import losses
from gm_jax.diffusion import objectives, samplers, schedules
from gm_jax.diffusion.unet import UNet, count_params
from gm_jax.family import Family

__all__ = ["make", "make_unet", "count_params", "set_model_defaults"]

SAMPLERS = ("ddpm", "ddim")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def set_model_defaults(model: ml_collections.ConfigDict) -> None:
  """Fills an (unlocked) ``config.model`` with every diffusion key, at the
  DDPM CIFAR-10 values; config files then override what differs."""
  model.family = "diffusion"
  model.image_shape = (32, 32, 3)
  # Forward process.
  model.schedule = "linear"  # linear | cosine
  model.num_timesteps = 1000
  model.beta_start = 1e-4  # linear schedule only
  model.beta_end = 0.02
  # Network and objective.
  model.prediction = "eps"  # eps | x0 | v
  model.ch = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.dropout = 0.1
  model.num_groups = 32
  model.num_heads = 1
  model.resample_with_conv = True
  model.dtype = "float32"  # float32 | bfloat16 (compute; params stay f32)
  # Class conditioning with classifier-free guidance (0 = unconditional).
  model.num_classes = 0
  model.label_dropout = 0.1
  model.guidance_scale = 1.0
  # Reverse process, evaluation and sampling.
  model.variance = "fixed_small"  # fixed_small | fixed_large
  model.eval_timesteps = 0  # 0: all T KL terms; n: stratified estimate
  model.sampler = "ddim"  # ddpm | ddim
  model.sample_steps = 50
  model.ddim_eta = 0.0
  model.clip_x0 = True  # clip predicted x_0 to [-1, 1] when sampling


def _validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the offending config.model key."""
  def need(cond, message):
    if not cond:
      raise ValueError(f"Invalid diffusion config: model.{message}")

  shape = tuple(cfg.image_shape)
  need(len(shape) == 3, f"image_shape={shape} must be (H, W, C).")
  need(cfg.schedule in schedules.SCHEDULES,
       f"schedule={cfg.schedule!r}, expected one of {schedules.SCHEDULES}.")
  need(cfg.num_timesteps >= 2,
       f"num_timesteps={cfg.num_timesteps} must be >= 2.")
  need(cfg.prediction in objectives.PREDICTIONS,
       f"prediction={cfg.prediction!r}, expected one of"
       f" {objectives.PREDICTIONS}.")
  need(cfg.variance in schedules.VARIANCES,
       f"variance={cfg.variance!r}, expected one of {schedules.VARIANCES}.")
  need(cfg.sampler in SAMPLERS,
       f"sampler={cfg.sampler!r}, expected one of {SAMPLERS}.")
  need(1 <= cfg.sample_steps <= cfg.num_timesteps,
       f"sample_steps={cfg.sample_steps} must be in 1..num_timesteps"
       f" ({cfg.num_timesteps}).")
  need(cfg.ddim_eta >= 0, f"ddim_eta={cfg.ddim_eta} must be >= 0.")
  need(cfg.eval_timesteps >= 0,
       f"eval_timesteps={cfg.eval_timesteps} must be >= 0 (0 = all T).")
  need(cfg.dtype in DTYPES,
       f"dtype={cfg.dtype!r}, expected one of {tuple(DTYPES)}.")
  need(0.0 <= cfg.dropout < 1.0, f"dropout={cfg.dropout} must be in [0, 1).")
  need(len(tuple(cfg.ch_mult)) >= 1, "ch_mult must be non-empty.")
  factor = 2 ** (len(tuple(cfg.ch_mult)) - 1)
  need(shape[0] % factor == 0 and shape[1] % factor == 0,
       f"image_shape={shape}: H and W must be divisible by 2^(len(ch_mult)-1)"
       f" = {factor} for ch_mult={tuple(cfg.ch_mult)}.")
  widths = {cfg.ch * m for m in cfg.ch_mult}
  need(all(w % cfg.num_groups == 0 for w in widths),
       f"num_groups={cfg.num_groups} must divide every width ch * ch_mult ="
       f" {sorted(widths)}.")
  need(cfg.num_classes >= 0, f"num_classes={cfg.num_classes} must be >= 0.")
  need(0.0 <= cfg.label_dropout <= 1.0,
       f"label_dropout={cfg.label_dropout} must be in [0, 1].")


def make_unet(cfg: ml_collections.ConfigDict) -> UNet:
  """The U-Net described by a diffusion ``config.model``."""
  return UNet(ch=cfg.ch, ch_mult=tuple(cfg.ch_mult),
              num_res_blocks=cfg.num_res_blocks,
              attn_resolutions=tuple(cfg.attn_resolutions),
              dropout=cfg.dropout, num_groups=cfg.num_groups,
              num_heads=cfg.num_heads,
              resample_with_conv=cfg.resample_with_conv,
              out_channels=tuple(cfg.image_shape)[-1],
              num_classes=cfg.num_classes, dtype=DTYPES[cfg.dtype])


def make(model_config: ml_collections.ConfigDict) -> Family:
  """Builds the diffusion Family from ``config.model`` (see module doc)."""
  cfg = model_config
  _validate(cfg)
  image_shape = tuple(cfg.image_shape)
  num_dims = image_shape[0] * image_shape[1] * image_shape[2]
  schedule = schedules.get_schedule(cfg.schedule, cfg.num_timesteps,
                                    cfg.beta_start, cfg.beta_end)
  net = make_unet(cfg)
  conditional = cfg.num_classes > 0
  null_label = cfg.num_classes

  def model_fn(params, labels, train=False, dropout_key=None):
    rngs = {"dropout": dropout_key} if train else None
    return lambda x, t: net.apply({"params": params}, x, t, labels,
                                  train=train, rngs=rngs)

  def eps_fn(params, labels):
    return objectives.eps_fn_from_model(model_fn(params, labels), schedule,
                                        cfg.prediction)

  def init(key, batch):
    x = jnp.zeros((batch["image"].shape[0],) + image_shape, jnp.float32)
    t = jnp.zeros(x.shape[:1], jnp.int32)
    labels = jnp.zeros(x.shape[:1], jnp.int32) if conditional else None
    return net.init({"params": key}, x, t, labels)["params"]

  def loss(params, batch, key, step):
    del step  # L_simple has no schedule over training steps.
    x0 = losses.scale_to_symmetric(batch["image"])  # [B, H, W, C]
    key_t, key_noise, key_drop, key_label = jax.random.split(key, 4)
    b = x0.shape[0]
    t = jax.random.randint(key_t, (b,), 0, cfg.num_timesteps)
    noise = jax.random.normal(key_noise, x0.shape, jnp.float32)
    labels = None
    if conditional:
      drop = jax.random.bernoulli(key_label, cfg.label_dropout, (b,))
      labels = jnp.where(drop, null_label, batch["label"].astype(jnp.int32))
    per_example = objectives.simple_loss(
        model_fn(params, labels, True, key_drop), schedule, x0, t, noise,
        cfg.prediction)
    value = jnp.mean(per_example)
    return value, {"loss": value}

  def evaluate(params, batch, key):
    x0 = losses.scale_to_symmetric(batch["image"])
    labels = (jnp.full(x0.shape[:1], null_label, jnp.int32)
              if conditional else None)
    terms = objectives.variational_bound(
        eps_fn(params, labels), schedule, x0, key, cfg.eval_timesteps,
        cfg.variance)
    return {
        "nll_nats": terms["nll_nats"],
        "bpd": losses.bits_per_dim(terms["nll_nats"], num_dims),
        "prior_bpd": losses.bits_per_dim(terms["prior_nats"], num_dims),
        "diffusion_bpd": losses.bits_per_dim(terms["diffusion_nats"],
                                             num_dims),
        "decoder_bpd": losses.bits_per_dim(terms["decoder_nats"], num_dims),
    }

  def guided_eps_fn(params, num):
    if not conditional:
      return eps_fn(params, None)
    labels = jnp.arange(num, dtype=jnp.int32) % cfg.num_classes
    cond = eps_fn(params, labels)
    uncond = eps_fn(params, jnp.full((num,), null_label, jnp.int32))
    w = cfg.guidance_scale
    return lambda x, t: (1.0 + w) * cond(x, t) - w * uncond(x, t)

  def run_sampler(name, params, key, num):
    shape = (num,) + image_shape
    fn = guided_eps_fn(params, num)
    if name == "ddpm":
      x = samplers.ddpm_sample(fn, schedule, key, shape, cfg.sample_steps,
                               cfg.variance, cfg.clip_x0)
    else:
      x = samplers.ddim_sample(fn, schedule, key, shape, cfg.sample_steps,
                               cfg.ddim_eta, cfg.clip_x0)
    return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)

  def sample(params, key, num):
    return run_sampler(cfg.sampler, params, key, num)

  def visualize(params, batch, key):
    num = min(batch["image"].shape[0], 16)
    # The same key gives both samplers the same x_T.
    return {f"samples_{name}": run_sampler(name, params, key, num)
            for name in SAMPLERS}

  return Family(init=init, loss=loss, evaluate=evaluate, sample=sample,
                visualize=visualize)
