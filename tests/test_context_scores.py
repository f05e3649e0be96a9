"""Teacher scores of saved rollouts under context variants, against full-logit float64."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopd_jax import peer_context, sharding, train
from mopd_jax.analysis import context_scores, teacher_signal
from mopd_jax.models import transformer
from mopd_jax.verifiers.result import Result
from tests.conftest import tiny_config


def _hash_scorer(texts, refs):
  del refs
  return [Result(reward=float(sum(map(ord, t)) % 2), status="ok") for t in texts]


@pytest.fixture(scope="module")
def saved(tiny_base_dir, tmp_path_factory):
  """A run's setup and 8 prompts x 4 rollouts sampled, verified and saved to .npz."""
  s = train.setup(tiny_config(tiny_base_dir, **{"data.batch_size": 8}),
                  score_batch=_hash_scorer)
  batch = s.train_batches.batch(0)
  cfg = s.step_cfg
  with jax.set_mesh(s.mesh):
    out = jax.device_get(jax.jit(cfg.sampler.__call__)(
        s.base_params, batch["prompt_tokens"], batch["prompt_mask"], jax.random.PRNGKey(3)))
  ids = np.repeat(batch["example_id"], cfg.num_samples)
  rewards, status, _, _ = s.host_verifier(ids, out.tokens, out.lengths)
  path = str(tmp_path_factory.mktemp("rollouts") / "rollouts.npz")
  context_scores.save_rollouts(path, batch, dict(
      tokens=out.tokens, lengths=out.lengths, finished=out.finished, rewards=rewards,
      status=status))
  return s, path


def _mean_logp_float64(s, teacher_tokens, teacher_mask, tokens, lengths):
  """Mean log-prob of each response from full-sequence logits, log-softmax in float64."""
  lr = tokens.shape[1]
  rmask = np.arange(lr)[None] < lengths[:, None]
  toks = np.concatenate([teacher_tokens, tokens], 1)
  mask = np.concatenate([teacher_mask, rmask], 1)
  with jax.set_mesh(s.mesh):
    logits = jax.jit(transformer.logits, static_argnums=0)(s.model_cfg, s.base_params, toks,
                                                           mask)
  logits = np.asarray(logits, np.float64)
  lp = teacher_tokens.shape[1]
  logits = logits[:, lp - 1:lp - 1 + lr]
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  logp = np.take_along_axis(logits, tokens[..., None], -1)[..., 0] - logz
  return (logp * rmask).sum(1) / np.maximum(rmask.sum(1), 1)


def test_save_load_round_trip_and_bad_files(saved, tmp_path):
  _, path = saved
  batch, rollouts = context_scores.load_rollouts(path)
  assert batch["prompt_tokens"].shape[0] * 4 == rollouts["tokens"].shape[0]
  bad = str(tmp_path / "bad.npz")
  np.savez(bad, tokens=rollouts["tokens"])
  with pytest.raises(ValueError, match="missing fields"):
    context_scores.load_rollouts(bad)
  with pytest.raises(ValueError, match="Unknown context variant 'xyz'"):
    context_scores.variant_config(saved[0].step_cfg, "xyz")


def test_base_and_2s1f_scores_match_full_logit_reference(saved):
  s, path = saved
  batch, rollouts = context_scores.load_rollouts(path)
  cfg = s.step_cfg
  got = context_scores.score(cfg, s.pieces, s.base_params, batch, rollouts,
                             ("base", "2S1F"), mesh=s.mesh, prompts_per_call=4, seed=5)
  g, n = cfg.num_samples, rollouts["tokens"].shape[0]

  # No context: the teacher reads the student's own prompt.
  prompt = np.repeat(batch["prompt_tokens"], g, 0)
  pmask = np.repeat(batch["prompt_mask"], g, 0).astype(bool)
  want = _mean_logp_float64(s, prompt, pmask, rollouts["tokens"], rollouts["lengths"])
  np.testing.assert_allclose(got["base"]["scores"].reshape(n), want, rtol=1e-4, atol=1e-4)

  # 2S1F: peers chosen as the score's calls choose them (4 prompts per call, key i).
  expected = []
  for i, lo in enumerate(range(0, 8, 4)):
    rows = slice(lo * g, (lo + 4) * g)
    success = (rollouts["rewards"][rows] >= 1.0).reshape(4, g)
    key = jax.random.fold_in(jax.random.PRNGKey(5), i)
    sel = peer_context.select_peers(jnp.asarray(success), key)
    idx = jax.tree.map(lambda x: x.reshape(4 * g), peer_context.to_row_indices(sel))
    tokens, lengths = rollouts["tokens"][rows], rollouts["lengths"][rows]
    t_tokens, t_mask = peer_context.assemble_teacher_prompts(
        prompt[rows], pmask[rows], np.repeat(batch["insert_index"][lo:lo + 4], g),
        peer_context.PeerBlocks(tokens, lengths - rollouts["finished"][rows], idx), s.pieces,
        peer_cap=cfg.peers.peer_cap, pad_id=0)
    expected.append(_mean_logp_float64(s, np.asarray(t_tokens), np.asarray(t_mask), tokens,
                                       lengths))
  np.testing.assert_allclose(got["2S1F"]["scores"].reshape(n), np.concatenate(expected),
                             rtol=1e-4, atol=1e-4)
  # The context makes the teacher prompts longer wherever a group has a success.
  has_block = got["2S1F"]["teacher_prompt_tokens"] > got["base"]["teacher_prompt_tokens"]
  success_groups = (rollouts["rewards"].reshape(8, g) >= 1.0).any(1)
  assert has_block[success_groups].any()


