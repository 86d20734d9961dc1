"""The PyTorch half of ``layer_costs.py``: times, in eager PyTorch, the
layers that ``layer_costs.py`` found in a gm_jax train step.

It needs torch only (no jax, no gm_jax, not even numpy), so that it runs in
the PyTorch peers' virtual environment (../shared/peers); torch is imported
where the timing starts, and the translations (``conv_plan``,
``einsum_spec``) are plain Python, tested against JAX without torch:

  $PEERSENV/bin/python benchmarks/layer_costs_torch.py layers.json out.json

``layers.json`` is a list of layer descriptions (what ``layer_costs.py``
writes): a convolution's operand shapes, layout specs, strides, padding,
dilations and groups, or a matrix product's shapes and dimension numbers.
For each, this writes to ``out.json`` the median milliseconds of the
forward pass (``torch.no_grad``) and of the forward pass plus the gradient
of the input, of the kernel, and of both, the way the peers train: float32, eager, 2 intra-op
threads and 1 inter-op thread, tensors in PyTorch's own layout (NCHW
images, OIHW kernels). Asymmetric padding is an explicit ``F.pad`` before
a padding-free convolution (``F.conv2d`` pads both sides alike); input
dilation (transposed convolutions) has no direct PyTorch equivalent and
is left out ("skipped").
"""

from __future__ import annotations

import json
import statistics
import string
import sys
import time


def _median_ms(fn, reps: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def conv_plan(layer: dict):
  """How PyTorch computes a convolution of ``layer``: the shapes of its
  input (NCHW) and kernel (OIHW), the explicit padding (F.pad's (left,
  right, top, bottom)) or None where F.conv2d's own symmetric padding
  does, and conv2d's keyword arguments. None where PyTorch has no direct
  equivalent (input dilation, batch groups, other than 2 spatial dims)."""
  if (len(layer["strides"]) != 2 or layer["batch_group_count"] != 1
      or any(d != 1 for d in layer["lhs_dilation"])):
    return None
  lhs, rhs = layer["lhs_shape"], layer["rhs_shape"]
  # A spec lists the operand's dims as (batch or out-feature, feature or
  # in-feature, spatial...): PyTorch's own order.
  (top, bottom), (left, right) = layer["padding"]
  symmetric = top == bottom and left == right
  return dict(
      x_shape=[lhs[d] for d in layer["lhs_spec"]],
      w_shape=[rhs[d] for d in layer["rhs_spec"]],
      pad=None if symmetric else (left, right, top, bottom),
      kwargs=dict(stride=tuple(layer["strides"]),
                  padding=(top, left) if symmetric else (0, 0),
                  dilation=tuple(layer["rhs_dilation"]),
                  groups=layer["feature_group_count"]))


def einsum_spec(layer: dict) -> str:
  """``lax.dot_general``'s product as an einsum: batch dims, then the
  left operand's free dims, then the right one's (dot_general's order)."""
  (a_contract, b_contract), (a_batch, b_batch) = layer["dimension_numbers"]
  letters = iter(string.ascii_letters)
  a_sub = [None] * len(layer["lhs_shape"])
  b_sub = [None] * len(layer["rhs_shape"])
  out = []
  for i, j in zip(a_batch, b_batch, strict=True):
    a_sub[i] = b_sub[j] = next(letters)
    out.append(a_sub[i])
  for i, j in zip(a_contract, b_contract, strict=True):
    a_sub[i] = b_sub[j] = next(letters)
  for sub in (a_sub, b_sub):
    for i, s in enumerate(sub):
      if s is None:
        sub[i] = next(letters)
        out.append(sub[i])
  return f"{''.join(a_sub)},{''.join(b_sub)}->{''.join(out)}"


def _torch_layer(layer, torch):
  """(forward, x, w) of ``layer`` in PyTorch, or None (see ``conv_plan``)."""
  import torch.nn.functional as F
  dtype = getattr(torch, layer["dtype"])
  if layer["kind"] == "dot":
    spec = einsum_spec(layer)
    return ((lambda a, b: torch.einsum(spec, a, b)),
            torch.randn(layer["lhs_shape"], dtype=dtype),
            0.05 * torch.randn(layer["rhs_shape"], dtype=dtype))
  plan = conv_plan(layer)
  if plan is None:
    return None
  pad, kwargs = plan["pad"], plan["kwargs"]

  def forward(x, w):
    return F.conv2d(x if pad is None else F.pad(x, pad), w, **kwargs)
  return (forward, torch.randn(plan["x_shape"], dtype=dtype),
          0.05 * torch.randn(plan["w_shape"], dtype=dtype))


def time_layer(layer, reps: int) -> dict:
  import torch
  made = _torch_layer(layer, torch)
  if made is None:
    return {"skipped": True}
  forward, x, w = made
  with torch.no_grad():
    y = forward(x, w)
    forward_ms = _median_ms(lambda: forward(x, w), reps)
  g = torch.randn_like(y)

  def with_gradients(of_x: bool, of_w: bool) -> float:
    x.requires_grad_(of_x)
    w.requires_grad_(of_w)

    def step():
      x.grad = w.grad = None
      forward(x, w).backward(g)
    return _median_ms(step, reps)
  return {"forward_ms": forward_ms,
          "input_ms": with_gradients(True, False),
          "kernel_ms": with_gradients(False, True),
          "train_ms": with_gradients(True, True)}


def main() -> None:
  if len(sys.argv) not in (3, 4):
    sys.exit("usage: layer_costs_torch.py LAYERS_JSON OUT_JSON [REPS]")
  import torch
  torch.set_num_threads(2)
  try:
    torch.set_num_interop_threads(1)
  except RuntimeError:
    pass
  torch.manual_seed(0)
  reps = int(sys.argv[3]) if len(sys.argv) == 4 else 10
  with open(sys.argv[1]) as f:
    layers = json.load(f)
  results = [time_layer(layer, reps) for layer in layers]
  with open(sys.argv[2], "w") as f:
    json.dump({"torch": torch.__version__, "threads": 2, "layers": results},
              f)


if __name__ == "__main__":
  main()
