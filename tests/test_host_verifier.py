"""HostVerifier: one decode per response when both host callables read the same batch; the
feedback's character cap and its token buffer."""
# pylint: disable=protected-access

import threading

import numpy as np
import pytest

from mopd_jax.verifiers import callback, tooluse
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


def _feedback_host(feedback_of, feedback_len):
  """A HostVerifier whose verifier answers every response with feedback_of(response)."""
  def score(texts, refs):
    del refs
    return [Result(reward=0.0, feedback=feedback_of(t), status="ok") for t in texts]
  return callback.HostVerifier(score, {0: None}, _CountingTokenizer(), feedback_len=feedback_len)


def _feedback_texts(feedback, lengths):
  return ["".join(map(chr, row[:n])) for row, n in zip(feedback, lengths)]


def test_feedback_is_cut_to_2000_characters_before_tokenisation():
  long = "".join(chr(ord("a") + i % 26) for i in range(2500))
  host = _feedback_host(lambda t: long if t == "long" else "short feedback", 2100)
  tokens, lengths = _batch(["long", "ok"])
  _, _, feedback, feedback_lengths = host(np.zeros(2, np.int32), tokens, lengths)
  assert feedback.shape == (2, 2100) and feedback.dtype == np.int32
  assert _feedback_texts(feedback, feedback_lengths) == [long[:2000], "short feedback"]
  assert not feedback[0, 2000:].any()
  assert host.feedback_cut_rows == 0


def test_feedback_over_the_token_buffer_is_cut_and_counted():
  text = "x" * 120
  host = _feedback_host(lambda t: text if t.startswith("long") else "fits", 50)
  tokens, lengths = _batch(["long 1", "ok", "long 2"])
  _, _, feedback, feedback_lengths = host(np.zeros(3, np.int32), tokens, lengths)
  assert _feedback_texts(feedback, feedback_lengths) == [text[:50], "fits", text[:50]]
  assert host.feedback_cut_rows == 2
  host(np.zeros(3, np.int32), tokens, lengths)
  assert host.feedback_cut_rows == 4  # over the whole run


def test_tool_use_feedback_keeps_its_expected_part():
  # A malformed Action Input: the whole message, "Expecting ..." included, reaches the
  # teacher when the buffer holds FEEDBACK_MAX_CHARS tokens.
  response = 'Action: getWeather\nAction Input: {"city": "Paris" "unit": "C"}'
  reference = {"actions": ["getWeather"], "inputs": [{"city": "Paris"}]}
  want = tooluse.score(response, reference).feedback
  assert "Expecting ',' delimiter" in want
  host = callback.HostVerifier(tooluse.score_batch, {0: reference}, _CountingTokenizer(),
                               feedback_len=callback.FEEDBACK_MAX_CHARS)
  tokens, lengths = _batch([response])
  _, status, feedback, feedback_lengths = host(np.zeros(1, np.int32), tokens, lengths)
  assert status[0] == callback.STATUS_CODES["format_error"]
  assert _feedback_texts(feedback, feedback_lengths) == [want]


def test_identical_responses_to_one_example_are_verified_once_with_the_same_result():
  seen = []

  def score(texts, refs):
    seen.append(list(zip(texts, refs)))
    return [Result(reward=float(t.endswith(r)), feedback=f"{t} for {r} " + "x" * 40,
                   status="ok" if t.endswith(r) else "format_error")
            for t, r in zip(texts, refs)]

  texts = ["p a", "p a", "q b", "p a", "q b", "p a"]
  ids = np.array([0, 0, 0, 1, 1, 0], np.int32)  # "p a" for example 1 is another response
  tokens, lengths = _batch(texts)
  outs = {}
  for dedupe in (False, True):
    seen.clear()
    host = callback.HostVerifier(score, {0: "a", 1: "b"}, _CountingTokenizer(),
                                 feedback_len=32, dedupe=dedupe)
    outs[dedupe] = host(ids, tokens, lengths)
    if dedupe:
      assert seen == [[("p a", "a"), ("q b", "a"), ("p a", "b"), ("q b", "b")]]
      assert host.duplicate_rows == 2
    else:
      assert len(seen[0]) == 6 and host.duplicate_rows == 0
    assert host.feedback_cut_rows == 6  # every row's feedback is over 32 tokens
  for got, want in zip(outs[True], outs[False]):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(outs[True][0], [1, 1, 0, 0, 1, 1])
  np.testing.assert_array_equal(outs[True][1], [0, 0, 1, 1, 0, 0])
  assert _feedback_texts(outs[True][2], outs[True][3])[3] == ("p a for b " + "x" * 40)[:32]


def test_a_verifier_that_returns_the_wrong_number_of_results_scores_the_batch_0():
  host = callback.HostVerifier(lambda texts, refs: [Result(reward=1.0, status="ok")],
                               {0: "a"}, _CountingTokenizer(), feedback_len=1)
  tokens, lengths = _batch(["a", "b a"])
  rewards, status, _, _ = host(np.zeros(2, np.int32), tokens, lengths)
  np.testing.assert_array_equal(rewards, [0.0, 0.0])
  np.testing.assert_array_equal(status, [callback.STATUS_CODES["error"]] * 2)
