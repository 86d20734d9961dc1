"""Where a train step's time goes, layer by layer, and what the same layers
cost in PyTorch: which operation loses, and by how much.

XLA:CPU's profiler cannot say this. Its trace records when each convolution
is launched, not how long it runs (the kernels run asynchronously on the
intra-op threads): a PixelCNN step of 1.25 s showed 0.2 ms per convolution.
So this times the layers one at a time instead:

1. It builds the config's trainer, times the whole jitted train step (as
   ``bench_train.py`` does), and reads the step's jaxpr.
2. It lists the forward pass's convolutions and matrix products, with how
   many times each runs per step (a ``scan`` counts its length; every
   branch of a ``cond`` counts). Equations under ``transpose(...)`` (the
   backward pass) are not listed: each forward layer is timed with its
   gradients.
3. Each distinct layer is jitted alone, on random operands of its shapes
   and dtype, with the trainer's CPU compile options, and timed four ways:
   its forward pass, and its forward pass with the gradient of the input,
   of the kernel, and of both. The sums subtract the forward pass to say
   which gradient loses. (The first layer's input gradient is timed too,
   on both sides, though training never computes it: the images are not
   parameters.) Convolutions in NHWC / HWIO run through
   ``gm_jax.convolutions.conv2d``, as the models' ``Conv`` layers do
   (kernel gradients included); others through ``lax.conv_general_dilated``
   with JAX's own derivative.
4. With ``--peer_python`` (the PyTorch peers' interpreter), the same layers
   are timed in eager PyTorch by ``layer_costs_torch.py``.

The table is sorted by the layers' share of the step. The sums say how
much of the step the layers explain; the rest is elementwise work,
normalisations, the loss and the optimizer.

  python benchmarks/layer_costs.py --config=configs/pixelcnn_mnist.py \
      --config.model.width=64 --config.train.batch_size=64 --steps=5 \
      --peer_python=$PEERSENV/bin/python

``side_by_side.sh`` runs it for its rows with ``LAYERS=1``.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

# bench_train defines --config (with --config.KEY=VALUE overrides) and
# --steps, the timed whole steps.
import bench_train
import flops as flops_lib
from absl import flags
from conv_forward import median_ms

from gm_jax import launch

_REPS = flags.DEFINE_integer("reps", 10, "Timed calls per layer (median).")
_PEER_PYTHON = flags.DEFINE_string(
    "peer_python", None,
    "A Python with torch (the PyTorch peers' venv): also time the layers"
    " in eager PyTorch.")
_JSON_OUT = flags.DEFINE_string("json_out", None,
                                "Also write the rows as JSON to this file.")

TORCH_SCRIPT = pathlib.Path(__file__).with_name("layer_costs_torch.py")
NHWC_HWIO = ([0, 3, 1, 2], [3, 2, 0, 1], [0, 3, 1, 2])


def _describe(eqn) -> dict:
  """A layer's description (JSON-able): what is needed to rebuild it."""
  lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
  layer = dict(lhs_shape=list(lhs.shape), rhs_shape=list(rhs.shape),
               dtype=str(lhs.dtype))
  p = eqn.params
  if eqn.primitive.name == "dot_general":
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    layer.update(kind="dot", dimension_numbers=[[list(lc), list(rc)],
                                                [list(lb), list(rb)]])
  else:
    numbers = p["dimension_numbers"]
    layer.update(
        kind="conv", lhs_spec=list(numbers.lhs_spec),
        rhs_spec=list(numbers.rhs_spec), out_spec=list(numbers.out_spec),
        strides=list(p["window_strides"]),
        padding=[list(pad) for pad in p["padding"]],
        lhs_dilation=list(p["lhs_dilation"]),
        rhs_dilation=list(p["rhs_dilation"]),
        feature_group_count=p["feature_group_count"],
        batch_group_count=p["batch_group_count"])
  return layer


def forward_layers(jaxpr) -> list[dict]:
  """The distinct convolutions and matrix products of ``jaxpr``'s forward
  pass, each with ``count`` (runs per call) and ``flops`` (per run)."""
  found: dict[str, dict] = {}

  def walk(jaxpr, times: int, backward: bool) -> None:
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      under_transpose = backward or "transpose(" in str(
          eqn.source_info.name_stack)
      if name in ("conv_general_dilated", "dot_general"):
        if under_transpose:
          continue
        layer = _describe(eqn)
        key = json.dumps(layer, sort_keys=True)
        if key not in found:
          found[key] = dict(layer, count=0, flops=(
              flops_lib.dot_flops(eqn) if name == "dot_general"
              else flops_lib.conv_flops(eqn)))
        found[key]["count"] += times
        continue
      inner = times * (eqn.params["length"] if name == "scan" else 1)
      for value in eqn.params.values():
        for sub in flops_lib.sub_jaxprs(value):
          walk(sub, inner, under_transpose)

  if hasattr(jaxpr, "jaxpr"):
    jaxpr = jaxpr.jaxpr
  walk(jaxpr, 1, False)
  return list(found.values())


