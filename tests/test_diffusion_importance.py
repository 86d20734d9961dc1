"""Improved DDPM's importance-sampled timesteps: the loss history, the
distribution, the weights, the configs, and the state in the trainer
(checkpoints, resumes, gradient accumulation, several devices)."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gm_jax import checkpoint as checkpoint_lib
from gm_jax import config_lib, families, launch, metrics, sharding, train
from gm_jax.diffusion import family as diffusion_family
from gm_jax.diffusion import timestep_sampling as ts
from tests.test_diffusion import _tiny_model_config
from tests.test_train import assert_trees_equal

# ----------------------------------------------------------------------------
# The loss history.


def _reference_update(history, count, timesteps, losses):
  """improved-diffusion's update, in plain Python, on lists."""
  size = len(history[0])
  for t, loss in zip(timesteps, losses, strict=True):
    if count[t] == size:
      history[t] = history[t][1:] + [loss]
    else:
      history[t][count[t]] = loss
      count[t] += 1
  return history, count


def test_history_update_matches_a_python_reference():
  """Random batches with repeated timesteps, past the history's length
  (FIFO): the same history and counts as the reference after every batch."""
  num_timesteps, size, batch = 5, 3, 16
  rng = np.random.default_rng(0)
  state = ts.init_loss_history(num_timesteps, size)
  history = [[0.0] * size for _ in range(num_timesteps)]
  count = [0] * num_timesteps
  update = jax.jit(ts.update_loss_history)
  for _ in range(6):
    t = rng.integers(0, num_timesteps, batch)
    losses = rng.normal(size=batch).astype(np.float32)
    history, count = _reference_update(history, count, t.tolist(),
                                       losses.tolist())
    state = update(state, jnp.asarray(t, jnp.int32), jnp.asarray(losses))
    np.testing.assert_array_equal(state["count"], count)
    np.testing.assert_array_equal(state["history"],
                                  np.asarray(history, np.float32))
  assert max(count) == size and sum(count) == num_timesteps * size
  assert state["count"].dtype == jnp.int32
  assert state["history"].dtype == jnp.float32


def test_history_keeps_the_last_losses_in_order():
  """One timestep seen five times in one batch with room for three: the
  last three, oldest first; the others untouched."""
  state = ts.init_loss_history(3, 3)
  state = ts.update_loss_history(state, jnp.array([1, 1, 1, 1, 1]),
                                 jnp.arange(1.0, 6.0))
  np.testing.assert_array_equal(state["history"][1], [3.0, 4.0, 5.0])
  np.testing.assert_array_equal(state["count"], [0, 3, 0])
  np.testing.assert_array_equal(np.asarray(state["history"])[[0, 2]], 0.0)
  with pytest.raises(ValueError, match="t and losses"):
    ts.update_loss_history(state, jnp.array([1, 2]), jnp.ones(3))


# ----------------------------------------------------------------------------
# The distribution.


def _warm_state(history):
  history = jnp.asarray(history, jnp.float32)
  return {"history": history,
          "count": jnp.full(history.shape[:1], history.shape[1], jnp.int32)}


def test_probabilities_are_uniform_until_every_history_is_full():
  size = 3
  state = ts.init_loss_history(4, size)
  # Every timestep but the last gets its 3 losses, the last 2 of them.
  t = [0, 1, 2, 3] * 2 + [0, 1, 2]
  state = ts.update_loss_history(state, jnp.array(t),
                                 jnp.arange(1.0, len(t) + 1))
  np.testing.assert_array_equal(ts.timestep_probabilities(state),
                                np.full(4, 0.25, np.float32))
  assert float(ts.warm_fraction(state)) == 0.75
  state = ts.update_loss_history(state, jnp.array([3]), jnp.array([40.0]))
  assert float(ts.warm_fraction(state)) == 1.0
  probs = ts.timestep_probabilities(state)
  assert not np.allclose(probs, 0.25)
  assert int(jnp.argmax(probs)) == 3  # it holds the 40


