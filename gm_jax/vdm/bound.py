"""The variational diffusion model's maths as pure functions (Kingma et al., 2021).

Notation. Data x in [-1, 1] (8-bit levels k scaled by
``losses.scale_to_symmetric``), time t in [0, 1], and the noise schedule
gamma(t) = -log SNR(t), increasing in t. The forward process is
variance-preserving:

  q(z_t | x) = N(alpha_t x, sigma_t^2 I),
  alpha_t^2 = sigmoid(-gamma(t)),  sigma_t^2 = sigmoid(gamma(t)),

so SNR(t) = alpha_t^2 / sigma_t^2 = exp(-gamma(t)). The negative ELBO of one
image (an upper bound on -log p(x) of the discrete data, in nats) has three
terms:

* prior: KL(q(z_1 | x) || N(0, I)) (``prior_kl``);
* reconstruction: E_{q(z_0|x)} -log p(x | z_0), a per-pixel categorical over
  the 256 levels (``reconstruction_nll``);
* diffusion: in continuous time (T -> infinity)
  0.5 E_{t ~ U(0,1), eps} gamma'(t) ||eps - eps_hat(z_t, t)||^2
  (``continuous_diffusion_loss``), or with T steps
  0.5 T E_{i ~ U{1..T}, eps} (exp(gamma(t_i) - gamma(t_{i-1})) - 1)
  ||eps - eps_hat(z_{t_i}, t_i)||^2, t_i = i / T
  (``discrete_diffusion_loss``).

Also here: low-discrepancy draws of t (``diffusion_times``), the monotone
schedules (``fixed_linear_gamma``, ``learned_gamma``), the gradient that
trains a schedule to lower the estimator's variance
(``variance_gradient``) and the T-step ancestral sampler
(``ancestral_sample``). Every function returns per-example values; nothing
is averaged over the batch.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gm_jax import losses

Array = jax.Array
# eps_fn(z_t [B, H, W, C], gamma_t [B]) -> eps_hat [B, H, W, C]
EpsFn = Callable[[Array, Array], Array]
# gamma_fn(t [B]) -> gamma(t) [B], differentiable in t.
GammaFn = Callable[[Array], Array]


# ----------------------------------------------------------------------------
# Noise schedules gamma(t) = -log SNR(t).


def fixed_linear_gamma(t: Array, gamma_min: float = -13.3,
                       gamma_max: float = 5.0) -> Array:
  """gamma(t) = gamma_min + (gamma_max - gamma_min) t, linear in log-SNR.

  The paper's fixed schedule: SNR falls from exp(13.3) at t = 0 to exp(-5)
  at t = 1.
  """
  return gamma_min + (gamma_max - gamma_min) * t


def softplus_inverse(y: float) -> float:
  """The x with softplus(x) = log(1 + e^x) = y > 0."""
  return float(y + np.log(-np.expm1(-y)))


def init_schedule(key: Array, kind: str, gamma_min: float, gamma_max: float,
                  hidden: int) -> dict[str, Any]:
  """Parameters of a learned schedule: its endpoints, and for "learned" the
  monotone network's shape (see ``learned_gamma``).

  Args:
    key: PRNG key for the network's weights.
    kind: "learned_linear" (endpoints only) or "learned".
    gamma_min, gamma_max: the initial gamma(0) < gamma(1).
    hidden: sigmoid units of the monotone network.

  Returns:
    {"gamma_0": [], "gap": [] (gamma(1) = gamma_0 + softplus(gap)),
    "shape": {...} for "learned"}.
  """
  if gamma_max <= gamma_min:
    raise ValueError(f"init_schedule: gamma_max={gamma_max} must exceed"
                     f" gamma_min={gamma_min}.")
  params = {"gamma_0": jnp.asarray(gamma_min, jnp.float32),
            "gap": jnp.asarray(softplus_inverse(gamma_max - gamma_min),
                               jnp.float32)}
  if kind == "learned":
    k_scale, k_weight, k_bias = jax.random.split(key, 3)
    params["shape"] = {
        # softplus(slope) = 1: the linear part starts at unit slope.
        "slope": jnp.asarray(softplus_inverse(1.0), jnp.float32),
        "scale": jax.random.normal(k_scale, (hidden,), jnp.float32),
        "weight": jax.random.normal(k_weight, (hidden,), jnp.float32),
        "bias": jax.random.normal(k_bias, (hidden,), jnp.float32),
    }
  return params


def monotone_shape(shape_params: Optional[dict[str, Array]],
                   t: Array) -> Array:
  """The schedule's shape s(t), increasing from s(0) = 0 to s(1) = 1.

  With no parameters s(t) = t. Otherwise the paper's monotone network: a
  linear layer plus a layer of H sigmoid units, every weight kept positive
  by a softplus,

    h(t) = softplus(a) t + (1/H) sum_j softplus(c_j)
           sigmoid(softplus(w_j) (2t - 1) + b_j),

  which is strictly increasing (softplus(a) > 0, each unit non-decreasing),
  rescaled to s(t) = (h(t) - h(0)) / (h(1) - h(0)).

  Args:
    shape_params: None, or {"slope": [], "scale": [H], "weight": [H],
      "bias": [H]}.
    t: times, any shape.

  Returns:
    s(t), the shape of t.
  """
  if shape_params is None:
    return t

  def h(u):
    units = jax.nn.sigmoid(
        jax.nn.softplus(shape_params["weight"]) * (2.0 * u[..., None] - 1.0)
        + shape_params["bias"])  # [..., H]
    return (jax.nn.softplus(shape_params["slope"]) * u
            + jnp.mean(jax.nn.softplus(shape_params["scale"]) * units, -1))

  h0 = h(jnp.zeros((), t.dtype))
  h1 = h(jnp.ones((), t.dtype))
  return (h(t) - h0) / (h1 - h0)


def endpoints(schedule_params: dict[str, Array]) -> tuple[Array, Array]:
  """(gamma(0), gamma(1)) of a learned schedule; gamma(1) > gamma(0) for
  every parameter value."""
  gamma_0 = schedule_params["gamma_0"]
  return gamma_0, gamma_0 + jax.nn.softplus(schedule_params["gap"])


def learned_gamma(schedule_params: dict[str, Array], t: Array) -> Array:
  """gamma(t) = gamma(0) + (gamma(1) - gamma(0)) s(t) with learned endpoints
  and the shape s of ``monotone_shape`` (s(t) = t without a "shape" entry:
  the linear schedule with learned endpoints)."""
  gamma_0, gamma_1 = endpoints(schedule_params)
  return gamma_0 + (gamma_1 - gamma_0) * monotone_shape(
      schedule_params.get("shape"), t)


def gamma_and_rate(gamma_fn: GammaFn, t: Array) -> tuple[Array, Array]:
  """(gamma(t), gamma'(t)), the derivative by forward-mode autodiff."""
  return jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))


