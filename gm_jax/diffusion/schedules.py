"""Noise schedules of the Gaussian diffusion and everything derived from them.

Indexing: timesteps are 0-based indices t = 0..T-1, so index t is the paper's
step t + 1 (as in the DDPM code). With alpha_t = 1 - beta_t and
abar_t = prod_{s <= t} alpha_s:

  q(x_t | x_0)        = N(sqrt(abar_t) x_0, (1 - abar_t) I)
  q(x_t | x_{t-1})    = N(sqrt(alpha_t) x_{t-1}, beta_t I)
  q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, beta~_t I), with
    c1_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t),
    c2_t = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t),
    beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t),
  and abar_{-1} = 1 (so beta~_0 = 0 and its log is clipped to log beta~_1).

The tables are computed in float64 NumPy and stored as float32 jnp arrays in
a ``Schedule`` NamedTuple (a pytree, safe to close over in jitted code).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SCHEDULES = ("linear", "cosine")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02) -> np.ndarray:
  """DDPM's linear schedule: beta_t = beta_start + (beta_end - beta_start)
  t / (T - 1), t = 0..T-1 (DDPM: 1e-4 to 0.02 over T = 1000).

  Returns:
    [T] float64 betas.
  """
  if num_timesteps < 1:
    raise ValueError(f"linear_betas: num_timesteps must be >= 1, got"
                     f" {num_timesteps}.")
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def cosine_alpha_bar(u: np.ndarray, s: float = 0.008) -> np.ndarray:
  """The improved-DDPM f(u) = cos^2(pi / 2 (u + s) / (1 + s)), u in [0, 1]."""
  return np.cos((u + s) / (1.0 + s) * math.pi / 2) ** 2


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008,
                 max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal's cosine schedule.

  abar_t = f((t + 1) / T) / f(0), i.e. beta_t = 1 - f((t + 1) / T) / f(t / T),
  clipped at ``max_beta`` to avoid the singularity at the end.

  Returns:
    [T] float64 betas.
  """
  if num_timesteps < 1:
    raise ValueError(f"cosine_betas: num_timesteps must be >= 1, got"
                     f" {num_timesteps}.")
  u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  f = cosine_alpha_bar(u, s)
  return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


class Schedule(NamedTuple):
  """Per-timestep tables, each [T] float32 (see the module docstring)."""

  betas: Array
  alphas_cumprod: Array  # abar_t
  alphas_cumprod_prev: Array  # abar_{t-1}, with abar_{-1} = 1
  sqrt_alphas_cumprod: Array
  sqrt_one_minus_alphas_cumprod: Array
  posterior_variance: Array  # beta~_t
  posterior_log_variance_clipped: Array  # log beta~_t, index 0 -> index 1
  posterior_mean_coef1: Array  # c1_t, multiplies x_0
  posterior_mean_coef2: Array  # c2_t, multiplies x_t
  fixed_large_log_variance: Array  # log beta_t, index 0 -> log beta~_1

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def schedule_from_betas(betas: np.ndarray) -> Schedule:
  """Derives every table of a ``Schedule`` from its betas.

  Args:
    betas: [T] values in (0, 1], T >= 2.

  Returns:
    The Schedule (tables computed in float64, stored float32).
  """
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.shape[0] < 2:
    raise ValueError(f"schedule_from_betas: betas must be [T] with T >= 2, got"
                     f" shape {betas.shape}.")
  if np.any(betas <= 0) or np.any(betas > 1):
    raise ValueError("schedule_from_betas: betas must lie in (0, 1].")
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.append(1.0, abar[:-1])
  post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
  # beta~_0 = 0: the log is clipped to beta~_1, the variance DDPM uses for its
  # decoder at t = 0.
  post_log_var = np.log(np.append(post_var[1], post_var[1:]))
  large_log_var = np.log(np.append(post_var[1], betas[1:]))
  tables = dict(
      betas=betas,
      alphas_cumprod=abar,
      alphas_cumprod_prev=abar_prev,
      sqrt_alphas_cumprod=np.sqrt(abar),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
      posterior_variance=post_var,
      posterior_log_variance_clipped=post_log_var,
      posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
      posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
      fixed_large_log_variance=large_log_var,
  )
  return Schedule(**{k: jnp.asarray(v, jnp.float32) for k, v in tables.items()})


