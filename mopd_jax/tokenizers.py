"""Tokenizers behind one small interface, and the chat format of prompts.

Interface (`Tokenizer`): `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`,
`pad_id`, `eos_id`, `stop_ids`. Two implementations:

- `SentencePieceTokenizer`: the demo's model, trained reproducibly from the demo corpus
  (pad=0, eos=1, unk=2, no bos).
- `HFTokenizer` (in `mopd_jax.hf_tokenizer`): a Hugging Face tokenizer directory
  (`tokenizer.json`, `tokenizer_config.json` and optionally `special_tokens_map.json`,
  `generation_config.json`, `chat_template.jinja`), read with the `tokenizers` library; its
  chat templates are rendered here with `jinja2`. Both libraries are imported only when such
  a tokenizer is used; `transformers` is never needed.

Chat formats. A prompt is either `ChatFormat`'s `prefix + user_text + suffix` (the suffix ends
with the generation prompt) or the rendering of a Hugging Face chat template
(`apply_chat_template`). `encode_chat_prompt` returns the token ids and the *insertion index*:
the number of tokens up to the end of the last user message's content. The teacher's peer
context is inserted there, so that the end of the user turn and the generation prompt always
stay last.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import io
import json
from typing import Any, Iterable, Mapping, Protocol, Sequence

import sentencepiece as spm

from mopd_jax import hf_tokenizer

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
USER_TAG, ASSISTANT_TAG = "<|user|>", "<|assistant|>"
# Pieces that must stay whole: the chat tags and code whitespace (SentencePiece would
# otherwise drop newlines and collapse indentation).
_USER_SYMBOLS = (USER_TAG, ASSISTANT_TAG, "\n", "```")


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  eos_id: int
  stop_ids: tuple[int, ...]

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


class SentencePieceTokenizer:
  """A SentencePiece model (from bytes or a file) with pad=0, eos=1, unk=2."""

  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id = self._sp.pad_id()
    self.eos_id = self._sp.eos_id()
    if self.pad_id < 0 or self.eos_id < 0:
      raise ValueError(
          f"SentencePiece model needs pad and eos ids; got pad={self.pad_id}, "
          f"eos={self.eos_id}."
      )
    self.stop_ids = (self.eos_id,)

  @classmethod
  def from_file(cls, path: str) -> "SentencePieceTokenizer":
    with open(path, "rb") as f:
      return cls(f.read())

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids if int(i) not in (self.pad_id, self.eos_id)]
    return self._sp.decode(ids)


def train_sentencepiece(texts: Iterable[str], vocab_size: int) -> bytes:
  """Trains a SentencePiece BPE model; deterministic for the same texts (one thread)."""
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(list(texts)),
      model_writer=out,
      vocab_size=vocab_size,
      model_type="bpe",
      pad_id=PAD_ID,
      eos_id=EOS_ID,
      unk_id=UNK_ID,
      bos_id=-1,
      user_defined_symbols=list(_USER_SYMBOLS),
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      split_digits=True,
      add_dummy_prefix=False,
      character_coverage=1.0,
      byte_fallback=False,
      num_threads=1,
      max_sentence_length=16384,
      minloglevel=2,
  )
  return out.getvalue()


# Appended to the last user message to find the end of its content in a rendered chat template
# (private-use characters, which no tokenizer or template treats specially).
_END_OF_USER_TEXT = "\ue000end-of-user-text\ue001"


@functools.lru_cache(maxsize=32)
def _compile_chat_template(source: str) -> Any:
  """A chat template compiled in the sandboxed environment that transformers uses."""
  # pylint: disable=import-outside-toplevel
  import jinja2
  from jinja2 import ext, nodes, sandbox

  class GenerationBlocks(ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text) renders its body."""

    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.TemplateError(message)

  def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlocks, ext.loopcontrols]
  )
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env.from_string(source)


