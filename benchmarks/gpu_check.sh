#!/usr/bin/env bash
# The GPU checks of the scale work, as one script (under 8 minutes on an H100/H200).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Runs, each under its own time limit, on the first GPU:
#   1. the numerics test files on the GPU (loss, attention, sampler, Hugging Face parity at
#      matmul precision "highest");
#   2. the sampler against transformers `generate` (both `decode_layers` kinds, with the
#      fraction of the memory roofline) and the update against PyTorch eager (with both
#      sides' peak memory), Qwen3-0.6B shape, bfloat16, prompt 1,024 / response 2,048 for
#      the update;
#   3. `benchmarks.step_memory` compiled for the GPU (Qwen3-0.6B, 8 rows, 1,024 + 2,048).
# Every part writes its output to OUT_DIR (default: gpu_check_out); a part that fails or
# times out is reported and the script goes on. On a machine without ml-collections or
# tensorboardX, put their wheels in .whl/ first (see README, "GPU checks").
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${1:-gpu_check_out}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/gpu_check_site .whl/*.whl \
    && export PYTHONPATH=/tmp/gpu_check_site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
# JAX and PyTorch share the GPU in the benchmarks: JAX allocates as it goes instead of
# taking 75% of the memory up front, and its peak is read from its allocator statistics.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
  tail -n 3 "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
part numerics 150 python3 -m pytest -q -x tests/test_losses.py tests/test_attention.py \
  tests/test_model_sampling.py tests/test_hf_parity.py
qwen3_06b=(--embed-dim=1024 --layers=28 --heads=16 --kv-heads=8 --head-dim=128
           --mlp-dim=3072 --vocab=151936)
part sampler 110 python3 -m benchmarks.sampler_vs_hf "${qwen3_06b[@]}" --dtype=bfloat16 \
  --batch=64 --prompt-len=128 --new-tokens=256 --decode-layers=scan,unrolled
part update 150 python3 -m benchmarks.update_vs_torch "${qwen3_06b[@]}" --dtype=bfloat16 \
  --rows=8 --prompt-len=1024 --response-len=2048 --teacher-prompt-len=4136
part step_memory 70 python3 -m benchmarks.step_memory --preset=qwen3-0.6b --rows=8 \
  --group=8 --prompt-len=1024 --response-len=2048 --peer-cap=1024
