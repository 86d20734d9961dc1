"""What scripts/evaluate.py and scripts/sample.py do, as a check any family's
smoke-training test can run on its workdir (no family-specific code)."""

import jax
import numpy as np

from gm_jax import data, train


def assert_workdir_serves_scripts(config, workdir, num_examples=8):
  built, params, step = train.restore_for_inference(config, workdir)
  assert step == config.train.num_steps
  source = data.load_source(config.data, config.data.eval_split)
  results = train.evaluate_dataset(
      built.evaluate, params, source, config.train.eval_batch_size,
      num_examples, jax.random.PRNGKey(0), built.mesh)
  assert np.isfinite(results["nll_nats"]) and results["bpd"] > 0
  images = built.sample(params, jax.random.PRNGKey(1), 2)
  assert images.shape == (2,) + tuple(config.model.image_shape)
  assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
