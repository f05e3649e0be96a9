"""`benchmarks.step_memory`: at vocabulary 151,936 the chunked loss saves several whole
float32 logits tensors of temporary memory, and micro-batches shrink it further."""

import pytest

from benchmarks import step_memory


def _compile(*extra):
  args = step_memory.parse_args([
      "--preset=qwen3-0.6b", "--num-layers=1", "--rows=16", "--group=8",
      "--prompt-len=32", "--response-len=512", "--peer-cap=64", "--dtype=float32",
      *extra])
  return step_memory.compile_step(args)


@pytest.mark.slow
def test_step_memory_interface_and_chunked_logits():
  stats = _compile()
  for key in ("temp_bytes", "argument_bytes", "output_bytes", "compile_s", "num_layers"):
    assert key in stats
  assert stats["num_layers"] == 1 and stats["rows"] == 16
  logits_bytes = 16 * 512 * 151_936 * 4  # 4.6 GiB
  # One chunk as long as the response materialises the logits (several copies):
  # chunking must save more than two whole logits tensors.
  unchunked = _compile("--chunk-size=512")
  assert unchunked["temp_bytes"] - stats["temp_bytes"] > 2 * logits_bytes
  # A quarter of the rows live at a time: the activations that scale with rows shrink.
  micro = _compile("--micro-batch-rows=4")
  assert micro["temp_bytes"] < 0.8 * stats["temp_bytes"]


def test_step_memory_rejects_rows_not_a_multiple_of_the_group():
  with pytest.raises(SystemExit):
    step_memory.parse_args(["--preset=qwen3-0.6b", "--rows=10", "--group=4",
                            "--prompt-len=8", "--response-len=8", "--peer-cap=8"])
