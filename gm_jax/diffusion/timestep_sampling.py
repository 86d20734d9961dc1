"""Importance sampling of diffusion timesteps (improved DDPM, sec. 3.3).

L_vlb = sum_t L_t is trained on one timestep per example. Drawn uniformly,
T L_t is an unbiased but very noisy estimate of the sum: the first few
terms are orders of magnitude larger than the rest. Nichol & Dhariwal
(2021) draw t with probability p_t proportional to the root mean square of
the recent losses at t and weight the example by 1 / (T p_t):

  p_t ∝ sqrt(E[L_t^2]),   E_{t ~ p}[L_t / (T p_t)] = (1 / T) sum_t L_t,

the same expectation as the uniform draw's, with less variance. Their
``LossSecondMomentResampler`` keeps the last H losses of every timestep,
draws uniformly until every timestep has H of them, and mixes in a little
of the uniform distribution, (1 - u) p + u / T with u = 0.001, so that no
timestep is starved.

Pure functions of a state pytree (a dict, so it can live in
``TrainState.family_state`` and in checkpoints)::

  {"history": float32 [T, H], the last H losses of each timestep, oldest
     first (only the first count[t] entries are filled),
   "count": int32 [T], how many entries of history[t] are filled (<= H)}
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
LossHistory = dict[str, Array]

SAMPLERS = ("uniform", "importance")
# The paper's history length per timestep and its uniform share.
DEFAULT_HISTORY = 10
UNIFORM_MIX = 1e-3


def init_loss_history(num_timesteps: int,
                      history: int = DEFAULT_HISTORY) -> LossHistory:
  """The empty state: no losses recorded.

  Args:
    num_timesteps: T.
    history: H, the losses kept per timestep.

  Returns:
    {"history": zeros float32 [T, H], "count": zeros int32 [T]}.
  """
  if num_timesteps < 1 or history < 1:
    raise ValueError(f"init_loss_history: need num_timesteps >= 1 and"
                     f" history >= 1, got {num_timesteps} and {history}.")
  return {"history": jnp.zeros((num_timesteps, history), jnp.float32),
          "count": jnp.zeros((num_timesteps,), jnp.int32)}


def _check(state: LossHistory) -> tuple[int, int]:
  history, count = state["history"], state["count"]
  if history.ndim != 2 or count.shape != history.shape[:1]:
    raise ValueError(f"A loss history needs history [T, H] and count [T];"
                     f" got {history.shape} and {count.shape}.")
  return history.shape


def warm_fraction(state: LossHistory) -> Array:
  """The fraction of timesteps whose history is full: float32 scalar;
  importance sampling starts when it reaches 1."""
  _, size = _check(state)
  return jnp.mean((state["count"] >= size).astype(jnp.float32))


def timestep_probabilities(state: LossHistory,
                           uniform_mix: float = UNIFORM_MIX) -> Array:
  """The distribution that the next timesteps are drawn from: [T] float32.

  Uniform, 1 / T, until every timestep has H recorded losses; afterwards
  p_t = (1 - u) r_t / sum_s r_s + u / T with r_t = sqrt(mean_h
  history[t, h]^2) and u = ``uniform_mix`` (uniform again if every r_t is
  0, where there is nothing to prefer).
  """
  num_timesteps, size = _check(state)
  if not 0.0 <= uniform_mix <= 1.0:
    raise ValueError(f"timestep_probabilities: uniform_mix must be in"
                     f" [0, 1], got {uniform_mix}.")
  rms = jnp.sqrt(jnp.mean(jnp.square(state["history"]), axis=-1))  # [T]
  total = jnp.sum(rms)
  uniform = jnp.full((num_timesteps,), 1.0 / num_timesteps, jnp.float32)
  mixed = ((1.0 - uniform_mix) * rms / jnp.where(total > 0, total, 1.0)
           + uniform_mix / num_timesteps)
  warm = jnp.all(state["count"] >= size) & (total > 0)
  return jnp.where(warm, mixed, uniform).astype(jnp.float32)


def effective_sample_fraction(probs: Array) -> Array:
  """The effective sample size per draw of the weights w_t = 1 / (T p_t)
  under t ~ p: N_eff / N = 1 / E_p[w^2] = T^2 / sum_t (1 / p_t). 1 for the
  uniform distribution, smaller the further p is from it.

  Args:
    probs: [T] probabilities, all positive.

  Returns:
    float32 scalar in (0, 1].
  """
  num_timesteps = probs.shape[-1]
  return num_timesteps**2 / jnp.sum(1.0 / probs)


def sample_timesteps(key: Array, probs: Array,
                     batch_size: int) -> tuple[Array, Array]:
  """Draws t ~ p for each example, with its importance weight.

  Args:
    key: PRNG key.
    probs: [T] probabilities (``timestep_probabilities``), all positive
      where a timestep may be drawn.
    batch_size: B.

  Returns:
    (t, weights): int32 [B] timesteps and float32 [B] weights 1 / (T p_t),
    so that mean(weights * L_t) estimates (1 / T) sum_t L_t without bias.
  """
  if probs.ndim != 1:
    raise ValueError(f"sample_timesteps: probs must be [T], got"
                     f" {probs.shape}.")
  num_timesteps = probs.shape[0]
  # The Gumbel-max draw, not the inverse CDF of jax.random.choice: float32
  # cumulative sums and uniforms resolve steps of about 1e-7 near 1, the
  # size of the smallest p_t (u / T = 2.5e-7 for T = 4000), whose draws
  # would then be off by tens of percent while their weights assume p_t.
  # mode="high" keeps the Gumbel draw unbiased down to p of about 1e-14.
  t = jax.random.categorical(key, jnp.log(probs), shape=(batch_size,),
                             mode="high").astype(jnp.int32)
  weights = 1.0 / (num_timesteps * probs[t])
  return t, weights.astype(jnp.float32)


def update_loss_history(state: LossHistory, t: Array,
                        losses: Array) -> LossHistory:
  """Records each example's loss at its timestep, in the examples' order.

  For each i = 0..B-1: if history[t_i] has fewer than H entries, losses[i]
  fills the next one (and count[t_i] grows); else the oldest entry is
  dropped, the rest move one place forward and losses[i] becomes the last
  (the last H losses of each timestep, oldest first). Several examples at
  the same timestep are recorded one after another, as if they came in
  successive steps.

  Args:
    state: the loss history.
    t: int32 [B] timesteps.
    losses: [B] per-example losses (their values only: gradients stop).

  Returns:
    The new state.
  """
  _, size = _check(state)
  if t.ndim != 1 or losses.shape != t.shape:
    raise ValueError(f"update_loss_history: need t and losses [B], got"
                     f" {t.shape} and {losses.shape}.")
  losses = jax.lax.stop_gradient(losses).astype(jnp.float32)

  def record(carry, example):
    history, count = carry
    index, loss = example
    row, filled = history[index], count[index]  # [H], scalar
    appended = row.at[jnp.minimum(filled, size - 1)].set(loss)
    shifted = jnp.concatenate([row[1:], loss[None]])
    row = jnp.where(filled < size, appended, shifted)
    history = history.at[index].set(row)
    count = count.at[index].set(jnp.minimum(filled + 1, size))
    return (history, count), None

  (history, count), _ = jax.lax.scan(
      record, (state["history"], state["count"]), (t.astype(jnp.int32),
                                                   losses))
  return {"history": history, "count": count}
