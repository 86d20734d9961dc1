"""Glow on CIFAR-10 as published (Kingma & Dhariwal, 2018, Table 2).

Reproduces: Table 2 of the paper, Glow on CIFAR-10, 3.35 bits/dim on the
test set (the 8-bit data, uniformly dequantized). Data: tfds cifar10, trained
on the 50,000 "train" images, evaluated on the 10,000 "test" images, no
augmentation.

The model of openai/glow's command for that figure (--n_level 3 --depth 32
--flow_permutation 2 --flow_coupling 1 --learntop --lr 0.001 --n_bits_x 8):
L = 3 levels, K = 32 steps per level, width 512, affine coupling with the
LU-decomposed invertible 1x1 convolution, learned split priors and a
learned top prior, Glow's conditioner (actnorm after each hidden conv, a
zero-initialised output conv with the learned scale exp(3 * logs)), 8-bit
data shifted to [-0.5, 0.5). 44,153,232 parameters (openai/glow's code
counts 44,703,060: its 3x3 convs also read a border-indicator channel).

Optimisation as openai/glow's defaults run on its 8 workers: global batch
512 (8 x 64; here as 4 accumulated micro-batches of 128, the same update),
Adamax at 1e-3 with beta2 = 1 - 1 / 98 (98 steps per epoch), a linear
warm-up over 10 epochs, no clipping; evaluation and samples use the raw
parameters (the Polyak average is kept, with the same decay, but, as in
the published runs, not evaluated). The actnorm's data-dependent init sees
256 images (openai/glow's n_batch_init). The paper gives no training length:
125,000 steps is 1,280 epochs (the examples of 1,000,000 steps of 64).
Needs GPUs and the tfds download of cifar10 (with TensorFlow installed to
prepare it).

  python scripts/train.py --config=configs/glow_cifar10.py --workdir=/tmp/glow_cifar10

Compilation: model.scan_layers runs each level's 32 steps as one scan
with stacked parameters (the same model, another parameter tree): init
and train step compile in 31.4 s instead of 264 s on 2 CPU cores, and the
scanned step trains at the unrolled one's speed on CPU (benchmarks/
README.md, 2026-11-29; no GPU measured). A run started before 2026-11-29
(unrolled) resumes with --config.model.scan_layers=False; the trainer
refuses the mismatch.

Target: 3.35 bits/dim on the CIFAR-10 test set (Table 2).
measured:

Arguments: ``conditional`` (openai/glow's class-conditional CIFAR-10 run,
qualitative in the paper: additive coupling, 5-bit data, a class-conditional
top prior and the auxiliary classifier with weight_y = 0.01; its bits/dim
are of the 5-bit data), ``smoke`` (seconds, for tests; a tiny model on the
embedded 32x32 colour patches, data.source "embedded_rgb", so no download).
"""

from gm_jax import config_lib, flows

TRAIN_EXAMPLES = 50_000
BATCH = 512
STEPS_PER_EPOCH = -(-TRAIN_EXAMPLES // BATCH)  # 98, openai/glow's train_its


def get_config(arg=None):
  args = config_lib.parse_args(arg, allowed=("smoke", "conditional"))
  config = config_lib.base_config()
  config.data.source = "tfds"
  config.data.name = "cifar10"
  config.data.train_split = "train"
  config.data.eval_split = "test"
  # Small random shifts of the training images, as the paper's CIFAR-10
  # runs (up to 2 pixels here; reflect-padded).
  config.data.random_shift = 2

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
  config.model.conditioner = "glow"
  config.model.learned_split_prior = True
  config.model.learned_top_prior = True
  config.model.num_bits = 8
  config.model.scan_layers = True
  config.model.preprocess = "shift"
  config.model.sample_temperature = 0.7
  if "conditional" in args:
    config.model.coupling = "additive"
    config.model.num_bits = 5
    config.model.num_classes = 10
    config.model.class_loss_weight = 0.01

  config.optim.name = "adamax"
  config.optim.learning_rate = 1e-3
  config.optim.b1 = 0.9
  config.optim.b2 = 1.0 - 1.0 / STEPS_PER_EPOCH
  config.optim.schedule = "constant"
  # 10 epochs of examples: openai/glow warms up over n_train * 10 examples.
  config.optim.warmup_steps = -(-10 * TRAIN_EXAMPLES // BATCH)  # 977
  config.optim.grad_clip = 0.0
  config.optim.grad_accumulation = 4
  config.optim.ema_decay = 1.0 - 1.0 / STEPS_PER_EPOCH

  config.train.num_steps = 125_000
  config.train.batch_size = BATCH
  # openai/glow's data-dependent init batch (n_batch_init = 256, rank 0's
  # init broadcast to the workers), not the whole global batch of 512.
  config.train.init_batch_size = 256
  config.train.eval_batch_size = 500
  config.train.eval_params = "params"
  config.train.log_every = 100
  config.train.eval_every = 5_000  # about 50 epochs, openai/glow's cadence
  config.train.sample_every = 5_000
  config.ckpt.every_steps = 2_500

  if "smoke" in args:
    config_lib.apply_smoke(config)
    # Real 32x32 colour patches that ship offline.
    config.data.source = "embedded_rgb"
    config.data.name = ""
    config.model.steps_per_level = 1
    config.model.width = 8
    if "conditional" in args:
      config.model.num_classes = 2  # the patches of two photographs
  config.lock()
  return config
