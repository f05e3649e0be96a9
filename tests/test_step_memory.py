"""The compiled step at vocabulary 151,936, 1,024 response tokens and 16 rollouts needs
less temporary memory than one float32 logits tensor of that batch."""

import pytest

from benchmarks import step_memory


@pytest.mark.slow
def test_step_temp_memory_below_one_logits_tensor():
  stats = step_memory.compile_step()  # chunk 32
  if stats["temp_bytes"] is None:
    pytest.skip("memory_analysis() is not available on this backend")
  assert stats["rollouts"] == 16 and stats["vocab"] == 151_936
  assert stats["temp_bytes"] < stats["float32_logits_bytes"]
  # Unchunked (one chunk = the whole response) needs far more: the chunking is what helps.
  unchunked = step_memory.compile_step(chunk=1024)
  assert unchunked["temp_bytes"] > stats["float32_logits_bytes"]
