"""HostVerifier: one decode per response when both host callables read the same batch."""
# pylint: disable=protected-access

import threading

import numpy as np
import pytest

from mopd_jax.verifiers import callback
from mopd_jax.verifiers.result import Result


class _CountingTokenizer:
  """One token per character; counts decode calls."""

  def __init__(self):
    self.decodes = 0
    self._lock = threading.Lock()

  def encode(self, text):
    return [ord(c) for c in text]

  def decode(self, ids):
    with self._lock:
      self.decodes += 1
    return "".join(chr(int(i)) for i in ids)


def _batch(texts):
  tok = _CountingTokenizer()
  tokens = np.zeros((len(texts), max(map(len, texts)) + 2), np.int32)
  for row, text in enumerate(texts):
    tokens[row, :len(text)] = tok.encode(text)
  return tokens, np.array([len(t) for t in texts], np.int32)


def _score(texts, refs):
  return [Result(reward=float(t.endswith(r)), status="ok") for t, r in zip(texts, refs)]


def _host(share):
  tok = _CountingTokenizer()
  host = callback.HostVerifier(_score, {0: "a", 1: "b"}, tok, feedback_len=1, summary_len=8,
                               summary_fallback_chars=3, share_texts=share)
  return host, tok


TEXTS = ["x <summary>one</summary> a", "no tag here b", "<summary>two"]
IDS = np.array([0, 1, 1], np.int32)


@pytest.mark.parametrize("summarize_first", [False, True])
def test_shared_texts_decode_each_response_once(summarize_first):
  tokens, lengths = _batch(TEXTS)
  results = {}
  for share in (False, True):
    host, tok = _host(share)
    calls = [lambda: host(IDS, tokens.copy(), lengths.copy()),
             lambda: host.summarize(tokens.copy(), lengths.copy())]
    outs = [call() for call in (calls[::-1] if summarize_first else calls)]
    results[share] = outs
    assert tok.decodes == (3 if share else 6)
    assert host.decoded_rows == tok.decodes
    assert not host._shared  # the second callable claimed the texts
  for got, want in zip(results[True], results[False]):
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b)
  rewards = results[True][1 if summarize_first else 0][0]
  np.testing.assert_array_equal(rewards, [1.0, 1.0, 0.0])


def test_unclaimed_batches_are_bounded_and_different_batches_do_not_collide():
  host, tok = _host(True)
  tokens, lengths = _batch(TEXTS)
  for step in range(3 * callback._MAX_SHARED_BATCHES):
    varied = tokens.copy()
    varied[0, 0] = 65 + step % 50
    host(IDS, varied, lengths)  # the summaries callable never comes
  assert len(host._shared) == callback._MAX_SHARED_BATCHES
  summaries, summary_lengths, missing = host.summarize(tokens, lengths)
  np.testing.assert_array_equal(missing, [0, 1, 1])  # "<summary>two" is not complete
  assert "".join(map(chr, summaries[0, :summary_lengths[0]])) == "one"
  assert "".join(map(chr, summaries[2, :summary_lengths[2]])) == "<su"
  assert tok.decodes == 3 * (3 * callback._MAX_SHARED_BATCHES) + 3


def test_summarize_time_counts_in_host_time():
  host, _ = _host(True)
  tokens, lengths = _batch(TEXTS)
  host.summarize(tokens, lengths)
  timing = host.pop_timing()
  assert timing["verify/host_time_s"] > 0.0
