"""PixelCNN on the embedded MNIST digits, binarized at 127 (no download).

PixelCNN (van den Oord et al., 2016, "Pixel Recurrent Neural Networks"): a
7x7 mask-A convolution, residual blocks of masked 3x3 convolutions and 1x1
output layers, with a Bernoulli likelihood per pixel; the test metric is the
exact NLL in nats of the 500 held-out binarized digits. The paper reports
81.30 nats on the stochastically binarized MNIST benchmark (60,000 digits,
a larger net); thresholded digits are cleaner, so the figures do not
compare. This config (58k parameters, 800 steps of 32) trained on 2 CPU
cores in 2 min 48 s and reached 72.3 nats (0.133 bits/dim) on the held-out
digits (2026-11-24).

  python scripts/train.py --config=configs/pixelcnn_mnist.py \
      --workdir=/tmp/pixelcnn_mnist

Arguments: ``smoke`` (a tiny net for tests), ``paper`` (the paper's width:
h = 128, 15 residual blocks, 1x1 layers of 1024 for a GPU run),
``dynamic`` (a fresh Bernoulli(pixel / 255) binarization every step).
"""

from gm_jax import autoregressive, config_lib


def get_config(arg=None):
  args = config_lib.parse_args(arg, allowed=("smoke", "paper", "dynamic"))
  config = config_lib.base_config()
  config.data.source = "embedded_mnist"

  config.model = autoregressive.default_model_config()
  config.model.image_shape = (28, 28, 1)
  config.model.architecture = "pixelcnn"
  config.model.likelihood = "bernoulli"
  config.model.binarize = "dynamic" if "dynamic" in args else "threshold"
  config.model.width = 32
  config.model.num_layers = 5
  config.model.kernel_size = 3
  config.model.first_kernel_size = 7
  config.model.num_output_filters = 64
  if "paper" in args:
    config.model.width = 128
    config.model.num_layers = 15
    config.model.num_output_filters = 1024

  config.optim.learning_rate = 1e-3
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 50
  config.optim.min_learning_rate_ratio = 0.1
  config.optim.grad_clip = 1.0
  config.optim.ema_decay = 0.995

  config.train.num_steps = 800
  config.train.batch_size = 32
  config.train.eval_batch_size = 100
  config.train.log_every = 100
  config_lib.evaluate_times(config, 4)  # the test NLL curve
  config.train.sample_every = 800
  config.train.num_samples = 16
  config.ckpt.every_steps = 500

  if "smoke" in args:
    config_lib.apply_smoke(config)
    config.model.width = 4
    config.model.num_layers = 1
    config.model.first_kernel_size = 3
    config.model.num_output_filters = 8
  config.lock()
  return config
