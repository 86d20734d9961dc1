"""Samplers of a Gaussian diffusion, as pure functions of an ``eps_fn``.

Both run a ``lax.scan`` over a decreasing subsequence tau_{S-1} > ... > tau_0
of the T training timesteps (``sampling_timesteps``, spaced by
``timestep_spacing``: "linspace" by default, evenly spaced and including
T - 1 and 0; S = T gives every step). Write a = abar_{tau_i} and
a' = abar_{tau_{i-1}} (a' = 1 after the last step), x0_hat = (x - sqrt(1 - a)
eps) / sqrt(a) with eps = eps_fn(x, tau_i) (optionally clipped to [-1, 1],
eps then recomputed from the clipped x0_hat).

* ``ddpm_sample``: ancestral sampling from p(x_{i-1} | x_i) = N(c1 x0_hat +
  c2 x, sigma^2) of the respaced chain with beta_i = 1 - a / a' (improved
  DDPM respacing; for S = T this is exactly DDPM's Algorithm 2); sigma^2 is
  "fixed_small" (beta~_i = beta_i (1 - a') / (1 - a)), "fixed_large"
  (beta_i) or "learned_range": exp of frac log beta_i + (1 - frac) log
  beta~_i, frac = (v + 1) / 2, with the respaced chain's beta_i and
  beta~_i (``respaced_tables``) and the network's v, the network still
  seeing the original timestep tau_i. No noise is added at the last step.
* ``ddim_sample``: x' = sqrt(a') x0_hat + sqrt(1 - a' - sigma^2) eps +
  sigma z, sigma = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a'); eta = 0 is
  deterministic, eta = 1 is the same chain as ``ddpm_sample`` with
  "fixed_small" variances.

Both draw x_T from keys[0] and step i's noise from keys[1 + i] of
``jax.random.split(key, S + 1)``, so with the same key the two samplers are
directly comparable. Outputs are in the data space [-1, 1] (unclipped).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gm_jax.diffusion.schedules import (
  VARIANCES,
  Schedule,
  learned_range_log_variance,
)

Array = jax.Array
EpsFn = Callable[[Array, Array], Array]

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def sampling_timesteps(num_timesteps: int, num_steps: Optional[int] = None,
                       spacing: str = "linspace") -> np.ndarray:
  """The S increasing timesteps a respaced sampler visits: [S] int32.

  With T = num_timesteps and S = num_steps (the conventions of the DDIM
  paper's code and of diffusers' ``timestep_spacing``):

  * "linspace": round(linspace(0, T - 1, S)); both ends included (S = 1:
    T - 1 alone).
  * "leading": k * floor(T / S) for k = 0..S-1, from 0 up; the top can
    stop well short of T - 1 (DDIM's "uniform" skip).
  * "trailing": round(T - k T / S) - 1 for k = 0..S-1, from T - 1 down; the
    lowest is about T / S - 1.

  Every grid has S distinct steps in 0..T-1, and S = T gives 0..T-1.

  Args:
    num_timesteps: T.
    num_steps: S in 1..T; None means T.
    spacing: "linspace", "leading" or "trailing".
  """
  num_steps = num_timesteps if num_steps is None else num_steps
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps={num_steps} must be in 1..{num_timesteps}"
                     " (the number of training timesteps).")
  if spacing == "linspace":
    if num_steps == 1:
      return np.array([num_timesteps - 1], np.int32)
    steps = np.round(np.linspace(0, num_timesteps - 1, num_steps))
  elif spacing == "leading":
    steps = np.arange(num_steps) * (num_timesteps // num_steps)
  elif spacing == "trailing":
    k = np.arange(num_steps)[::-1]
    steps = np.round(num_timesteps - k * num_timesteps / num_steps) - 1
  else:
    raise ValueError(f"Unknown timestep spacing {spacing!r}; expected one of"
                     f" {TIMESTEP_SPACINGS}.")
  return steps.astype(np.int32)


class RespacedTables(NamedTuple):
  """The respaced chain's tables along tau_0 < ... < tau_{S-1}, each [S]."""

  timesteps: Array  # int32 tau_i, the network's timestep inputs
  alphas_cumprod: Array  # a = abar_{tau_i}
  alphas_cumprod_prev: Array  # a' = abar_{tau_{i-1}}, 1 for i = 0
  betas: Array  # 1 - a / a'
  posterior_log_variance_clipped: Array  # log beta~_i; i = 0 -> i = 1
  log_betas: Array  # log beta_i


def respaced_tables(schedule: Schedule, num_steps: Optional[int],
                    spacing: str = "linspace") -> RespacedTables:
  """The tables of the chain that visits only ``sampling_timesteps``.

  With a = abar_{tau_i} and a' = abar_{tau_{i-1}}: beta_i = 1 - a / a',
  beta~_i = beta_i (1 - a') / (1 - a), its log clipped at i = 0 to that of
  i = 1 (beta~_0 = 0), as ``schedules.schedule_from_betas`` does for the
  full chain; for S = T these are the schedule's own tables (up to float32
  rounding). A single step (S = 1) keeps log beta_0 for both logs: the last
  step adds no noise, so it is never used.
  """
  timesteps = sampling_timesteps(schedule.num_timesteps, num_steps, spacing)
  abar = schedule.alphas_cumprod[timesteps]
  abar_prev = jnp.concatenate([jnp.ones((1,), abar.dtype), abar[:-1]])
  betas = 1.0 - abar / abar_prev
  log_betas = jnp.log(betas)
  if timesteps.shape[0] > 1:
    log_post = jnp.log(betas * (1.0 - abar_prev) / (1.0 - abar))
    log_post = jnp.concatenate([log_post[1:2], log_post[1:]])
  else:
    log_post = log_betas
  return RespacedTables(jnp.asarray(timesteps), abar, abar_prev, betas,
                        log_post, log_betas)


def _x0_from_eps(x: Array, eps: Array, abar: Array,
                 clip_x0: bool) -> tuple[Array, Array]:
  """(x0_hat, eps) at x with scalar abar; eps is made consistent with the
  clipped x0_hat when clipping."""
  eps = eps.astype(jnp.float32)
  x0 = (x - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = (x - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)
  return x0, eps


def _run(step_fn, schedule: Schedule, key: Array, shape: Sequence[int],
         num_steps: Optional[int], x_T: Optional[Array],
         spacing: str) -> Array:
  """Scans ``step_fn(x, row, noise, is_last)`` from T down; ``row`` is
  step i's ``RespacedTables`` entry (scalars)."""
  tables = respaced_tables(schedule, num_steps, spacing)
  num = tables.timesteps.shape[0]
  keys = jax.random.split(key, num + 1)
  x = (jax.random.normal(keys[0], tuple(shape), jnp.float32)
       if x_T is None else x_T.astype(jnp.float32))

  def body(x, inputs):
    row, step_key, is_last = inputs
    noise = jax.random.normal(step_key, x.shape, jnp.float32)
    return step_fn(x, row, noise, is_last), None

  is_last = jnp.arange(num) == 0
  # Reverse time: the last scan element is tau_0 (the final step).
  inputs = (tables, keys[1:], is_last)
  x, _ = jax.lax.scan(body, x, jax.tree.map(lambda a: a[::-1], inputs))
  return x


def ddpm_sample(eps_fn: EpsFn, schedule: Schedule, key: Array,
                shape: Sequence[int], num_steps: Optional[int] = None,
                variance: str = "fixed_small", clip_x0: bool = False,
                x_T: Optional[Array] = None,
                timestep_spacing: str = "linspace") -> Array:
  """Ancestral sampling (DDPM Algorithm 2, respaced to ``num_steps``).

  Args:
    eps_fn: ``eps_fn(x_t, t) -> eps``, x_t [B, ...], t [B] int32; with
      "learned_range" ``eps_fn(x_t, t) -> (eps, v)``, v [B, ...].
    schedule: the noise schedule (T timesteps).
    key: PRNG key.
    shape: (B, ...) of the samples.
    num_steps: S steps of the respaced chain; None for all T.
    variance: "fixed_small" (posterior variance), "fixed_large" (beta) or
      "learned_range" (between them, per the network's v).
    clip_x0: clip the predicted x_0 to [-1, 1] at every step.
    x_T: optional [B, ...] start; None draws N(0, I) from the key.
    timestep_spacing: the respaced steps, see ``sampling_timesteps``.

  Returns:
    [B, ...] float32 samples in data space.
  """
  if variance not in VARIANCES:
    raise ValueError(f"Unknown variance {variance!r}; expected one of"
                     f" {VARIANCES}.")

  learned = variance == "learned_range"

  def step(x, row, noise, is_last):
    t, a, a_prev = row.timesteps, row.alphas_cumprod, row.alphas_cumprod_prev
    out = eps_fn(x, jnp.full(x.shape[:1], t, jnp.int32))
    eps, v = out if learned else (out, None)
    x0, _ = _x0_from_eps(x, eps, a, clip_x0)
    beta = row.betas
    coef1 = beta * jnp.sqrt(a_prev) / (1.0 - a)
    coef2 = (1.0 - a_prev) * jnp.sqrt(1.0 - beta) / (1.0 - a)
    if variance == "fixed_small":
      std = jnp.sqrt(beta * (1.0 - a_prev) / (1.0 - a))
    elif variance == "fixed_large":
      std = jnp.sqrt(beta)
    else:
      std = jnp.exp(0.5 * learned_range_log_variance(
          row.posterior_log_variance_clipped, row.log_betas, v))
    mean = coef1 * x0 + coef2 * x
    return jnp.where(is_last, mean, mean + std * noise)

  return _run(step, schedule, key, shape, num_steps, x_T, timestep_spacing)


def ddim_sample(eps_fn: EpsFn, schedule: Schedule, key: Array,
                shape: Sequence[int], num_steps: Optional[int] = 50,
                eta: float = 0.0, clip_x0: bool = False,
                x_T: Optional[Array] = None,
                timestep_spacing: str = "linspace") -> Array:
  """DDIM (Song et al., 2021) with ``num_steps`` steps and stochasticity eta.

  Args:
    eps_fn: ``eps_fn(x_t, t) -> eps``, x_t [B, ...], t [B] int32.
    schedule: the noise schedule (T timesteps).
    key: PRNG key (only x_T uses it when eta = 0).
    shape: (B, ...) of the samples.
    num_steps: S in 1..T; None for all T.
    eta: 0 for the deterministic sampler, 1 for the DDPM posterior variance.
    clip_x0: clip the predicted x_0 to [-1, 1] at every step.
    x_T: optional [B, ...] start; None draws N(0, I) from the key.
    timestep_spacing: "linspace" (evenly spaced, both ends), "leading" or
      "trailing"; see ``sampling_timesteps``.

  Returns:
    [B, ...] float32 samples in data space.
  """
  if isinstance(eta, (int, float)) and eta < 0:
    raise ValueError(f"ddim_sample: eta must be >= 0, got {eta}.")

  def step(x, row, noise, is_last):
    t, a, a_prev = row.timesteps, row.alphas_cumprod, row.alphas_cumprod_prev
    eps = eps_fn(x, jnp.full(x.shape[:1], t, jnp.int32))
    x0, eps = _x0_from_eps(x, eps, a, clip_x0)
    sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev))
    direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma**2, 0.0)) * eps
    return jnp.sqrt(a_prev) * x0 + direction + sigma * noise

  return _run(step, schedule, key, shape, num_steps, x_T, timestep_spacing)
