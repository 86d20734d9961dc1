"""One-shot accelerator check: every paper config's step, the U-Net's MFU,
sampling times. Prepared to run once, in under 8 minutes, on a borrowed GPU.

  python benchmarks/gpu_check.py                 # on the accelerator
  python benchmarks/gpu_check.py --smoke         # the same path on CPU, tiny

Prints, as a table and then as one JSON line per measurement:

* for each paper config: first-step time (compilation included; the
  benchmark does not open the persistent cache, so it is the cold figure),
  train step time and images/s in float32, and in bfloat16 where the config
  has a ``bf16`` argument (``BF16_CONFIGS``: the DDPM and VDM U-Nets; the
  others say "no bfloat16 option");
* every step's model FLOPs (products and convolutions, counted from its
  jaxpr by benchmarks/flops.py: XLA:GPU's own cost analysis leaves out the
  cuDNN and cuBLAS calls) and MFU against the device's dense peak
  (``--peak_tflops`` or the built-in table; float32 against the TF32 peak,
  see ``PEAK_TFLOPS``);
* DDIM-50 for 64 CIFAR-shaped images and 64 PixelCNN MNIST samples, each
  timed after its config's training runs, from the float32 run's state;
* last, the configs that scan their layers (``model.scan_layers``) again
  unrolled, so that one run compares the two layouts' step times.

Data are the embedded images (MNIST digits, 32x32 colour patches), so the
machine needs no network; the figures time the jitted computation. A
``--budget_s`` guard skips what would not fit and says so; the configs
run in the order of ``PAPER_CONFIGS``, the issue's headline figures first.
``--out FILE`` appends the JSON lines to a file as they come. ``--profile``
(by default the DDPM U-Net's bfloat16 step, whose MFU is the headline)
traces 5 steps with ``jax.profiler`` and prints the kernels that took the
most time, so that one borrowed run also says where to optimise next.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Dense peak TFLOP/s by device kind (substring match): (float32, bfloat16).
# The float32 figure is the TF32 tensor-core peak: at JAX's default matmul
# precision XLA:GPU lets cuBLAS and cuDNN round float32 operands to TF32 on
# Ampere and later, so that is the ceiling a float32 step can reach (the
# plain FP32 units' peak, 67 TFLOP/s on Hopper, would overstate its MFU: the
# DDPM U-Net's float32 step ran at 132 TFLOP/s on an H200).
# bfloat16 is the dense tensor-core peak. SXM parts, vendor datasheets.
PEAK_TFLOPS = {
    "H200": (494.7, 989.4),
    "H100": (494.7, 989.4),
    "A100": (156.0, 312.0),
}

# The figures the issue names first (the U-Net's MFU, DDIM-50, PixelCNN
# samples) come first, so that a run cut short by --budget_s still has them.
PAPER_CONFIGS = (
    "diffusion_cifar10.py", "pixelcnn_mnist.py", "vae_mnist.py",
    "vae_binarized_mnist.py", "gated_pixelcnn_mnist.py",
    "pixelcnnpp_cifar10.py", "realnvp_cifar10.py", "glow_cifar10.py",
    "vdm_cifar10.py",
)


# The paper configs with a ``bf16`` argument (model.dtype "bfloat16":
# bfloat16 compute, float32 parameters); the others have no such option.
BF16_CONFIGS = ("diffusion_cifar10.py", "vdm_cifar10.py")


def _peak(kind: str, dtype: str, override: float) -> float:
  if override:
    return override
  for name, (f32, bf16) in PEAK_TFLOPS.items():
    if name in kind:
      return bf16 if dtype == "bfloat16" else f32
  return 0.0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true",
                      help="tiny configs (:smoke) and batches: a CPU check"
                      " of this script")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--budget_s", type=float, default=420.0,
                      help="skip measurements once this much time is spent")
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="device dense peak for the MFU (0: built-in table)")
  parser.add_argument("--configs", default=",".join(PAPER_CONFIGS))
  parser.add_argument("--out", default="",
                      help="also append each JSON line to this file")
  parser.add_argument(
      "--profile", default="diffusion_cifar10.py:bfloat16",
      help="CONFIG:DTYPE whose train step is traced with jax.profiler after"
      " its timing (5 steps, into --profile_dir), its kernels summed by name;"
      " '' for none")
  parser.add_argument("--profile_dir", default="/tmp/gpu_check_trace")
  parser.add_argument(
      "--unrolled", choices=("also", "no", "only"), default="also",
      help="the scanned configs' unrolled re-runs: after the others (also),"
      " none (no), or only those (only: gpu_check.sh runs them last, in"
      " their own process)")
  args = parser.parse_args()

  import bench_train
  import jax
  import numpy as np

  from gm_jax import config_lib

  start = time.perf_counter()
  device = jax.devices()[0]
  kind = f"{device.device_kind} ({device.platform})"
  print(f"device: {len(jax.devices())} x {kind}; jax {jax.__version__}")
  rows = []

  def over_budget(what: str) -> bool:
    spent = time.perf_counter() - start
    if spent > args.budget_s:
      print(f"skipped {what}: {spent:.0f} s spent of --budget_s"
            f" {args.budget_s:.0f}")
      rows.append(dict(what=what, skipped="budget"))
      return True
    return False

  def emit(row: dict) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")

  def train_row(name: str, dtype: str, r: dict) -> dict:
    row = dict(what="train", config=name, dtype=dtype,
               params=r["num_params"], batch=r["batch"],
               first_step_s=round(r["first_step_s"], 2),
               step_ms=round(1e3 * r["step_s"], 2),
               images_s=round(r["train_images_s"], 1))
    if r["flops_per_step"]:
      achieved = r["flops_per_step"] / r["step_s"] / 1e12
      row["tflops_achieved"] = round(achieved, 3)
      # A while loop's body is counted once (the jaxpr holds no trip
      # count): then the figures are lower bounds, and MFU is left out.
      row["flops_lower_bound"] = not r["flops_exact"]
      peak = _peak(device.device_kind, dtype.split()[0], args.peak_tflops)
      if peak and r["flops_exact"]:
        row["peak_tflops"] = peak
        row["mfu_percent"] = round(100 * achieved / peak, 1)
    return row

  def profile(name: str, dtype: str, r: dict, steps: int = 5) -> None:
    """Traces ``steps`` train steps of the run just timed and prints where
    their time went (benchmarks/trace_summary.py); the trace stays in
    --profile_dir for Perfetto or TensorBoard."""
    import trace_summary
    try:
      with jax.profiler.trace(args.profile_dir, create_perfetto_trace=True):
        for _ in range(steps):
          # The step donates its state: keep the newest for the sampler.
          r["state"], metrics = r["built"].train_step(
              r["state"], r["first_batch"], r["step_key"])
        jax.block_until_ready(metrics)
      summary = trace_summary.summarize(
          trace_summary.latest_trace(args.profile_dir))
    except Exception as e:  # noqa: BLE001 -- a profiler that cannot trace
      print(f"no profile of {name} {dtype}: {type(e).__name__}: {e}"[:300])
      return
    print(f"\nprofile of {name} {dtype}, {steps} steps ({args.profile_dir}):")
    print(trace_summary.format_summary(summary, steps))
    emit(dict(what="profile", config=name, dtype=dtype,
              device_tracks=summary["device"],
              ms_per_step=round(summary["total_us"] / 1e3 / steps, 3),
              top=[(n[:60], round(us / 1e3 / steps, 3))
                   for n, us, _ in summary["rows"][:10]]))

  suffix = ":smoke" if args.smoke else ""
  num = 4 if args.smoke else 64

  def sample_row(holder: str, built, train_state) -> None:
    """Times ``num`` samples of the run just measured: the first call
    (compilation included), then a second with another key."""
    what = f"{num} PixelCNN MNIST samples"
    if holder == "diffusion":
      what = (f"DDIM-{built.config.model.sample_steps}, {num} CIFAR-shaped"
              " images")
    if over_budget(what):
      return
    t0 = time.perf_counter()
    jax.block_until_ready(built.sample(train_state.ema_params,
                                       jax.random.PRNGKey(3), num))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(
        built.sample(train_state.ema_params, jax.random.PRNGKey(4), num))
    emit(dict(what="sample", name=what, first_call_s=round(first, 2),
              seconds=round(time.perf_counter() - t0, 3),
              shape=list(np.shape(out))))

  # Configs that scan their layers are measured unrolled too, last (their
  # unrolled compile is the long one): the layouts' step times on the
  # accelerator decide whether scanning costs anything there.
  unrolled = []
  sampled = set()
  for name in args.configs.split(","):
    if args.unrolled == "only":
      spec = f"configs/{name}" + suffix
      if config_lib.load(spec).model.get("scan_layers", False):
        unrolled.append((name, spec))
      continue
    kept = None  # (built, state) of the float32 run, for sampling
    variants = [("float32", "")]
    if name in BF16_CONFIGS:
      variants.append(("bfloat16", "bf16"))
    for dtype, arg in variants:
      what = f"{name} {dtype}"
      if over_budget(what):
        continue
      spec = f"configs/{name}"
      opts = [o for o in (suffix.lstrip(":"), arg) if o]
      if opts:
        spec += ":" + ",".join(opts)
      config = bench_train.offline(config_lib.load(spec))
      r = bench_train.measure(config, args.steps if not args.smoke else 2,
                              eval_batches=0)
      row = train_row(name, dtype, r)
      emit(row)
      if args.profile == f"{name}:{dtype}":
        profile(name, dtype, r)
      if (dtype == "float32" and args.unrolled == "also"
          and config.model.get("scan_layers", False)):
        unrolled.append((name, spec))
      if dtype == "float32" and name in ("diffusion_cifar10.py",
                                         "pixelcnn_mnist.py"):
        kept = (r["built"], r["state"])
      del r
    if kept is not None:
      # Sampled after the config's own variants (the bfloat16 step first:
      # its MFU is the headline) and before the next config, which frees
      # this run's state.
      holder = name.split("_")[0]
      sample_row(holder, *kept)
      sampled.add(holder)
      kept = None
    if name not in BF16_CONFIGS and not args.smoke:
      emit(dict(what="train", config=name, dtype="bfloat16",
                skipped="no bfloat16 option in this family"))
  for holder, what in (("diffusion", "DDIM"), ("pixelcnn", "PixelCNN")):
    if holder not in sampled and args.unrolled != "only":
      print(f"skipped {what} samples: their config was not measured")

  for name, spec in unrolled:
    what = f"{name} float32 unrolled"
    if over_budget(what):
      continue
    config = bench_train.offline(config_lib.load(spec))
    config.unlock()
    config.model.scan_layers = False
    config.lock()
    r = bench_train.measure(config, args.steps if not args.smoke else 2,
                            eval_batches=0)
    emit(train_row(name, "float32 unrolled", r))
    del r

  print("\n| measurement | figures |\n|---|---|")
  for row in rows:
    label = " ".join(str(row.get(k, "")) for k in ("what", "config", "name",
                                                   "dtype")).strip()
    rest = {k: v for k, v in row.items()
            if k not in ("what", "config", "name", "dtype")}
    print(f"| {label} | {', '.join(f'{k} {v}' for k, v in rest.items())} |")
  print(f"total: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
