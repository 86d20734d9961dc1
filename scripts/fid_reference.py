"""Reference statistics of a dataset split for FID / KID, computed once.

  python scripts/fid_reference.py --config=configs/vae_mnist.py \
      --split=test --out=/tmp/refs/mnist_test.npz
  python scripts/fid_reference.py --config=configs/diffusion_cifar10.py \
      --extractor=inception --weights=/path/to/pt_inception-2015-12-05-6726825d.pth \
      --split=test --out=/tmp/refs/cifar10_test.npz

Writes OUT (.npz): the features' mean ``mu`` and covariance ``sigma``, the
features themselves (for KID) and JSON metadata naming the extractor, the
data and N. Running it again with the same extractor and data reuses the
file (--overwrite recomputes). The default extractor is the digit classifier
for grey images (trained on the config's train split and cached on first
use, about a minute on 2 CPU cores) and the FID Inception-v3 for colour
images; the Inception weights are a local file (see
gm_jax/quality/inception.py), nothing downloads.

Run with the repository on PYTHONPATH (or gm_jax installed).
"""

import dataclasses

from absl import app, flags

from gm_jax import config_lib, launch
from gm_jax.quality import classifier, reference

_CONFIG = flags.DEFINE_string(
    "config", None, "Config file, optionally with its argument:"
    " configs/x.py or configs/x.py:arg. Only its data section is used.")
_OUT = flags.DEFINE_string("out", None, "The .npz file to write (or reuse).")
_SPLIT = flags.DEFINE_string("split", None,
                             "Split (default: the config's data.eval_split).")
_EXTRACTOR = flags.DEFINE_enum(
    "extractor", None, list(reference.EXTRACTORS),
    "Feature extractor (default: mnist_classifier for grey images,"
    " inception for colour).")
_WEIGHTS = flags.DEFINE_string(
    "weights", None, "inception: pytorch-fid's"
    " pt_inception-2015-12-05-6726825d.pth (or an .npz of its arrays).")
_NUM_EXAMPLES = flags.DEFINE_integer(
    "num_examples", -1, "Use the first N examples of the split (-1: all).")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "Feature-extractor cache (default:"
    " $XDG_CACHE_HOME/gm_jax/feature_extractors or"
    " ~/.cache/gm_jax/feature_extractors).")
_SEED = flags.DEFINE_integer("seed", 0, "mnist_classifier: training seed.")
_CLASSIFIER_STEPS = flags.DEFINE_integer(
    "classifier_steps", None, "mnist_classifier: training steps (default:"
    f" {classifier.ClassifierSettings().num_steps}).")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Images per feature-extractor call.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Recompute even when OUT is up to date.")
_KEEP_FEATURES = flags.DEFINE_bool(
    "keep_features", True, "Store the features too (KID needs them).")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = config_lib.load(_CONFIG.value)
  name = _EXTRACTOR.value or reference.default_extractor(
      tuple(config.model.image_shape))
  settings = classifier.ClassifierSettings()
  if _CLASSIFIER_STEPS.value is not None:
    settings = dataclasses.replace(settings, num_steps=_CLASSIFIER_STEPS.value)
  extractor = reference.build_extractor(
      name, config.data, weights=_WEIGHTS.value, cache_dir=_CACHE_DIR.value,
      seed=_SEED.value, settings=settings, batch_size=_BATCH_SIZE.value)
  reference.compute_reference(
      extractor, config.data, _SPLIT.value or config.data.eval_split,
      path=_OUT.value, num_examples=_NUM_EXAMPLES.value,
      keep_features=_KEEP_FEATURES.value, overwrite=_OVERWRITE.value)


if __name__ == "__main__":
  launch.run(main)
