"""Adding an algorithm is one file: a toy one, registered through the public decorator,
selected by config.algorithm.name and run for a step on the tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopd_jax import algorithms, settings, step_losses, train, train_step
from mopd_jax.algorithms import policy
from mopd_jax.models import transformer
from mopd_jax.verifiers.result import Result
from tests.conftest import sampled_rollouts, tiny_config


@algorithms.register("toy_reward_weighted_nll")
class RewardWeightedNLL(policy.PolicyLoss):
  """-reward * log p of every response token of the rewarded rollouts, token-mean."""

  def rollout_mask(self, cfg, rollouts, num_prompts):
    return rollouts.rewards > 0

  def loss(self, cfg, params, inputs, rollouts, signal, weights):
    logp = step_losses.student_logp(cfg, params, inputs, rollouts)
    per_token = -rollouts.rewards[:, None] * logp
    return step_losses.weighted_sum(per_token, weights), step_losses.stopped(logp)

  def metrics(self, cfg, inputs, rollouts):
    return {"train/toy_rewarded_rows": inputs.rollout_mask.sum()}


def _hash_scorer(texts, refs):
  del refs
  return [Result(reward=float(sum(map(ord, t)) % 2), status="ok") for t in texts]


def test_toy_algorithm_runs_a_step_and_matches_reference(tiny_base_dir):
  config = tiny_config(tiny_base_dir, **{"algorithm.name": "toy_reward_weighted_nll"})
  s = train.setup(config, score_batch=_hash_scorer)
  assert s.step_cfg.method is algorithms.get("toy_reward_weighted_nll")
  assert s.settings.loss.aggregation == "token-mean"  # the base class's default
  state = s.init_state()
  batch = s.put_batch(s.train_batches.batch(1))
  rollouts, peer_key = sampled_rollouts(s, state, batch)
  update = jax.jit(lambda st, b, r, k: train_step.update(s.step_cfg, s.optimizer, s.pieces,
                                                         st, b, r, k))
  _, metrics = jax.device_get(update(state, batch, rollouts, peer_key))

  # float64 reference from full logits on the plain prompt.
  batch, rollouts = jax.device_get((batch, rollouts))
  g, lr = config.sampling.num_samples, rollouts.tokens.shape[1]
  prompt = np.repeat(batch["prompt_tokens"], g, 0)
  rmask = np.arange(lr)[None] < rollouts.lengths[:, None]
  mask = np.concatenate([np.repeat(batch["prompt_mask"], g, 0), rmask], 1)
  logits = jax.jit(transformer.logits, static_argnums=0)(
      s.model_cfg, state.params, jnp.asarray(np.concatenate([prompt, rollouts.tokens], 1)),
      jnp.asarray(mask))
  lp = prompt.shape[1]
  logits = np.asarray(logits, np.float64)[:, lp - 1:lp - 1 + lr] / config.sampling.temperature
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  logp = np.take_along_axis(logp, rollouts.tokens[..., None], -1)[..., 0]
  rewards = np.asarray(rollouts.rewards, np.float64)
  loss_mask = rmask & (rewards > 0)[:, None]
  assert 0 < loss_mask.sum() < rmask.sum()  # some rows in, some out
  expected = (-rewards[:, None] * logp * loss_mask).sum() / loss_mask.sum()
  np.testing.assert_allclose(metrics["train/loss"], expected, rtol=1e-4)
  assert metrics["train/toy_rewarded_rows"] == (rewards > 0).sum()
  assert metrics["train/reprompt_fraction"] == pytest.approx((rewards > 0).mean())


def test_registering_a_name_twice_or_a_non_algorithm_fails():
  with pytest.raises(ValueError, match="'toy_reward_weighted_nll' is already registered"):
    algorithms.register("toy_reward_weighted_nll")(RewardWeightedNLL)
  with pytest.raises(ValueError, match="'sdpo' is already registered"):
    algorithms.register("sdpo")(RewardWeightedNLL)
  with pytest.raises(TypeError, match="subclass of Algorithm"):
    algorithms.register("not_an_algorithm")(object)
  with pytest.raises(settings.ConfigError, match="'nope'.*toy_reward_weighted_nll"):
    algorithms.get("nope")