def alpha_sigma(gamma: Array) -> tuple[Array, Array]:
  """(alpha, sigma) with alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma)."""
  return jnp.sqrt(jax.nn.sigmoid(-gamma)), jnp.sqrt(jax.nn.sigmoid(gamma))


def _per_example(v: Array, like: Array) -> Array:
  """[B] -> [B, 1, 1, ...] broadcasting against ``like``."""
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def diffuse(x: Array, gamma_t: Array, eps: Array) -> Array:
  """z_t = alpha_t x + sigma_t eps, a draw of q(z_t | x).

  Args: x, eps [B, ...]; gamma_t [B]. Returns [B, ...].
  """
  alpha, sigma = alpha_sigma(_per_example(gamma_t, x))
  return alpha * x + sigma * eps


# ----------------------------------------------------------------------------
# The three terms of the bound, in nats per example.


def prior_kl(x: Array, gamma_1: Array) -> Array:
  """KL(q(z_1 | x) || N(0, I)) per example, in nats.

  KL = 0.5 sum_i (alpha_1^2 x_i^2 + sigma_1^2 - log sigma_1^2 - 1).

  Args:
    x: [B, ...] data in [-1, 1].
    gamma_1: gamma(1), a scalar or [B].

  Returns:
    [B].
  """
  gamma_1 = _per_example(jnp.broadcast_to(gamma_1, x.shape[:1]), x)
  alpha_sq = jax.nn.sigmoid(-gamma_1)
  kl = 0.5 * (alpha_sq * jnp.square(x) + jax.nn.sigmoid(gamma_1)
              - jax.nn.log_sigmoid(gamma_1) - 1.0)
  return losses.sum_except_batch(jnp.broadcast_to(kl, x.shape))


