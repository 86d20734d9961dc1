"""Sample quality: FID / KID over features, and the feature extractors.

``metrics`` holds the pure functions over feature arrays, ``features`` the
extractor interface, ``classifier`` and ``inception`` the two extractors and
``reference`` the glue that scripts use (extractors by name, cached
reference statistics of a data split).
"""

from gm_jax.quality.classifier import (  # noqa: F401  (re-exports)
  ClassifierSettings,
  DigitClassifier,
  mnist_classifier,
)
from gm_jax.quality.features import (  # noqa: F401  (re-exports)
  FeatureExtractor,
  default_cache_dir,
  source_features,
  to_uint8,
)
from gm_jax.quality.inception import (  # noqa: F401  (re-exports)
  FIDInceptionV3,
  convert_weights,
  inception_extractor,
  load_variables,
  read_torch_state_dict,
)
from gm_jax.quality.metrics import (  # noqa: F401  (re-exports)
  Reference,
  feature_statistics,
  fid,
  frechet_distance,
  kid,
  load_reference,
  save_reference,
  score_against_reference,
)
from gm_jax.quality.reference import (  # noqa: F401  (re-exports)
  EXTRACTORS,
  build_extractor,
  compute_reference,
  default_extractor,
  extractor_id,
  sample_scores,
  split_reference,
)
