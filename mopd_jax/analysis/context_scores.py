"""Teacher scores of saved rollouts under context variants (the teacher-signal analysis).

For each rollout of a group, the teacher reads its prompt under one *context variant*
(no context, 1S, 2S, 1S1F, 2S1F, or a matched-budget control) and scores the rollout's
own tokens; the score is the mean per-token log-prob of the response (MOPD spec §8).
`teacher_signal.alignment` then compares those scores with the verifier rewards per
prompt. The teacher prompt of a variant is built by the training step's own stage 1
(`step_teacher.build_teacher_inputs`), so the analysis sees exactly what training shows
the teacher.

Rollouts are saved as one `.npz` (`save_rollouts` / `load_rollouts`): the prompts
(`prompt_tokens`, `prompt_mask`, `insert_index`, `example_id`, [B, ...]) and their B * G
rollouts (`tokens`, `lengths`, `finished`, `rewards`, `status`, [N, ...]); row
b * G + g is sample g of prompt b.

From the command line, with a run's config (and optionally its workdir, whose latest
checkpoint's teacher then scores; else the initial model does):

  python -m mopd_jax.analysis.context_scores --config=configs/code.py \
      --rollouts=/tmp/r.npz --sample_prompts=96 --out=/tmp/signal.json [--workdir=RUN]

`--sample_prompts=P` first samples the held-out set's first P prompts with the student
(`config.sampling.num_samples` each), verifies and saves them to `--rollouts`; without
it, `--rollouts` must exist. The output JSON holds, per variant, the alignment averages,
their bootstrap intervals and the scores.

Cost: one teacher forward per variant over N rows of (teacher prompt + response)
tokens; no backward. The vocabulary projection runs one chunk of positions at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from mopd_jax import checkpointing, losses, step_teacher, train_step

# name -> changes to the run's peer settings (None: the plain prompt, no context).
VARIANTS = {
    "base": None,
    "1S": dict(include_primary=True, include_another=False, include_failure=False),
    "2S": dict(include_primary=True, include_another=True, include_failure=False),
    "1S1F": dict(include_primary=True, include_another=False, include_failure=True,
                 failure_condition="always"),
    "2S1F": dict(include_primary=True, include_another=True, include_failure=True,
                 failure_condition="always"),
    "random_peer": dict(include_primary=True, include_another=True, include_failure=True,
                        failure_condition="always", control="random_peer"),
    "unrelated_prompt": dict(include_primary=True, include_another=True,
                             include_failure=True, failure_condition="always",
                             control="unrelated_prompt"),
}

PROMPT_FIELDS = ("prompt_tokens", "prompt_mask", "insert_index", "example_id")
ROLLOUT_FIELDS = ("tokens", "lengths", "finished", "rewards", "status")


def save_rollouts(path: str, batch: dict, rollouts: dict) -> None:
  """Writes prompts and rollouts (host arrays) to one compressed `.npz`."""
  missing = [f for f in PROMPT_FIELDS if f not in batch]
  missing += [f for f in ROLLOUT_FIELDS if f not in rollouts]
  if missing:
    raise ValueError(f"Cannot save rollouts: missing fields {missing}.")
  arrays = {f: np.asarray(batch[f]) for f in PROMPT_FIELDS}
  arrays.update({f: np.asarray(rollouts[f]) for f in ROLLOUT_FIELDS})
  np.savez_compressed(path, **arrays)


def load_rollouts(path: str) -> tuple[dict, dict]:
  """(batch, rollouts) as saved by `save_rollouts`, with their shapes checked."""
  with np.load(path) as data:
    missing = [f for f in PROMPT_FIELDS + ROLLOUT_FIELDS if f not in data.files]
    if missing:
      raise ValueError(f"{path}: not a rollouts file, missing fields {missing}.")
    batch = {f: data[f] for f in PROMPT_FIELDS}
    rollouts = {f: data[f] for f in ROLLOUT_FIELDS}
  b, n = batch["prompt_tokens"].shape[0], rollouts["tokens"].shape[0]
  if b == 0 or n % b:
    raise ValueError(f"{path}: {n} rollouts for {b} prompts; expected a multiple.")
  return batch, rollouts


def variant_config(cfg: train_step.StepConfig, variant: str) -> train_step.StepConfig:
  """The step config whose stage 1 builds the teacher prompts of `variant`."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown context variant {variant!r}; allowed: {tuple(VARIANTS)}.")
  change = VARIANTS[variant]
  if change is None:  # opd's stage 1: the plain prompt
    return dataclasses.replace(cfg, algorithm=dataclasses.replace(cfg.algorithm, name="opd"))
  peers = dataclasses.replace(cfg.peers, **{"include_feedback": False, "control": "",
                                            **change})
  peers.check()
  return dataclasses.replace(cfg, peers=peers,
                             algorithm=dataclasses.replace(cfg.algorithm, name="mopd"))


