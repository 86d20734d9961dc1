"""Pytree helpers shared by the scanned layers' parameter mappings.

A scanned stack of layers keeps each parameter of its K layers stacked on
a leading axis of K; the unrolled layout keeps K separate subtrees. These
two helpers convert between them (flows, PixelCNN++, VDM).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp


def stack(trees: Sequence[Any], stack_fn: Callable = jnp.stack) -> Any:
  """Trees of equal structure -> one tree, leaves stacked on a new axis 0
  (``stack_fn=np.stack`` keeps host constants as numpy)."""
  return jax.tree.map(lambda *leaves: stack_fn(leaves), *trees)


def index(tree: Any, i: int) -> Any:
  """Entry ``i`` along axis 0 of every leaf: the inverse of ``stack``."""
  return jax.tree.map(lambda leaf: leaf[i], tree)
