r"""The demo's base model: a tokenizer and a small pretrained student, built reproducibly.

    python -m mopd_jax.demo_base --out=/tmp/mopd_demo_base

Everything is derived from the project's own demo corpus (`data.demo_problems`, train
split only) and a fixed seed, so the same files come out on every machine (CPU):

1. A SentencePiece tokenizer trained on the problem statements, solutions, template
   pieces and chat tags (pad=0, eos=1, unk=2).
2. A small decoder pretrained with next-token loss on response tokens of two formats:
   - *student format*: prompt -> a response that is correct with probability
     `correct_fraction` and otherwise a plausible wrong program (`wrong_solution`);
   - *teacher format*: a prompt carrying peer blocks, assembled exactly as the MOPD
     teacher prompt (token-level concatenation of the same template pieces) -> the
     correct solution when a success is shown, else the student-format mixture. With
     probability `deviation_fraction` the response is instead a wrong program scored
     only *after* its first wrong token: the teacher then learns to continue a
     student's deviating answer sensibly, which is what it is asked to score in MOPD.
   The first format makes a student whose success rate is neither zero nor saturated;
   the second gives it the in-context reading a real LLM brings to MOPD (copying what a
   shown correct solution does). That is what MOPD then distils into the student.

The result is cached in a directory (`tokenizer.model`, `params.npz`, `model.json`) and
rebuilt only when missing.
"""

from __future__ import annotations

import dataclasses
import json
import os
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

VERSION = 4  # 3: stacked per-layer parameters; 4: no blank line after the solution block


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
  batch_size: int = 32
  max_len: int = 192
  lr: float = 3e-3
  correct_fraction: float = 0.45
  teacher_format_fraction: float = 0.5
  deviation_fraction: float = 0.4
  seed: int = 0


def model_config(recipe: BaseRecipe, vocab_size: int) -> transformer.ModelConfig:
  return transformer.ModelConfig(
      vocab_size=vocab_size, num_layers=recipe.num_layers, embed_dim=recipe.embed_dim,
      num_heads=recipe.num_heads, num_kv_heads=recipe.num_kv_heads,
      head_dim=recipe.head_dim, mlp_dim=recipe.mlp_dim, qk_norm=True,
      tie_embeddings=True, rope_theta=10_000.0, remat_policy="none")


def tokenizer_corpus() -> list[str]:
  texts = [tokenizers.USER_TAG, tokenizers.ASSISTANT_TAG]
  texts += list(peer_template.TEMPLATE_TEXTS.values())
  for i in demo_problems.problem_ids("train"):
    p = demo_problems.get_problem(int(i))
    texts += [p.prompt, p.solution]
  return texts


class _Encoder:
  """Token-level assembly of student- and teacher-format training sequences."""

  def __init__(self, tok):
    self.tok = tok
    chat = tokenizers.ChatFormat()
    self.prefix = tok.encode(chat.prefix)
    self.suffix = tok.encode(chat.suffix)
    self.pieces = {k: tok.encode(v) for k, v in peer_template.TEMPLATE_TEXTS.items()}

  def prompt(self, text, blocks=()):
    """blocks: sequence of (kind, response text) with kind in solution/another/failure."""
    ids = self.prefix + self.tok.encode(text)
    for kind, response in blocks:
      body = self.tok.encode(response)
      ids += self.pieces[f"{kind}_header"] + body
    if blocks:
      ids += self.pieces["closing"]
    return ids + self.suffix


def _first_difference(a, b) -> int:
  n = min(len(a), len(b))
  return next((i for i in range(n) if a[i] != b[i]), n)


def _training_example(enc, problem, recipe, rng):
  """(prompt ids, response ids incl. eos, index of the first scored response token)."""

  def noisy():
    if rng.random() < recipe.correct_fraction:
      return problem.solution
    return demo_problems.wrong_solution(problem, rng)

  blocks = ()
  target = None
  if rng.random() < recipe.teacher_format_fraction:
    wrong = demo_problems.wrong_solution(problem, rng)
    kind = rng.choice(4)
    if kind == 0:  # 2S1F
      blocks = (("solution", problem.solution), ("another", problem.solution),
                ("failure", wrong))
    elif kind == 1:  # 1S1F
      blocks = (("solution", problem.solution), ("failure", wrong))
    elif kind == 2:  # 2S
      blocks = (("solution", problem.solution), ("another", problem.solution))
    else:  # 1F: nothing known to be correct; the answer is as uncertain as the student
      blocks = (("failure", wrong),)
    target = problem.solution if kind != 3 else noisy()
    if kind != 3 and rng.random() < recipe.deviation_fraction:
      response = enc.tok.encode(demo_problems.wrong_solution(problem, rng)) + [enc.tok.eos_id]
      first = _first_difference(response, enc.tok.encode(problem.solution)) + 1
      return enc.prompt(problem.prompt, blocks), response, first
  else:
    target = noisy()
  return enc.prompt(problem.prompt, blocks), enc.tok.encode(target) + [enc.tok.eos_id], 0


def _make_batch(examples, max_len, pad_id):
  """Right-padded tokens [B, L], mask [B, L] and loss weights on response targets."""
  b = len(examples)
  tokens = np.full((b, max_len), pad_id, np.int32)
  mask = np.zeros((b, max_len), bool)
  weights = np.zeros((b, max_len), np.float32)
  for row, (prompt, response, first) in enumerate(examples):
    seq = (prompt + response)[:max_len]
    tokens[row, :len(seq)] = seq
    mask[row, :len(seq)] = True
    # weights[t] = 1 where token t+1 is a scored response token (predicted from t).
    start = len(prompt) - 1 + first
    weights[row, start:len(seq) - 1] = 1.0
  return tokens, mask, weights


def pretrain(recipe: BaseRecipe, tok, log_every: int = 100):
  """Returns (model config, params) of the pretrained base model."""
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
  def step(params, opt_state, tokens, mask, weights):
    def loss_fn(p):
      logits = transformer.logits(cfg, p, tokens, mask)[:, :-1]
      logp = jax.nn.log_softmax(logits)
      nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
      w = weights[:, :-1]
      return (nll * w).sum() / jnp.maximum(w.sum(), 1.0)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  start = time.time()
  for s in range(recipe.steps):
    idx = rng.integers(len(problems), size=recipe.batch_size)
    examples = [_training_example(enc, problems[i], recipe, rng) for i in idx]
    params, opt_state, loss = step(params, opt_state,
                                   *_make_batch(examples, recipe.max_len, tok.pad_id))
    if log_every and (s % log_every == 0 or s == recipe.steps - 1):
      logging.info("base pretraining step %d/%d loss %.4f (%.0fs)", s, recipe.steps,
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


def ensure(directory: str, recipe: BaseRecipe = BaseRecipe()):
  """Builds the base model into `directory` unless it is already there; returns load()."""
  if not is_complete(directory):
    logging.info("Building the demo base model into %s (one-off, a few minutes).", directory)
    proto = tokenizers.train_sentencepiece(tokenizer_corpus(), recipe.vocab_size)
    tok = tokenizers.SentencePieceTokenizer(proto)
    cfg, params = pretrain(recipe, tok)
    save(directory, cfg, params, proto, recipe)
  return load(directory)


def default_dir() -> str:
  root = os.environ.get("MOPD_JAX_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "mopd_jax"))
  return os.path.join(root, f"demo_base_v{VERSION}")


_OUT = flags.DEFINE_string("out", None, "Directory to write the base model into.")


def main(argv):
  del argv
  ensure(_OUT.value or default_dir())


if __name__ == "__main__":
  app.run(main)
