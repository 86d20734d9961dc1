"""VDM on CIFAR-10: the paper's model (Kingma et al., 2021, Appendix B).

Paper figure: 2.65 bits/dim on the CIFAR-10 test set without data
augmentation (Table 1; the released code's README quotes the paper as 2.64
and reports 2.637 for its released checkpoint). Model: a noise predictor at
the full 32x32 resolution with no down- or up-sampling, 32 ResNet blocks of
width 128 before the middle and 33 after (skip connections), self-attention
only in the middle, dropout 0.1, Fourier features sin / cos(2 pi 2^n z) for
n = 6, 7 on the input, conditioned on gamma(t); gamma from -13.3 to 5 at
the start and learned (the monotone network with 1024 sigmoid units, its
shape trained to minimise the diffusion term's variance, its endpoints by
the bound); the continuous-time bound with antithetic t. Training as in the
released code's cifar10 config: AdamW (b1 0.9, b2 0.99, weight decay 0.01),
lr 2e-4 constant after 100 warm-up steps, batch 128, EMA 0.9999, 10M steps,
no augmentation. That config uses the linear schedule with learned
endpoints: ``learned_linear`` here; ``fixed`` is the fixed linear one.
Data: tfds cifar10, the 50,000 training images; evaluation on the 10,000
test images with the continuous-time bound, 4 draws of t per image
(``eval_time_samples``: two independent stratified halves), whose mean over
the test set estimates the same quantity as the paper's figure.
Parameters: 30,589,318 with the learned schedule (3,075 of them the
schedule's), 30,586,245 with ``learned_linear``, 30,586,243 with ``fixed``;
the paper states no parameter count that I could find. ``smoke`` shrinks
everything and reads the embedded 32x32 colour patches (no download).
Compilation: model.scan_layers runs the 32 blocks before the middle and
the 33 after it as two scans with stacked parameters (the same network and
parameter count): init and train step compile in 12.6 s instead of 53.8 s
on 2 CPU cores, at the same step time (benchmarks/README.md). A run started
unrolled resumes with --config.model.scan_layers=False; the trainer refuses
the mismatch. ``bf16`` computes the network in bfloat16 with float32
parameters (the Fourier features before the cast, the attention's softmax,
the schedule and the bound in float32), as ``diffusion_cifar10.py:bf16``:
an accelerator option, for throughput; the paper's figure is float32's.
measured:

  python scripts/train.py --config=configs/vdm_cifar10.py --workdir=/tmp/vdm_cifar10
"""

from gm_jax import config_lib, vdm


def get_config(arg=None):
  args = config_lib.parse_args(
      arg, allowed=("smoke", "fixed", "learned_linear", "bf16"))
  config = config_lib.base_config()
  config.data.source = "tfds"
  config.data.name = "cifar10"
  config.model = vdm.default_model_config()  # the paper's CIFAR-10 model
  config.model.image_shape = (32, 32, 3)
  if "fixed" in args:
    config.model.schedule = "fixed_linear"
  elif "learned_linear" in args:
    config.model.schedule = "learned_linear"
  config.model.eval_time_samples = 4
  config.model.sample_steps = 1000
  config.model.scan_layers = True
  if "bf16" in args:
    config.model.dtype = "bfloat16"

  config.optim.name = "adamw"
  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 100
  config.optim.b1 = 0.9
  config.optim.b2 = 0.99
  config.optim.eps = 1e-8
  config.optim.weight_decay = 0.01
  config.optim.ema_decay = 0.9999
  config.train.num_steps = 10_000_000
  config.train.batch_size = 128
  config.train.eval_batch_size = 128
  config.train.eval_examples = -1  # the whole test split
  config.train.log_every = 1_000
  config.train.eval_every = 50_000
  config.train.sample_every = 50_000
  config.ckpt.every_steps = 10_000
  if "smoke" in args:
    config_lib.apply_smoke(config)
    config.data.source = "embedded_rgb"
    config.data.name = ""
    config.model.width = 8
    config.model.num_blocks = 1
    config.model.num_groups = 4
    config.model.schedule_units = 16
    config.model.eval_time_samples = 2
    config.model.sample_steps = 3
  config.lock()
  return config
