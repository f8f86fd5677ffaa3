#!/usr/bin/env bash
# The CUDA checks, on a machine with an NVIDIA GPU and a CUDA build of PyTorch: the CUDA tests,
# the GPU offload benchmark (benchmarks/offload_cuda.py), then the whole default suite (with
# pytest-xdist where installed). Logs and JSON lines go to OUTDIR.
#   bash scripts/gpu_check.sh OUTDIR [BENCH_SECONDS] [SUITE_SECONDS]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
export LAYERCAKE_BENCH_CACHE=${LAYERCAKE_BENCH_CACHE:-/tmp/layercake-bench}
PY=${PYTHON:-python3}
{ nvidia-smi -L; nproc; $PY -c "import torch, transformers; print(torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name(), 'transformers', transformers.__version__)"; } \
    2>&1 | tee "$out/machine.txt"
t0=$(date +%s)
timeout 150 $PY -m pytest -q -p no:cacheprovider -rfEs tests/test_offload_cuda.py \
    tests/test_checkpoint.py -k cuda 2>&1 | tee "$out/cuda-tests.log"
echo "cuda tests: $(( $(date +%s) - t0 )) s"; t0=$(date +%s)
timeout "${2:-200}" $PY benchmarks/offload_cuda.py --batch 32 --gen-len 16 --repeats 2 \
    --timeout 90 --out "$out/offload-cuda.jsonl" 2>&1 | tee "$out/offload-cuda.log"
echo "benchmark: $(( $(date +%s) - t0 )) s"; t0=$(date +%s)
xdist=$($PY -c "import xdist" 2>/dev/null && echo "-n 12")
timeout "${3:-120}" $PY -m pytest -q -p no:cacheprovider $xdist -rfE --tb=short tests \
    > "$out/suite.log" 2>&1  # whole: a tail cut the reasons of the failures off
echo "suite: $(( $(date +%s) - t0 )) s"; tail -40 "$out/suite.log"
