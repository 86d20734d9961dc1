"""PixelCNN++ on CIFAR-10 with the paper's hyper-parameters.

Salimans et al. (2017), "PixelCNN++", Table 1: 2.92 bits/dim on the CIFAR-10
test set. Down-shifted / down-right-shifted convolutions in a two-stream
U-Net (3 resolutions, 5 gated ResNet blocks per stage, 160 filters,
concat_elu, dropout 0.5), a discretized logistic mixture with 10 components
and coupled RGB means; Adam at 1e-3 with the paper's betas (0.95, 0.9995)
decayed by 0.999995 per step, batch 128, EMA of the parameters with decay
0.9995. Every shifted, transposed and 1x1 layer is weight-normalised with the
paper's data-dependent initialisation (model.weight_norm; the residual
branch's second convolution at init scale 0.1), set from 100 images of the
first training batch (openai/pixel-cnn's init_batch_size). Data: tfds cifar10, 50,000 training and 10,000 test images, the
whole test split evaluated. The paper trained for days
on 8 GPUs; needs the tfds cifar10 data prepared (see the README).

  python scripts/train.py --config=configs/pixelcnnpp_cifar10.py \
      --workdir=/tmp/pixelcnnpp_cifar10

Compilation: model.scan_layers runs each stage's gated resnet blocks (per
stream) as one scan with stacked parameters, the same network and parameter
count: the first step compiled in 27.8 s instead of 55.8 s on 2 CPU cores
(benchmarks/README.md). A run started unrolled resumes with
--config.model.scan_layers=False; the trainer refuses the mismatch.

Target: 2.92 bits/dim (test, Table 1). measured: (empty until a run on
the real data fills it). ``smoke`` shrinks everything for tests and
reads the embedded 32x32 colour patches (data.source "embedded_rgb"), so it
needs no download.
"""

from gm_jax import autoregressive, config_lib


def get_config(arg=None):
  args = config_lib.parse_args(arg, allowed=("smoke",))
  config = config_lib.base_config()
  config.data.source = "tfds"
  config.data.name = "cifar10"

  config.model = autoregressive.default_model_config()
  config.model.image_shape = (32, 32, 3)
  config.model.architecture = "pixelcnnpp"
  config.model.likelihood = "logistic_mixture"
  config.model.binarize = "none"
  config.model.width = 160
  config.model.num_resnet = 5
  config.model.num_mixtures = 10
  config.model.dropout = 0.5
  config.model.weight_norm = True
  config.model.scan_layers = True

  config.optim.learning_rate = 1e-3
  config.optim.b1 = 0.95
  config.optim.b2 = 0.9995
  config.optim.schedule = "exponential"
  config.optim.decay_rate = 0.999995
  config.optim.decay_steps = 1
  config.optim.ema_decay = 0.9995

  config.train.num_steps = 600_000
  config.train.batch_size = 128
  config.train.init_batch_size = 100  # openai/pixel-cnn's init_batch_size
  config.train.eval_batch_size = 256
  config.train.log_every = 500
  config.train.eval_every = 20_000
  config.train.sample_every = 20_000
  config.train.num_samples = 16
  config.ckpt.every_steps = 5_000

  if "smoke" in args:
    config_lib.apply_smoke(config)
    config.data.source = "embedded_rgb"
    config.data.name = ""
    config.model.width = 4
    config.model.num_resnet = 1
    config.model.num_mixtures = 2
  config.lock()
  return config
