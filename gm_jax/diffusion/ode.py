"""The probability-flow ODE of a trained diffusion model and its exact
likelihood (Song et al., 2021, "Score-based generative modeling through
stochastic differential equations", section 4.3 and appendix D).

A discrete schedule abar_0..abar_{T-1} is read as a continuous one in the
timestep index tau in [0, T - 1]: log abar(tau) linear between the integer
indices. The forward process is then the variance-preserving SDE with
beta(tau) = -d log abar / d tau (piecewise constant, about beta_t), whose
marginals are exactly q(x_tau | x_0) = N(sqrt(abar(tau)) x_0,
(1 - abar(tau)) I), and its probability-flow ODE is

  dx / dtau = f(x, tau) = -beta(tau) / 2 (x - eps(x, tau) / sigma(tau)),

sigma = sqrt(1 - abar), with the network's eps at the continuous index (the
sinusoidal time embedding takes any real tau). Integrating from the data at
tau = 0 to tau = T - 1 with the log-density change d log p / dtau =
-div f gives

  log p_0(x) = log N(x_{T-1}; 0, I) + int_0^{T-1} div f(x_tau, tau) dtau,

an exact density of the model's continuous ODE flow, evaluated here with an
adaptive solver (diffrax: Tsit5 with a PID step-size controller) and the
divergence exact (D Jacobian-vector products; tiny D only) or by
Hutchinson's estimator with one Rademacher or Gaussian probe per example
(unbiased: E[e^T J e] = tr J). Uniform dequantization of the 8-bit data
turns it into a bound on the discrete likelihood: with bins of width
h = 2 / (levels - 1) around each level of [-1, 1],
log P(k) >= E_u log p_0(x_k + u) + D log h, u ~ U[-h/2, h/2]^D.
"""

from __future__ import annotations

import math
from typing import Callable

import diffrax
import jax
import jax.numpy as jnp

from gm_jax import losses
from gm_jax.diffusion.objectives import PREDICTIONS
from gm_jax.diffusion.schedules import Schedule

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]

DIVERGENCES = ("hutchinson_rademacher", "hutchinson_gaussian", "exact")


def continuous_log_alpha_bar(schedule: Schedule, tau: Array) -> Array:
  """log abar at real indices ``tau`` in [0, T - 1] (linear in between)."""
  grid = jnp.arange(schedule.num_timesteps, dtype=jnp.float32)
  return jnp.interp(tau, grid, jnp.log(schedule.alphas_cumprod))


def continuous_beta(schedule: Schedule, tau: Array) -> Array:
  """beta(tau) = -d log abar / d tau, the slope of the segment holding tau."""
  log_abar = jnp.log(schedule.alphas_cumprod)
  slopes = log_abar[:-1] - log_abar[1:]  # [T - 1]
  index = jnp.clip(jnp.floor(tau).astype(jnp.int32), 0, slopes.shape[0] - 1)
  return slopes[index]


def ode_drift(model_fn: ModelFn, schedule: Schedule,
              prediction: str = "eps") -> Callable[[Array, Array], Array]:
  """f(x, tau) of the probability-flow ODE for a network predicting eps, x0
  or v (``objectives.PREDICTIONS``) at real indices tau [B]."""
  if prediction not in PREDICTIONS:
    raise ValueError(f"Unknown prediction {prediction!r}; expected one of"
                     f" {PREDICTIONS}.")

  def drift(x, tau):
    shape = (-1,) + (1,) * (x.ndim - 1)
    log_abar = continuous_log_alpha_bar(schedule, tau).reshape(shape)
    alpha = jnp.exp(0.5 * log_abar)
    sigma = jnp.sqrt(-jnp.expm1(log_abar))
    out = model_fn(x, tau).astype(jnp.float32)
    if prediction == "eps":
      eps = out
    elif prediction == "x0":
      eps = (x - alpha * out) / sigma
    else:  # v = alpha eps - sigma x0, so eps = alpha v + sigma x
      eps = alpha * out + sigma * x
    beta = continuous_beta(schedule, tau).reshape(shape)
    return -0.5 * beta * (x - eps / sigma)

  return drift


