"""A small PixelCNN++ on the 8-bit embedded MNIST digits (no download).

The PixelCNN++ architecture (Salimans et al., 2017) at a small scale: 32
filters, 1 gated ResNet block per stage (572,847 parameters), a 5-component
discretized logistic mixture over the 256 grey levels; the test metric is the
exact NLL of the 8-bit digits in bits/dim (and nats). Meant for an
accelerator: on 2 CPU cores a step of 32 images takes seconds. Sampling is
cached (model.fast_sampling): each of the 784 steps computes only the
U-Net's newly computable rows and pixels, about one pass over the image in
all (16 samples in 0.4-0.6 s on 2 shared CPU cores, against 138 s with a
full pass per pixel).

  python scripts/train.py --config=configs/pixelcnnpp_mnist.py \
      --workdir=/tmp/pixelcnnpp_mnist
"""

from gm_jax import autoregressive, config_lib


def get_config(arg=None):
  args = config_lib.parse_args(arg, allowed=("smoke",))
  config = config_lib.base_config()
  config.data.source = "embedded_mnist"

  config.model = autoregressive.default_model_config()
  config.model.image_shape = (28, 28, 1)
  config.model.architecture = "pixelcnnpp"
  config.model.likelihood = "logistic_mixture"
  config.model.binarize = "none"
  config.model.width = 32
  config.model.num_resnet = 1
  config.model.num_mixtures = 5
  config.model.dropout = 0.1

  config.optim.learning_rate = 1e-3
  config.optim.schedule = "exponential"
  config.optim.decay_rate = 0.9995
  config.optim.decay_steps = 1
  config.optim.ema_decay = 0.995

  config.train.num_steps = 2_000
  config.train.batch_size = 32
  config.train.eval_batch_size = 100
  config.train.log_every = 100
  config_lib.evaluate_times(config, 4)  # the test NLL curve
  config.train.sample_every = 2_000
  config.train.num_samples = 16
  config.ckpt.every_steps = 500

  if "smoke" in args:
    config_lib.apply_smoke(config)
    config.model.width = 4
    config.model.num_resnet = 1
    config.model.num_mixtures = 2
    config.model.dropout = 0.0
  config.lock()
  return config
