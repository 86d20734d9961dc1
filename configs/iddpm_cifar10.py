"""Improved DDPM on CIFAR-10 (Nichol & Dhariwal, 2021): L_hybrid, cosine, T = 4000.

The paper's unconditional CIFAR-10 model trained with L_hybrid = L_simple +
0.001 L_vlb (model.loss_type "hybrid": the bound's term trains only the
variance), learned variances (model.variance "learned_range": the U-Net
outputs 6 channels, eps and v, with sigma^2 = exp(frac log beta_t +
(1 - frac) log beta~_t), frac = (v + 1) / 2), the cosine schedule with
T = 4000, and the hyper-parameters of the released run (the
openai/improved-diffusion README's CIFAR-10 L_hybrid flags: image_size 32,
num_channels 128, num_res_blocks 3, learn_sigma, dropout 0.3,
diffusion_steps 4000, noise_schedule cosine, lr 1e-4, batch_size 128; its
script defaults add attention at 16x16 and 8x8 with 4 heads, channel
multipliers (1, 2, 2, 2) at 32x32 and EMA 0.9999; the released checkpoint
is named for 500K steps, the length of the paper's CIFAR-10 ablations).
Adam without warm-up or gradient clipping, as there.

The paper's figure: CIFAR-10 NLL 2.94 bits/dim (the paper's headline
CIFAR-10 likelihood, its comparison of likelihood models), with FID for the
L_hybrid models in its ablations. Not verified here: which objective
(L_hybrid or L_vlb with importance-sampled timesteps) and which table give
2.94 could not be checked against the paper's text in this environment;
secondary summaries attribute 2.94 to the full method. By default this
config trains the L_hybrid row of the paper's CIFAR-10 ablation.

``vlb`` trains the L_vlb run instead: model.loss_type "vlb" (the bound's
term trains the whole network) with the paper's importance-sampled
timesteps (model.timestep_sampler "importance", sec. 3.3: p_t
proportional to the root mean square of the last 10 losses at t, mixed
with 0.001 of the uniform distribution, uniform until every one of the
4000 timesteps has 10: about 790 steps of 128, simulated). These are the
flags of the openai/improved-diffusion README's "Unconditional CIFAR-10
with the L_vlb objective and cosine noise schedule" run (its L_hybrid
flags plus --use_kl True --schedule_sampler loss-second-moment; released
as cifar10_uncond_vlb_50M_500K). gm_jax trains T L_t in bits/dim where
improved-diffusion's use_kl trains L_t in bits/dim: a constant factor,
which Adam's update and the sampler's probabilities do not see (up to
Adam's eps). Not run here.

Network: gm_jax's DDPM U-Net (additive timestep embedding in each ResNet
block, ``layers``) with improved DDPM's sizes; improved-diffusion's U-Net
differs in details (scale-shift GroupNorm conditioning on the timestep,
"use_scale_shift_norm", and its own block layout), so the parameter count
differs from its ~50M (the released checkpoint's name,
"cifar10_uncond_50M_500K"): this config has 49,066,246 parameters
(tests/test_contract.py). Other known differences: the network sees the
timestep index 0..3999 itself (improved-diffusion rescales it to 0..1000)
and gm_jax's EMA decay warms up as min(0.9999, (1 + step) / (10 + step)).
Data: tfds cifar10, the 50,000 training images with random horizontal
flips, bound on the 10,000 test images in bits/dim of the 8-bit data,
estimated with 100 network calls per image (timesteps 1..40 exactly and 60
strata over the rest, unbiased for the full 4000-term sum); ``exact`` sums
all 4000 terms (the paper's evaluation; 4001 calls per image). Samples
during training: the 100-step respaced ancestral sampler with the learned
variances (the paper's fast-sampling result); ``bf16`` computes in
bfloat16. ``smoke`` shrinks everything for tests on the embedded 32x32
colour patches.
measured:

  python scripts/train.py --config=configs/iddpm_cifar10.py --workdir=/tmp/iddpm_cifar10
  python scripts/train.py --config=configs/iddpm_cifar10.py:vlb --workdir=/tmp/iddpm_vlb_cifar10
"""

from gm_jax import config_lib, diffusion


def get_config(arg=None):
  args = config_lib.parse_args(arg, allowed=("smoke", "bf16", "exact", "vlb"))
  config = config_lib.base_config()
  config.data.source = "tfds"
  config.data.name = "cifar10"
  config.data.random_flip = True
  config.model = diffusion.default_model_config()
  config.model.image_shape = (32, 32, 3)
  config.model.width = 128
  config.model.width_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 3
  config.model.attn_resolutions = (16, 8)
  config.model.num_heads = 4
  config.model.dropout = 0.3
  config.model.schedule = "cosine"
  config.model.num_timesteps = 4000
  config.model.variance = "learned_range"
  config.model.loss_type = "hybrid"
  if "vlb" in args:
    config.model.loss_type = "vlb"
    config.model.timestep_sampler = "importance"
  config.model.eval_timesteps = 0 if "exact" in args else 100
  config.model.eval_exact_timesteps = 40
  config.model.sampler = "ddpm"
  config.model.sample_steps = 100
  if "bf16" in args:
    config.model.dtype = "bfloat16"

  config.optim.learning_rate = 1e-4
  config.optim.warmup_steps = 0
  config.optim.grad_clip = 0.0
  config.optim.ema_decay = 0.9999
  config.train.num_steps = 500_000
  config.train.batch_size = 128
  config.train.eval_batch_size = 256
  config.train.eval_examples = -1  # the whole test split
  config.train.log_every = 100
  config.train.eval_every = 20_000
  config.train.sample_every = 20_000
  config.ckpt.every_steps = 10_000
  if "smoke" in args:
    config_lib.apply_smoke(config)
    config.data.source = "embedded_rgb"
    config.data.name = ""
    config.model.width = 8
    config.model.width_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (16,)
    config.model.num_heads = 1
    config.model.num_groups = 4
    config.model.num_timesteps = 100
    config.model.eval_timesteps = 3
    config.model.sample_steps = 3
  config.lock()
  return config
