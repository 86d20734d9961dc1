"""Glow on CIFAR-10 with the paper's setting (Kingma & Dhariwal, 2018, Table 2).

L = 3 levels, K = 32 steps per level, conditioner width 512, affine coupling
with the LU-decomposed invertible 1x1 convolution, learned split priors,
8-bit data uniformly dequantized and shifted to [-0.5, 0.5), Adam at 1e-3
with a linear warm-up over 10 epochs, batch 64 (the openai/glow ablation
command: --n_level 3 --depth 32 --flow_coupling 1 --learntop --lr 0.001).
Target: 3.35 bits/dim on the CIFAR-10 test set. Needs GPUs and the tfds
download of cifar10 (with TensorFlow installed to prepare it).

  python scripts/train.py --config=configs/glow_cifar10.py --workdir=/tmp/glow_cifar10

Arguments: ``smoke`` (seconds, for tests; a tiny model on the embedded 32x32
colour patches, data.source "embedded_rgb", so no download).
"""

from gm_jax import config_lib, flows


def get_config(arg=None):
  args = config_lib.parse_args(arg, allowed=("smoke",))
  config = config_lib.base_config()
  config.data.source = "tfds"
  config.data.name = "cifar10"

  config.model = flows.default_model_config()
  config.model.image_shape = (32, 32, 3)
  config.model.architecture = "glow"
  config.model.num_levels = 3
  config.model.steps_per_level = 32
  config.model.width = 512
  config.model.num_res_blocks = 0
  config.model.coupling = "affine"
  config.model.scale_fn = "sigmoid"
  config.model.permutation = "lu"
  config.model.learned_split_prior = True
  config.model.preprocess = "shift"
  config.model.sample_temperature = 0.7

  config.optim.learning_rate = 1e-3
  config.optim.schedule = "constant"
  config.optim.warmup_steps = 7_800  # 10 epochs of 50,000 / 64
  config.optim.grad_clip = 100.0
  config.optim.ema_decay = 0.9999

  config.train.num_steps = 1_000_000
  config.train.batch_size = 64
  config.train.eval_batch_size = 500
  config.train.log_every = 500
  config.train.eval_every = 20_000
  config.train.sample_every = 20_000
  config.ckpt.every_steps = 10_000

  if "smoke" in args:
    config_lib.apply_smoke(config)
    # Real 32x32 colour patches that ship offline.
    config.data.source = "embedded_rgb"
    config.data.name = ""
    config.model.steps_per_level = 1
    config.model.width = 8
  config.lock()
  return config
