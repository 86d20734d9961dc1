"""Model FLOPs of a traced JAX function, counted from its jaxpr.

MFU needs the FLOPs the model does, the same on every backend. XLA's cost
analysis does not give that everywhere:

* on the GPU (jax 0.11.2, CUDA PJRT plugin) only the compiled executable
  answers, and it leaves out the cuDNN convolutions and cuBLAS products,
  which XLA has turned into custom calls: on an H200 it counted 0.21 TFLOP
  for the DDPM CIFAR-10 step that the CPU's analysis of the same step
  counts as 3.49 (benchmarks/README.md, GPU section);
* everywhere, it counts a while loop's body once, so scanned layers and
  gradient accumulation give lower bounds.

So this counts, from the jaxpr that ``jit(...).trace`` gives (the graph the
backend at hand runs), the matrix products and convolutions: 2 x the
multiply-adds, leaving out the taps that fall on padding or on the holes of
a dilated input (as XLA does), the convention of MFU in
the PaLM paper (Chowdhery et al., 2022, appendix B), where elementwise work
is left out. A ``scan`` counts its body ``length`` times; a ``cond`` its
costliest branch; a ``while`` (no trip count in the jaxpr) its body once,
and the count says it is then a lower bound.
"""

from __future__ import annotations

import math

from jax.extend import core


def dot_flops(eqn) -> int:
  lhs = eqn.invars[0].aval
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  terms = math.prod(lhs.shape[d] for d in lhs_contract)
  return 2 * math.prod(eqn.outvars[0].aval.shape) * terms


def _taps(n: int, k: int, stride: int, pad: tuple[int, int], lhs_dil: int,
          rhs_dil: int) -> int:
  """Pairs (output position, kernel tap) along one spatial dimension whose
  tap lands on a real input element, not on padding or on a hole that
  ``lhs_dil`` inserts (transposed convolutions, strided layers' input
  gradients): only those multiply, as XLA's cost analysis counts them."""
  dilated = (n - 1) * lhs_dil + 1
  out = (dilated + pad[0] + pad[1] - (k - 1) * rhs_dil - 1) // stride + 1
  count = 0
  for o in range(max(out, 0)):
    for t in range(k):
      pos = o * stride + t * rhs_dil - pad[0]
      count += 0 <= pos < dilated and pos % lhs_dil == 0
  return count


def conv_flops(eqn) -> int:
  # Per (output position, tap), every input feature of the kernel multiplies
  # once per output feature and batch element. The same holds for the
  # gradient convolutions of JAX's transpose rules (there the "kernel" is
  # the output gradient, and its window spans the image).
  params = eqn.params
  lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
  out = eqn.outvars[0].aval
  numbers = params["dimension_numbers"]
  lhs_spatial, rhs_spatial = numbers.lhs_spec[2:], numbers.rhs_spec[2:]
  out_spatial = numbers.out_spec[2:]
  taps = 1
  for i, (ld, rd) in enumerate(zip(lhs_spatial, rhs_spatial, strict=True)):
    taps *= _taps(lhs.shape[ld], rhs.shape[rd], params["window_strides"][i],
                  tuple(params["padding"][i]), params["lhs_dilation"][i],
                  params["rhs_dilation"][i])
  batch_and_features = math.prod(out.shape) // math.prod(
      out.shape[d] for d in out_spatial)
  return 2 * batch_and_features * rhs.shape[numbers.rhs_spec[1]] * taps


def sub_jaxprs(value):
  if isinstance(value, core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from sub_jaxprs(item)


def jaxpr_flops(jaxpr) -> tuple[int, bool]:
  """(FLOPs, exact) of ``jaxpr`` (a Jaxpr or ClosedJaxpr); ``exact`` is
  False when a ``while`` loop made the count a lower bound."""
  if isinstance(jaxpr, core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  total, exact = 0, True
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += conv_flops(eqn)
    elif name == "cond":
      counts = [jaxpr_flops(b) for b in eqn.params["branches"]]
      total += max(c for c, _ in counts)
      exact &= all(e for _, e in counts)
    else:
      inner = [jaxpr_flops(j) for value in eqn.params.values()
               for j in sub_jaxprs(value)]
      times = eqn.params["length"] if name == "scan" else 1
      total += times * sum(c for c, _ in inner)
      exact &= all(e for _, e in inner) and name != "while"
  return total, exact


def traced_flops(traced) -> tuple[int, bool]:
  """(FLOPs, exact) of a ``jax.jit(f).trace(*args)`` result."""
  return jaxpr_flops(traced.jaxpr)