@functools.partial(jax.jit, static_argnums=(0,))
def _score_group_batch(cfg: train_step.StepConfig, pieces, teacher_params, batch,
                       rollouts: train_step.Rollouts, key):
  inputs = step_teacher.build_teacher_inputs(cfg, pieces, batch, rollouts, key)
  hidden, head = step_teacher.score_with_teacher(cfg, teacher_params, inputs, rollouts)
  logp = losses.chunked_token_logp(hidden, head, rollouts.tokens,
                                   chunk_size=cfg.loss.chunk_size)
  mask = inputs.response_mask
  mean = jnp.where(mask, logp, 0.0).sum(1) / jnp.maximum(mask.sum(1), 1)
  return mean, inputs.teacher_mask.sum(1)


def score(cfg: train_step.StepConfig, pieces, teacher_params, batch: dict, rollouts: dict,
          variants=tuple(VARIANTS), *, mesh, prompts_per_call: int = 16,
          seed: int = 0) -> dict:
  """Mean per-token teacher log-prob of every rollout under each context variant.

  Args:
    cfg: the run's step config (its peers section gives the peer cap and the exclusion
      rule; `variants` replace which blocks are shown).
    pieces: the tokenised template pieces (`peer_template.tokenize_pieces`).
    teacher_params: the teacher's parameters (e.g. the initial student).
    batch, rollouts: as loaded by `load_rollouts`.
    variants: names from `VARIANTS`.
    prompts_per_call: prompts (with all their rollouts) per jitted call; peers and the
      controls' other prompts are drawn within a call.
    mesh: the mesh the teacher's parameters live on (`train.Setup.mesh`); the forwards
      are traced under it, so the model's sharding constraints act (its rows per call,
      prompts_per_call x samples, must divide its batch axes).
    seed: key of the peer selection.

  Returns:
    {variant: {"scores": float64 [B, G], "teacher_prompt_tokens": int [B, G]}}.
  """
  b = batch["prompt_tokens"].shape[0]
  g = rollouts["tokens"].shape[0] // b
  if g != cfg.num_samples:
    raise ValueError(f"The rollouts have {g} samples per prompt; the step config "
                     f"{cfg.num_samples} (config.sampling.num_samples).")
  calls = [(s, min(s + prompts_per_call, b)) for s in range(0, b, prompts_per_call)]
  out = {}
  for variant in variants:
    vcfg = variant_config(cfg, variant)
    means, lengths = [], []
    for i, (lo, hi) in enumerate(calls):
      part = {f: jnp.asarray(batch[f][lo:hi]) for f in PROMPT_FIELDS}
      rows = slice(lo * g, hi * g)
      tokens = jnp.asarray(rollouts["tokens"][rows])
      n = tokens.shape[0]
      r = train_step.Rollouts(
          tokens=tokens, logprobs=jnp.zeros(tokens.shape, jnp.float32),
          lengths=jnp.asarray(rollouts["lengths"][rows]),
          finished=jnp.asarray(rollouts["finished"][rows]),
          rewards=jnp.asarray(rollouts["rewards"][rows], jnp.float32),
          status=jnp.asarray(rollouts["status"][rows]),
          feedback=jnp.zeros((n, 1), jnp.int32), feedback_lengths=jnp.zeros((n,), jnp.int32))
      key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
      with jax.set_mesh(mesh):
        mean, length = _score_group_batch(vcfg, pieces, teacher_params, part, r, key)
      means.append(np.asarray(mean, np.float64))
      lengths.append(np.asarray(length))
    out[variant] = {"scores": np.concatenate(means).reshape(b, g),
                    "teacher_prompt_tokens": np.concatenate(lengths).reshape(b, g)}
  return out



