"""Autoregressive sampling with a KV cache: one prefill, then a `lax.while_loop` decode.

Layout. Prompts are LEFT-padded to a common length Lp (`prompt_mask` True on real
tokens), so every row's last prompt token sits at index Lp - 1. The cache has two parts:
- the prompt cache [L, B, K, Lp, Dh], written once by the prefill and read by all G
  samples of its prompt (no G-fold copy);
- the response cache [L, B*G, K, Lr', Dh] (Lr' = Lr rounded up to `decode_block`),
  where every row writes its t-th response token at slot t.
A decode step attends to the real prompt slots, to the response blocks that hold
written slots (ceil(t / decode_block) blocks, read with `dynamic_slice`), and to the
current token itself; unwritten blocks are never read. RoPE positions count real tokens
only, so padding does not shift them.

Outputs per row: `tokens` [B*G, Lr] (pad after the end-of-sequence token), `logprobs`
[B*G, Lr] = log p(token) under the temperature-scaled full distribution (before top-k
/ top-p filtering; 0 after the end), `lengths` [B*G] = tokens generated including the
end-of-sequence token. The loop stops early once every row has finished.

Decode layout. With axis rules in the model config (a run on a mesh) and with
`decode_layout = "tensor"`, the weights are cast to the compute dtype and then resharded
once per call into `sharding.DECODE_RULES` (split over 'tensor' only, replicated over the
batch axes that split the rows), and the whole sampler is traced with a copy of the model
config that holds those rules: the prefill and the
decode loop read local weights, and a decode step communicates activations only (the
tensor-parallel reductions, and the vocabulary-split logits of the rows the device holds,
where 'tensor' has more than one device). `decode_layout = "wide"` does the same with
`sharding.WIDE_DECODE_RULES` (weights split over tensor and fsdp together, rows over
data only): a copy fsdp times smaller, for a model whose 'tensor' copy does not fit. With
"train" the weights stay in the training layout, and XLA gathers the fsdp-split weights
inside the loop, at every generated token.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from mopd_jax import sharding
from mopd_jax.choices import DECODE_LAYERS, SAMPLER_LAYOUTS
from mopd_jax.models import decoding, transformer


@flax.struct.dataclass
class SampleOutput:
  tokens: jax.Array  # int32 [N, Lr]
  logprobs: jax.Array  # float32 [N, Lr]
  lengths: jax.Array  # int32 [N], including the end-of-sequence token
  finished: jax.Array  # bool [N], True when an end-of-sequence token was produced


@flax.struct.dataclass
class _LoopState:
  step: jax.Array
  last_token: jax.Array  # [N]
  position: jax.Array  # [N] RoPE position of last_token
  tokens: jax.Array
  logprobs: jax.Array
  done: jax.Array
  lengths: jax.Array
  cache: dict  # response cache {"k", "v"} [L, N, K, Lr', Dh]


def filter_logits(logits, *, top_k: int, top_p: float):
  """Masks logits [N, V] outside the top-k set and the top-p nucleus with -inf."""
  neg = jnp.finfo(logits.dtype).min
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass strictly before it is below top_p (always keeps the top).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, neg, logits)
  return logits


def _first_above(cumulative, threshold, weights):
  """Index of the first entry of `cumulative` [N, M] above `threshold` [N]; the last
  entry of positive weight when rounding leaves none above it."""
  above = cumulative > threshold[:, None]
  last_positive = weights.shape[-1] - 1 - jnp.argmax(weights[:, ::-1] > 0, axis=-1)
  return jnp.where(jnp.any(above, axis=-1), jnp.argmax(above, axis=-1), last_positive)


def sample_categorical(key, logits, block: int = 128):
  """One token per row of logits [N, V] (-inf or float min = excluded), by inverse CDF.

  Draws one uniform per row and walks two short cumulative sums (over the V / block
  block masses, then within the chosen block): O(N * V) exps and adds and N random
  numbers, where `jax.random.categorical` draws N * V Gumbel variates (on CPU the
  random-bit generation of a 32k vocabulary dominated a decode step). A token of zero
  probability is never chosen.
  """
  n, v = logits.shape
  probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  probs = jnp.pad(probs, ((0, 0), (0, -v % block))).reshape(n, -1, block)
  block_mass = jnp.sum(probs, axis=-1)  # [N, V / block]
  block_cdf = jnp.cumsum(block_mass, axis=-1)
  target = jax.random.uniform(key, (n,)) * block_cdf[:, -1]
  b = _first_above(block_cdf, target, block_mass)
  take = lambda x: jnp.take_along_axis(x, b[:, None], axis=1)[:, 0]  # noqa: E731
  rest = target - (take(block_cdf) - take(block_mass))  # mass to cover inside block b
  in_block = jnp.take_along_axis(probs, b[:, None, None], axis=1)[:, 0]  # [N, block]
  return b * block + _first_above(jnp.cumsum(in_block, axis=-1), rest, in_block)


def weights_for_decode(model: transformer.ModelConfig, params):
  """`params` with every floating leaf wider than the compute dtype cast to it, once.

  The model casts each weight to the compute dtype where it is used, so the values are
  the same; but inside the decode loop that cast would re-read the wide weights at every
  token step. Decode steps are bound by reading the weights, so with float32 parameters
  and bfloat16 compute this halves the bytes a step reads, at the cost of one compute-dtype
  copy of the weights while sampling runs. Leaves already as narrow are left alone.
  """
  compute = jnp.dtype(transformer.dtype_from_name(model.dtype))

  def cast(x):
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize > compute.itemsize:
      return x.astype(compute)
    return x

  return jax.tree.map(cast, params)


def sampler_layout(setting: str) -> str:
  """The sampler's layout for a `config.sampling.decode_layout` value: 'auto' is 'tensor'
  until the memory plan says otherwise (`train_setup.Setup.compile_step` then writes the
  chosen layout back into the settings)."""
  return "tensor" if setting == "auto" else setting


@dataclasses.dataclass(frozen=True)
class Sampler:
  """Static sampling settings; hashable, so it can be a static argument of jit.

  temperature == 0 means greedy decoding (log-probs are then those of temperature 1).
  """

  model: transformer.ModelConfig
  max_new_tokens: int
  stop_ids: tuple[int, ...]
  pad_id: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  num_samples: int = 1
  decode_block: int = 128  # response cache slots read per block in a decode step
  # How a decode step runs the layers: "scan" (stacked weights sliced per layer and step)
  # or "unrolled" (weights split once per call, layers one after another; see
  # `decoding.unstack_layers`).
  decode_layers: str = "scan"
  # Layout of the weights while sampling: "tensor" (`sharding.DECODE_RULES`, entered once
  # per call), "wide" (`sharding.WIDE_DECODE_RULES`, likewise) or "train" (as they
  # arrive); see the module docstring.
  decode_layout: str = "tensor"

  def __post_init__(self):
    if self.max_new_tokens <= 0:
      raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}.")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}.")
    if self.decode_block <= 0:
      raise ValueError(f"decode_block must be positive, got {self.decode_block}.")
    if self.decode_layers not in DECODE_LAYERS:
      raise ValueError(f"decode_layers must be one of {DECODE_LAYERS}, got "
                       f"{self.decode_layers!r}.")
    if self.decode_layout not in SAMPLER_LAYOUTS:
      raise ValueError(f"decode_layout must be one of {SAMPLER_LAYOUTS}, got "
                       f"{self.decode_layout!r} ('auto' is resolved from the memory plan "
                       "before a sampler is built: `train_setup.Setup`).")
    if not self.stop_ids:
      raise ValueError("stop_ids must name at least one end-of-sequence token.")

  def _pick(self, logits, key):
    """logits float32 [N, V] -> (token [N], log-prob [N])."""
    temp = self.temperature if self.temperature > 0 else 1.0
    scaled = logits / temp
    if self.temperature == 0:
      token = jnp.argmax(logits, axis=-1)
    else:
      token = sample_categorical(key, filter_logits(scaled, top_k=self.top_k, top_p=self.top_p))
    token = token.astype(jnp.int32)
    logp = (jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0]
            - jax.nn.logsumexp(scaled, axis=-1))
    return token, logp

  def _is_stop(self, token):
    return jnp.isin(token, jnp.asarray(self.stop_ids, jnp.int32))

  def __call__(self, params, prompt_tokens, prompt_mask, key) -> SampleOutput:
    """prompt_tokens int32 [B, Lp] left-padded -> SampleOutput over B * num_samples rows.

    Row b * num_samples + g holds sample g of prompt b.
    """
    if self.decode_layout == "train" or self.model.axis_rules is None:
      return self._sample(self.model, weights_for_decode(self.model, params),
                          prompt_tokens, prompt_mask, key)
    cfg = dataclasses.replace(self.model,
                              axis_rules=sharding.DECODE_LAYOUT_RULES[self.decode_layout])
    # Named, so that tools find the reshard in compiled programs; cast first, so that it
    # moves compute-dtype bytes.
    with jax.named_scope("decode_layout"):
      params = sharding.constrain_tree(weights_for_decode(cfg, params),
                                       transformer.param_logical_axes(cfg), cfg.axis_rules)
    return self._sample(cfg, params, prompt_tokens, prompt_mask, key)

  def _sample(self, cfg, params, prompt_tokens, prompt_mask, key) -> SampleOutput:
    """`__call__` on weights already cast (and in the layout of `cfg`'s rules)."""
    b = prompt_tokens.shape[0]
    lr, g = self.max_new_tokens, self.num_samples
    n = b * g
    prompt_mask = prompt_mask.astype(bool)

    # Prefill once per prompt; the G samples of a prompt share its prompt cache.
    hidden, prompt_cache = decoding.prefill(cfg, params, prompt_tokens, prompt_mask)
    last_logits = jnp.repeat(transformer.project(cfg, params, hidden[:, -1]), g, axis=0)
    last_position = jnp.repeat(transformer.positions_from_mask(prompt_mask)[:, -1], g)
    block = min(self.decode_block, lr)
    cache = decoding.init_response_cache(cfg, n, -(-lr // block) * block)

    token, logp = self._pick(last_logits, jax.random.fold_in(key, 0))
    done = self._is_stop(token)
    state = _LoopState(
        step=jnp.asarray(1, jnp.int32),
        last_token=token,
        position=last_position + 1,
        tokens=jnp.full((n, lr), self.pad_id, jnp.int32).at[:, 0].set(token),
        logprobs=jnp.zeros((n, lr), jnp.float32).at[:, 0].set(logp),
        done=done,
        lengths=jnp.ones((n,), jnp.int32),
        cache=cache,
    )

    decode_params = params
    if self.decode_layers == "unrolled":
      decode_params = decoding.unstack_layers(params)

    def cond(s):
      return (s.step < lr) & ~jnp.all(s.done)

    def body(s):
      # Feed token step-1 (written to response slot step - 1) and sample token `step`.
      hidden, cache = decoding.decode_step(
          cfg, decode_params, s.last_token[:, None], s.position[:, None], prompt_cache,
          prompt_mask, s.cache, s.step - 1, block=block)
      logits = transformer.project(cfg, params, hidden[:, 0])
      token, logp = self._pick(logits, jax.random.fold_in(key, s.step))
      token = jnp.where(s.done, self.pad_id, token)
      logp = jnp.where(s.done, 0.0, logp)
      return _LoopState(
          step=s.step + 1,
          last_token=token,
          position=s.position + 1,
          tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], s.step, 1),
          logprobs=jax.lax.dynamic_update_slice_in_dim(s.logprobs, logp[:, None], s.step,
                                                       1),
          done=s.done | self._is_stop(token),
          lengths=s.lengths + (~s.done).astype(jnp.int32),
          cache=cache,
      )

    # Named, so that tools find the decode loop in compiled programs (topology.collectives).
    with jax.named_scope("decode"):
      state = jax.lax.while_loop(cond, body, state)
    return SampleOutput(tokens=state.tokens, logprobs=state.logprobs,
                        lengths=state.lengths, finished=state.done)