def label(layer: dict) -> str:
  """A short name: "conv 2x3 64->64 /1 28x28 B64" or "dot 50176x64 . 64x128"."""
  lhs, rhs = layer["lhs_shape"], layer["rhs_shape"]
  dtype = "" if layer["dtype"] == "float32" else f" {layer['dtype']}"
  if layer["kind"] == "dot":
    return ("dot " + "x".join(map(str, lhs)) + " . " + "x".join(map(str, rhs))
            + dtype)
  ls, rs = layer["lhs_spec"], layer["rhs_spec"]
  kernel = "x".join(str(rhs[d]) for d in rs[2:])
  size = "x".join(str(lhs[d]) for d in ls[2:])
  stride = "x".join(map(str, layer["strides"]))
  extra = ""
  if any(d != 1 for d in layer["lhs_dilation"]):
    extra += " dilated input"
  if layer["feature_group_count"] != 1:
    extra += f" groups {layer['feature_group_count']}"
  return (f"conv {kernel} {lhs[ls[1]]}->{rhs[rs[0]]} /{stride} {size}"
          f" B{lhs[ls[0]]}{extra}{dtype}")


def _layer_fn(layer: dict):
  import jax

  from gm_jax import convolutions
  if layer["kind"] == "dot":
    (lc, rc), (lb, rb) = layer["dimension_numbers"]
    numbers = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    return lambda a, b: jax.lax.dot_general(a, b, numbers)
  strides = tuple(layer["strides"])
  padding = tuple(tuple(p) for p in layer["padding"])
  if ((layer["lhs_spec"], layer["rhs_spec"], layer["out_spec"]) == NHWC_HWIO
      and layer["feature_group_count"] == layer["batch_group_count"] == 1
      and set(layer["lhs_dilation"] + layer["rhs_dilation"]) == {1}):
    return lambda x, k: convolutions.conv2d(x, k, strides, padding)
  numbers = jax.lax.ConvDimensionNumbers(
      tuple(layer["lhs_spec"]), tuple(layer["rhs_spec"]),
      tuple(layer["out_spec"]))
  return lambda x, k: jax.lax.conv_general_dilated(
      x, k, strides, padding, tuple(layer["lhs_dilation"]),
      tuple(layer["rhs_dilation"]), numbers,
      feature_group_count=layer["feature_group_count"],
      batch_group_count=layer["batch_group_count"])


def time_layer(layer: dict, compiler_options, reps: int) -> dict:
  """``layer`` alone in gm_jax, median ms of: the forward pass
  ("forward_ms"), the forward pass with the gradient of the input
  ("input_ms"), of the kernel ("kernel_ms"), and of both ("train_ms")."""
  import jax
  import jax.numpy as jnp
  dtype = jnp.dtype(layer["dtype"])
  x = jax.random.normal(jax.random.PRNGKey(0), layer["lhs_shape"], dtype)
  w = 0.05 * jax.random.normal(jax.random.PRNGKey(1), layer["rhs_shape"],
                               dtype)
  fn = _layer_fn(layer)
  forward = jax.jit(fn, compiler_options=compiler_options)
  g = jax.random.normal(jax.random.PRNGKey(2), forward(x, w).shape, dtype)

  def with_gradients(wrt):
    def run(x, w, g):
      y, pullback = jax.vjp(wrt, x, w)
      return y, pullback(g)
    return jax.jit(run, compiler_options=compiler_options)
  return dict(
      forward_ms=median_ms(forward, x, w, reps=reps),
      input_ms=median_ms(with_gradients(
          lambda x, w: fn(x, jax.lax.stop_gradient(w))), x, w, g, reps=reps),
      kernel_ms=median_ms(with_gradients(
          lambda x, w: fn(jax.lax.stop_gradient(x), w)), x, w, g, reps=reps),
      train_ms=median_ms(with_gradients(fn), x, w, g, reps=reps))


def torch_times(layers: list[dict], python: str,
                reps: int) -> tuple[list[dict], str]:
  """(times of ``layers``, torch version) from ``layer_costs_torch.py``
  under ``python``."""
  with tempfile.TemporaryDirectory() as tmp:
    spec, out = os.path.join(tmp, "layers.json"), os.path.join(tmp, "out.json")
    with open(spec, "w") as f:
      json.dump(layers, f)
    done = subprocess.run([python, str(TORCH_SCRIPT), spec, out, str(reps)],
                          capture_output=True, text=True, check=False)
    if done.returncode:
      raise RuntimeError(f"{python} {TORCH_SCRIPT.name} failed:"
                         f" {done.stderr.strip().splitlines()[-1:]}")
    with open(out) as f:
      result = json.load(f)
  return result["layers"], result["torch"]