def test_warm_probabilities_have_the_closed_form():
  history = np.array([[1.0, 1.0, 1.0], [2.0, -2.0, 2.0], [3.0, 4.0, 5.0],
                      [0.5, 0.0, 1.0]])
  probs = np.asarray(ts.timestep_probabilities(_warm_state(history)),
                     np.float64)
  rms = np.sqrt(np.mean(history**2, axis=1))
  expected = (1 - 0.001) * rms / rms.sum() + 0.001 / 4
  np.testing.assert_allclose(probs, expected, rtol=1e-6)
  assert probs.sum() == pytest.approx(1.0, abs=1e-6)
  assert ts.UNIFORM_MIX == 0.001 and ts.DEFAULT_HISTORY == 10
  # Other mixing weights; all-zero histories stay uniform.
  no_mix = np.asarray(ts.timestep_probabilities(_warm_state(history), 0.0))
  np.testing.assert_allclose(no_mix, rms / rms.sum(), rtol=1e-6)
  np.testing.assert_array_equal(
      ts.timestep_probabilities(_warm_state(np.zeros((4, 3)))), 0.25)
  # The effective sample size per draw: 1 when uniform, T^2 / sum(1 / p).
  assert float(ts.effective_sample_fraction(jnp.full(4, 0.25))) == (
      pytest.approx(1.0))
  assert float(ts.effective_sample_fraction(jnp.asarray(probs))) == (
      pytest.approx(16 / np.sum(1 / probs), rel=1e-6))


# Per-timestep losses spread over three orders of magnitude, like the
# bound's terms, and a warm history that knows them roughly.
_LOSSES = np.array([300.0, 40.0, 9.0, 3.0, 1.5, 1.0, 0.6, 0.3])


def _history_for(losses, key):
  noise = 1.0 + 0.2 * jax.random.uniform(key, (losses.size, 4))
  return _warm_state(losses[:, None] * np.asarray(noise))


def test_importance_weights_are_unbiased():
  """sum_t p_t w_t L_t = mean_t L_t exactly with w_t = 1 / (T p_t) as
  sample_timesteps returns it, and a Monte Carlo mean of w L over many
  draws is within 4 standard errors of mean_t L_t (with a far smaller
  standard error than uniform draws give)."""
  num_timesteps = _LOSSES.size
  probs = ts.timestep_probabilities(_history_for(_LOSSES, jax.random.key(0)))
  num_draws = 200_000
  t, weights = jax.jit(ts.sample_timesteps, static_argnums=2)(
      jax.random.key(1), probs, num_draws)
  t, weights = np.asarray(t), np.asarray(weights, np.float64)
  p = np.asarray(probs, np.float64)
  # Every draw's weight is 1 / (T p_t) of its timestep.
  np.testing.assert_allclose(weights, 1.0 / (num_timesteps * p[t]),
                             rtol=1e-6)
  weight_of = np.zeros(num_timesteps)
  weight_of[t] = weights
  assert np.all(weight_of > 0)  # every timestep was drawn
  assert np.sum(p * weight_of * _LOSSES) == pytest.approx(_LOSSES.mean(),
                                                          rel=1e-6)
  values = weights * _LOSSES[t]
  stderr = values.std() / np.sqrt(num_draws)
  assert abs(values.mean() - _LOSSES.mean()) < 4 * stderr
  uniform_stderr = _LOSSES.std() / np.sqrt(num_draws)
  assert stderr < 0.2 * uniform_stderr


def test_draws_follow_the_probabilities():
  """Draw frequencies match a non-uniform p (chi-square over the
  timesteps), down to timesteps held only by the uniform share."""
  losses = np.concatenate([_LOSSES, np.zeros(2)])  # the last two: p = u / T
  probs = np.asarray(ts.timestep_probabilities(
      _history_for(losses, jax.random.key(2))), np.float64)
  num_draws = 400_000
  t, _ = jax.jit(ts.sample_timesteps, static_argnums=2)(
      jax.random.key(3), jnp.asarray(probs, jnp.float32), num_draws)
  counts = np.bincount(np.asarray(t), minlength=probs.size)
  expected = num_draws * probs
  chi_square = np.sum((counts - expected)**2 / expected)
  assert chi_square < 30, (chi_square, counts, expected)  # 9 d.o.f.: p < 1e-3
  # The rare ones (expected 40 each): within 5 standard errors.
  rare = expected[-2:]
  assert np.all(np.abs(counts[-2:] - rare) < 5 * np.sqrt(rare))
  assert probs[-1] == pytest.approx(0.001 / probs.size, rel=1e-5)


# ----------------------------------------------------------------------------
# Configs.


