"""The interface every model family implements.

A family is four pure functions closed over a Flax module and whatever static
things the model needs (noise schedules, masks), plus, for objectives that
learn from earlier training steps, an optional ``LossState``. The trainer,
the evaluation
and sampling scripts only ever talk to this interface, so adding a family
means one module with a ``make(model_config) -> Family`` function, one entry
in ``gm_jax.families.FAMILIES``, its configs and its tests.

Batches are ``{"image": uint8 [B, H, W, C], "label": int32 [B]}``. Each family
scales, binarizes or dequantizes the raw bytes itself, so every likelihood it
reports is in nats (and bits/dim) of the discrete data.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax

Array = jax.Array
Batch = Mapping[str, Array]
Params = Any


class LossState(NamedTuple):
  """A training objective with state carried from one training step to the
  next (e.g. a running record of the loss per timestep that decides where
  the next batch draws its timesteps).

  The trainer keeps the state in ``TrainState.family_state``: replicated on
  every device, saved in every checkpoint and restored with it, so a
  resumed run continues bit for bit. All three functions are pure and run
  inside the jitted training step.

  Attributes:
    init: ``init() -> state``, the state before the first step: a pytree of
      arrays whose shapes do not depend on the data.
    loss: ``loss(params, state, batch, key, step) -> (scalar, (metrics,
      stats))``. Like ``Family.loss``, with the current state as an input
      (never differentiated) and ``stats`` added: a pytree of per-example
      arrays, each with leading axis B (the examples of ``batch``), that
      ``update`` consumes. With gradient accumulation the trainer calls it
      once per micro-batch, all with the same state, and gives ``update``
      the stats of the whole batch in the batch's order.
    update: ``update(state, stats) -> state``, applied once per training
      step after the loss; it sees no gradients (stats carry no gradient).
  """

  init: Callable[[], Any]
  loss: Callable[[Params, Any, Batch, Array, Array],
                 tuple[Array, tuple[dict[str, Array], Any]]]
  update: Callable[[Any, Any], Any]


class Family(NamedTuple):
  """A model family as pure functions.

  Attributes:
    init: ``init(key, batch) -> params``. The batch fixes the shapes (and
      serves data-dependent initialisation, e.g. actnorm); under ``jax.jit``
      with a sharded batch the statistics are over the global batch.
    loss: ``loss(params, batch, key, step) -> (scalar, metrics)``. The scalar
      is minimised; ``metrics`` maps names to scalars for logging. ``step``
      is the int32 training step (for warm-ups); families may ignore it.
    evaluate: ``evaluate(params, batch, key) -> {name: [B] array}``. Per
      example, with at least ``"nll_nats"`` (an upper bound on the negative
      log-likelihood in nats of the discrete data) and ``"bpd"`` (the same
      in bits per dimension). A [B, D] array is a vector per example (the
      VAE's posterior means), reported as its count of active components;
      ``"<name>_estimator_var"`` [B] is a Monte Carlo estimate's variance
      (see ``train.evaluate_dataset``).
    sample: ``sample(params, key, num) -> [num, H, W, C]`` float32 in [0, 1].
    visualize: optional ``visualize(params, batch, key) -> {name: images}``
      with images float32 in [0, 1], either ``[N, H, W, C]`` (tiled in a
      near-square grid) or ``[rows, cols, H, W, C]`` (tiled as laid out, e.g.
      inputs above reconstructions, one interpolation or temperature per
      row): family-specific pictures, each saved as one grid named by its
      key.
    loss_state: optional ``LossState``. When set, the trainer minimises
      ``loss_state.loss`` and carries its state across steps instead of
      calling ``loss``; ``loss`` stays a stateless pure objective for users
      who import it (it may differ from the stateful one, e.g. the
      diffusion family's ``loss`` keeps uniform timesteps while its
      ``loss_state`` importance-samples them).
  """

  init: Callable[[Array, Batch], Params]
  loss: Callable[[Params, Batch, Array, Array], tuple[Array, dict[str, Array]]]
  evaluate: Callable[[Params, Batch, Array], dict[str, Array]]
  sample: Callable[[Params, Array, int], Array]
  visualize: Optional[Callable[[Params, Batch, Array], dict[str, Array]]] = None
  loss_state: Optional[LossState] = None
