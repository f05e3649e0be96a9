"""Row micro-batches inside the update: same loss, gradient and metrics as one batch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopd_jax import losses, settings, step_teacher, train, train_step
from tests.conftest import load_config, sampled_rollouts, tiny_config
from tests.test_losses import np_aggregate


@pytest.mark.parametrize("mode", losses.AGGREGATION_MODES)
def test_aggregation_weights_reproduce_aggregate(mode):
  rng = np.random.default_rng(3)
  values = rng.standard_normal((6, 5))
  mask = rng.random((6, 5)) < 0.5
  mask[1] = False
  w = np.asarray(losses.aggregation_weights(jnp.asarray(mask), mode), np.float64)
  assert np.all(w[~mask] == 0)
  np.testing.assert_allclose((values * w).sum(), np_aggregate(values, mask, mode), rtol=1e-6)
  # Split over row groups, the weighted sums add up to the whole.
  parts = sum((values[i::3] * w[i::3]).sum() for i in range(3))
  np.testing.assert_allclose(parts, np_aggregate(values, mask, mode), rtol=1e-6)


def test_micro_batch_rows_must_divide_the_rows():
  with pytest.raises(settings.ConfigError, match=r"micro_batch_rows = 5.*64 rows.*divisors"):
    settings.from_config(load_config(**{"optim.micro_batch_rows": 5}))
  settings.from_config(load_config(**{"optim.micro_batch_rows": 16}))


@pytest.fixture(scope="module")
def one_batch(tiny_base_dir):
  config = tiny_config(tiny_base_dir, **{"loss.aggregation": "seq-mean-token-mean-all"})
  s = train.setup(config)
  state = s.init_state()
  batch = s.train_batches.batch(0)
  rollouts, peer_key = sampled_rollouts(s, state, batch)
  return s, state, batch, rollouts, peer_key


def _cfg(s, micro_batch_rows):
  return dataclasses.replace(
      s.step_cfg, optim=dataclasses.replace(s.step_cfg.optim,
                                            micro_batch_rows=micro_batch_rows))


def _loss_and_grads(s, state, batch, rollouts, peer_key, micro_batch_rows):
  cfg = _cfg(s, micro_batch_rows)

  @jax.jit
  def fn(state, batch, rollouts, peer_key):
    inputs = step_teacher.build_teacher_inputs(cfg, s.pieces, batch, rollouts, peer_key)
    return train_step.loss_and_grads(cfg, state, inputs, rollouts)

  return jax.device_get(fn(state, batch, rollouts, peer_key))


def test_micro_batches_give_the_one_batch_loss_and_gradient(one_batch):
  s, state, batch, rollouts, peer_key = one_batch
  assert rollouts.tokens.shape[0] == 16
  loss, grads, s_logp, t_logp = _loss_and_grads(s, state, batch, rollouts, peer_key, 0)
  assert loss > 0
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-6
  for rows in (4, 8):
    mb_loss, mb_grads, mb_s, mb_t = _loss_and_grads(s, state, batch, rollouts, peer_key,
                                                    rows)
    np.testing.assert_allclose(mb_loss, loss, rtol=2e-5)
    np.testing.assert_allclose(mb_s, s_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mb_t, t_logp, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(mb_grads), jax.tree.leaves(grads)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_micro_batched_step_metrics_match(one_batch):
  s, state, batch, rollouts, peer_key = one_batch
  results = []
  for rows in (0, 4):
    cfg = _cfg(s, rows)
    fn = jax.jit(lambda st, b, r, k, cfg=cfg: train_step.update(cfg, s.optimizer, s.pieces,
                                                                st, b, r, k))
    results.append(jax.device_get(fn(state, batch, rollouts, peer_key))[1])
  for key, value in results[0].items():
    np.testing.assert_allclose(results[1][key], value, rtol=2e-5, atol=1e-7, err_msg=key)
