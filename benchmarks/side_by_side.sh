#!/usr/bin/env bash
# Side by side with the PyTorch peers (issue 10): each row runs the peer and
# gm_jax at the matched size back to back, REPS times, and appends every
# output to $LOG. Run it on a quiet machine and nothing else at the same time
# (2 cores: any other process slows both sides).
#
#   PEERSENV=/path/to/peer/venv REPS=3 bash benchmarks/side_by_side.sh [rows]
#
# rows: any of vae glow pixelcnn gated ddpm (default: all); PIXELCNN_SAMPLES=0
# skips the (long) 16-image sampling of the two PixelCNN rows. The peers are in
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

peer() { (cd "$PEERS" && "$PEERPY" "$@" 2>/dev/null | tail -1); }

row() {
  case $1 in
    vae)
      peer vae.py
      $BENCH --config=configs/vae_mnist.py --steps=20 --eval_batches=1 \
        --config.model.latent_dim=32 --config.model.likelihood=bernoulli \
        --config.model.binarize=dynamic --config.model.conv_channels='(32,64)' \
        --config.model.dense_size=256 --config.train.batch_size=128 \
        --config.train.eval_batch_size=100 --config.model.iwae_samples=1000 \
        --config.model.iwae_chunk=100 --config.model.conv_kernel_size=4 \
        --config.model.decoder_head=transpose 2>&1 | grep -v "^[IWE][0-9]" ;;
    glow)
      peer glow.py
      $BENCH --config=configs/glow_mnist.py --steps=20 --eval_batches=0 \
        --config.model.steps_per_level=8 --config.model.width=128 \
        --config.train.batch_size=32 2>&1 | grep -v "^[IWE][0-9]" ;;
    pixelcnn)
      peer pixelcnn.py --model pixelcnn
      $BENCH --config=configs/pixelcnn_mnist.py --steps=10 --eval_batches=0 \
        --config.model.width=64 --config.model.num_layers=8 \
        --config.model.num_output_filters=64 --config.train.batch_size=64 \
        --samples=${PIXELCNN_SAMPLES:-16} 2>&1 | grep -v "^[IWE][0-9]" ;;
    gated)
      peer pixelcnn.py --model gated
      $BENCH --config=configs/gated_pixelcnn_mnist.py --steps=10 \
        --eval_batches=0 --config.model.width=64 --config.model.num_layers=8 \
        --config.train.batch_size=64 --samples=${PIXELCNN_SAMPLES:-16} 2>&1 | grep -v "^[IWE][0-9]" ;;
    ddpm)
      peer ddpm_unet.py
      $BENCH --config=configs/diffusion_cifar10.py --steps=5 --eval_batches=0 \
        --config.data.source=embedded_rgb --config.data.name= \
        --config.model.width=64 --config.train.batch_size=16 --samples=8 \
        2>&1 | grep -v "^[IWE][0-9]" ;;
    *) echo "unknown row $1 (vae glow pixelcnn gated ddpm)"; exit 2 ;;
  esac
}

for rep in $(seq "$REPS"); do
  for r in $ROWS; do
    echo "=== $r rep $rep $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)" | tee -a "$LOG"
    row "$r" 2>&1 | tee -a "$LOG"
  done
done
