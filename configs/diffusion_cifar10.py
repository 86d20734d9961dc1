"""DDPM on CIFAR-10: the paper's 35.7M-parameter U-Net (Ho et al., 2020).

Reproduces Table 1/2's unconditional CIFAR-10 model trained with L_simple:
width 128, width_mult (1, 2, 2, 2), 2 ResNet blocks per level, attention at 16x16,
dropout 0.1, linear betas 1e-4..0.02 over T = 1000, Adam lr 2e-4 with 5,000
warm-up steps, batch 128, EMA 0.9999, gradient clipping at 1, 800k steps,
fixed-large reverse variances (as the paper's CIFAR-10 run). Paper figures
(Table 1, unconditional CIFAR-10, L_simple): FID 3.17 (50,000 samples
against the training set) and NLL <= 3.75 bits/dim on the test set. Data:
tfds cifar10, 50,000 training images with random horizontal flips (the
paper's augmentation), the 10,000 test images. measured: (empty until a
run on the real data fills it)

Evaluation bounds the NLL on the full 10,000-image test split with 100
network calls per image: timesteps 1..40 exactly (they carry most of the
bound) and 60 strata over the rest (an unbiased estimate of the full sum,
reported with its standard errors over images and over the timestep draws,
``bpd_stderr`` and ``bpd_estimator_stderr``); the ``exact`` argument sums
all 1000 terms (what the paper reports; 1001 network calls per image). ``bf16`` computes in bfloat16 with float32 parameters;
``cosine`` swaps in Nichol & Dhariwal's (2021) cosine schedule of improved
DDPM, abar_t = f(t / T) / f(0), f(u) = cos^2(pi / 2 (u + 0.008) / 1.008),
betas clipped at 0.999: their ablations found it improves the
log-likelihood over the linear one, so with ``cosine`` the target is a bound
below the linear schedule's. Sampling during training uses DDIM with 50
steps; ``ddpm`` switches to the paper's 1000-step ancestral sampler.
``smoke`` shrinks everything for tests and reads the embedded 32x32 colour
patches (data.source "embedded_rgb"), so it needs no download.

  python scripts/train.py --config=configs/diffusion_cifar10.py --workdir=/tmp/diffusion_cifar10
  python scripts/train.py --config=configs/diffusion_cifar10.py:bf16,exact --workdir=...
  python scripts/train.py --config=configs/diffusion_cifar10.py:cosine --workdir=/tmp/diffusion_cifar10_cosine
"""

from gm_jax import config_lib, diffusion


def get_config(arg=None):
  args = config_lib.parse_args(
      arg, allowed=("smoke", "bf16", "exact", "cosine", "ddpm"))
  config = config_lib.base_config()
  config.data.source = "tfds"
  config.data.name = "cifar10"
  config.data.random_flip = True  # the paper's augmentation
  config.model = diffusion.default_model_config()  # DDPM CIFAR-10
  config.model.image_shape = (32, 32, 3)
  config.model.variance = "fixed_large"
  config.model.eval_timesteps = 0 if "exact" in args else 100
  config.model.eval_exact_timesteps = 40
  config.model.sampler = "ddpm" if "ddpm" in args else "ddim"
  config.model.sample_steps = 1000 if "ddpm" in args else 50
  if "bf16" in args:
    config.model.dtype = "bfloat16"
  if "cosine" in args:
    config.model.schedule = "cosine"

  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 5_000
  config.optim.grad_clip = 1.0
  config.optim.ema_decay = 0.9999
  config.train.num_steps = 800_000
  config.train.batch_size = 128
  config.train.eval_batch_size = 256
  config.train.eval_examples = -1  # the whole test split
  config.train.log_every = 100
  config.train.eval_every = 20_000
  config.train.sample_every = 20_000
  config.ckpt.every_steps = 10_000
  if "smoke" in args:
    config_lib.apply_smoke(config)
    # Real 32x32 colour patches that ship offline.
    config.data.source = "embedded_rgb"
    config.data.name = ""
    config.model.width = 8
    config.model.width_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.num_groups = 4
    config.model.eval_timesteps = 3
    config.model.sample_steps = 3
  config.lock()
  return config