def decoder_log_probs(z_0: Array, gamma_0: Array,
                      num_bins: int = losses.PIXEL_VALUES) -> Array:
  """log p(x = k | z_0) for every level k, per element.

  The decoder puts on each level x_k (scaled to [-1, 1]) the mass of a
  Gaussian N(z_0 / alpha_0, exp(gamma_0)) at x_k, normalised over the levels:

    log p(k | z_0) = log softmax_k(-(z_0 / alpha_0 - x_k)^2 / (2 exp(gamma_0))),

  the variance exp(gamma_0) = sigma_0^2 / alpha_0^2 of q(z_0 / alpha_0 | x).
  Exact when the pixels are independent given z_0, which they nearly are
  for small gamma_0.

  Args:
    z_0: [B, ...] latents at t = 0.
    gamma_0: gamma(0), a scalar or [B].
    num_bins: levels of the data.

  Returns:
    [B, ..., num_bins] log-probabilities.
  """
  gamma_0 = _per_example(jnp.broadcast_to(gamma_0, z_0.shape[:1]), z_0)
  alpha_0, _ = alpha_sigma(gamma_0)
  levels = losses.scale_to_symmetric(jnp.arange(num_bins), num_bins)  # [K]
  diff = (z_0 / alpha_0)[..., None] - levels  # [B, ..., K]
  logits = -0.5 * jnp.square(diff) * jnp.exp(-gamma_0)[..., None]
  return jax.nn.log_softmax(logits, axis=-1)


def reconstruction_nll(x_int: Array, z_0: Array, gamma_0: Array) -> Array:
  """-log p(x | z_0) per example, in nats (``decoder_log_probs``).

  Args:
    x_int: [B, ...] integer levels in 0..255.
    z_0: [B, ...] a draw of q(z_0 | x).
    gamma_0: gamma(0), a scalar or [B].

  Returns:
    [B].
  """
  log_probs = decoder_log_probs(z_0, gamma_0)
  return -losses.sum_except_batch(
      losses.categorical_log_prob(x_int, log_probs))


def continuous_diffusion_loss(eps: Array, eps_hat: Array,
                              gamma_rate: Array) -> Array:
  """The continuous-time diffusion term for one t per example, in nats.

  L_inf = 0.5 gamma'(t) ||eps - eps_hat||^2: with t ~ U(0, 1) its mean is
  -0.5 int_0^1 SNR'(t) ||x - x_hat(z_t)||^2 dt, the T -> infinity limit of
  ``discrete_diffusion_loss``.

  Args:
    eps, eps_hat: [B, ...] the noise and its prediction.
    gamma_rate: [B] gamma'(t).

  Returns:
    [B].
  """
  return 0.5 * gamma_rate * losses.sum_except_batch(jnp.square(eps - eps_hat))


