r"""The demo's base model and its external teacher: a tokenizer and two small pretrained
decoders, built reproducibly.

    python -m mopd_jax.demo_base --out=/tmp/mopd_demo_base            # the base model
    python -m mopd_jax.demo_base --out=/tmp/mopd_demo_base --teacher  # and its teacher

Everything is derived from the project's own demo corpus (`data.demo_problems`, train
split only) and a fixed seed, so the same files come out on every machine (CPU):

1. A SentencePiece tokenizer trained on the problem statements, their solutions and
   systematic wrong answers, the verifier's feedback on those, the template pieces and
   the chat tags (pad=0, eos=1, unk=2). The teacher reuses the base model's tokenizer.
2. A small decoder pretrained with next-token loss on the response tokens of every
   prompt format a method of this project shows it, in comparable amounts
   (`FORMATS`): the plain student prompt; the teacher prompts 2S1F, 1S1F, 2S, 1S, 1F,
   own feedback (FB, SDPO without a success) and 1F with own feedback, assembled
   exactly as the teacher prompt of a run (token-level concatenation of the same
   template pieces; the feedback is the code verifier's real text on that wrong
   program); and the summaries variant (the student prompt asking for a summary, and
   the teacher prompt showing a simulated group's labelled summaries).

What the model answers, and how often, is its *beliefs* (`beliefs`): per problem, the
correct program or one of the family's few systematic misconceptions
(`demo_problems.misconceptions`). How likely each is depends on the family and the
problem's surface form (function name x phrasing): some forms the learner knows, in
others it mostly holds one misconception, in others it is torn between that one and
the truth. Its wrong programs are therefore often as probable as its right one, and its
own log-probability does not already tell its successes from its failures. In a teacher
prompt that shows a success it answers with the correct program (with probability
`deviation_fraction` instead a misconception, scored only *after* its first wrong
token: the teacher learns to continue a student's deviating answer sensibly, which is
what it is asked to score); without one it answers from its beliefs, minus the wrong
programs the prompt shows (a failed peer, or the program its feedback is about).
`skill` moves the beliefs towards the correct program: the external teacher is the
same recipe with more capacity and more skill.

The result is cached in a directory (`tokenizer.model`, `params.npz`, `model.json`) and
rebuilt only when missing or of another version.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time

from absl import app, flags, logging
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mopd_jax import peer_template, tokenizers
from mopd_jax.data import demo_problems
from mopd_jax.models import transformer
from mopd_jax.verifiers import callback, code

# 3: stacked per-layer parameters; 4: no blank line after the solution block;
# 5: systematic misconceptions, every teacher format (own feedback, summaries, 1S, ...).
VERSION = 5

# Prompt formats of the pretraining data and their shares (see the module docstring).
FORMATS = {
    "plain": 0.2, "2S1F": 0.08, "1S1F": 0.08, "2S": 0.08, "1S": 0.08, "1F": 0.08,
    "FB": 0.08, "1F+FB": 0.08, "summaries_student": 0.12, "summaries_teacher": 0.12,
}

# Beliefs per surface form: (weight of the correct program, of the family's favourite
# misconception); the other misconceptions share the rest. "knows", "confused", "torn".
_PROFILES = ((0.65, 0.2), (0.25, 0.6), (0.4, 0.45))
_STYLE_PROFILES = (0, 1, 2, 1)  # profiles of a family's four surface forms, permuted
_GROUP_SIZE = 4  # simulated group of the summaries teacher format


@dataclasses.dataclass(frozen=True)
class BaseRecipe:
  vocab_size: int = 384
  num_layers: int = 2
  embed_dim: int = 96
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 24
  mlp_dim: int = 256
  steps: int = 500
  rows: int = 14  # packed rows of `max_len` tokens per step (about 36 examples)
  max_len: int = 384
  lr: float = 3e-3
  skill: float = 0.0
  deviation_fraction: float = 0.4
  seed: int = 0


# The external teacher: same data and tokenizer, more capacity and skill.
TEACHER_RECIPE = BaseRecipe(num_layers=4, skill=0.5, seed=1)


def model_config(recipe: BaseRecipe, vocab_size: int) -> transformer.ModelConfig:
  return transformer.ModelConfig(
      vocab_size=vocab_size, num_layers=recipe.num_layers, embed_dim=recipe.embed_dim,
      num_heads=recipe.num_heads, num_kv_heads=recipe.num_kv_heads,
      head_dim=recipe.head_dim, mlp_dim=recipe.mlp_dim, qk_norm=True,
      tie_embeddings=True, rope_theta=10_000.0, remat_policy="none", attention="blockwise",
      unroll_layers=True)


def beliefs(problem: demo_problems.Problem, skill: float = 0.0) -> np.ndarray:
  """float64 [1 + M]: how likely the model answers `problem` with its correct program
  (index 0) or with each of its M misconceptions (`demo_problems.misconceptions`)."""
  num_wrong = len(demo_problems.misconceptions(problem))
  family = demo_problems.family_index(problem.id)
  order = np.random.default_rng([20251205, family]).permutation(len(_STYLE_PROFILES))
  correct, favourite = _PROFILES[_STYLE_PROFILES[order[demo_problems.style_of(problem.id)]]]
  pick = family % num_wrong  # the family's favourite misconception
  p = np.zeros(1 + num_wrong)
  others = [j for j in range(num_wrong) if j != pick]
  p[0], p[1 + pick] = correct, favourite if others else 1.0 - correct
  for j in others:
    p[1 + j] = (1.0 - correct - favourite) / len(others)
  p = (1.0 - skill) * p
  p[0] += skill
  return p


def summary_text(response: str) -> str:
  """The one-sentence summary the model writes of a demo program: its return line."""
  match = re.search(r"return (.*)", response)
  return f"Return {match.group(1) if match else 'a value'}."


def _feedback(problem, index) -> str:
  """The code verifier's feedback on misconception `index` (as a run's verifier gives it)."""
  outputs = demo_problems.misconception_outputs(problem, index)
  return code.grade_outputs(outputs, problem.tests).feedback[:callback.FEEDBACK_MAX_CHARS]


def tokenizer_corpus() -> list[str]:
  texts = [tokenizers.USER_TAG, tokenizers.ASSISTANT_TAG, "<summary>", "</summary>"]
  texts += list(peer_template.TEMPLATE_TEXTS.values())
  for i in demo_problems.problem_ids("train"):
    p = demo_problems.get_problem(int(i))
    wrong = demo_problems.misconceptions(p)
    texts += [p.prompt, p.solution, summary_text(p.solution), *wrong]
    if i % 8 == 0:
      texts.append(_feedback(p, int(i) % len(wrong)))
  return texts


class _Encoder:
  """Token-level assembly of student- and teacher-format training sequences."""

  def __init__(self, tok):
    self.tok = tok
    chat = tokenizers.ChatFormat()
    self.prefix = tok.encode(chat.prefix)
    self.suffix = tok.encode(chat.suffix)
    self.pieces = {k: tok.encode(v) for k, v in peer_template.TEMPLATE_TEXTS.items()}

  def prompt(self, text, blocks=(), summaries=None, instruction=False):
    """The prompt as a run assembles it (peer_context): blocks is a sequence of (kind,
    text) with kind in solution/another/failure/feedback, in that order; summaries a
    list of (successful, summary text) or None; instruction: the summaries variant's
    request."""
    ids = self.prefix + self.tok.encode(text)
    if instruction:
      ids += self.pieces["summary_instruction"]
    blocks = list(blocks)
    if blocks and blocks[0][0] == "solution":
      ids += self.pieces["solution_header"] + self.tok.encode(blocks.pop(0)[1])
    if summaries:
      ids += self.pieces["summaries_header"]
      for good, summary in summaries:
        ids += self.pieces["summary_success" if good else "summary_failure"]
        ids += self.tok.encode(summary)
    for kind, body in blocks:
      ids += self.pieces[f"{kind}_header"] + self.tok.encode(body)
    if blocks or summaries:
      ids += self.pieces["closing"]
    return ids + self.suffix


def _first_difference(a, b) -> int:
  n = min(len(a), len(b))
  return next((i for i in range(n) if a[i] != b[i]), n)


def _training_example(enc, problem, recipe, rng, fmt=None):
  """(prompt ids, response ids incl. eos, index of the first scored response token)."""
  wrong = demo_problems.misconceptions(problem)
  programs = (problem.solution,) + wrong
  p = beliefs(problem, recipe.skill)
  fmt = fmt or rng.choice(list(FORMATS), p=list(FORMATS.values()))

  def believe(excluded=()):
    q = p.copy()
    q[[1 + j for j in excluded]] = 0.0
    return int(rng.choice(len(q), p=q / q.sum()))

  def failed():  # index of a wrong program, drawn as the model's own failures are
    return int(rng.choice(len(wrong), p=p[1:] / p[1:].sum()))

  def answer(index, summarize=False):
    text = programs[index]
    if summarize:
      text += f"\n<summary>{summary_text(text)}</summary>"
    return enc.tok.encode(text) + [enc.tok.eos_id]

  if fmt == "plain":
    return enc.prompt(problem.prompt), answer(believe()), 0
  if fmt == "summaries_student":
    return enc.prompt(problem.prompt, instruction=True), answer(believe(), True), 0
  if fmt == "summaries_teacher":
    group = [believe() for _ in range(_GROUP_SIZE)]  # member 0 is the scored rollout
    successes = [j for j in range(1, _GROUP_SIZE) if group[j] == 0]
    failures = [j for j in range(1, _GROUP_SIZE) if group[j] != 0]
    primary = successes[0] if successes else None
    shown = [j for j in rng.permutation(range(1, _GROUP_SIZE)) if j != primary]
    blocks = []
    if primary is not None:
      blocks.append(("solution", programs[0]))
      if len(successes) > 1:
        blocks.append(("another", programs[0]))
    if failures:
      blocks.append(("failure", programs[group[int(rng.choice(failures))]]))
    summaries = [(group[j] == 0, summary_text(programs[group[j]])) for j in shown]
    prompt = enc.prompt(problem.prompt, blocks, summaries, instruction=True)
    if primary is None:
      return prompt, answer(believe({group[j] - 1 for j in failures}), True), 0
    return prompt, answer(0, True), 0
  shown_wrong = failed()
  own_wrong = failed()
  blocks = {
      "2S1F": [("solution", programs[0]), ("another", programs[0]),
               ("failure", wrong[shown_wrong])],
      "1S1F": [("solution", programs[0]), ("failure", wrong[shown_wrong])],
      "2S": [("solution", programs[0]), ("another", programs[0])],
      "1S": [("solution", programs[0])],
      "1F": [("failure", wrong[shown_wrong])],
      "FB": [("feedback", _feedback(problem, own_wrong))],
      "1F+FB": [("failure", wrong[shown_wrong]), ("feedback", _feedback(problem, own_wrong))],
  }[fmt]
  prompt = enc.prompt(problem.prompt, blocks)
  if fmt == "1F":
    return prompt, answer(believe({shown_wrong})), 0
  if fmt == "FB":
    return prompt, answer(believe({own_wrong})), 0
  if fmt == "1F+FB":
    return prompt, answer(believe({shown_wrong, own_wrong})), 0
  if rng.random() < recipe.deviation_fraction:
    response = answer(1 + int(rng.integers(len(wrong))))
    first = _first_difference(response, answer(0)) + 1
    return prompt, response, first
  return prompt, answer(0), 0


class _Packer:
  """Fills `rows` rows of `length` tokens with whole training examples, first fit in
  arrival order: packed rows (segment ids, positions restarting per example), so an
  update costs about its real tokens however unequal the formats' lengths. An example
  that fits no row opens the next batch."""

  def __init__(self, rows: int, length: int, pad_id: int):
    self.rows, self.length, self.pad_id = rows, length, pad_id
    self.pending = None

  def batch(self, next_example):
    """(tokens, positions, segment ids, loss weights), each [rows, length]."""
    tokens = np.full((self.rows, self.length), self.pad_id, np.int32)
    positions = np.zeros((self.rows, self.length), np.int32)
    segments = np.zeros((self.rows, self.length), np.int32)
    # weights[t] = 1 where token t+1 is a scored response token (predicted from t).
    weights = np.zeros((self.rows, self.length), np.float32)
    used = [0] * self.rows
    while True:
      example, self.pending = self.pending or next_example(), None
      prompt, response, first = example
      seq = (prompt + response)[:self.length]
      row = next((r for r in range(self.rows) if used[r] + len(seq) <= self.length), None)
      if row is None:
        self.pending = example
        return tokens, positions, segments, weights
      start = used[row]
      end = start + len(seq)
      tokens[row, start:end] = seq
      positions[row, start:end] = np.arange(len(seq))
      segments[row, start:end] = 1 + segments[row].max()
      weights[row, start + len(prompt) - 1 + first:end - 1] = 1.0
      used[row] = end


def pretrain(recipe: BaseRecipe, tok, log_every: int = 100):
  """Returns (model config, params) of the pretrained model."""
  cfg = model_config(recipe, tok.vocab_size)
  enc = _Encoder(tok)
  rng = np.random.default_rng(recipe.seed)
  problems = [demo_problems.get_problem(int(i)) for i in demo_problems.problem_ids("train")]
  params = transformer.init_params(cfg, jax.random.PRNGKey(recipe.seed))
  warmup = min(50, recipe.steps // 5)
  schedule = optax.warmup_cosine_decay_schedule(0.0, recipe.lr, warmup, recipe.steps,
                                                recipe.lr * 0.1)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, tokens, positions, segments, weights):
    def loss_fn(p):
      hidden, _ = transformer.hidden_states(cfg, p, tokens, positions, segments != 0,
                                            segment_ids=segments)
      logp = jax.nn.log_softmax(transformer.project(cfg, p, hidden[:, :-1]))
      nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
      w = weights[:, :-1]
      return (nll * w).sum() / jnp.maximum(w.sum(), 1.0)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  packer = _Packer(recipe.rows, recipe.max_len, tok.pad_id)

  def next_example():
    return _training_example(enc, problems[rng.integers(len(problems))], recipe, rng)

  start = time.time()
  for s in range(recipe.steps):
    params, opt_state, loss = step(params, opt_state, *packer.batch(next_example))
    if log_every and (s % log_every == 0 or s == recipe.steps - 1):
      logging.info("demo model pretraining step %d/%d loss %.4f (%.0fs)", s, recipe.steps,
                   float(loss), time.time() - start)
  return cfg, params


def save(directory: str, cfg: transformer.ModelConfig, params, tokenizer_proto: bytes,
         recipe: BaseRecipe):
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, "params.tmp.npz")
  flat = flax.traverse_util.flatten_dict(jax.device_get(params), sep="/")
  np.savez(tmp, **{k: np.asarray(v) for k, v in flat.items()})
  with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
    f.write(tokenizer_proto)
  with open(os.path.join(directory, "model.json"), "w", encoding="utf-8") as f:
    json.dump({"version": VERSION, "model": dataclasses.asdict(cfg),
               "recipe": dataclasses.asdict(recipe)}, f, indent=1)
  os.replace(tmp, os.path.join(directory, "params.npz"))  # written last: marks complete


def load(directory: str):
  """(model config, params as numpy, tokenizer) from a directory written by `save`."""
  with open(os.path.join(directory, "model.json"), encoding="utf-8") as f:
    cfg = transformer.ModelConfig(**json.load(f)["model"])
  with np.load(os.path.join(directory, "params.npz")) as f:
    params = flax.traverse_util.unflatten_dict({k: f[k] for k in f.files}, sep="/")
  tok = tokenizers.SentencePieceTokenizer.from_file(os.path.join(directory,
                                                                 "tokenizer.model"))
  return cfg, params, tok


def is_complete(directory: str) -> bool:
  if not os.path.exists(os.path.join(directory, "params.npz")):
    return False
  with open(os.path.join(directory, "model.json"), encoding="utf-8") as f:
    return json.load(f).get("version") == VERSION


def ensure(directory: str, recipe: BaseRecipe = BaseRecipe(), tokenizer_dir: str | None = None):
  """Builds the model into `directory` unless it is already there; returns load().

  tokenizer_dir: a built model whose tokenizer this one shares (None: train one)."""
  if not is_complete(directory):
    logging.info("Building a demo model into %s (one-off, a few minutes).", directory)
    if tokenizer_dir is None:
      proto = tokenizers.train_sentencepiece(tokenizer_corpus(), recipe.vocab_size)
    else:
      with open(os.path.join(tokenizer_dir, "tokenizer.model"), "rb") as f:
        proto = f.read()
    tok = tokenizers.SentencePieceTokenizer(proto)
    cfg, params = pretrain(recipe, tok)
    save(directory, cfg, params, proto, recipe)
  return load(directory)


def teacher_dir(base_dir: str) -> str:
  """Where the external teacher of the base model in `base_dir` is cached."""
  return os.path.normpath(base_dir) + "_teacher"


def ensure_teacher(base_dir: str, recipe: BaseRecipe = TEACHER_RECIPE):
  """The demo's external teacher (built on first use, with the base model's tokenizer,
  which is built first if missing); returns load() of it."""
  ensure(base_dir)
  return ensure(teacher_dir(base_dir), recipe, tokenizer_dir=base_dir)


def default_dir() -> str:
  root = os.environ.get("MOPD_JAX_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "mopd_jax"))
  return os.path.join(root, f"demo_base_v{VERSION}")


_OUT = flags.DEFINE_string("out", None, "Directory to write the model into (with "
                           "--teacher: the base model's directory, default as a run's).")
_TEACHER = flags.DEFINE_bool("teacher", False, "Also build the external teacher, next to "
                             "the base model (`teacher_dir`).")


def main(argv):
  del argv
  directory = _OUT.value or default_dir()
  if _TEACHER.value:
    ensure_teacher(directory)
  else:
    ensure(directory)


if __name__ == "__main__":
  app.run(main)