def test_every_variant_scores_every_rollout_and_feeds_alignment(saved):
  s, path = saved
  batch, rollouts = context_scores.load_rollouts(path)
  got = context_scores.score(s.step_cfg, s.pieces, s.base_params, batch, rollouts,
                             mesh=s.mesh, prompts_per_call=8)
  assert set(got) == set(context_scores.VARIANTS)
  rewards = rollouts["rewards"].reshape(8, -1)
  for variant, result in got.items():
    assert result["scores"].shape == (8, 4), variant
    assert np.isfinite(result["scores"]).all() and (result["scores"] <= 0).all(), variant
    a = teacher_signal.alignment(list(result["scores"]), list(rewards))
    assert a["num_prompts"] == int(((rewards >= 1).any(1) & (rewards < 1).any(1)).sum())
  # Controls draw other rollouts than 2S1F, so their prompts differ somewhere.
  assert not np.array_equal(got["unrelated_prompt"]["scores"], got["2S1F"]["scores"])


def test_the_teacher_forward_is_traced_under_the_mesh(saved, monkeypatch):
  """The model config holds the run's axis rules: traced without a context mesh where
  there are several devices, the teacher forward is an error rather than a forward whose
  constraints silently vanish (this process has one device: it pretends otherwise)."""
  s, path = saved
  monkeypatch.setattr(sharding, "_one_device", lambda: False)
  assert s.model_cfg.axis_rules is not None
  batch, rollouts = context_scores.load_rollouts(path)
  with pytest.raises(ValueError, match="without a context mesh"):
    context_scores.score(s.step_cfg, s.pieces, s.base_params, batch, rollouts, ("base",),
                         mesh=None)


def test_wrong_group_size_is_an_error(saved):
  s, path = saved
  batch, rollouts = context_scores.load_rollouts(path)
  cfg = dataclasses.replace(
      s.step_cfg, sampling=dataclasses.replace(s.step_cfg.sampling, num_samples=2))
  with pytest.raises(ValueError, match="4 samples per prompt"):
    context_scores.score(cfg, s.pieces, s.base_params, batch, rollouts, ("base",),
                         mesh=s.mesh)


def test_analyse_samples_saves_and_scores_with_the_runs_config(tiny_base_dir, tmp_path):
  config = tiny_config(tiny_base_dir, **{"data.batch_size": 8})
  path = str(tmp_path / "r.npz")
  report = context_scores.analyse(config, path, sample_prompts=8, variants=("base", "1S"),
                                  num_resamples=50)
  batch, rollouts = context_scores.load_rollouts(path)
  assert batch["prompt_tokens"].shape[0] == 8 and report["prompts"] == 8
  s = train.setup(config)
  direct = context_scores.score(s.step_cfg, s.pieces, s.base_params, batch, rollouts,
                                ("base", "1S"), mesh=s.mesh)
  for variant in ("base", "1S"):
    np.testing.assert_allclose(report["variants"][variant]["scores"],
                               direct[variant]["scores"], rtol=1e-6)
    assert set(report["variants"][variant]["ci95"]) == set(teacher_signal.METRICS)
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    context_scores.analyse(config, path, workdir=str(tmp_path), variants=("base",))