def discrete_diffusion_loss(eps: Array, eps_hat: Array, gamma_t: Array,
                            gamma_s: Array, num_timesteps: int) -> Array:
  """The T-step diffusion term for one step per example, in nats.

  With s = t - 1/T, the step's KL(q(z_s | z_t, x) || p(z_s | z_t)) is
  0.5 (SNR(s) - SNR(t)) ||x - x_hat||^2 = 0.5 (exp(gamma_t - gamma_s) - 1)
  ||eps - eps_hat||^2; the sum over the T steps is estimated by T times one
  uniformly drawn step:

    L_T = 0.5 T expm1(gamma_t - gamma_s) ||eps - eps_hat||^2.

  Args:
    eps, eps_hat: [B, ...].
    gamma_t, gamma_s: [B] gamma at t and at s = t - 1/T.
    num_timesteps: T.

  Returns:
    [B].
  """
  return (0.5 * num_timesteps * jnp.expm1(gamma_t - gamma_s)
          * losses.sum_except_batch(jnp.square(eps - eps_hat)))


def diffusion_times(key: Array, batch_size: int,
                    antithetic: bool = True) -> Array:
  """t for each example of a batch, uniform on [0, 1).

  ``antithetic``: the paper's low-discrepancy draw, t_i = (u + i / B) mod 1
  with one u ~ U(0, 1): each t_i is uniform and together they cover [0, 1)
  evenly, which lowers the variance of the batch's mean loss. Otherwise
  independent draws.

  Returns:
    [B] float32.
  """
  if antithetic:
    u = jax.random.uniform(key, ())
    return jnp.mod(u + jnp.arange(batch_size, dtype=jnp.float32) / batch_size,
                   1.0)
  return jax.random.uniform(key, (batch_size,))


def discretize_times(t: Array, num_timesteps: int) -> Array:
  """Maps t in [0, 1) to the grid {1/T, ..., 1}: ceil(t T) / T, at least
  1/T; uniform t gives a uniform step."""
  return jnp.maximum(jnp.ceil(t * num_timesteps), 1.0) / num_timesteps


def diffusion_loss(eps_fn: EpsFn, gamma_fn: GammaFn, x: Array, t: Array,
                   eps: Array, num_timesteps: int = 0) -> Array:
  """The diffusion term at given times, in nats per example.

  Args:
    eps_fn: eps_fn(z_t, gamma_t) -> eps_hat.
    gamma_fn: the schedule, differentiable in t.
    x: [B, ...] data in [-1, 1].
    t: [B] times in [0, 1) (mapped to the grid when num_timesteps > 0).
    eps: [B, ...] standard normal noise.
    num_timesteps: 0 for continuous time, T > 0 for the T-step bound.

  Returns:
    [B] ``continuous_diffusion_loss`` or ``discrete_diffusion_loss``.
  """
  if num_timesteps > 0:
    t = discretize_times(t, num_timesteps)
    gamma_t = gamma_fn(t)
    gamma_s = gamma_fn(t - 1.0 / num_timesteps)
    eps_hat = eps_fn(diffuse(x, gamma_t, eps), gamma_t)
    return discrete_diffusion_loss(eps, eps_hat, gamma_t, gamma_s,
                                   num_timesteps)
  gamma_t, gamma_rate = gamma_and_rate(gamma_fn, t)
  eps_hat = eps_fn(diffuse(x, gamma_t, eps), gamma_t)
  return continuous_diffusion_loss(eps, eps_hat, gamma_rate)


