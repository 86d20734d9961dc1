"""RealNVP on CIFAR-10 with the paper's setting (Dinh et al., 2017, Table 1).

Two scales ("downscale only once" for CIFAR-10): 3 checkerboard couplings,
squeeze, 3 channel couplings, factor out half, then 4 checkerboard
couplings; ResNet conditioners with 8 residual blocks of 64 feature maps,
affine couplings with tanh-bounded scales, 8-bit data dequantized and
logit-transformed with alpha = 0.05, random horizontal flips of the
training images, Adam at 1e-3, batch 64, and the
paper's L2 regulariser 5e-5 added to the loss (optim.l2_penalty: 5e-5 / 2 *
sum of squared weights, a gradient through Adam's preconditioner, not
decoupled AdamW decay; the paper puts it on weight-norm scales, here on the
weight matrices and kernels, as the conditioners have no weight norm).
Table 1 of the paper: 3.49 bits/dim on the CIFAR-10 test set. measured:
(empty until a run on the real data fills it). Needs GPUs and the tfds
download of cifar10.

Normalisation: the paper uses batch normalisation in the conditioners and
as a bijector (with running averages at test time). Here actnorm takes its
place: a per-channel affine map initialised from the first batch's
statistics, the same function class at test time, with a log-determinant
that does not depend on the other examples of the batch, so a training
batch's likelihood stays exact and one config runs at any per-device
batch size.

  python scripts/train.py --config=configs/realnvp_cifar10.py --workdir=/tmp/realnvp_cifar10

Compilation: model.scan_layers runs each conditioner's 8 residual blocks
as one scan with stacked parameters (the same model, another parameter
tree): init and train step compile in 32.8 s instead of 82.1 s on 2 CPU
cores, and a training step at batch 16 runs at the unrolled model's speed
on CPU within 10% (benchmarks/README.md, 2026-11-29; no GPU measured). A
run started before 2026-11-29 (unrolled) resumes with
--config.model.scan_layers=False; the trainer refuses the mismatch.

Arguments: ``smoke`` (seconds, for tests; a tiny model on the embedded 32x32
colour patches, data.source "embedded_rgb", so no download).
"""

from gm_jax import config_lib, flows


def get_config(arg=None):
  args = config_lib.parse_args(arg, allowed=("smoke",))
  config = config_lib.base_config()
  config.data.source = "tfds"
  config.data.name = "cifar10"
  config.data.random_flip = True  # the paper's augmentation

  config.model = flows.default_model_config()
  config.model.image_shape = (32, 32, 3)
  config.model.architecture = "realnvp"
  config.model.num_levels = 2
  config.model.steps_per_level = 3
  config.model.width = 64
  config.model.num_res_blocks = 8
  config.model.scan_layers = True
  config.model.coupling = "affine"
  config.model.scale_fn = "tanh"
  config.model.actnorm = True
  config.model.learned_split_prior = False
  config.model.preprocess = "logit"
  config.model.logit_alpha = 0.05
  config.model.sample_temperature = 0.7

  config.optim.name = "adam"
  config.optim.learning_rate = 1e-3
  config.optim.l2_penalty = 5e-5
  config.optim.warmup_steps = 1_000
  config.optim.grad_clip = 100.0
  config.optim.ema_decay = 0.9999

  config.train.num_steps = 500_000
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
    config.model.num_res_blocks = 1
  config.lock()
  return config
