#!/usr/bin/env bash
# The offload issue's GPU checks in one prepared run for a device session (a few minutes on an H200):
# the CUDA tests, expert copy and MoE-layer timings, and the demo model's decode with its expert cache on the GPU.
#   device run: bash benchmarks/gpu_check.sh      (carry .whl: the gguf wheel, absent from the GPU image)
# Results land in $OUT (or benchmarks/out): cuda_tests.txt, offload_cuda.json, overhead_cuda.json, demo_cuda_*.json.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out}
mkdir -p "$out"
if ! python3 -c "import gguf" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pytest -q -p no:cacheprovider tests/test_offload_cuda.py tests/test_qmatrix.py tests/test_quant_formats.py \
    tests/test_model.py -k cuda 2>&1 | tee "$out/cuda_tests.txt"
python3 benchmarks/bench_offload.py --cuda --layers 3 2>&1 | tee "$out/offload_cuda.json"
python3 benchmarks/bench_offload.py --device cuda --overhead-only --tokens 64 2>&1 | tee "$out/overhead_cuda.json"
bench() { python3 -m cli.main bench lite/data/demo.gguf --device cuda -p 64 -n 256 -r 3 --json "$@"; }
bench --experts-on device > "$out/demo_cuda_resident.json"
for pf in off 1 2; do
    bench --experts-on ram --expert-cache 4 --miss-policy fetch --prefetch "$pf" > "$out/demo_cuda_cache4_prefetch_$pf.json"
done
python3 - "$out" <<'PY'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("demo_cuda_*.json")):
    r = json.loads(f.read_text())
    t = (r.get("stats") or {}).get("total") or {}
    keys = ("hit_rate", "effective_hit_rate", "hits_late", "stall_s", "bytes_h2d")
    print(f.name, "tg tok/s", r["tg_tps"]["median"], {k: t.get(k) for k in keys})
PY
