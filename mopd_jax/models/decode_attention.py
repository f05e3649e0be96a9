"""The sampler's one-token attention step over the prompt and response KV caches.

Kept apart from `models.attention`: it is not one of the attention kinds (no masks from
segment ids, no kernel choice) but the decode loop's own online softmax, over a prompt
cache shared by the G samples of each prompt plus the written blocks of a per-sample
response cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mopd_jax.models.attention import target_platform


def decode_attention(q, prompt_k, prompt_v, prompt_mask, response_k, response_v,
                     num_written, new_k, new_v, *, layer, block=128, precision=None):
  """One decode step of N = B*G rows, G samples per prompt, in one layer.

  The caches arrive stacked over layers and only what the step reads is sliced out of
  them: taking the layer's whole response cache first would copy all Lr slots of it at
  every step (XLA:CPU materialises such a slice), whatever has been written.

  Args:
    q: [N, H, D] queries of the current token.
    prompt_k, prompt_v: [L, B, K, Lp, D] prompt cache, shared by the G samples of a prompt.
    prompt_mask: bool [B, Lp], True on real prompt tokens.
    response_k, response_v: [L, N, K, Lr, D] response cache; slots [0, num_written) hold
      the earlier response tokens; Lr is a multiple of `block`.
    num_written: int32 scalar, response slots written so far (same for every row).
    new_k, new_v: [N, K, D] keys/values of the current token (not yet in the cache).
    layer: int32 scalar (or int), the layer's index in the stacked caches.
    block: response slots read per loop iteration; only ceil(num_written / block) blocks
      are read, so the response part costs O(num_written), not O(Lr).

  Returns:
    [N, H, D] in q.dtype.
  """
  n, h, d = q.shape
  _, b, kh, lp, _ = prompt_k.shape
  g = n // b
  qg = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, g, kh, h // kh, d)
  upcast = target_platform() == "cpu"

  def mm(eq, a, b):
    # XLA's CPU runtime has no bf16 x bf16 -> f32 kernel for these batched
    # matrix-vector products; on CPU they run in float32 (the result dtype is unchanged).
    if upcast:
      a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(eq, a, b, precision=precision, preferred_element_type=jnp.float32)

  def merge(state, scores, values, eq):
    """Online-softmax update with a block of scores [..., S] and values."""
    m, l, acc = state
    m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(scores - m_safe[..., None])
    corr = jnp.exp(m - m_safe)
    acc = acc * corr[..., None] + mm(eq, p.astype(values.dtype), values)
    return m_new, l * corr + jnp.sum(p, axis=-1), acc

  # The current token attends to itself: this starts every row's softmax.
  self_scores = mm("bgkhd,bgkd->bgkh", qg, new_k.reshape(b, g, kh, d))
  state = (self_scores, jnp.ones_like(self_scores),
           new_v.reshape(b, g, kh, 1, d).astype(jnp.float32) * jnp.ones((h // kh, 1)))
  # Prompt: one matmul against the layer's shared cache, all of which is read.
  prompt_k, prompt_v = (jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False)
                        for x in (prompt_k, prompt_v))
  scores = mm("bgkhd,bksd->bgkhs", qg, prompt_k)
  scores = jnp.where(prompt_mask[:, None, None, None, :], scores, -jnp.inf)
  state = merge(state, scores, prompt_v, "bgkhs,bksd->bgkhd")
  # Response: only the blocks that hold written slots. Each block is sliced from the
  # stacked cache as it is stored and only then split into (prompt, sample): reshaping
  # the whole cache first made XLA:CPU copy all of it, every layer and step.

  def response_block(j, state):
    start, size = (layer, 0, 0, j * block, 0), (1, n, kh, block, d)
    k_j, v_j = (jax.lax.dynamic_slice(x, start, size).reshape(b, g, kh, block, d)
                for x in (response_k, response_v))
    scores = mm("bgkhd,bgksd->bgkhs", qg, k_j)
    written = j * block + jnp.arange(block) < num_written
    scores = jnp.where(written, scores, -jnp.inf)
    return merge(state, scores, v_j, "bgkhs,bgksd->bgkhd")

  num_blocks = (num_written + block - 1) // block
  _, l, acc = jax.lax.fori_loop(0, num_blocks, response_block, state)
  return (acc / l[..., None]).reshape(n, h, d).astype(q.dtype)