def apply_chat_template(
    tokenizer: hf_tokenizer.HFTokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> str:
  """Renders a conversation with the tokenizer's chat template.

  Equals transformers' `AutoTokenizer.apply_chat_template(messages, tokenize=False,
  add_generation_prompt=..., tools=..., documents=..., **kwargs)`: the template runs in a
  sandboxed jinja2 environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
  extension, `{% generation %}` blocks, a `tojson` filter that keeps non-ASCII text, and the
  globals `raise_exception` and `strftime_now`. It sees `messages` (copies without the keys
  whose value is None), `tools`, `documents`, `add_generation_prompt`, the named special tokens
  (`bos_token`, `eos_token`, ...) and `kwargs` (e.g. Qwen3's `enable_thinking`), which override
  special tokens of the same name.

  Differences from transformers: the generation prompt is on by default (prompts are rendered
  for sampling); `chat_template` only names one of the tokenizer's templates; `tools` are JSON
  schemas (no Python functions); messages are passed as given (transformers 5 also copies a
  `thinking` or `reasoning` key to `reasoning_content`).

  Args:
    tokenizer: The tokenizer whose templates and special tokens are used.
    messages: The conversation, mappings with at least `role` and `content`.
    add_generation_prompt: Whether to end with the header of an assistant turn.
    chat_template: Name of the template; by default "tool_use" when `tools` are given and the
      tokenizer has such a template, else "default".
    tools: Tool schemas for templates that support tool use.
    documents: Documents for templates that support retrieval.
    **kwargs: Further template variables.

  Returns:
    The rendered conversation.

  Raises:
    ValueError: The conversation is empty or the template does not exist.
    TypeError: A message is not a mapping.
    jinja2.TemplateError: The template rejects the conversation (`raise_exception`).
  """
  template = _select_chat_template(tokenizer, chat_template, tools)
  if not messages:
    raise ValueError("Cannot render an empty conversation.")
  plain = []
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise TypeError(f"Message {i} must be a mapping with 'role' and 'content'; got {message!r}.")
    plain.append({k: v for k, v in message.items() if v is not None})
  variables = {**tokenizer.special_tokens, **kwargs}
  return _compile_chat_template(template).render(
      messages=plain,
      tools=tools,
      documents=documents,
      add_generation_prompt=add_generation_prompt,
      **variables,
  )


def _select_chat_template(
    tokenizer: hf_tokenizer.HFTokenizer, name: str | None, tools: Any
) -> str:
  templates = tokenizer.chat_templates
  if not templates:
    raise ValueError(f"The tokenizer of {tokenizer.source} has no chat template.")
  if name is None:
    name = "tool_use" if tools is not None and "tool_use" in templates else "default"
  if name not in templates:
    raise ValueError(
        f"The tokenizer of {tokenizer.source} has no chat template named {name!r}; it has "
        f"{sorted(templates)}."
    )
  return templates[name]


@dataclasses.dataclass(frozen=True)
class ChatFormat:
  """`prefix + user_text + suffix`; the suffix ends with the generation prompt."""

  prefix: str = USER_TAG + "\n"
  suffix: str = "\n" + ASSISTANT_TAG + "\n"

  def render(self, user_text: str) -> str:
    return self.prefix + user_text + self.suffix


def encode_chat_prompt(
    tokenizer: Tokenizer,
    user_text: str,
    chat: ChatFormat | None = None,
    *,
    system: str | None = None,
    history: Sequence[Mapping[str, Any]] = (),
    **template_kwargs: Any,
) -> tuple[list[int], int]:
  """Token ids of a rendered prompt and the insertion index of the peer context.

  With a `ChatFormat` (the default for tokenizers without a chat template), the ids are
  `encode(prefix) + encode(user_text) + encode(suffix)` and the index is the length of the
  first two parts.

  With a chat template (the default for an `HFTokenizer` that has one), the conversation
  `[system] + history + [user]` is rendered by `apply_chat_template` (generation prompt on).
  The rendering is split at the end of the last user message's content: the conversation is
  rendered once more with a private-use marker appended to that content, and the text before
  and after the marker are `head` and `tail`. The ids are `encode(head) + encode(tail)` and the
  index is `len(encode(head))`: the peer context goes right after the user's text, before the
  end-of-turn token and the generation prompt.

  The split forces a token boundary at the insertion index. The ids equal `encode(full
  rendering)` whenever the tail starts with an added token that does not strip whitespace on
  its left (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`), because added tokens are split off
  before the tokenizer model runs; otherwise text that would merge into one token across the
  boundary is tokenized on each side.

  Args:
    tokenizer: Any `Tokenizer`; an `HFTokenizer` for chat templates.
    user_text: The last user message.
    chat: A `ChatFormat` to use instead of the tokenizer's chat template.
    system: System prompt (chat templates only).
    history: Messages between the system prompt and the user message (chat templates only).
    **template_kwargs: Passed to `apply_chat_template` (e.g. `enable_thinking=False`,
      `chat_template`, `tools`).

  Returns:
    `(ids, insertion_index)`.

  Raises:
    ValueError: `system`, `history` or template arguments with a `ChatFormat`; `user_text`
      containing the marker; a template that does not print the marker exactly once, or that
      changes the end of the user text (e.g. `| trim` with trailing whitespace; strip the text
      first then).
  """
  if chat is None and not getattr(tokenizer, "chat_templates", None):
    chat = ChatFormat()
  if chat is not None:
    if system is not None or history or template_kwargs:
      raise ValueError(
          "A ChatFormat prompt has only the user text; got system="
          f"{system!r}, {len(history)} history messages and template arguments "
          f"{sorted(template_kwargs)}."
      )
    head = tokenizer.encode(chat.prefix) + tokenizer.encode(user_text)
    return head + tokenizer.encode(chat.suffix), len(head)

  if _END_OF_USER_TEXT in user_text:
    raise ValueError(f"The user text contains the reserved marker {_END_OF_USER_TEXT!r}.")
  messages = [{"role": "system", "content": system}] if system is not None else []
  messages += list(history)

  def render(content):
    return apply_chat_template(
        tokenizer, messages + [{"role": "user", "content": content}], **template_kwargs
    )

  marked = render(user_text + _END_OF_USER_TEXT)
  if marked.count(_END_OF_USER_TEXT) != 1:
    raise ValueError(
        f"The chat template of {tokenizer.source} printed the end-of-user-text marker "
        f"{marked.count(_END_OF_USER_TEXT)} times instead of once; it must print the last user "
        "message's content unchanged."
    )
  head, tail = marked.split(_END_OF_USER_TEXT)
  if head + tail != render(user_text):
    raise ValueError(
        f"The chat template of {tokenizer.source} changes the end of the last user message "
        "(e.g. trims whitespace), so the peer context has no exact insertion point; strip the "
        f"user text first (it ends with {user_text[-20:]!r})."
    )
  head_ids = tokenizer.encode(head)
  return head_ids + tokenizer.encode(tail), len(head_ids)