def test_config_keys_are_checked_with_one_line_naming_the_key():
  config = _tiny_model_config(timestep_sampler="importance")  # L_simple
  with pytest.raises(ValueError) as error:
    diffusion_family.make(config)
  message = str(error.value)
  assert message.startswith("config.model.timestep_sampler='importance'")
  assert "loss_type" in message and "\n" not in message
  config = _tiny_model_config(timestep_sampler="importance",
                              variance="learned_range", loss_type="vlb",
                              importance_history=0)
  with pytest.raises(ValueError, match=r"^config.model.importance_history=0"
                     r" must be >= 1\.$"):
    diffusion_family.make(config)
  with pytest.raises(ValueError, match="config.model.timestep_sampler='x'"):
    diffusion_family.make(_tiny_model_config(timestep_sampler="x"))
  # The default draws uniformly and has no state.
  assert diffusion_family.make(_tiny_model_config()).loss_state is None


def test_configs_and_the_command_line_turn_it_on(monkeypatch):
  for spec in ("configs/diffusion_mnist.py:vlb",
               "configs/diffusion_mnist.py:iddpm,vlb",
               "configs/iddpm_cifar10.py:vlb"):
    model = config_lib.load(spec).model
    assert (model.variance, model.loss_type, model.timestep_sampler,
            model.importance_history) == ("learned_range", "vlb",
                                          "importance", 10), spec
    assert model.schedule == "cosine"
  assert config_lib.load("configs/diffusion_mnist.py:vlb").model.to_dict() == (
      config_lib.load("configs/diffusion_mnist.py:iddpm,vlb").model.to_dict())
  paper = config_lib.load("configs/iddpm_cifar10.py:vlb")
  assert paper.model.num_timesteps == 4000 and paper.model.dropout == 0.3
  assert config_lib.load("configs/iddpm_cifar10.py").model.timestep_sampler == (
      "uniform")
  # --config.model.timestep_sampler=importance, as scripts/train.py reads it.
  monkeypatch.setattr(launch, "_overrides",
                      [("model.timestep_sampler", "importance"),
                       ("model.importance_history", "4")])
  config = launch.load_config("configs/diffusion_mnist.py:iddpm")
  assert config.model.timestep_sampler == "importance"
  assert config.model.importance_history == 4
  family = families.make_family(config.model)
  state = family.loss_state.init()
  assert state["history"].shape == (1000, 4) and state["count"].shape == (1000,)
  # On an L_simple config the same override is refused, naming the key.
  config = launch.load_config("configs/diffusion_mnist.py")
  with pytest.raises(ValueError, match="config.model.timestep_sampler"):
    train.build(config)


