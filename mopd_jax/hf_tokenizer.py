"""`HFTokenizer`: a Hugging Face tokenizer directory behind the project's `Tokenizer` interface.

Kept apart from `mopd_jax.tokenizers` (the interface, the demo's SentencePiece model and
the chat formats): everything here is about reading a checkpoint's tokenizer files the way
transformers does (which special tokens, eos / pad / stop ids, chat template sources),
and only a run from a Hugging Face checkpoint needs it. The `tokenizers` library is
imported only when one is loaded; `transformers` is never needed. Rendering the chat
templates is `tokenizers.apply_chat_template`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence


# Named special tokens of a Hugging Face tokenizer config; chat templates see them as variables.
_SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
class HFTokenizer:
  """A Hugging Face fast tokenizer (`tokenizers` library) and its configuration.

  Behaviour compared with `transformers.AutoTokenizer` loaded from the same directory:

  - `encode(text)` equals `encode(text, add_special_tokens=False)`: no bos, eos or other
    post-processor tokens are added, and special tokens written in the text (e.g. `<|im_end|>`)
    become their ids. Truncation and padding stored in `tokenizer.json` are switched off.
  - `decode(ids)` drops `pad_id` and every id in `stop_ids`, then equals transformers'
    `decode(remaining_ids, skip_special_tokens=...)`. No clean-up of tokenization spaces is done
    (transformers skips it for BPE models as well); ids without a token decode to nothing.
  - `vocab_size` is the model-facing size: the largest id of the vocabulary and the added
    tokens, plus one (`len(tokenizer)` in transformers when ids have no gaps). A checkpoint's
    embedding table may be larger.
  - `eos_id`: the id of `eos_token`, else the first `eos_token_id` of `generation_config.json`.
    `stop_ids`: `eos_id`, then the `eos_token_id` of `generation_config.json` (an int or a
    list), without repeats; for Qwen3, `<|im_end|>` and `<|endoftext|>`.
  - `pad_id`: the id of `pad_token`, else `pad_token_id` of `generation_config.json`, else
    `eos_id` (transformers leaves `pad_token_id` unset in that case).
  - Named special tokens are read from `tokenizer_config.json`; names it leaves unset are read
    from `special_tokens_map.json`. The eos and pad tokens must be in `tokenizer.json`
    (transformers would add a missing token under a new id; here that is an error).

  Attributes:
    vocab_size: Model-facing vocabulary size, see above.
    pad_id: Padding id, see above.
    eos_id: End-of-sequence id, see above.
    stop_ids: Ids that end a generation, `eos_id` first.
    special_tokens: Named special tokens as strings (`bos_token`, `eos_token`, ...).
    chat_templates: Jinja chat template sources by name; a single template is named "default".
    source: The directory the tokenizer was loaded from.
  """

  def __init__(self, directory: str):
    """Loads a Hugging Face tokenizer directory.

    Reads `tokenizer.json` (required), `tokenizer_config.json`, `special_tokens_map.json` and
    `generation_config.json`. Chat templates in `chat_template.jinja` (named "default") and
    `additional_chat_templates/NAME.jinja` replace those of `tokenizer_config.json` (a string,
    or a list of `{"name": ..., "template": ...}`), as in transformers.

    Args:
      directory: The directory holding the files.

    Raises:
      FileNotFoundError: `tokenizer.json` is missing.
      ValueError: No eos token is configured, a configured eos or pad token is not in the
        vocabulary, or an id in `generation_config.json` is outside the vocabulary.
      TypeError: A configuration entry has the wrong type.
    """
    import tokenizers as hf_tokenizers  # pylint: disable=import-outside-toplevel

    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"No tokenizer.json in {directory!r}: an HFTokenizer needs a Hugging Face fast "
          "tokenizer directory."
      )
    self.source = directory
    self._backend = hf_tokenizers.Tokenizer.from_file(path)
    self._backend.no_truncation()
    self._backend.no_padding()
    vocab = self._backend.get_vocab(with_added_tokens=True)
    if not vocab:
      raise ValueError(f"The tokenizer of {directory} has an empty vocabulary.")
    self.vocab_size = max(vocab.values()) + 1
    config = _read_json(directory, "tokenizer_config.json")
    special_tokens_map = _read_json(directory, "special_tokens_map.json")
    generation_config = _read_json(directory, "generation_config.json")

    self.special_tokens = {}
    for name in _SPECIAL_TOKEN_NAMES:
      value = config.get(name)
      if value is None:
        value = special_tokens_map.get(name)
      if value is not None:
        self.special_tokens[name] = _token_content(name, value, directory)

    eos_ids = self._generation_ids(generation_config, "eos_token_id")
    pad_ids = self._generation_ids(generation_config, "pad_token_id")
    if "eos_token" in self.special_tokens:
      self.eos_id = self.token_id(self.special_tokens["eos_token"])
    elif eos_ids:
      self.eos_id = eos_ids[0]
    else:
      raise ValueError(
          f"The tokenizer of {directory} has no eos token: neither 'eos_token' in "
          "tokenizer_config.json or special_tokens_map.json nor 'eos_token_id' in "
          "generation_config.json is set."
      )
    self.stop_ids = tuple(dict.fromkeys([self.eos_id, *eos_ids]))
    if "pad_token" in self.special_tokens:
      self.pad_id = self.token_id(self.special_tokens["pad_token"])
    elif pad_ids:
      self.pad_id = pad_ids[0]
    else:
      self.pad_id = self.eos_id

    self.chat_templates = _load_chat_templates(directory, config)

  def encode(self, text: str) -> list[int]:
    return self._backend.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    """Text of `ids` without pad and stop tokens.

    Args:
      ids: Token ids (ints or numpy integers).
      skip_special_tokens: Also drop every other added token marked special (as transformers'
        `decode(..., skip_special_tokens=True)`); tokens such as Qwen3's `<think>` are not
        special and stay.

    Returns:
      The decoded text.
    """
    dropped = {self.pad_id, *self.stop_ids}
    kept = [int(i) for i in ids if int(i) not in dropped]
    return self._backend.decode(kept, skip_special_tokens=skip_special_tokens)

  def token_id(self, token: str) -> int:
    """The id of a token of the vocabulary (e.g. `"<|im_end|>"`); ValueError when absent."""
    token_id = self._backend.token_to_id(token)
    if token_id is None:
      raise ValueError(f"Token {token!r} is not in the vocabulary of {self.source}.")
    return token_id

  def _generation_ids(self, generation_config: Mapping[str, Any], key: str) -> list[int]:
    value = generation_config.get(key)
    if value is None:
      return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
      raise TypeError(
          f"{key} in generation_config.json of {self.source} must be an int or a list of ints; "
          f"got {value!r}."
      )
    outside = [v for v in values if not 0 <= v < self.vocab_size]
    if outside:
      raise ValueError(
          f"{key} in generation_config.json of {self.source} has ids {outside} outside the "
          f"vocabulary [0, {self.vocab_size})."
      )
    return values


def _token_content(name: str, value: Any, source: str) -> str:
  if isinstance(value, Mapping) and isinstance(value.get("content"), str):
    return value["content"]
  if isinstance(value, str):
    return value
  raise TypeError(
      f"{name} of {source} must be a string or an object with a 'content' string; got {value!r}."
  )


def _load_chat_templates(directory: str, config: Mapping[str, Any]) -> dict[str, str]:
  """Template files if there are any, else the `chat_template` entry of the config."""
  templates = {}
  default_template = os.path.join(directory, "chat_template.jinja")
  if os.path.isfile(default_template):
    templates["default"] = _read_text(default_template)
  extra_dir = os.path.join(directory, "additional_chat_templates")
  if os.path.isdir(extra_dir):
    for name in sorted(os.listdir(extra_dir)):
      if name.endswith(".jinja"):
        templates[name[: -len(".jinja")]] = _read_text(os.path.join(extra_dir, name))
  if templates:
    return templates
  value = config.get("chat_template")
  if value is None:
    return {}
  if isinstance(value, str):
    return {"default": value}
  if isinstance(value, list) and all(
      isinstance(t, Mapping)
      and isinstance(t.get("name"), str)
      and isinstance(t.get("template"), str)
      for t in value
  ):
    return {t["name"]: t["template"] for t in value}
  raise TypeError(
      f"chat_template in tokenizer_config.json of {directory} must be a string or a list of "
      f"{{'name': ..., 'template': ...}} objects; got {value!r:.200}."
  )


def _read_text(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def _read_json(directory: str, name: str) -> dict[str, Any]:
  """The JSON object in `directory/name`; empty when the file does not exist."""
  path = os.path.join(directory, name)
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    value = json.load(f)
  if not isinstance(value, dict):
    raise TypeError(f"{path} must hold a JSON object; got {type(value).__name__}.")
  return value
