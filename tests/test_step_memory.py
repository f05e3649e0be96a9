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


_HLO = """HloModule jit_step

%fused (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  ROOT %ar = f32[4]{0} all-reduce(f32[4]{0} %a), to_apply=%add, metadata={op_name="x"}
}

%decode_body (p: (s32[], bf16[8,4])) -> (s32[], bf16[8,4]) {
  %ag = bf16[8,16]{1,0:T(8,128)(2,1)} all-gather(bf16[8,4]{1,0} %x), dimensions={1}, metadata={op_name="jit(step)/decode/while/body/dot"}
  ROOT %f = f32[4]{0} fusion(%ag), kind=kLoop, calls=%fused
}

ENTRY %main (t: (s32[], bf16[8,4])) -> f32[2,4] {
  %w = (s32[], bf16[8,4]) while(%t), condition=%cond, body=%decode_body, metadata={op_name="jit(step)/decode/while"}
  %ags = (bf16[4,4]{1,0}, bf16[16,4]{1,0}) all-gather-start(%y), metadata={op_name="jit(step)/transpose(jvp(Decoder))/dot"}
  %agd = bf16[16,4]{1,0} all-gather-done(%ags)
  %rs = f32[2,4]{1,0} reduce-scatter(%z), dimensions={0}, metadata={op_name="jit(step)/jvp(Decoder)/x"}
  %ar2 = f32[2,4]{1,0} all-reduce(f32[2,4]{1,0} %rs), replica_groups={{0,1}}, to_apply=%add
  ROOT %cp = u32[3]{0} collective-permute(%q), metadata={op_name="jit(step)/optimizer"}
}
"""


def test_collectives_are_split_into_decode_loop_training_and_rest():
  from mopd_jax import topology  # pylint: disable=import-outside-toplevel
  assert topology.collectives(_HLO) == {
      # Inside the decode loop's body, and in the fusion that body calls.
      "decode_loop": {"all-gather": {"count": 1, "bytes": 8 * 16 * 2},
                      "all-reduce": {"count": 1, "bytes": 4 * 4}},
      # An async start counts once, with its output's bytes (not its operand's).
      # A collective without metadata (%ar2) is named after its operand (%rs).
      "training": {"all-gather": {"count": 1, "bytes": 16 * 4 * 2},
                   "reduce-scatter": {"count": 1, "bytes": 2 * 4 * 4},
                   "all-reduce": {"count": 1, "bytes": 2 * 4 * 4}},
      "rest": {"collective-permute": {"count": 1, "bytes": 3 * 4}},
  }