def test_stateful_loss_matches_the_plain_loss_while_uniform():
  """During the warm-up the importance loss is the plain objective at its
  draws (all weights 1); its stats are its timesteps and unweighted
  per-example objectives, which it also logs."""
  config = _tiny_model_config(
      timestep_sampler="importance", variance="learned_range",
      loss_type="hybrid", num_timesteps=8)
  family = diffusion_family.make(config)
  key = jax.random.key(0)
  batch = {"image": jax.random.randint(key, (4, 8, 8, 1), 0, 256).astype(
      jnp.uint8), "label": jnp.zeros((4,), jnp.int32)}
  params = family.init(key, batch)
  state = family.loss_state.init()
  loss, (metrics_, stats) = jax.jit(family.loss_state.loss)(
      params, state, batch, key, jnp.int32(0))
  assert set(stats) == {"t", "loss"}
  assert stats["t"].shape == (4,) and stats["t"].dtype == jnp.int32
  assert float(loss) == pytest.approx(float(jnp.mean(stats["loss"])),
                                      rel=1e-6)
  assert float(loss) == pytest.approx(
      float(metrics_["simple_loss"] + 1e-3 * metrics_["vlb_term_bpd"]),
      rel=1e-5)
  assert float(metrics_["importance_warm"]) == 0.0
  assert float(metrics_["importance_ess"]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------
# In the trainer.


def _trainer_config(**train_overrides):
  """A tiny L_vlb model on the embedded digits whose warm-up (T = 8
  timesteps, 2 losses each, 8 examples a step) ends within a few steps."""
  config = config_lib.load("configs/diffusion_mnist.py:vlb,smoke")
  config.unlock()
  model = config.model
  model.width_mult = (1,)
  model.attn_resolutions = ()
  model.num_timesteps = 8
  model.importance_history = 2
  model.sample_steps = 2
  model.eval_timesteps = 2
  model.eval_exact_timesteps = 0
  model.dropout = 0.0  # compiles faster
  config.train.num_steps = 6
  config.train.log_every = 1
  config.train.eval_every = 1000  # only at the end
  config.train.sample_every = 0
  config.train.eval_examples = 8
  config.train.compilation_cache_dir = ""  # the test session's cache
  config.ckpt.every_steps = 2
  for k, v in train_overrides.items():
    config.train[k] = v
  config.lock()
  return config


def _host(tree):
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _final_state(workdir, config):
  abstract = train.build(config, sharding.make_mesh(
      jax.devices()[:1])).abstract_state
  restored = checkpoint_lib.Checkpointer(workdir, read_only=True
                                         ).restore_latest(abstract)
  return restored.step, _host(restored.state)


def _train_records(workdir):
  return [{k: v for k, v in r.items() if k not in metrics.TIMING_KEYS}
          for r in metrics.read_metrics(workdir, "train")]


@pytest.fixture(scope="module")
def importance_run(tmp_path_factory):
  """An uninterrupted run on one device, with the family state after every
  step."""
  workdir = str(tmp_path_factory.mktemp("importance"))
  states = []
  train.train_and_evaluate(
      _trainer_config(), workdir, devices=jax.devices()[:1],
      hooks=[lambda step, state: states.append(_host(state.family_state))])
  return workdir, states


def test_trainer_carries_the_state_and_saves_it(importance_run):
  workdir, states = importance_run
  config = _trainer_config()
  assert len(states) == config.train.num_steps
  counts = [int(s["count"].sum()) for s in states]
  # Up to 8 new losses a step (fewer where a timestep's 2 are taken),
  # until every timestep has its 2 (16).
  steps = np.diff([0] + counts)
  assert np.all(steps >= 0) and np.all(steps <= 8) and steps[0] > 0
  assert counts[-1] == 16
  records = metrics.read_metrics(workdir, "train")
  warm = [r["importance_warm"] for r in records]
  assert warm[0] == 0.0 and warm[-1] == 1.0  # warm-up ended in the run
  assert records[0]["importance_ess"] == 1.0
  assert records[-1]["importance_ess"] < 1.0  # importance-sampled by then
  # Once full, every step still replaces losses (FIFO).
  full = [s for s in states if np.all(s["count"] == 2)]
  assert len(full) >= 2
  assert all(np.any(a["history"] != b["history"])
             for a, b in zip(full[:-1], full[1:], strict=True))
  # Every checkpoint holds the state after its step.
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  assert checkpointer.all_steps() == [2, 4, 6]
  abstract = train.build(config, sharding.make_mesh(
      jax.devices()[:1])).abstract_state
  assert {"family_state/history", "family_state/count"} <= set(
      checkpoint_lib.tree_paths(abstract))
  for step in (2, 4):
    restored = checkpointer.restore(step, abstract, only="family_state")
    assert_trees_equal(_host(restored.state), states[step - 1])
  step, state = _final_state(workdir, config)
  assert step == 6
  assert_trees_equal(state.family_state, states[-1])
  # Evaluation and sampling restore the EMA parameters alone.
  built, ema_params, step = train.restore_for_inference(
      config, workdir, devices=jax.devices()[:1])
  assert step == 6
  assert_trees_equal(_host(ema_params), state.ema_params)
  assert built.family.loss_state is not None


def test_preempted_run_resumes_identically(importance_run, tmp_path):
  """SIGTERM after step 2 saves at step 3 and stops; the resumed run ends
  with the parameters, EMA, family state and training records of the
  uninterrupted run, bit for bit."""
  reference, _ = importance_run
  config = _trainer_config()
  workdir = str(tmp_path)

  def preempt(step, state):
    if step == 2:  # noticed at the end of the next step
      os.kill(os.getpid(), signal.SIGTERM)

  assert train.train_and_evaluate(config, workdir, devices=jax.devices()[:1],
                                  hooks=[preempt]) == {}
  assert checkpoint_lib.Checkpointer(workdir).all_steps() == [2, 3]
  step, state = _final_state(workdir, config)
  assert step == 3 and int(state.family_state["count"].sum()) > 0
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  _, got = _final_state(workdir, config)
  _, want = _final_state(reference, config)
  assert_trees_equal(got, want)
  assert _train_records(workdir) == _train_records(reference)


def _direct_config():
  """An 8x8 model with T = 8 and room for 10 losses per timestep, trained
  through build()'s step with gradient accumulation 2."""
  config = config_lib.load("configs/diffusion_mnist.py:vlb,smoke")
  config.unlock()
  config.model.update(image_shape=(8, 8, 1), width_mult=(1,),
                      attn_resolutions=(), num_timesteps=8,
                      importance_history=10, sample_steps=2, dropout=0.0)
  config.optim.grad_accumulation = 2
  config.lock()
  return config


def _warm_history(num_timesteps, size):
  """A full history with losses falling over three orders of magnitude."""
  scale = 100.0 * 0.3 ** np.arange(num_timesteps)
  noise = np.random.default_rng(1).uniform(0.8, 1.2, (num_timesteps, size))
  return {"history": (scale[:, None] * noise).astype(np.float32),
          "count": np.full(num_timesteps, size, np.int32)}


def _run_steps(config, devices, num_steps=2):
  """(states, metrics, replicated) after each of ``num_steps`` train steps
  on random batches (the same on any devices), from the initial family
  state ("cold") and from a full history ("warm")."""
  built = train.build(config, sharding.make_mesh(devices))
  rng = np.random.default_rng(0)
  shape = (config.train.batch_size,) + tuple(config.model.image_shape)
  batches = [{"image": rng.integers(0, 256, shape).astype(np.uint8),
              "label": np.zeros(shape[:1], np.int32)}
             for _ in range(num_steps)]
  batched = sharding.batch_sharding(built.mesh)
  replicated = sharding.replicated(built.mesh)
  place = lambda b: jax.device_put(b, batched)  # noqa: E731
  warm = _warm_history(config.model.num_timesteps,
                       config.model.importance_history)
  runs = {}
  for start in ("cold", "warm"):
    state = built.init(jax.random.key(0), place(batches[0]))
    if start == "warm":
      state = state.replace(family_state=jax.device_put(warm, replicated))
    states, records, flags = [], [], []
    for batch in batches:
      state, step_metrics = built.train_step(state, place(batch),
                                             jax.random.key(1))
      flags.append(state.family_state["history"].sharding.is_fully_replicated)
      states.append(_host(state))  # the step donates the state
      records.append(_host(step_metrics))
    runs[start] = states, records, flags
  return runs


@pytest.fixture(scope="module")
def one_device_runs():
  """Two steps with gradient accumulation 2 on one device."""
  return _run_steps(_direct_config(), jax.devices()[:1])


def test_gradient_accumulation_records_every_example(one_device_runs):
  """With 2 micro-batches the state gets all B examples of a step, once
  each (during the warm-up, with room for all of them)."""
  states, records, _ = one_device_runs["cold"]
  batch_size = _direct_config().train.batch_size
  for step, state in enumerate(states, 1):
    count = state.family_state["count"]
    history = state.family_state["history"]
    assert count.sum() == step * batch_size
    # Exactly the filled entries hold losses (positive: bits/dim terms).
    filled = np.arange(history.shape[1])[None, :] < count[:, None]
    assert np.all(history[filled] > 0) and np.all(history[~filled] == 0)
  assert all(r["importance_warm"] == 0 for r in records)
  # Warm: every step pushes B losses through the FIFOs, counts stay full.
  warm_states, warm_records, _ = one_device_runs["warm"]
  start = _warm_history(8, 10)["history"]
  changed = [np.sum(np.any(s.family_state["history"] != start, axis=1))
             for s in warm_states]
  assert 0 < changed[0] <= changed[1]
  assert all(np.all(s.family_state["count"] == 10) for s in warm_states)
  assert all(r["importance_warm"] == 1 for r in warm_records)
  assert warm_records[0]["importance_ess"] < 0.9


def test_several_devices_match_one(one_device_runs):
  """The stateful step on a 4-device mesh: the same timesteps (counts and
  FIFO positions), histories and parameters within float tolerance, cold
  and warm; the family state stays replicated."""
  four_device_runs = _run_steps(_direct_config(), jax.devices()[:4])
  for start in ("cold", "warm"):
    one, records1, _ = one_device_runs[start]
    four, records4, replicated = four_device_runs[start]
    assert all(replicated)
    for a, b in zip(one, four, strict=True):
      np.testing.assert_array_equal(a.family_state["count"],
                                    b.family_state["count"])
      np.testing.assert_allclose(a.family_state["history"],
                                 b.family_state["history"], rtol=1e-4,
                                 atol=1e-5)
      for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params),
                      strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    for r1, r4 in zip(records1, records4, strict=True):
      assert r1["importance_warm"] == r4["importance_warm"]
      np.testing.assert_allclose(r1["loss"], r4["loss"], rtol=1e-5)
      np.testing.assert_allclose(r1["importance_ess"], r4["importance_ess"],
                                 rtol=1e-6)


def test_importance_config_json_round_trips(importance_run):
  """config.json (what evaluate.py and a resume read) keeps the keys."""
  workdir, _ = importance_run
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["model"]["timestep_sampler"] == "importance"
  assert saved["model"]["importance_history"] == 2
