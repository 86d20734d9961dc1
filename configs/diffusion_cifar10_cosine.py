"""DDPM on CIFAR-10 with the cosine noise schedule of improved DDPM.

The paper network and optimisation of diffusion_cifar10.py (35.7M
parameters, L_simple, T = 1000) with Nichol & Dhariwal's (2021) cosine
schedule, abar_t = f(t / T) / f(0), f(u) = cos^2(pi / 2 (u + 0.008) / 1.008),
betas clipped at 0.999. Their ablations found the cosine schedule improves
the log-likelihood over the linear one; this config measures that on the
DDPM network (target: below diffusion_cifar10.py's bound, which states
<= 3.75 bits/dim). Accepts the same arguments (smoke, bf16, exact, ddpm).

  python scripts/train.py --config=configs/diffusion_cifar10_cosine.py --workdir=/tmp/diffusion_cifar10_cosine
"""

import importlib.util
import pathlib


def get_config(arg=None):
  # Load the sibling config by path: config files are not a package.
  path = pathlib.Path(__file__).with_name("diffusion_cifar10.py")
  spec = importlib.util.spec_from_file_location("diffusion_cifar10", path)
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  words = [w for w in (arg or "").split(",") if w.strip()]
  return base.get_config(",".join(words + ["cosine"]))
