"""Glow (Kingma & Dhariwal, 2018) on the embedded MNIST digits (no download).

L = 2 levels of (squeeze, K = 4 steps of actnorm / LU 1x1 conv / affine
coupling, split with a learned conditional prior), width 64, on 8-bit digits
uniformly dequantized, scaled to [0, 1) and logit-transformed. A small model
sized for 2 CPU cores; test bits/dim on the 500 held-out digits.
Measured 2026-11-24: test 2.28 bits/dim after the 1,200 steps of 64, in
2 min 07 s on 2 CPU cores. The run evaluates 4 times (the test curve).
The paper's MNIST figure, 1.05 bits/dim (L = 3, K = 32, width 512, long
training), is not comparable: openai/glow pads the digits to 32x32 and
tiles them to 3 channels, which makes most dimensions easy.

  python scripts/train.py --config=configs/glow_mnist.py --workdir=/tmp/glow_mnist

Arguments: ``smoke`` (seconds, for tests), ``conditional`` (Glow's
class-conditional variant on the digit labels: Glow's conditioner, a
learned top prior with a class-dependent term, and the auxiliary classifier
on the top latent with the paper's weight_y = 0.01; it reports
"class_bits" and "class_error" beside bits/dim, which stay those of the
images alone; samples cycle through the digits 0..9), ``vardeq`` (Flow++'s variational
dequantization, see gm_jax.flows.dequantization: nll_nats / bpd become the
variational bound, and uniform_bpd reports the same flow with uniform
noise).
"""

from gm_jax import config_lib, flows


def get_config(arg=None):
  args = config_lib.parse_args(arg, allowed=("smoke", "conditional",
                                                "vardeq"))
  config = config_lib.base_config()
  config.data.source = "embedded_mnist"

  config.model = flows.default_model_config()
  config.model.image_shape = (28, 28, 1)
  config.model.architecture = "glow"
  config.model.num_levels = 2
  config.model.steps_per_level = 4
  config.model.width = 64
  config.model.coupling = "affine"
  config.model.scale_fn = "sigmoid"
  config.model.permutation = "lu"
  config.model.learned_split_prior = True
  # The paper shifts to [-0.5, 0.5); on MNIST's mostly-black digits the
  # logit transform trains much faster on a CPU budget (3.0 against 4.9
  # train bits/dim after 300 steps).
  config.model.preprocess = "logit"
  config.model.logit_alpha = 0.05
  config.model.sample_temperature = 0.7
  if "conditional" in args:
    config.model.conditioner = "glow"
    config.model.learned_top_prior = True
    config.model.num_classes = 10
    config.model.class_loss_weight = 0.01

  if "vardeq" in args:
    # Flow++'s variational dequantization: q(u | x) trained with the flow,
    # sized for the CPU: 2 conditional couplings of Glow's 3-conv net, width
    # 16, at the full 28x28 (4 couplings of width 32 with residual blocks,
    # the model config's default, made a step about 15x slower here).
    config.model.dequantization = "variational"
    config.model.dequantization_steps = 2
    config.model.dequantization_width = 16
    config.model.dequantization_res_blocks = 0

  config.optim.learning_rate = 1e-3
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 100
  config.optim.grad_clip = 50.0
  # The trainer warms the EMA up (decay min(0.99, (1 + s) / (10 + s)));
  # 0.99 averages over about the last 100 of the 1,200 steps.
  config.optim.ema_decay = 0.99

  config.train.num_steps = 1_200
  config.train.batch_size = 64
  config.train.eval_batch_size = 100
  # On CPU, YNNPACK runs the couplings' few-channel output convolutions
  # faster than XLA's own kernels: 662 against 570 images/s for this config
  # (2 cores, 2026-11-29, benchmarks/README.md, seventh pass), and without
  # gradients too: 64 samples in 21 against 25 ms, 100 test images
  # evaluated in 31 against 33.5 ms (medians of 10, eighth pass).
  config.train.cpu_convolutions = "ynnpack"
  config.train.cpu_forward_convolutions = "ynnpack"
  config.train.log_every = 100
  config_lib.evaluate_times(config, 4)  # the test NLL curve
  config.train.sample_every = 400
  config.ckpt.every_steps = 400

  if "smoke" in args:
    config_lib.apply_smoke(config)
    config.model.num_levels = 1
    config.model.steps_per_level = 1
    config.model.width = 8
    config.model.visualize_temperatures = (0.7,)
  config.lock()
  return config
