"""The benchmark scripts run and print what they promise (tiny configs on
CPU; the figures themselves are recorded in benchmarks/README.md)."""

import json
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import script_env

REPO = pathlib.Path(__file__).resolve().parent.parent


def _json_lines(stdout):
  return [json.loads(line) for line in stdout.splitlines()
          if line.startswith("{")]


def _gpu_check(*args, timeout=600):
  proc = subprocess.run(
      [sys.executable, "benchmarks/gpu_check.py", "--smoke", *args],
      cwd=REPO, env=script_env(), capture_output=True, text=True,
      timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout


def test_gpu_check_times_training_and_sampling(tmp_path):
  """One config's train step, a profile of it and its samples: every figure
  is there and positive, the sample has the data's shape."""
  out = _gpu_check("--configs=pixelcnn_mnist.py",
                   "--profile=pixelcnn_mnist.py:float32",
                   f"--profile_dir={tmp_path}")
  rows = _json_lines(out)
  train, profile, sample = rows
  # The traced steps' ops, summed by name: the CPU has no device tracks.
  assert profile["what"] == "profile" and not profile["device_tracks"]
  assert profile["ms_per_step"] > 0 and profile["top"]
  assert "| name | ms / step |" in out
  assert train["config"] == "pixelcnn_mnist.py" and train["params"] > 0
  assert train["first_step_s"] > 0 and train["step_ms"] > 0
  assert train["images_s"] > 0
  assert sample["name"] == "4 PixelCNN MNIST samples"
  assert sample["shape"] == [4, 28, 28, 1] and sample["seconds"] > 0
  assert "skipped DDIM" in out  # no diffusion config measured: said so
  assert "| measurement | figures |" in out


def test_gpu_check_measures_a_scanned_config_unrolled_too():
  """A config with model.scan_layers gets a second, unrolled row (same
  parameter count), after the others."""
  rows = [r for r in _json_lines(_gpu_check("--configs=realnvp_cifar10.py"))
          if r["what"] == "train"]
  assert [r["dtype"] for r in rows] == ["float32", "float32 unrolled"]
  assert rows[0]["params"] == rows[1]["params"] > 0
  assert all(r["images_s"] > 0 for r in rows)
  # gpu_check.sh measures the unrolled layouts apart, last: --unrolled=no
  # in the groups, --unrolled=only after them (non-scanned configs skipped).
  for choice, dtypes in (("no", ["float32"]), ("only", ["float32 unrolled"])):
    rows = [r for r in _json_lines(_gpu_check(
        "--configs=realnvp_cifar10.py,pixelcnn_mnist.py"
        if choice == "only" else "--configs=realnvp_cifar10.py",
        f"--unrolled={choice}")) if r["what"] == "train"]
    assert [r["dtype"] for r in rows] == dtypes, choice


def test_gpu_check_budget_skips_and_says_so():
  out = _gpu_check("--configs=vae_binarized_mnist.py,pixelcnn_mnist.py",
                   "--budget_s=0")
  assert "skipped vae_binarized_mnist.py float32" in out
  assert "skipped pixelcnn_mnist.py float32" in out
  assert not [r for r in _json_lines(out) if "images_s" in r]


@pytest.mark.slow  # about 3 minutes on 2 cores
def test_gpu_check_all_paper_configs():
  rows = _json_lines(_gpu_check())
  dtypes = {(r["config"], r["dtype"]) for r in rows if r["what"] == "train"}
  assert ("diffusion_cifar10.py", "bfloat16") in dtypes
  assert ("vdm_cifar10.py", "bfloat16") in dtypes
  # 9 configs, DDPM and VDM also in bfloat16, and the four scanned configs
  # (two flows, PixelCNN++, VDM) again unrolled.
  assert len([r for r in rows if "images_s" in r]) == 15
  assert any(r.get("name", "").startswith("DDIM-") for r in rows)


def test_compile_times_overrides_a_field_and_names_a_misspelt_one(
    monkeypatch):
  """``--set section.key=value`` changes the config it times (the literal
  converted to the field's type); a field that does not exist stops with
  one line naming it."""
  monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
  import compile_times

  from gm_jax import config_lib
  config = config_lib.load(str(REPO / "configs/glow_cifar10.py"))
  config = compile_times.override(config, "model.scan_layers=False")
  assert config.model.scan_layers is False
  config = compile_times.override(config, "train.batch_size=64")
  assert config.train.batch_size == 64
  with pytest.raises(SystemExit, match="no field 'model.scan_layer'"):
    compile_times.override(config, "model.scan_layer=True")
  with pytest.raises(SystemExit, match="section.key=value"):
    compile_times.override(config, "scan_layers")


def test_bench_train_counts_accumulated_micro_batches_in_full(monkeypatch):
  """The step's FLOPs come from its jaxpr, where a scan's body counts
  ``length`` times: accumulating 2 micro-batches of 8 costs what one batch
  of 16 does (XLA's cost analysis counted half), and the count is exact."""
  monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
  import bench_train

  from gm_jax import config_lib
  results = {}
  for accumulation in (1, 2):
    config = config_lib.load(str(REPO / "configs/pixelcnn_mnist.py:smoke"))
    config.unlock()
    config.train.batch_size = 16
    config.optim.grad_accumulation = accumulation
    r = bench_train.measure(config, steps=1, eval_batches=0)
    results[accumulation] = (r["flops_per_step"], r["flops_exact"])
  assert results[1][1] and results[2][1]
  assert results[1][0] > 0
  assert results[2][0] == pytest.approx(results[1][0], rel=1e-3), results


class _ConvNet:
  """A small network with every kind of convolution the models use: padded,
  strided, transposed (input dilation), kernel-dilated, a 1x1 product and a
  dense layer; no biases, so XLA's count has no elementwise terms."""

  def __init__(self):
    import flax.linen as nn

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = nn.Conv(16, (3, 3), use_bias=False)(x)
        x = nn.Conv(32, (3, 3), strides=2, use_bias=False)(x)
        x = nn.ConvTranspose(8, (4, 4), strides=(2, 2), use_bias=False)(x)
        x = nn.Conv(8, (5, 5), padding=((1, 3), (2, 2)), kernel_dilation=2,
                    use_bias=False)(x)
        x = nn.Dense(4, use_bias=False)(x)
        return nn.Dense(10, use_bias=False)(x.reshape(x.shape[0], -1))

    self.net = Net()


def test_jaxpr_flops_equal_xla_cost_analysis_on_cpu(monkeypatch):
  """On the forward pass the count equals XLA's own (padding taps and the
  holes of a transposed convolution left out, as XLA does) exactly; on the
  gradient, within 1% (XLA counts the loss's few elementwise ops too)."""
  monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
  import flops
  import jax
  import jax.numpy as jnp

  net = _ConvNet().net
  x = jnp.ones((4, 16, 16, 3))
  params = net.init(jax.random.PRNGKey(0), x)
  forward = jax.jit(net.apply)
  count, exact = flops.traced_flops(forward.trace(params, x))
  assert exact
  assert count == forward.lower(params, x).cost_analysis()["flops"]
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(net.apply(p, x)),
                          argnums=(0, 1)))
  count, exact = flops.traced_flops(grad.trace(params, x))
  xla = grad.lower(params, x).cost_analysis()["flops"]
  assert exact and count == pytest.approx(xla, rel=0.01)


