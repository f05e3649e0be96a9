r"""The MOPD update step in JAX and in PyTorch eager, on the same weights, side by side.

    python -m benchmarks.update_vs_torch                       # 2-core CPU shape, float32
    python -m benchmarks.update_vs_torch --rows=8 --prompt-len=1024 --response-len=2048 \
        --embed-dim=1024 --layers=28 --heads=16 --kv-heads=8 --mlp-dim=3072 \
        --vocab=151936 --dtype=bfloat16                        # Qwen3-0.6B shape on a GPU

One update = teacher forward (no gradient) on teacher prompt + response, student forward
and backward on prompt + response, the top-k + tail divergence (JSD, alpha 0.5, top-k 100
by default) of the response positions with token-mean aggregation, and one AdamW step. No
sampling: the tokens are random. A random Qwen3-shaped model is built by transformers,
saved with `save_pretrained` and loaded on the JAX side with `hf_import.load`, so both
frameworks start from the same weights (the teacher is a copy of the student, as the EMA
self-teacher is at step 0).

The JAX side is the project's own code (`transformer.hidden_states`,
`losses.chunked_distillation`, optax AdamW) under one `jax.jit`; the PyTorch side is
`Qwen3ForCausalLM` (SDPA attention) with the full response logits and the same loss written
in torch. The two steps alternate, so load from other processes hits both alike; each
reports the median of `--steps` timed steps after `--warmup` untimed ones, and JAX's
compile time is reported separately. `--dtype=bfloat16` keeps float32 parameters and
computes in bfloat16 on both sides (torch autocast; JAX compute dtype).

Prints one JSON line: timings, the ratio torch_s / jax_s (> 1: JAX is faster), the loss of
the first step on both sides (they must agree), on a GPU each side's peak device memory
(JAX's allocator statistics, `torch.cuda.max_memory_allocated`), and the settings.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

from mopd_jax import losses
from mopd_jax.models import hf_import, transformer


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add = parser.add_argument
  add("--rows", type=int, default=16, help="sequences per update")
  add("--prompt-len", type=int, default=64)
  add("--response-len", type=int, default=128)
  add("--teacher-prompt-len", type=int, default=None,
      help="default: prompt + 3 peer blocks of prompt length + 40 template tokens")
  add("--embed-dim", type=int, default=512)
  add("--layers", type=int, default=8)
  add("--heads", type=int, default=8)
  add("--kv-heads", type=int, default=4)
  add("--head-dim", type=int, default=64)
  add("--mlp-dim", type=int, default=1536)
  add("--vocab", type=int, default=32_000)
  add("--dtype", choices=("float32", "bfloat16"), default="float32",
      help="compute dtype; parameters stay float32")
  add("--top-k", type=int, default=100)
  add("--alpha", type=float, default=0.5)
  add("--chunk-size", type=int, default=32, help="JAX loss chunk (positions)")
  add("--remat-policy", default="none",
      help="JAX student's remat policy (models.transformer.REMAT_POLICIES); 'none' keeps "
      "the activations, as PyTorch eager does")
  add("--attention", default="auto", help="JAX attention kind (models.attention.KINDS)")
  add("--steps", type=int, default=5, help="timed steps per framework")
  add("--warmup", type=int, default=1, help="untimed steps per framework after compile")
  add("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.teacher_prompt_len is None:
    args.teacher_prompt_len = 4 * args.prompt_len + 40
  for name in ("rows", "prompt_len", "response_len", "teacher_prompt_len", "steps"):
    if getattr(args, name) <= 0:
      parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
  return args


def build_checkpoint(args, directory: str) -> transformers.Qwen3ForCausalLM:
  """A random Qwen3 model saved to `directory`; returns the float32 torch model."""
  config = transformers.Qwen3Config(
      vocab_size=args.vocab, hidden_size=args.embed_dim, intermediate_size=args.mlp_dim,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
      max_position_embeddings=args.teacher_prompt_len + args.response_len,
      rope_theta=1_000_000.0, tie_word_embeddings=True, use_cache=False)
  torch.manual_seed(args.seed)
  model = transformers.Qwen3ForCausalLM(config).to(torch.float32)
  model.save_pretrained(directory)
  return model


# ----------------------------------------------------------------------------------------
# PyTorch: the same loss on full response logits.
# ----------------------------------------------------------------------------------------


def torch_kl(logp, logq):
  """KL(p || q) over the last axis, 0 log 0 = 0."""
  p = logp.exp()
  return (p * torch.where(p > 0, logp - logq, torch.zeros_like(logp))).sum(-1)


def torch_top_k_divergence(student_logits, teacher_logits, *, alpha, top_k):
  """Per-token top-k + tail divergence, float32 [N, L] (MOPD_SPEC section 3).

  The tail bucket is log(sum of p outside the top-k) computed without cancellation:
  logsumexp over the logits outside the top-k minus the full logsumexp.
  """
  student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
  idx = student_logits.topk(top_k, dim=-1).indices

  def restrict(logits):
    lse = logits.logsumexp(-1, keepdim=True)
    top = logits.gather(-1, idx) - lse
    outside = logits.scatter(-1, idx, float("-inf"))
    tail = outside.logsumexp(-1, keepdim=True) - lse
    return torch.cat([top, tail], dim=-1)

  logp_s, logp_t = restrict(student_logits), restrict(teacher_logits)
  if alpha == 0.0:
    return torch_kl(logp_t, logp_s)
  if alpha == 1.0:
    return torch_kl(logp_s, logp_t)
  logp_m = torch.logaddexp(np.log1p(-alpha) + logp_s, np.log(alpha) + logp_t)
  return (1 - alpha) * torch_kl(logp_s, logp_m) + alpha * torch_kl(logp_t, logp_m)


class TorchUpdate:
  """Teacher forward (no grad) + student forward/backward + loss + AdamW, eager."""

  def __init__(self, model, args):
    self.student = model.train()
    self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
    self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=1e-5,
                                       betas=(0.9, 0.999), weight_decay=0.01)
    self.args = args
    self.autocast = args.dtype == "bfloat16"

  def response_logits(self, model, tokens, prompt_len):
    hidden = model.model(input_ids=tokens, use_cache=False).last_hidden_state
    hidden = hidden[:, prompt_len - 1:prompt_len - 1 + self.args.response_len]
    return model.lm_head(hidden)

  def __call__(self, student_tokens, teacher_tokens) -> float:
    args = self.args
    with torch.autocast("cpu" if not torch.cuda.is_available() else "cuda",
                        dtype=torch.bfloat16, enabled=self.autocast):
      with torch.no_grad():
        teacher_logits = self.response_logits(self.teacher, teacher_tokens,
                                              args.teacher_prompt_len)
      student_logits = self.response_logits(self.student, student_tokens, args.prompt_len)
      per_token = torch_top_k_divergence(student_logits, teacher_logits, alpha=args.alpha,
                                         top_k=args.top_k)
      loss = per_token.mean()  # token-mean, every response token counts
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()
    return float(loss.detach())


# ----------------------------------------------------------------------------------------
# JAX: the project's model and loss under one jit.
# ----------------------------------------------------------------------------------------


def make_jax_update(model_cfg, args):
  """Jitted (params, opt_state, teacher_params, tokens...) -> (params, opt_state, loss)."""
  optimizer = optax.adamw(1e-5, b1=0.9, b2=0.999, weight_decay=0.01)

  def response_hidden(params, tokens, prompt_len):
    mask = jnp.ones(tokens.shape, bool)
    hidden, _ = transformer.hidden_states(model_cfg, params, tokens,
                                          transformer.positions_from_mask(mask), mask)
    return hidden[:, prompt_len - 1:prompt_len - 1 + args.response_len]

  def update(params, opt_state, teacher_params, student_tokens, teacher_tokens):
    teacher_params = jax.lax.stop_gradient(teacher_params)
    teacher_hidden = response_hidden(teacher_params, teacher_tokens, args.teacher_prompt_len)
    teacher_head = transformer.lm_head(model_cfg, teacher_params)
    targets = student_tokens[:, args.prompt_len:]
    token_weights = losses.aggregation_weights(jnp.ones(targets.shape, bool), "token-mean")

    def loss_fn(p):
      student_hidden = response_hidden(p, student_tokens, args.prompt_len)
      return losses.chunked_distillation(
          student_hidden, teacher_hidden, transformer.lm_head(model_cfg, p), teacher_head,
          targets, token_weights=token_weights, alpha=args.alpha, top_k=args.top_k,
          add_tail=True, chunk_size=args.chunk_size).loss

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return optimizer, jax.jit(update, donate_argnums=(0, 1))


def main(argv=None):
  args = parse_args(argv)
  torch.manual_seed(args.seed)
  with tempfile.TemporaryDirectory() as directory:
    torch_model = build_checkpoint(args, directory)
    model_cfg, params = hf_import.load(directory, dtype="float32")
  model_cfg = dataclasses.replace(model_cfg, dtype=args.dtype,
                                  remat_policy=args.remat_policy, attention=args.attention)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch_model = torch_model.to(device)

  rng = np.random.default_rng(args.seed)
  response = rng.integers(0, args.vocab, (args.rows, args.response_len))
  student_np = np.concatenate(
      [rng.integers(0, args.vocab, (args.rows, args.prompt_len)), response], 1)
  teacher_np = np.concatenate(
      [rng.integers(0, args.vocab, (args.rows, args.teacher_prompt_len)), response], 1)

  optimizer, jax_update = make_jax_update(model_cfg, args)
  teacher_params = jax.tree.map(jnp.copy, params)
  opt_state = optimizer.init(params)
  student_j = jnp.asarray(student_np, jnp.int32)
  teacher_j = jnp.asarray(teacher_np, jnp.int32)
  start = time.perf_counter()
  compiled = jax_update.lower(params, opt_state, teacher_params, student_j,
                              teacher_j).compile()
  compile_s = time.perf_counter() - start

  torch_update = TorchUpdate(torch_model, args)
  student_t = torch.as_tensor(student_np, device=device)
  teacher_t = torch.as_tensor(teacher_np, device=device)

  def jax_step():
    nonlocal params, opt_state
    params, opt_state, loss = compiled(params, opt_state, teacher_params, student_j,
                                       teacher_j)
    return float(loss)  # blocks until the step is done

  def torch_step():
    value = torch_update(student_t, teacher_t)  # float() synchronises
    if device == "cuda":
      torch.cuda.synchronize()
    return value

  first_loss = {"jax": jax_step(), "torch": torch_step()}
  for _ in range(args.warmup):
    jax_step()
    torch_step()
  times = {"jax": [], "torch": []}
  for _ in range(args.steps):
    for name, step in (("jax", jax_step), ("torch", torch_step)):
      start = time.perf_counter()
      step()
      times[name].append(time.perf_counter() - start)
  jax_s, torch_s = statistics.median(times["jax"]), statistics.median(times["torch"])
  # Peak device memory of each side over the whole run (both hold a student, a teacher
  # and AdamW state); the backends report it on GPUs only.
  jax_stats = jax.local_devices()[0].memory_stats() or {}
  jax_peak = jax_stats.get("peak_bytes_in_use")
  torch_peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
  print(json.dumps({
      "benchmark": "update_vs_torch",
      "jax_step_s": round(jax_s, 4),
      "torch_step_s": round(torch_s, 4),
      "ratio_torch_over_jax": round(torch_s / jax_s, 3),
      "jax_compile_s": round(compile_s, 2),
      "jax_peak_bytes": jax_peak, "torch_peak_bytes": torch_peak,
      "peak_ratio_jax_over_torch": (round(jax_peak / torch_peak, 3)
                                    if jax_peak and torch_peak else None),
      "jax_steps_s": [round(t, 4) for t in times["jax"]],
      "torch_steps_s": [round(t, 4) for t in times["torch"]],
      "first_loss_jax": first_loss["jax"],
      "first_loss_torch": first_loss["torch"],
      "rows": args.rows, "prompt_len": args.prompt_len,
      "teacher_prompt_len": args.teacher_prompt_len, "response_len": args.response_len,
      "embed_dim": args.embed_dim, "layers": args.layers, "heads": args.heads,
      "kv_heads": args.kv_heads, "vocab": args.vocab, "dtype": args.dtype,
      "top_k": args.top_k, "alpha": args.alpha, "chunk_size": args.chunk_size,
      "remat_policy": args.remat_policy, "attention": args.attention,
      "jax_backend": jax.default_backend(), "torch_device": device,
      "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
      "jax_version": jax.__version__, "torch_version": torch.__version__,
      "transformers_version": transformers.__version__,
  }))


if __name__ == "__main__":
  main()