COLUMNS = (("forward_ms", "forward"), ("input_ms", "+ input gradient"),
           ("kernel_ms", "+ kernel gradient"), ("train_ms", "+ both"))


def table(rows: list[dict], step_ms: float, with_torch: bool) -> str:
  """The Markdown table of ``rows`` (layers with their times) and the sums:
  times in ms, "gm_jax / PyTorch" with ``with_torch``."""
  who = " (gm_jax / PyTorch)" if with_torch else ""
  head = (["layer", "per step", "GFLOP"]
          + [f"{name} ms{who}" for _, name in COLUMNS])
  if with_torch:
    head.append("gm_jax speed / PyTorch's (+ both)")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  timed = [r for r in rows if "train_ms" in r.get("torch", {})]

  def ratio(ours, theirs):
    return f"{theirs / ours:.2f}x" if ours and theirs else "n/a"
  for r in rows:
    cells = [label(r), f"{r['count']:g}", f"{r['flops'] / 1e9:.3f}"]
    theirs = r.get("torch", {})
    for key, _ in COLUMNS:
      cells.append(f"{r[key]:.2f}" + (
          "" if not with_torch else
          f" / {theirs[key]:.2f}" if key in theirs else " / skipped"))
    if with_torch:
      cells.append(ratio(r["train_ms"], theirs.get("train_ms")))
    lines.append("| " + " | ".join(cells) + " |")

  def total(rows, key, side=None):
    return sum(r["count"] * (r[side] if side else r)[key] for r in rows)
  ours = total(rows, "train_ms")
  lines += ["", f"whole gm_jax train step: {step_ms:.1f} ms; its layers"
            " alone, forward + gradients, summed over the step:"
            f" {ours:.1f} ms ({100 * ours / step_ms:.0f}%); the rest"
            " (elementwise, normalisation, loss, optimizer):"
            f" {step_ms - ours:.1f} ms"]
  if with_torch:
    lines.append(f"the same layers in PyTorch ({len(rows) - len(timed)}"
                 " layer kinds skipped), summed over the step, gm_jax /"
                 " PyTorch ms:")
    forward = (total(timed, "forward_ms"),
               total(timed, "forward_ms", "torch"))
    for key, name in COLUMNS:
      both = (total(timed, key), total(timed, key, "torch"))
      if key in ("input_ms", "kernel_ms"):
        name = name[2:] + " alone (column minus forward)"
        both = (both[0] - forward[0], both[1] - forward[1])
      elif key == "train_ms":
        name = "forward + both gradients"
      lines.append(f"- {name}: {both[0]:.1f} / {both[1]:.1f}"
                   f" ({ratio(*both)} speed)")
  return "\n".join(lines)


def main(argv):
  del argv
  import jax

  from gm_jax import convolutions
  config = launch.load_config(flags.FLAGS.config)
  r = bench_train.measure(config, bench_train._STEPS.value, eval_batches=0)
  step_ms = 1e3 * r["step_s"]
  traced = r["built"].train_step.trace(r["state"], r["first_batch"],
                                       r["step_key"])
  layers = forward_layers(traced.jaxpr)
  options = convolutions.cpu_compiler_options(config.train.cpu_convolutions)
  for layer in layers:
    layer.update(time_layer(layer, options, _REPS.value))
  with_torch = bool(_PEER_PYTHON.value)
  torch_version = None
  if with_torch:
    try:
      peer, torch_version = torch_times(
          [{k: v for k, v in layer.items() if not k.endswith("_ms")}
           for layer in layers], _PEER_PYTHON.value, _REPS.value)
      for layer, times in zip(layers, peer, strict=True):
        layer["torch"] = times
    except (OSError, RuntimeError) as e:
      print(f"PyTorch side not timed: {e}", file=sys.stderr)
      with_torch = False
  layers.sort(key=lambda layer: -layer["count"] * layer["train_ms"])
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()});"
        f" {config.model.family}, {r['num_params']:,} parameters, batch"
        f" {r['batch']}; cpu_convolutions {config.train.cpu_convolutions};"
        f" median of {_REPS.value} calls per layer"
        + (f"; PyTorch {torch_version}, 2 threads" if torch_version else ""))
  print(table(layers, step_ms, with_torch))
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(dict(step_ms=step_ms, torch=torch_version, layers=layers), f)


if __name__ == "__main__":
  launch.run(main)
