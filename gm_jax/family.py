"""The interface every model family implements.

A family is four pure functions closed over a Flax module and whatever static
things the model needs (noise schedules, masks). The trainer, the evaluation
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
  """

  init: Callable[[Array, Batch], Params]
  loss: Callable[[Params, Batch, Array, Array], tuple[Array, dict[str, Array]]]
  evaluate: Callable[[Params, Batch, Array], dict[str, Array]]
  sample: Callable[[Params, Array, int], Array]
  visualize: Optional[Callable[[Params, Batch, Array], dict[str, Array]]] = None