def _divergence(drift, x, tau, probe, method):
  """(f(x, tau), div_x f per example [B])."""
  fn = lambda y: drift(y, tau)  # noqa: E731
  if method == "exact":
    flat = x.reshape(x.shape[0], -1)
    dims = flat.shape[1]

    def column(d):
      basis = jnp.zeros_like(flat).at[:, d].set(1.0).reshape(x.shape)
      _, jvp = jax.jvp(fn, (x,), (basis,))
      return jvp.reshape(flat.shape)[:, d]

    value = fn(x)
    return value, jnp.sum(jax.vmap(column)(jnp.arange(dims)), axis=0)
  value, jvp = jax.jvp(fn, (x,), (probe,))
  return value, losses.sum_except_batch(jvp * probe)


def ode_log_likelihood(model_fn: ModelFn, schedule: Schedule, x: Array,
                       key: Array, prediction: str = "eps",
                       divergence: str = "hutchinson_rademacher",
                       rtol: float = 1e-5, atol: float = 1e-5,
                       max_steps: int = 4096) -> dict[str, Array]:
  """log p_0(x) in nats under the probability-flow ODE, per example.

  Args:
    model_fn: the network, ``model_fn(x_tau, tau) -> prediction`` with
      real tau [B] in [0, T - 1].
    schedule: its noise schedule.
    x: [B, ...] continuous data in (about) [-1, 1].
    key: PRNG key of the Hutchinson probes (one per example, fixed along
      the trajectory).
    prediction: what the network predicts ("eps", "x0" or "v").
    divergence: "hutchinson_rademacher", "hutchinson_gaussian" or "exact".
    rtol, atol: the adaptive solver's tolerances.
    max_steps: the solver's step limit.

  Returns:
    {"log_prob": [B] log p_0(x), "prior_log_prob": [B] log N(x_{T-1}; 0, I),
    "latent": [B, ...] x_{T-1} (the ODE's encoding of x), "num_steps": [B]
    the solver's accepted steps (the same for the batch)}.
  """
  if divergence not in DIVERGENCES:
    raise ValueError(f"Unknown divergence {divergence!r}; expected one of"
                     f" {DIVERGENCES}.")
  drift = ode_drift(model_fn, schedule, prediction)
  if divergence == "hutchinson_gaussian":
    probe = jax.random.normal(key, x.shape, jnp.float32)
  else:
    probe = jax.random.rademacher(key, x.shape, jnp.float32)
  batch = x.shape[0]

  def vector_field(tau, state, args):
    y, _ = state
    taus = jnp.full((batch,), tau, jnp.float32)
    value, div = _divergence(drift, y, taus, probe, divergence)
    return value, div

  solution = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), diffrax.Tsit5(), t0=0.0,
      t1=float(schedule.num_timesteps - 1), dt0=None,
      y0=(x.astype(jnp.float32), jnp.zeros((batch,), jnp.float32)),
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      max_steps=max_steps)
  final, integral = jax.tree.map(lambda a: a[-1], solution.ys)
  prior = losses.sum_except_batch(losses.gaussian_log_prob(final, 0.0, 0.0))
  steps = jnp.full((batch,), solution.stats["num_accepted_steps"],
                   jnp.float32)
  return {"log_prob": prior + integral, "prior_log_prob": prior,
          "latent": final, "num_steps": steps}


def dequantized_nll(model_fn: ModelFn, schedule: Schedule, x0: Array,
                    key: Array, num_bins: int = losses.PIXEL_VALUES,
                    **kwargs) -> dict[str, Array]:
  """A bound on -log P(x0) in nats for discrete data x0 on the grid of
  ``num_bins`` levels in [-1, 1], by uniform dequantization within each
  level's bin: -log p_0(x0 + u) - D log h, h = 2 / (num_bins - 1), with one
  u per example. ``kwargs`` go to ``ode_log_likelihood``.

  Returns:
    {"nll_nats": [B], "num_steps": [B]}.
  """
  key_u, key_probe = jax.random.split(key)
  width = 2.0 / (num_bins - 1)
  u = jax.random.uniform(key_u, x0.shape, jnp.float32, -0.5, 0.5) * width
  out = ode_log_likelihood(model_fn, schedule, x0 + u, key_probe, **kwargs)
  dims = math.prod(x0.shape[1:])
  return {"nll_nats": -out["log_prob"] - dims * math.log(width),
          "num_steps": out["num_steps"]}
