"""DDPM on the embedded MNIST digits: a small U-Net, the default diffusion run.

Trains L_simple (eps prediction, linear schedule, T = 1000) on the 4,500
embedded training digits, samples with DDIM (50 steps) and reports the
variational bound on the 500 test digits in bits/dim of the 8-bit data,
estimated with 25 network calls (model.eval_timesteps; 0 = all 1000 terms):
timesteps 1..15 exactly (model.eval_exact_timesteps) and 10 strata over the
rest, unbiased for the full sum. On a trained model the per-digit standard
deviation of this estimate is 0.28 bits/dim against 1.94 with 25 equal
strata (2026-11-28, 100 digits x 8 draws); bpd_estimator_stderr reports it.
A run of this config (2026-11-28) ends at 2.3731 bits/dim, standard error
0.0224 over the digits (the former 25-equal-strata estimate on the same
model: 2.2697 +- 0.0767); 1,000 steps of 32 took 4 min 12 s on 2 quiet CPU
cores with one evaluation (2026-11-24). Samples are digit-like but rough; a
longer run (e.g. --config.train.num_steps=20000 --config.model.width=32)
gives clean digits. The run evaluates 4 times (train.eval_every =
num_steps // 4): the first three, the test curve's points, on 100 test
digits (train.curve_eval_examples), the last, the run's figure, on all 500
(50-63 s each on 2 quiet cores, 2026-11-29).

The ``iddpm`` argument trains improved DDPM (Nichol & Dhariwal, 2021)
instead: learned variances (model.variance "learned_range": the U-Net
outputs 2C channels), L_hybrid = L_simple + 0.001 L_vlb (model.loss_type
"hybrid") and the cosine schedule, keeping T = 1000 (the paper uses 4000;
1000 keeps the CPU run's evaluation as cheap as the default's), and
samples with the 50-step respaced ancestral sampler and its learned
variances (sampler "ddpm"). measured (2026-11-29, 1,000 steps, 280,322
parameters): 6.54 bits/dim, standard error 1.96 over the 500 digits, almost
all of it the timestep draws' (bpd_estimator_stderr 1.97): after 1,000
steps the learned variances are far from trained, so the bound is loose and
noisy; 34 min 52 s on 2 cores shared with another job.

The ``vlb`` argument is improved DDPM's L_vlb setting on the same model
(``iddpm`` in every other respect): model.loss_type "vlb" (the bound's
term trains the whole network) with importance-sampled timesteps
(model.timestep_sampler "importance": p_t proportional to the root mean
square of the last model.importance_history = 10 losses at t, uniform
until all 1,000 timesteps have 10: about 740 steps of 32, simulated, so
in a 1,000-step run the last quarter or so is importance-sampled;
``importance_warm`` in the training log is the fraction of timesteps
with a full history). Measured (2026-11-29, 1,000 steps, 280,322
parameters, on 2 cores shared with the test suite, about 17 min): 3.58
bits/dim, standard error 0.72 over the 500 digits, almost all of it the
timestep draws' (bpd_estimator_stderr 0.72); the history was full by step
~750 and the draws' effective sample fraction (importance_ess) was then
0.08.

  python scripts/train.py --config=configs/diffusion_mnist.py --workdir=/tmp/diffusion_mnist
  python scripts/train.py --config=configs/diffusion_mnist.py:iddpm --workdir=/tmp/iddpm_mnist
  python scripts/train.py --config=configs/diffusion_mnist.py:vlb --workdir=/tmp/iddpm_vlb_mnist
"""

from gm_jax import config_lib, diffusion


def get_config(arg=None):
  args = config_lib.parse_args(arg, allowed=("smoke", "iddpm", "vlb"))
  config = config_lib.base_config()
  config.data.source = "embedded_mnist"
  config.model = diffusion.default_model_config()
  config.model.image_shape = (28, 28, 1)
  config.model.width = 16
  config.model.width_mult = (1, 2, 2)  # 28 -> 14 -> 7
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (7,)
  config.model.num_groups = 8
  config.model.dropout = 0.1
  config.model.eval_timesteps = 25
  config.model.sampler = "ddim"
  config.model.sample_steps = 50
  if "iddpm" in args or "vlb" in args:
    config.model.variance = "learned_range"
    config.model.loss_type = "hybrid"
    config.model.schedule = "cosine"
    config.model.sampler = "ddpm"
  if "vlb" in args:
    config.model.loss_type = "vlb"
    config.model.timestep_sampler = "importance"

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.optim.grad_clip = 1.0
  config.optim.ema_decay = 0.995
  config.train.num_steps = 1_000
  config.train.batch_size = 32
  config.train.eval_batch_size = 250
  config.train.log_every = 100
  # The test NLL curve: 4 evaluations, the first 3 on 100 test digits (the
  # last, the run's figure, on all 500).
  config_lib.evaluate_times(config, 4, curve_examples=100)
  config.train.sample_every = 1_000
  config.ckpt.every_steps = 500
  if "smoke" in args:
    config_lib.apply_smoke(config)
    config.model.width = 8
    config.model.width_mult = (1, 2)
    config.model.attn_resolutions = (14,)
    config.model.num_groups = 4
    config.model.eval_timesteps = 3
    config.model.sample_steps = 3
  config.lock()
  return config
