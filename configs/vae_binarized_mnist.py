"""The IWAE paper's one-stochastic-layer VAE on statically binarized MNIST.

Burda, Grosse & Salakhutdinov (2016), Table 1, MNIST, one stochastic layer,
VAE trained with k = 1: encoder and decoder are MLPs with two deterministic
layers of 200 tanh units, 50 latent units, Bernoulli decoder; Adam with
beta1 = 0.9, beta2 = 0.999, eps = 1e-4, batch 20, 3^i epochs at learning rate
1e-3 * 10^(-i/7) for i = 0..7 (3,280 epochs in all; we use the equivalent
exponential decay), test NLL by the IWAE bound with k = 5000. The paper
reports 86.76 nats for this model (Table 1; trained as an IWAE with k = 50
it reaches 84.78, and the two-layer VAE 85.33: configs/iwae_mnist.py,
which uses the paper's dynamically binarized data). measured: (empty until
a run on the real data fills it)

Data: tfds ``binarized_mnist`` (the static binarization of Larochelle &
Murray, 2011), which must be prepared once with TensorFlow installed
(``pip install 'gm_jax[tf]'`` then ``tfds build binarized_mnist``).

  python scripts/train.py --config=configs/vae_binarized_mnist.py \
      --workdir=/tmp/vae_binarized_mnist

``smoke`` shrinks everything for tests and reads the embedded MNIST digits,
thresholded at 127, so it needs no download.
"""

from gm_jax import config_lib, vae

TRAIN_EXAMPLES = 50_000


def get_config(arg=None):
  args = config_lib.parse_args(arg, allowed=("smoke",))
  config = config_lib.base_config()
  config.data.source = "tfds"
  config.data.name = "binarized_mnist"
  config.data.train_split = "train"
  config.data.eval_split = "test"

  vae.iwae_paper_recipe(config, TRAIN_EXAMPLES)
  config.model.binarize = "none"  # the data is already {0, 1}
  config.train.eval_every = 500_000
  config.train.sample_every = 500_000

  if "smoke" in args:
    config_lib.apply_smoke(config)
    config.data.source = "embedded_mnist"
    config.data.name = ""
    config.model.binarize = "threshold"
    config.optim.piecewise_boundaries = (2,)
    config.model.hidden_sizes = (16,)
    config.model.latent_dim = 4
    config.model.iwae_samples = 4
    config.model.iwae_chunk = 2
  config.lock()
  return config