def test_jaxpr_flops_count_loops(monkeypatch):
  """A scan's body counts ``length`` times (the unrolled loop's count); a
  cond counts its costliest branch; a while loop once, flagged inexact."""
  monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
  import flops
  import jax
  import jax.numpy as jnp

  x = jnp.ones((8, 8))
  one = flops.traced_flops(jax.jit(lambda x: x @ x).trace(x))
  assert one == (2 * 8**3, True)
  scanned = jax.jit(lambda x: jax.lax.scan(
      lambda c, _: (c @ x, None), x, None, length=5)[0])
  assert flops.traced_flops(scanned.trace(x)) == (5 * one[0], True)
  branchy = jax.jit(lambda x: jax.lax.cond(
      x[0, 0] > 0, lambda x: x @ x @ x, lambda x: x, x))
  assert flops.traced_flops(branchy.trace(x)) == (2 * one[0], True)
  looped = jax.jit(lambda x: jax.lax.while_loop(
      lambda c: c[0, 0] < 100.0, lambda c: c @ x, x))
  assert flops.traced_flops(looped.trace(x)) == (one[0], False)


def test_trace_summary_sums_device_kernels_only(tmp_path, monkeypatch):
  """With device tracks, only their events count (host events, nested or
  not, are left out), summed by name and sorted by time."""
  import gzip

  monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
  import trace_summary

  def meta(kind, pid, name, tid=None):
    return dict(ph="M", name=kind, pid=pid, tid=tid, args=dict(name=name))

  def event(pid, tid, name, dur):
    return dict(ph="X", pid=pid, tid=tid, name=name, ts=0, dur=dur)

  events = [
      meta("process_name", 1, "/host:CPU"),
      meta("thread_name", 1, "tf_XLAPjRtCpuClient/1", tid=7),
      meta("process_name", 2, "/device:GPU:0"),
      event(1, 7, "PjitFunction(train_step)", 900.0),
      event(2, 3, "gemm_kernel", 30.0), event(2, 3, "gemm_kernel", 40.0),
      event(2, 4, "loop_fusion", 50.0), dict(ph="i", pid=2, name="marker"),
  ]
  path = tmp_path / "plugins" / "profile" / "perfetto_trace.json.gz"
  path.parent.mkdir(parents=True)
  with gzip.open(path, "wt") as f:
    json.dump(dict(traceEvents=events), f)
  summary = trace_summary.summarize(trace_summary.latest_trace(tmp_path))
  assert summary["device"] and summary["total_us"] == 120.0
  assert summary["rows"] == [("gemm_kernel", 70.0, 2), ("loop_fusion", 50.0, 1)]
  table = trace_summary.format_summary(summary, steps=2)
  assert "0.06 ms per step" in table and "| `gemm_kernel` | 0.035 | 1 |" in table
  with pytest.raises(FileNotFoundError, match="no perfetto_trace"):
    trace_summary.latest_trace(tmp_path / "plugins" / "nothing")