def noise_schedule(name: str, num_timesteps: int = 1000,
                   beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
  """Builds the "linear" (DDPM) or "cosine" (improved DDPM) schedule.

  ``beta_start`` and ``beta_end`` are the linear schedule's; any other
  betas make a schedule with ``schedule_from_betas``.
  """
  if name == "linear":
    return schedule_from_betas(
        linear_betas(num_timesteps, beta_start, beta_end))
  if name == "cosine":
    return schedule_from_betas(cosine_betas(num_timesteps))
  raise ValueError(f"Unknown schedule {name!r}; expected one of {SCHEDULES}.")


def extract(table: Array, t: Array, ndim: int) -> Array:
  """table[t] reshaped to broadcast against a rank-``ndim`` batch: [B, 1, ...]."""
  return table[t].reshape(t.shape + (1,) * (ndim - 1))


def q_sample(schedule: Schedule, x0: Array, t: Array, noise: Array) -> Array:
  """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.  x0, noise [B, ...]; t [B]."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0 +
          extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def q_mean_variance(schedule: Schedule, x0: Array,
                    t: Array) -> tuple[Array, Array]:
  """Mean [B, ...] and variance [B, 1, ...] of q(x_t | x_0)."""
  mean = extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
  var = 1.0 - extract(schedule.alphas_cumprod, t, x0.ndim)
  return mean, var


def q_posterior(schedule: Schedule, x0: Array, x_t: Array,
                t: Array) -> tuple[Array, Array, Array]:
  """q(x_{t-1} | x_t, x_0): mean = c1_t x_0 + c2_t x_t, variance beta~_t.

  Returns:
    mean [B, ...], variance [B, 1, ...] and clipped log-variance [B, 1, ...].
  """
  mean = (extract(schedule.posterior_mean_coef1, t, x0.ndim) * x0 +
          extract(schedule.posterior_mean_coef2, t, x0.ndim) * x_t)
  var = extract(schedule.posterior_variance, t, x0.ndim)
  log_var = extract(schedule.posterior_log_variance_clipped, t, x0.ndim)
  return mean, var, log_var


def learned_range_log_variance(min_log: Array, max_log: Array,
                               v: Array) -> Array:
  """Improved DDPM's learned variance: an interpolation in log space.

  log sigma^2 = frac max_log + (1 - frac) min_log, frac = (v + 1) / 2, so
  the network output v = -1 gives exp(min_log) (beta~_t) and v = +1 gives
  exp(max_log) (beta_t); v is not clipped (values outside [-1, 1]
  extrapolate, as in Nichol & Dhariwal's code).

  Args:
    min_log: log beta~_t (clipped at t = 0), broadcastable to v.
    max_log: log beta_t, broadcastable to v.
    v: the network's variance output, e.g. [B, H, W, C].

  Returns:
    log sigma^2, the broadcast shape of the three.
  """
  frac = (v.astype(jnp.float32) + 1.0) / 2.0
  return frac * max_log + (1.0 - frac) * min_log


def model_log_variance(schedule: Schedule, t: Array, ndim: int,
                       variance: str, v: Array | None = None) -> Array:
  """log of the reverse-process variance sigma_t^2.

  * "fixed_small": log beta~_t, clipped at t = 0 to log beta~_1. [B, 1, ...]
  * "fixed_large": log beta_t, with log beta~_1 at t = 0 (DDPM). [B, 1, ...]
  * "learned_range": ``learned_range_log_variance`` between log beta~_t
    (clipped at t = 0 as above) and log beta_t, with the network's output
    ``v`` [B, ...]. At t = 0 the upper end is log beta_0 itself (not
    beta~_1 as for "fixed_large"), as in improved DDPM. [B, ...]
  """
  if variance == "fixed_small":
    return extract(schedule.posterior_log_variance_clipped, t, ndim)
  if variance == "fixed_large":
    return extract(schedule.fixed_large_log_variance, t, ndim)
  if variance == "learned_range":
    if v is None:
      raise ValueError('model_log_variance: "learned_range" needs the'
                       " network's variance output v.")
    return learned_range_log_variance(
        extract(schedule.posterior_log_variance_clipped, t, ndim),
        extract(jnp.log(schedule.betas), t, ndim), v)
  raise ValueError(f"Unknown variance {variance!r}; expected one of"
                   f" {VARIANCES}.")


def predict_x0_from_eps(schedule: Schedule, x_t: Array, t: Array,
                        eps: Array) -> Array:
  """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
  return ((x_t - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
           * eps) / extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim))


def predict_eps_from_x0(schedule: Schedule, x_t: Array, t: Array,
                        x0: Array) -> Array:
  """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
  return ((x_t - extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * x0) /
          extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim))


def v_from_x0_eps(schedule: Schedule, x0: Array, t: Array,
                  eps: Array) -> Array:
  """The v target (Salimans & Ho): v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * eps -
          extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)


def eps_from_v(schedule: Schedule, x_t: Array, t: Array, v: Array) -> Array:
  """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v."""
  return (extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t +
          extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * v)
