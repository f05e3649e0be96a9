"""Tokenizers behind one small interface, and the chat format of prompts.

Interface (`Tokenizer`): `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`,
`pad_id`, `eos_id`, `stop_ids`. The demo uses a SentencePiece model trained reproducibly
from the demo corpus (pad=0, eos=1, unk=2, no bos).

Chat format. A prompt is rendered as `prefix + user_text + suffix`, where the suffix ends
with the generation prompt. `encode_chat_prompt` returns the token ids and the *insertion
index*: the number of tokens before the suffix. The teacher's peer context is inserted
there, so that the generation prompt always stays last.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Iterable, Protocol, Sequence

import sentencepiece as spm

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
          f"eos={self.eos_id}.")
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
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
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


@dataclasses.dataclass(frozen=True)
class ChatFormat:
  """`prefix + user_text + suffix`; the suffix ends with the generation prompt."""

  prefix: str = USER_TAG + "\n"
  suffix: str = "\n" + ASSISTANT_TAG + "\n"

  def render(self, user_text: str) -> str:
    return self.prefix + user_text + self.suffix


def encode_chat_prompt(tokenizer: Tokenizer, user_text: str,
                       chat: ChatFormat = ChatFormat()) -> tuple[list[int], int]:
  """Token ids of the rendered prompt and the insertion index of the peer context."""
  head = tokenizer.encode(chat.prefix) + tokenizer.encode(user_text)
  return head + tokenizer.encode(chat.suffix), len(head)