def test_conv_forward_times_both_formulations_per_library():
  """conv_forward.py checks the two formulations agree, then prints one row
  per kernel library with both times."""
  proc = subprocess.run(
      [sys.executable, "benchmarks/conv_forward.py", "--shapes=2x8x4x4",
       "--reps=1"], cwd=REPO, env=script_env(), capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [line for line in proc.stdout.splitlines()
          if line.startswith("| 2x8x4x4 |")]
  assert [r.split(" | ")[2] for r in rows] == ["eigen", "ynnpack", "xla"]


def test_layer_costs_lists_the_forward_layers_once_each(monkeypatch):
  """From a gradient's jaxpr, layer_costs takes the forward pass's
  convolutions and products only (not the backward pass's), each distinct
  layer once with how often it runs (a scan's length), and their FLOPs sum
  to the forward pass's."""
  monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
  import flops
  import jax
  import jax.numpy as jnp
  import layer_costs

  from gm_jax import convolutions

  x = jnp.ones((2, 6, 6, 3))
  k = jnp.ones((3, 3, 3, 4))
  w = jnp.ones((4, 5))

  def forward(x, k, w):
    h = convolutions.conv2d(x, k, (1, 1), ((1, 1), (1, 1)))
    h = jax.lax.scan(lambda c, _: (jnp.tanh(c @ jnp.eye(4)), None), h, None,
                     length=3)[0]
    return jnp.sum(jnp.sin(convolutions.dot_general(
        h, w, (((3,), (0,)), ((), ())))))

  grad = jax.jit(jax.grad(forward, (0, 1, 2))).trace(x, k, w)
  layers = layer_costs.forward_layers(grad.jaxpr)
  assert sorted((layer_costs.label(r), r["count"]) for r in layers) == [
      ("conv 3x3 3->4 /1x1 6x6 B2", 1),
      ("dot 2x6x6x4 . 4x4", 3),
      ("dot 72x4 . 4x5", 1),
  ]
  total = sum(r["count"] * r["flops"] for r in layers)
  assert total == flops.traced_flops(jax.jit(forward).trace(x, k, w))[0]


@pytest.mark.parametrize("padding,strides,groups", [
    (((1, 0), (1, 1)), (1, 1), 1),  # PixelCNN's cropped masked kernel
    (((1, 1), (1, 1)), (2, 1), 1),
    (((0, 0), (0, 0)), (1, 1), 2),
])
def test_layer_costs_torch_plans_compute_the_same_layer(padding, strides,
                                                        groups, monkeypatch):
  """layer_costs_torch.py's translations, replayed with JAX in PyTorch's
  layouts (NCHW, OIHW, explicit padding then symmetric): the same
  convolution and the same product as the layer they describe."""
  monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
  import jax
  import jax.numpy as jnp
  import layer_costs
  import layer_costs_torch
  import numpy as np

  x = jax.random.normal(jax.random.key(0), (2, 7, 6, 4))
  k = jax.random.normal(jax.random.key(1), (2, 3, 4 // groups, 6))
  conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
      x, k, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups)
  layer = layer_costs.forward_layers(jax.make_jaxpr(conv)(x, k))[0]
  plan = layer_costs_torch.conv_plan(json.loads(json.dumps(layer)))
  xt, kt = x.transpose(0, 3, 1, 2), k.transpose(3, 2, 0, 1)
  assert list(xt.shape) == plan["x_shape"]
  assert list(kt.shape) == plan["w_shape"]
  if plan["pad"] is not None:
    left, right, top, bottom = plan["pad"]
    xt = jnp.pad(xt, ((0, 0), (0, 0), (top, bottom), (left, right)))
  kw = plan["kwargs"]
  out = jax.lax.conv_general_dilated(
      xt, kt, kw["stride"], [(p, p) for p in kw["padding"]],
      rhs_dilation=kw["dilation"], feature_group_count=kw["groups"],
      dimension_numbers=("NCHW", "OIHW", "NCHW"))
  np.testing.assert_allclose(out.transpose(0, 2, 3, 1), conv(x, k),
                             rtol=1e-5, atol=1e-5)

  for lhs_shape, rhs_shape, numbers in [
      ((3, 5, 4), (3, 4, 2), (((2,), (1,)), ((0,), (0,)))),
      ((6, 3), (6, 2), (((0,), (0,)), ((), ()))),
      ((2, 4, 3, 5), (3, 5, 7), (((2, 3), (0, 1)), ((), ())))]:
    a = jax.random.normal(jax.random.key(2), lhs_shape)
    b = jax.random.normal(jax.random.key(3), rhs_shape)
    product = lambda a, b, n=numbers: jax.lax.dot_general(a, b, n)  # noqa: E731
    layer = layer_costs.forward_layers(jax.make_jaxpr(product)(a, b))[0]
    np.testing.assert_allclose(
        np.einsum(layer_costs_torch.einsum_spec(layer), a, b), product(a, b),
        rtol=1e-5, atol=1e-5)


def test_layer_costs_prints_every_layer_and_names_a_missing_peer():
  """layer_costs.py on a tiny config: one row per distinct layer, the sums
  against the whole step, and, when the PyTorch side cannot run (here: an
  interpreter without torch), one line saying so, the gm_jax side intact."""
  proc = subprocess.run(
      [sys.executable, "benchmarks/layer_costs.py",
       "--config=configs/pixelcnn_mnist.py:smoke", "--steps=1", "--reps=1",
       f"--peer_python={sys.executable}"],
      cwd=REPO, env=script_env(), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "PyTorch side not timed" in proc.stderr
  assert "No module named 'torch'" in proc.stderr
  rows = [line for line in proc.stdout.splitlines()
          if line.startswith("| conv") or line.startswith("| dot")]
  assert len(rows) == 6, proc.stdout
  assert sum(" 1->" in row for row in rows) == 1  # the type A layer
  assert "whole gm_jax train step" in proc.stdout


def test_peer_profile_groups_pytorch_operators(monkeypatch):
  """peer_profile.py's table: PyTorch's operators summed per group per step
  (convolutions forward and backward together, products, normalisations,
  the optimizer, the rest), without torch installed."""
  monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
  import peer_profile

  events = [("aten::mkldnn_convolution", 2000.0),
            ("aten::convolution_backward", 4000.0), ("aten::bmm", 600.0),
            ("aten::native_group_norm", 300.0),
            ("aten::linalg_vector_norm", 100.0),
            ("Optimizer.step#Adam.step", 200.0), ("aten::mul", 800.0)]
  table = peer_profile.report(events, steps=2)
  assert "self CPU time per step: 4.0 ms" in table
  assert "| convolutions | 3.0 | 75% |" in table
  assert "| rest | 0.4 | 10% |" in table
  assert "| normalisations | 0.2 | 5% |" in table
  assert "| matrix products | 0.3 | 8% |" in table
  assert "| optimizer | 0.1 | 2% |" in table
  assert "| `aten::convolution_backward` | convolutions | 2.00 |" in table


def test_layer_costs_table_sums_over_the_step(monkeypatch):
  """The table's sums weigh each layer by its runs per step, and a
  gradient alone is its column minus the forward pass, on both sides."""
  monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
  import layer_costs

  layer = dict(kind="dot", lhs_shape=[8, 4], rhs_shape=[4, 2],
               dtype="float32", dimension_numbers=[[[1], [0]], [[], []]],
               flops=128, count=3, forward_ms=1.0, input_ms=2.0,
               kernel_ms=4.0, train_ms=5.0,
               torch=dict(forward_ms=2.0, input_ms=3.0, kernel_ms=4.0,
                          train_ms=6.0))
  text = layer_costs.table([layer], step_ms=20.0, with_torch=True)
  assert "| dot 8x4 . 4x2 | 3 | 0.000 | 1.00 / 2.00 | 2.00 / 3.00 |" in text
  assert "| 1.20x |" in text
  assert "summed over the step: 15.0 ms (75%)" in text
  assert "the rest (elementwise, normalisation, loss, optimizer): 5.0 ms" in text
  assert "- forward: 3.0 / 6.0 (2.00x speed)" in text
  assert "- input gradient alone (column minus forward): 3.0 / 3.0" in text
  assert "- kernel gradient alone (column minus forward): 9.0 / 6.0 (0.67x" in text
  assert "- forward + both gradients: 15.0 / 18.0 (1.20x speed)" in text
