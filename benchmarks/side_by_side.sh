#!/usr/bin/env bash
# Side by side with the PyTorch peers (issue 10): each row runs the peer and
# gm_jax at the matched size back to back, REPS times, and appends every
# output to $LOG. Run it on a quiet machine and nothing else at the same time
# (2 cores: any other process slows both sides).
#
#   PEERSENV=/path/to/peer/venv REPS=3 bash benchmarks/side_by_side.sh [rows]
#
# rows: any of vae glow pixelcnn gated ddpm (default: all); PIXELCNN_SAMPLES=0
# skips the (long) 16-image sampling of the two PixelCNN rows; LAYERS=1 times
# each row's layers instead (benchmarks/layer_costs.py). The peers are in
# ../shared/peers (README there); set them up with its setup.sh.
set -u
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
LOG=${LOG:-/tmp/side_by_side.log}
PY=${PY:-python}
PEERS=${PEERS:-../shared/peers}
PEERPY=${PEERSENV:?set PEERSENV to the peers venv}/bin/python
ROWS=${*:-vae glow pixelcnn gated ddpm}
BENCH="$PY benchmarks/bench_train.py"

# gm_jax's side of each row: the config at the peer's size.
VAE=(--config=configs/vae_mnist.py --config.model.latent_dim=32
  --config.model.likelihood=bernoulli --config.model.binarize=dynamic
  --config.model.conv_channels='(32,64)' --config.model.dense_size=256
  --config.train.batch_size=128 --config.train.eval_batch_size=100
  --config.model.iwae_samples=1000 --config.model.iwae_chunk=100
  --config.model.conv_kernel_size=4 --config.model.decoder_head=transpose)
GLOW=(--config=configs/glow_mnist.py --config.model.steps_per_level=8
  --config.model.width=128 --config.train.batch_size=32)
PIXELCNN=(--config=configs/pixelcnn_mnist.py --config.model.width=64
  --config.model.num_layers=8 --config.model.num_output_filters=64
  --config.train.batch_size=64)
GATED=(--config=configs/gated_pixelcnn_mnist.py --config.model.width=64
  --config.model.num_layers=8 --config.train.batch_size=64)
DDPM=(--config=configs/diffusion_cifar10.py --config.data.source=embedded_rgb
  --config.data.name= --config.model.width=64 --config.train.batch_size=16)

peer() { (cd "$PEERS" && "$PEERPY" "$@" 2>/dev/null | tail -1); }
quiet() { grep -v "^[IWE][0-9]"; }

row() {
  case $1 in
    vae)
      peer vae.py
      $BENCH "${VAE[@]}" --steps=20 --eval_batches=1 2>&1 | quiet ;;
    glow)
      peer glow.py
      $BENCH "${GLOW[@]}" --steps=20 --eval_batches=0 2>&1 | quiet ;;
    pixelcnn)
      peer pixelcnn.py --model pixelcnn
      $BENCH "${PIXELCNN[@]}" --steps=10 --eval_batches=0 \
        --samples=${PIXELCNN_SAMPLES:-16} 2>&1 | quiet ;;
    gated)
      peer pixelcnn.py --model gated
      $BENCH "${GATED[@]}" --steps=10 --eval_batches=0 \
        --samples=${PIXELCNN_SAMPLES:-16} 2>&1 | quiet ;;
    ddpm)
      peer ddpm_unet.py
      $BENCH "${DDPM[@]}" --steps=5 --eval_batches=0 --samples=8 2>&1 | quiet ;;
    *) echo "unknown row $1 (vae glow pixelcnn gated ddpm)"; exit 2 ;;
  esac
}

# LAYERS=1: instead of whole steps, each row's train step layer by layer,
# gm_jax against PyTorch on the same layers (benchmarks/layer_costs.py).
layers() {
  local name
  name=$(echo "$1" | tr a-z A-Z)
  case $1 in vae|glow|pixelcnn|gated|ddpm) ;;
    *) echo "unknown row $1 (vae glow pixelcnn gated ddpm)"; exit 2 ;;
  esac
  local -n args=$name
  $PY benchmarks/layer_costs.py "${args[@]}" --steps=5 \
    --peer_python="$PEERPY" 2>&1 | quiet
}

for rep in $(seq "$REPS"); do
  for r in $ROWS; do
    echo "=== $r rep $rep $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)" | tee -a "$LOG"
    if [ "${LAYERS:-0}" = 1 ]; then layers "$r"; else row "$r"; fi 2>&1 | tee -a "$LOG"
  done
done
