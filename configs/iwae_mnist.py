"""The IWAE paper's MNIST models (Burda, Grosse & Salakhutdinov, 2016).

Reproduces Table 1's MNIST column. Default: one stochastic layer trained as
an IWAE with k = 50. Arguments: ``vae`` trains the k-sample ELBO instead of
the importance-weighted bound; ``k1`` / ``k5`` set k (default 50);
``two_layer`` uses the two-stochastic-layer model. Test NLL in nats by the
IWAE bound with k = 5000 (Table 1):

  one layer:  VAE k=1 86.76, k=5 86.47, k=50 86.35;
              IWAE k=1 86.76, k=5 85.54, k=50 84.78
  two layers: VAE k=1 85.33, k=5 85.01, k=50 84.78;
              IWAE k=1 85.33, k=5 83.89, k=50 82.90

measured: (empty until a run on the real data fills it)

Model: one layer, 784-200-200-50 encoder and 50-200-200-784 decoder (tanh,
Bernoulli outputs); two layers, 784-200-200-100 (h1) -100-100-50 (h2) with
the generative path mirrored (``model.stochastic_layers`` = 2). Data: tfds
``mnist``, its 60,000 training and 10,000 test images, binarized afresh
every step (Bernoulli(pixel / 255), the dynamic binarization; evaluation
draws one binarization per test image from the evaluation key). Adam
(beta1 0.9, beta2 0.999, eps 1e-4), batch 20, 3^i epochs at learning rate
1e-3 * 10^(-i/7) for i = 0..7 (3,280 epochs), raw parameters evaluated.
Evaluation also counts the active units (variance over the test set of
E_q[u | x] above 0.01; the paper's Figure 3 / Table 2).

  python scripts/train.py --config=configs/iwae_mnist.py --workdir=/tmp/iwae
  python scripts/train.py --config=configs/iwae_mnist.py:two_layer,k5 ...

``smoke`` shrinks everything and reads the embedded digits (offline).
"""

from gm_jax import config_lib, vae

TRAIN_EXAMPLES = 60_000


def get_config(arg=None):
  args = config_lib.parse_args(
      arg, allowed=("smoke", "vae", "k1", "k5", "two_layer"))
  if {"k1", "k5"} <= args:
    raise ValueError("Config arguments k1 and k5 exclude each other.")
  config = config_lib.base_config()
  config.data.source = "tfds"
  config.data.name = "mnist"
  config.data.train_split = "train"
  config.data.eval_split = "test"

  vae.iwae_paper_recipe(config, TRAIN_EXAMPLES)
  config.model.binarize = "dynamic"
  config.model.objective = "elbo" if "vae" in args else "iwae"
  config.model.train_samples = 1 if "k1" in args else 5 if "k5" in args else 50
  if "two_layer" in args:
    config.model.stochastic_layers = 2
    config.model.bottom_latent_dim = 100
    config.model.top_hidden_sizes = (100, 100)
  config.train.eval_every = 1_000_000
  config.train.sample_every = 1_000_000
  # On CPU, the importance samples' matrix products run faster on XLA's own
  # kernels than on YNNPACK: k = 50 trained 760 -> 1,080 images/s, k = 5
  # 4,800 -> 5,600; k = 1 ran 12,200 -> 9,800, so it keeps the default (2
  # cores, 2026-11-29, benchmarks/README.md, eighth pass).
  if config.model.train_samples > 1:
    config.train.cpu_convolutions = "xla"

  if "smoke" in args:
    config_lib.apply_smoke(config)
    config.data.source = "embedded_mnist"
    config.data.name = ""
    config.optim.piecewise_boundaries = (2,)
    config.model.hidden_sizes = (16,)
    config.model.latent_dim = 4
    config.model.bottom_latent_dim = 6
    config.model.top_hidden_sizes = (8,)
    config.model.train_samples = min(config.model.train_samples, 3)
    config.model.iwae_samples = 4
    config.model.iwae_chunk = 2
  config.lock()
  return config
