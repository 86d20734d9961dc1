"""Training objectives and the variational bound of a Gaussian diffusion.

Pure functions of a schedule, data and a network given as a callable:

* ``model_fn(x_t, t) -> prediction`` for training, where the prediction is
  eps (the noise), x0 (the clean data) or v = sqrt(abar) eps - sqrt(1 - abar)
  x0, per ``prediction``; ``eps_fn_from_model`` turns any of them into an
* ``eps_fn(x_t, t) -> eps``, which the bound and the samplers consume.

With a learned variance (``variance`` = "learned_range", improved DDPM) the
network has 2C output channels [prediction, v] (``split_output``) and the
bound and the ancestral sampler take an ``eps_fn(x_t, t) -> (eps, v)``;
v sets the variance through ``schedules.learned_range_log_variance``.

x_t, eps: [B, ...] float32 with data scaled to [-1, 1]; t: [B] int32 indices
in 0..T-1 (see ``schedules``). Every function returns per-example values [B].
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gm_jax import losses
from gm_jax.diffusion import schedules as sched
from gm_jax.diffusion.schedules import Schedule

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]

PREDICTIONS = ("eps", "x0", "v")
LOSS_TYPES = ("simple", "hybrid", "vlb")
# Improved DDPM's weight of L_vlb in L_hybrid = L_simple + lambda L_vlb.
HYBRID_VLB_WEIGHT = 1e-3


def split_output(out: Array, variance: str) -> tuple[Array, Array | None]:
  """(prediction, v) of a network output: with "learned_range" the last
  axis holds 2C channels [prediction (C), v (C)], else the C channels are
  the prediction alone and v is None."""
  if variance != "learned_range":
    return out, None
  if out.shape[-1] % 2:
    raise ValueError(f"split_output: a learned variance needs 2C output"
                     f" channels, got {out.shape[-1]}.")
  pred, v = jnp.split(out, 2, axis=-1)
  return pred, v


def _eps_and_v(out, variance: str) -> tuple[Array, Array | None]:
  """An eps_fn's output as (eps, v): a pair with "learned_range", else the
  eps array alone and v = None."""
  if variance == "learned_range":
    if not isinstance(out, (tuple, list)) or len(out) != 2:
      raise ValueError('A "learned_range" variance needs an eps_fn that'
                       " returns (eps, v).")
    eps, v = out
    return eps.astype(jnp.float32), v.astype(jnp.float32)
  return out.astype(jnp.float32), None


def _check_prediction(prediction: str) -> None:
  if prediction not in PREDICTIONS:
    raise ValueError(f"Unknown prediction {prediction!r}; expected one of"
                     f" {PREDICTIONS}.")


def eps_fn_from_model(model_fn: ModelFn, schedule: Schedule,
                      prediction: str = "eps") -> ModelFn:
  """Wraps a network predicting eps, x0 or v into an ``eps_fn(x_t, t)``.

  x0 -> eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar);
  v -> eps = sqrt(1 - abar) x_t + sqrt(abar) v.
  """
  _check_prediction(prediction)
  if prediction == "eps":
    return model_fn
  if prediction == "x0":
    return lambda x_t, t: sched.predict_eps_from_x0(schedule, x_t, t,
                                                    model_fn(x_t, t))
  return lambda x_t, t: sched.eps_from_v(schedule, x_t, t, model_fn(x_t, t))


def simple_loss(model_fn: ModelFn, schedule: Schedule, x0: Array, t: Array,
                noise: Array, prediction: str = "eps") -> Array:
  """DDPM's L_simple: mean over dimensions of ||target - model_fn(x_t, t)||^2.

  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise; the target is ``noise``
  (eps), ``x0`` (x0) or sqrt(abar_t) noise - sqrt(1 - abar_t) x_0 (v).

  Args:
    model_fn: the network, ``model_fn(x_t, t) -> [B, ...]``.
    schedule: the noise schedule.
    x0: [B, ...] data in [-1, 1].
    t: [B] int32 timesteps (usually uniform over 0..T-1).
    noise: [B, ...] standard normal draws.
    prediction: "eps", "x0" or "v".

  Returns:
    [B] per-example losses.
  """
  _check_prediction(prediction)
  if noise.shape != x0.shape or t.shape != x0.shape[:1]:
    raise ValueError(f"simple_loss: need x0, noise [B, ...] and t [B]; got"
                     f" {x0.shape}, {noise.shape}, {t.shape}.")
  x_t = sched.q_sample(schedule, x0, t, noise)
  if prediction == "eps":
    target = noise
  elif prediction == "x0":
    target = x0
  else:
    target = sched.v_from_x0_eps(schedule, x0, t, noise)
  err = jnp.square(target - model_fn(x_t, t).astype(jnp.float32))
  return jnp.mean(err.reshape(err.shape[0], -1), axis=-1)


def prior_kl(schedule: Schedule, x0: Array) -> Array:
  """KL(q(x_T | x_0) || N(0, I)) in nats, summed over dimensions: [B].

  The bound's L_T; no parameters, about 1e-5 nats/dim for DDPM's schedule.
  """
  t = jnp.full(x0.shape[:1], schedule.num_timesteps - 1, jnp.int32)
  mean, var = sched.q_mean_variance(schedule, x0, t)
  kl = losses.normal_kl(mean, jnp.log(var), 0.0, 0.0)
  return losses.sum_except_batch(kl)


def p_mean_from_eps(schedule: Schedule, x_t: Array, t: Array, eps: Array,
                    clip_x0: bool = False) -> tuple[Array, Array]:
  """The reverse-process mean mu(x_t, t) = c1_t x0_hat + c2_t x_t.

  x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), clipped to [-1, 1]
  if ``clip_x0``.

  Returns:
    (mean, x0_hat), both [B, ...].
  """
  x0_hat = sched.predict_x0_from_eps(schedule, x_t, t, eps)
  if clip_x0:
    x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
  mean, _, _ = sched.q_posterior(schedule, x0_hat, x_t, t)
  return mean, x0_hat


def vlb_term(eps_fn: ModelFn, schedule: Schedule, x0: Array, t: Array,
             noise: Array, variance: str = "fixed_small",
             clip_x0: bool = False,
             num_bins: int = losses.PIXEL_VALUES) -> Array:
  """One term of the bound at x_t = q_sample(x0, t, noise), in nats: [B].

  t >= 1: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), both Gaussians,
    p's variance set by ``variance`` (``schedules.model_log_variance``);
  t = 0: -log p(x_0 | x_1), the discretized Gaussian decoder with mean
    mu(x_1, 0) and standard deviation exp(0.5 log var_0) (=sqrt(beta~_1)
    for both fixed variances; learned: between sqrt(beta~_1) and
    sqrt(beta_0)), over ``num_bins`` levels.

  Args:
    eps_fn: ``eps_fn(x_t, t) -> eps`` [B, ...]; with "learned_range"
      ``eps_fn(x_t, t) -> (eps, v)``, both [B, ...].
    schedule: the noise schedule.
    x0: [B, ...] data on the grid of num_bins levels in [-1, 1].
    t: [B] int32 timesteps; entries may differ.
    noise: [B, ...] standard normal draws for x_t.
    variance: "fixed_small", "fixed_large" or "learned_range".
    clip_x0: clip the predicted x_0 to [-1, 1] inside the model mean.
    num_bins: levels of the data.

  Returns:
    [B] the term in nats (KL for t >= 1, decoder NLL for t = 0).
  """
  x_t = sched.q_sample(schedule, x0, t, noise)
  eps, v = _eps_and_v(eps_fn(x_t, t), variance)
  model_mean, _ = p_mean_from_eps(schedule, x_t, t, eps, clip_x0)
  model_log_var = sched.model_log_variance(schedule, t, x0.ndim, variance, v)
  true_mean, _, true_log_var = sched.q_posterior(schedule, x0, x_t, t)
  kl = losses.sum_except_batch(
      losses.normal_kl(true_mean, true_log_var, model_mean, model_log_var))
  decoder_nll = -losses.sum_except_batch(
      losses.discretized_gaussian_log_prob(
          x0, model_mean, 0.5 * jnp.broadcast_to(model_log_var, x0.shape),
          num_bins))
  return jnp.where(t == 0, decoder_nll, kl)


def training_terms(model_fn: ModelFn, schedule: Schedule, x0: Array,
                   t: Array, noise: Array, prediction: str = "eps",
                   variance: str = "fixed_small",
                   stop_mean_gradient: bool = True,
                   num_bins: int = losses.PIXEL_VALUES) -> dict[str, Array]:
  """L_simple and the bound's term at one timestep, from one network call.

  With x_t = q_sample(x0, t, noise) and out = model_fn(x_t, t):

  * "simple_loss": ``simple_loss`` of the prediction (the first C channels
    with a learned variance), mean over dimensions.
  * "vlb_term_bpd": T L_t / (D ln 2), the term ``vlb_term`` (nats) in bits
    per dimension times T; for t uniform on 0..T-1 its expectation is
    (L_0 + ... + L_{T-1}) / (D ln 2), the bound less its constant prior
    term L_T, in bits/dim. With ``stop_mean_gradient`` the term sees
    stop_gradient(eps): it trains only the variance channels (improved
    DDPM's L_hybrid); without, it trains the whole network (L_vlb).

  Improved DDPM's L_hybrid = L_simple + lambda L_vlb, lambda = 0.001 and
  L_vlb = sum_t L_t estimated as T L_t, is then simple_loss +
  ``HYBRID_VLB_WEIGHT`` vlb_term_bpd: per example, the term in bits/dim
  times T / 1000 (the "rescaled MSE" loss of Nichol & Dhariwal's code).

  Args:
    model_fn: the network, ``model_fn(x_t, t) -> [B, ..., C]`` or
      ``[B, ..., 2C]`` with "learned_range" (see ``split_output``).
    schedule: the noise schedule.
    x0: [B, ...] data on the grid of ``num_bins`` levels in [-1, 1].
    t: [B] int32 timesteps.
    noise: [B, ...] standard normal draws.
    prediction: "eps", "x0" or "v".
    variance: "fixed_small", "fixed_large" or "learned_range".
    stop_mean_gradient: stop the bound term's gradient into the prediction.
    num_bins: levels of the data.

  Returns:
    {"simple_loss": [B], "vlb_term_bpd": [B]}.
  """
  _check_prediction(prediction)
  x_t = sched.q_sample(schedule, x0, t, noise)
  pred, v = split_output(model_fn(x_t, t).astype(jnp.float32), variance)
  simple = simple_loss(lambda *_: pred, schedule, x0, t, noise, prediction)
  eps = eps_fn_from_model(lambda *_: pred, schedule, prediction)(x_t, t)
  if stop_mean_gradient:
    eps = jax.lax.stop_gradient(eps)
  out = (eps, v) if v is not None else eps
  term = vlb_term(lambda *_: out, schedule, x0, t, noise, variance,
                  num_bins=num_bins)
  num_dims = math.prod(x0.shape[1:])
  scale = schedule.num_timesteps / (num_dims * losses.LN2)
  return {"simple_loss": simple, "vlb_term_bpd": scale * term}


def timestep_strata(num_timesteps: int, num_eval_timesteps: int,
                    num_exact: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Splits the KL timesteps 1..T-1 into contiguous strata.

  The first ``num_exact`` timesteps (1..num_exact) are strata of one
  timestep each, evaluated exactly; they carry most of the bound for a
  trained model (the KL weight of t = 1 is about 10^4 times that of t = T/2
  under DDPM's linear schedule). The remaining timesteps are split into
  n - num_exact strata of (nearly) equal width.

  Args:
    num_timesteps: T.
    num_eval_timesteps: the number of strata n (the network calls of the
      sum); 0 or >= T - 1 gives the T - 1 strata of one timestep each (the
      exact sum).
    num_exact: how many of the n strata are the single timesteps 1, 2, ...;
      at most n - 2 are used, so that at least two strata remain and the
      estimate's variance can be estimated (``stratified_variance``).

  Returns:
    (starts, sizes): [n] int32 arrays; stratum j is starts[j] ..
    starts[j] + sizes[j] - 1, and the strata tile 1..T-1 exactly.
  """
  num_kl = num_timesteps - 1
  if num_eval_timesteps <= 0 or num_eval_timesteps >= num_kl:
    return (np.arange(1, num_timesteps, dtype=np.int32),
            np.ones(num_kl, np.int32))
  n = num_eval_timesteps
  exact = int(np.clip(num_exact, 0, max(n - 2, 0)))
  edges = np.round(np.linspace(1 + exact, num_timesteps, n - exact + 1))
  edges = np.concatenate([np.arange(1, 1 + exact), edges]).astype(np.int64)
  return edges[:-1].astype(np.int32), np.diff(edges).astype(np.int32)


def stratified_variance(values: Array, sizes: np.ndarray) -> Array:
  """An estimate of the variance of a stratified sum over its random draws.

  ``values`` [n, B] are the weighted draws Y_j = size_j L_{t_j} of the n
  strata; the estimate sum_j Y_j has variance sum_j Var(Y_j), but one draw
  per stratum cannot estimate Var(Y_j). The collapsed-strata estimator pairs
  neighbouring random strata (the last group takes three if their number is
  odd) and treats each group's draws as draws from one stratum:
  sum_g k_g / (k_g - 1) sum_{j in g} (Y_j - mean_g Y)^2. Its expectation is
  the true variance plus the spread of the grouped strata's means, so it
  errs on the high side (conservative). Strata of one timestep contribute
  nothing. Returns [B]; zeros when fewer than two strata are random (all
  exact: no variance; a single random stratum: see ``timestep_strata``,
  which keeps two).
  """
  random = np.flatnonzero(np.asarray(sizes) > 1)
  if len(random) < 2:
    return jnp.zeros(values.shape[1:], values.dtype)
  # Pairs, the last group a triple when their number is odd.
  bounds = list(range(0, len(random) - len(random) % 2, 2)) + [len(random)]
  total = jnp.zeros(values.shape[1:], values.dtype)
  for lo, hi in itertools.pairwise(bounds):
    group = values[random[lo:hi]]  # [k, B]
    k = hi - lo
    spread = jnp.sum(jnp.square(group - jnp.mean(group, axis=0)), axis=0)
    total = total + k / (k - 1) * spread
  return total


def variational_bound(eps_fn: ModelFn, schedule: Schedule, x0: Array,
                      key: Array, num_eval_timesteps: int = 0,
                      variance: str = "fixed_small", clip_x0: bool = False,
                      num_bins: int = losses.PIXEL_VALUES,
                      num_exact_timesteps: int = 0) -> dict[str, Array]:
  """The DDPM variational bound on -log p(x_0) in nats, per example.

  -log p(x_0) <= L_T + sum_{t=1}^{T-1} L_t + L_0 with
    L_T = KL(q(x_T | x_0) || N(0, I))                 (``prior_kl``, exact),
    L_t = E_{x_t ~ q} KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)),
    L_0 = E_{x_1 ~ q} -log p(x_0 | x_1)               (discretized decoder),
  in 0-based timestep indices (see ``schedules``). L_0 and every L_t use one
  draw of x_t per example (the standard single-sample estimate of each
  expectation, as in the DDPM and improved-DDPM evaluations), so even the
  full sum is a Monte Carlo estimate; only L_T is computed in closed form.

  ``num_eval_timesteps`` = 0 evaluates every L_t (T - 1 network calls, plus
  one for L_0). n > 0 gives a stratified unbiased estimate of the sum with n
  calls (``timestep_strata``): timesteps 1..``num_exact_timesteps`` one
  call each, the rest split into contiguous strata; one t is drawn
  uniformly inside each stratum per example, and its L_t is weighted by the
  stratum's size, so E[estimate] = sum_t L_t exactly.

  Args:
    eps_fn: ``eps_fn(x_t, t) -> eps`` (with "learned_range": -> (eps, v));
      called under ``lax.scan``.
    schedule: the noise schedule.
    x0: [B, ...] data on the grid of ``num_bins`` levels in [-1, 1].
    key: PRNG key for the x_t draws (and the strata offsets).
    num_eval_timesteps: 0 for all timesteps, n for the stratified estimate.
    variance: the reverse-process variance, "fixed_small", "fixed_large"
      or "learned_range".
    clip_x0: clip the predicted x_0 in the model mean.
    num_bins: levels of the data (256 for 8-bit images).
    num_exact_timesteps: of the n calls, how many go to timesteps 1, 2, ...
      one each (ignored for the full sum).

  Returns:
    {"nll_nats": [B] the bound, "prior_nats", "diffusion_nats" (the L_t sum),
    "decoder_nats": [B] its three parts, "timestep_var_nats": [B] an
    estimate of the variance of ``nll_nats`` over the timestep draws
    (``stratified_variance``; 0 for the full sum)}.
  """
  starts, sizes = timestep_strata(schedule.num_timesteps, num_eval_timesteps,
                                  num_exact_timesteps)
  batch = x0.shape[0]
  key_decoder, key_kl = jax.random.split(key)
  term = lambda t, noise: vlb_term(eps_fn, schedule, x0, t, noise,  # noqa: E731
                                   variance, clip_x0, num_bins)

  def body(total, inputs):
    start, size, index = inputs
    key_t, key_noise = jax.random.split(jax.random.fold_in(key_kl, index))
    t = start + jax.random.randint(key_t, (batch,), 0, size)  # [B]
    noise = jax.random.normal(key_noise, x0.shape, jnp.float32)
    weighted = size.astype(jnp.float32) * term(t, noise)
    return total + weighted, weighted

  diffusion, weighted = jax.lax.scan(
      body, jnp.zeros((batch,), jnp.float32),
      (jnp.asarray(starts), jnp.asarray(sizes),
       jnp.arange(len(starts), dtype=jnp.int32)))
  decoder = term(jnp.zeros((batch,), jnp.int32),
                 jax.random.normal(key_decoder, x0.shape, jnp.float32))
  prior = prior_kl(schedule, x0)
  return {"nll_nats": prior + diffusion + decoder, "prior_nats": prior,
          "diffusion_nats": diffusion, "decoder_nats": decoder,
          "timestep_var_nats": stratified_variance(weighted, sizes)}
