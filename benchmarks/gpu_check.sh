#!/usr/bin/env bash
# The GPU checks in one prepared device run (budget: under 8 minutes on an H100), exiting non-zero if any step fails:
#   1. the CUDA tests (device kernels on the GPU, the offload engine's CUDA paths, model parity on CUDA);
#   2. Triton kernel GB/s per GGUF type against the device's own copy rate;
#   3. a V2-Lite-shaped Q4_K_M file of random blocks, 4 and 27 layers: fully resident, and experts in RAM behind a
#      2.5 GiB cache: decode tok/s, 4K-token prefill tok/s, effective hit rate, bytes_h2d, host syncs per token,
#      peak VRAM and RSS.
#   device run: bash benchmarks/gpu_check.sh      (carry .whl: the gguf wheel, absent from the GPU image)
# Results land in $OUT (or benchmarks/out): cuda_tests.txt, kernels.jsonl, model_4.jsonl, model_27.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out}
mkdir -p "$out"
if ! python3 -c "import gguf" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
# CPU-side experts (the cpu/auto miss policies) dequantize per call: building the native CPU extension there would
# take minutes of device time, and the GPU path is what this run checks.
export LITE_CPU_KERNEL=dense
python3 -m pip list 2>/dev/null | grep -E "^(torch|triton|gguf|transformers) " || true
python3 -c "import triton, torch; assert torch.cuda.is_available(); print('triton', triton.__version__, torch.cuda.get_device_name())" || exit 1
failed=()
step() {  # step NAME SECONDS LOGFILE COMMAND...: run with a time limit, keep going, remember failures
    local name=$1 limit=$2 log=$3
    shift 3
    echo "== $name"
    if ! timeout "$limit" "$@" 2>&1 | tee "$log"; then
        failed+=("$name")
    fi
}
step cuda-tests 200 "$out/cuda_tests.txt" python3 -m pytest -q -p no:cacheprovider -rfE \
    tests/test_offload_cuda.py tests/test_qmatrix.py tests/test_model.py tests/test_device_kernels.py \
    tests/test_v3_offload.py -k cuda
step model-4 130 "$out/model_4.jsonl" python3 benchmarks/bench_gpu.py model --layers 4
step kernels 60 "$out/kernels.jsonl" python3 benchmarks/bench_gpu.py kernels
step model-27 170 "$out/model_27.jsonl" python3 benchmarks/bench_gpu.py model --layers 27
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all GPU checks passed"