def sample_and_save(s, params, path: str, num_prompts: int, seed: int = 0) -> None:
  """Samples `num_prompts` held-out prompts with `params` (a `train_setup.Setup`'s sampler
  settings), verifies the rollouts on the host and saves them to `path`."""
  cfg = s.step_cfg
  batch = s.eval_batches.first(num_prompts)
  if len(batch["example_id"]) < num_prompts:
    raise ValueError(f"The held-out split has {len(batch['example_id'])} usable prompts; "
                     f"asked for {num_prompts}.")
  with jax.set_mesh(s.mesh):
    out = jax.device_get(jax.jit(cfg.sampler.__call__)(
        params, batch["prompt_tokens"], batch["prompt_mask"], jax.random.PRNGKey(seed)))
  ids = np.repeat(batch["example_id"], cfg.num_samples)
  rewards, status, _, _ = s.host_verifier(ids, out.tokens, out.lengths)
  save_rollouts(path, batch, dict(tokens=out.tokens, lengths=out.lengths,
                                  finished=out.finished, rewards=rewards, status=status))


def analyse(config, rollouts_path: str, *, workdir: str | None = None,
            sample_prompts: int = 0, variants=tuple(VARIANTS), num_resamples: int = 1000,
            sample_seed: int = 0):
  """Scores saved rollouts under `variants` with a run's teacher; returns the report.

  config: the run's ConfigDict (its model, data, peers and sampling sections are used).
  workdir: the run's directory; its latest checkpoint's teacher (and, for sampling, its
    student) is used. None: the initial model plays both.
  """
  # Imported here: train_setup imports the whole pipeline, which the scoring functions
  # above do not need.
  from mopd_jax import train_setup  # pylint: disable=import-outside-toplevel
  from mopd_jax.analysis import teacher_signal  # pylint: disable=import-outside-toplevel
  s = train_setup.setup(config)
  student, teacher_params, step = s.base_params, None, 0
  if workdir is not None:
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), every=0)
    restored = ckpt.restore_latest(checkpointing.abstract_like(s.state_shapes, s.shardings))
    ckpt.close()
    if restored is None:
      raise FileNotFoundError(f"No checkpoint under {workdir}/checkpoints.")
    step, state, _ = restored
    student, teacher_params = state.params, state.teacher_params
  if teacher_params is None:
    teacher_params = (s.external_teacher_params if s.external_teacher_params is not None
                      else student)
  if sample_prompts:
    sample_and_save(s, student, rollouts_path, sample_prompts, seed=sample_seed)
  batch, rollouts = load_rollouts(rollouts_path)
  scored = score(s.step_cfg, s.pieces, teacher_params, batch, rollouts, variants,
                 mesh=s.mesh)
  rewards = list(rollouts["rewards"].reshape(-1, s.step_cfg.num_samples))
  threshold = s.settings.verifier.success_threshold
  report = {"rollouts": rollouts_path, "checkpoint_step": int(step),
            "prompts": len(rewards), "samples_per_prompt": s.step_cfg.num_samples,
            "variants": {}}
  for variant, v in scored.items():
    scores = list(v["scores"])
    report["variants"][variant] = {
        **teacher_signal.alignment(scores, rewards, success_threshold=threshold),
        "ci95": teacher_signal.bootstrap_ci(scores, rewards, success_threshold=threshold,
                                            num_resamples=num_resamples),
        "mean_teacher_prompt_tokens": float(v["teacher_prompt_tokens"].mean()),
        "scores": v["scores"].tolist(),
    }
  return report


def main(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  del argv
  f = flags.FLAGS
  report = analyse(f.config, f.rollouts, workdir=f.workdir, sample_prompts=f.sample_prompts,
                   variants=tuple(f.variants))
  with open(f.out, "w", encoding="utf-8") as out:
    json.dump(report, out, indent=1)
  for variant, v in report["variants"].items():
    print(f"{variant:>16}: auc {v['auc']:.3f}  spearman {v['spearman']:.3f}  "
          f"({v['num_prompts']} prompts)")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "The run's config file.")
  flags.DEFINE_string("rollouts", None, "Saved rollouts (.npz); written with "
                      "--sample_prompts.")
  flags.DEFINE_string("out", None, "Report (JSON).")
  flags.DEFINE_string("workdir", None, "The run's workdir (its latest checkpoint).")
  flags.DEFINE_integer("sample_prompts", 0, "Sample this many held-out prompts first.")
  flags.DEFINE_list("variants", list(VARIANTS), f"Context variants of {list(VARIANTS)}.")
  flags.mark_flags_as_required(["config", "rollouts", "out"])
  app.run(main)