def variational_bound(eps_fn: EpsFn, gamma_fn: GammaFn, x_int: Array,
                      key: Array, num_timesteps: int = 0,
                      time_samples: int = 1) -> dict[str, Array]:
  """The negative ELBO of 8-bit images, per example, in nats.

  nll <= prior + reconstruction + diffusion (the module docstring's terms).
  The diffusion term averages ``time_samples`` = K draws of t per example.
  K = 1: one uniform t. K even: two independent systematic halves,
  t = (u_a + j / (K/2)) mod 1 and (u_b + j / (K/2)) mod 1 for
  j < K/2, with u_a, u_b ~ U(0, 1) drawn per example: each half is an
  unbiased, stratified estimate, and the squared difference of the halves'
  means over 4 is an unbiased estimate of the variance of their average.

  Args:
    eps_fn: eps_fn(z_t, gamma_t) -> eps_hat.
    gamma_fn: the schedule.
    x_int: [B, H, W, C] uint8 images.
    key: PRNG key.
    num_timesteps: 0 for the continuous-time bound, T for the T-step one.
    time_samples: K, 1 or even.

  Returns:
    {"prior_nats", "recon_nats", "diffusion_nats", "nll_nats"} [B], and for
    K > 1 "diffusion_var_nats" [B], the estimated variance of the diffusion
    term's estimate (the only random part that matters: the prior is exact
    and the reconstruction's noise is tiny).
  """
  if time_samples < 1 or (time_samples > 1 and time_samples % 2):
    raise ValueError(f"variational_bound: time_samples={time_samples} must"
                     " be 1 or even.")
  x = losses.scale_to_symmetric(x_int)
  batch = x.shape[0]
  key_0, key_u, key_eps = jax.random.split(key, 3)
  gamma_0 = gamma_fn(jnp.zeros((), jnp.float32))
  gamma_1 = gamma_fn(jnp.ones((), jnp.float32))
  prior = prior_kl(x, gamma_1)
  z_0 = diffuse(x, jnp.broadcast_to(gamma_0, (batch,)),
                jax.random.normal(key_0, x.shape))
  recon = reconstruction_nll(x_int, z_0, gamma_0)

  half = max(time_samples // 2, 1)
  offsets = jax.random.uniform(key_u, (2, batch))  # per half, per example

  def one_draw(k):
    t = jnp.mod(offsets[k // half] + (k % half) / half, 1.0)
    eps = jax.random.normal(jax.random.fold_in(key_eps, k), x.shape)
    return diffusion_loss(eps_fn, gamma_fn, x, t, eps, num_timesteps)

  draws = jax.lax.map(one_draw, jnp.arange(time_samples))  # [K, B]
  diffusion = jnp.mean(draws, axis=0)
  out = {"prior_nats": prior, "recon_nats": recon,
         "diffusion_nats": diffusion, "nll_nats": prior + recon + diffusion}
  if time_samples > 1:
    halves = jnp.mean(draws.reshape(2, half, batch), axis=1)  # [2, B]
    out["diffusion_var_nats"] = jnp.square(halves[0] - halves[1]) / 4.0
  return out


# ----------------------------------------------------------------------------
# Training the schedule for a low-variance estimator.


def _zero_cotangent(x: Array) -> Array:
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, dtype=jax.dtypes.float0)


def variance_gradient(loss_fn: Callable[[Any, Any, Any], Array], params: Any,
                      shape_values: Any, aux: Any) -> Array:
  """``loss_fn(params, shape_values, aux)`` [B] with the gradient of
  E[L^2] for ``shape_values``.

  The continuous-time bound depends on the schedule only through its
  endpoints (Kingma et al., 2021, Sec. 5.1): the schedule's shape between
  them changes the estimator's variance, not its mean. So the shape is
  trained to minimise the variance: since Var[L] = E[L^2] - E[L]^2 and E[L]
  does not depend on the shape, its gradient is that of E[L^2], and per
  example d(L_i^2)/ds_i = 2 L_i dL_i/ds_i. Each ``shape_values`` leaf is
  per example ([B]: s(t_i), s'(t_i), ...) and reaches only L_i, so one
  backward pass serves both: the cotangents reaching ``shape_values`` are
  multiplied by 2 L_i, everything else (the network, the endpoints in
  ``params``) gets the plain gradient of L. A ``jax.custom_vjp`` does it.

  Args:
    loss_fn: loss_fn(params, shape_values, aux) -> [B] per-example losses.
    params: differentiated plainly.
    shape_values: pytree of [B] arrays: the schedule's shape at each
      example's times.
    aux: pytree of arrays that are not differentiated (data, noise, keys
      as ``jax.random.key_data``).

  Returns:
    [B], the value of ``loss_fn``.
  """

  @jax.custom_vjp
  def wrapped(params, shape_values, aux):
    return loss_fn(params, shape_values, aux)

  def forward(params, shape_values, aux):
    value, vjp = jax.vjp(lambda p, s: loss_fn(p, s, aux), params,
                         shape_values)
    return value, (value, vjp, aux)

  def backward(residuals, cotangent):
    value, vjp, aux = residuals
    d_params, d_shape = vjp(cotangent)
    d_shape = jax.tree.map(lambda d: 2.0 * value * d, d_shape)
    return d_params, d_shape, jax.tree.map(_zero_cotangent, aux)

  wrapped.defvjp(forward, backward)
  return wrapped(params, shape_values, aux)


# ----------------------------------------------------------------------------
# Sampling.


def ancestral_step(z_t: Array, eps_hat: Array, gamma_t: Array,
                   gamma_s: Array, noise: Array) -> Array:
  """One draw of p(z_s | z_t) = q(z_s | z_t, x = x_hat), s < t.

  With c = 1 - SNR(t) / SNR(s) = -expm1(gamma_s - gamma_t) and
  x_hat = (z_t - sigma_t eps_hat) / alpha_t, the posterior is

    mean = (alpha_s / alpha_t) (z_t - sigma_t c eps_hat),
    variance = sigma_s^2 c.

  Args:
    z_t, eps_hat, noise: [B, ...]; gamma_t, gamma_s: scalars or [B].

  Returns:
    z_s [B, ...].
  """
  alpha_t, sigma_t = alpha_sigma(gamma_t)
  alpha_s, sigma_s = alpha_sigma(gamma_s)
  c = -jnp.expm1(gamma_s - gamma_t)
  mean = (alpha_s / alpha_t) * (z_t - sigma_t * c * eps_hat)
  return mean + sigma_s * jnp.sqrt(c) * noise


def ancestral_sample(eps_fn: EpsFn, gamma_fn: GammaFn, key: Array,
                     shape: tuple[int, ...], num_steps: int,
                     decode: str = "argmax") -> Array:
  """Samples 8-bit images with the T-step ancestral sampler.

  z_1 ~ N(0, I); for i = T..1, z_{(i-1)/T} ~ p(z_{(i-1)/T} | z_{i/T})
  (``ancestral_step``); then x from the decoder p(x | z_0): its most likely
  level ("argmax") or a draw ("sample").

  Args:
    eps_fn: eps_fn(z_t, gamma_t) -> eps_hat.
    gamma_fn: the schedule.
    key: PRNG key.
    shape: [B, H, W, C].
    num_steps: T >= 1.
    decode: "argmax" or "sample".

  Returns:
    [B, H, W, C] int32 levels in 0..255.
  """
  if num_steps < 1:
    raise ValueError(f"ancestral_sample: num_steps={num_steps} must be >= 1.")
  key_init, key_steps, key_decode = jax.random.split(key, 3)
  batch = shape[0]

  def step(z, i):
    t = i.astype(jnp.float32) / num_steps
    s = (i - 1).astype(jnp.float32) / num_steps
    gamma_t = gamma_fn(t)
    gamma_s = gamma_fn(s)
    eps_hat = eps_fn(z, jnp.broadcast_to(gamma_t, (batch,)))
    noise = jax.random.normal(jax.random.fold_in(key_steps, i), shape)
    return ancestral_step(z, eps_hat, gamma_t, gamma_s, noise), None

  z_1 = jax.random.normal(key_init, shape)
  steps = jnp.arange(num_steps, 0, -1)  # T, ..., 1
  z_0, _ = jax.lax.scan(step, z_1, steps)
  log_probs = decoder_log_probs(z_0, gamma_fn(jnp.zeros((), jnp.float32)))
  if decode == "sample":
    return jax.random.categorical(key_decode, log_probs).astype(jnp.int32)
  if decode != "argmax":
    raise ValueError(f"ancestral_sample: decode={decode!r} is not 'argmax'"
                     " or 'sample'.")
  return jnp.argmax(log_probs, axis=-1).astype(jnp.int32)

