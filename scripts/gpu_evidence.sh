#!/usr/bin/env bash
# The GPU checks of one device session, in order, each under a time limit that leaves room for a
# rerun in the 15 device-minutes a session gets. Run from the repository root on the GPU machine,
# from the source tree (that machine has its own torch and Triton; nothing is installed):
#
#   bash scripts/gpu_evidence.sh                 # every step; results under results/gpu/ or $OUT
#   bash scripts/gpu_evidence.sh tests kernels   # some steps: tests kernels e2e-64 e2e-1
#
# The device tool allows 600 s per command: run `tests kernels` in one call and `e2e-64 e2e-1` in
# the next (compiling two models three ways dominates the end-to-end steps).
#
# 1. the `gpu` test tier: Triton kernels vs the float64 reference, Inductor's generated code holds
#    the Triton kernels (tests/test_triton_kernels.py and others marked gpu);
# 2. the kernel benchmark (full vs reduced vs fused site) at VMamba tiny's stage shapes;
# 3. whole models: v0-tiny and v2-tiny at 224x224, batch 1 and 64, float32 and float16 autocast,
#    backend="inductor" vs backend="vmeanba" with no site and every site reduced.
# A step that fails or runs out of time is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DEST="${OUT:-results/gpu}"
mkdir -p "$DEST"
status=0

step() {  # step SECONDS NAME COMMAND...
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$DEST/$name.log" | tail -25
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start))s"
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tests kernels e2e-64 e2e-1)
for name in "${steps[@]}"; do
    case "$name" in
    tests) step 150 gpu_tests python -m pytest -q -m gpu -p no:cacheprovider ;;
    kernels) step 150 scan_kernels python -m vmeanba_compiler.bench.scan_kernels --batches 1,32 --dims 768 \
        --states 1,16 --lengths 3136,784 --associative-scan none --repeats 20 --out "$DEST/scan_kernels.json" ;;
    e2e-64) step 280 end_to_end_b64 python -m vmeanba_compiler.bench.end_to_end --batches 64 --repeats 20 \
        --out "$DEST/end_to_end_b64.json" ;;
    e2e-1) step 280 end_to_end_b1 python -m vmeanba_compiler.bench.end_to_end --batches 1 --repeats 30 \
        --out "$DEST/end_to_end_b1.json" ;;
    *) echo "unknown step $name (steps: tests kernels e2e-64 e2e-1)"; exit 2 ;;
    esac
done
exit $status
