#!/usr/bin/env bash
# Every GPU check in one pass, for a GPU lent for minutes (the device tool's machine has torch,
# triton and timm, so kzoo runs from the tree): the kernel and layer tests on CUDA, then the
# five benchmarks. Logs and JSON/PNG results land in $OUT (default bench/results); the exit
# status is non-zero if any step failed or ran out of its time.
#   bash bench/gpu_check.sh            # 10 minutes at most (the step limits add up to 590 s)
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>/dev/null | tee "$out/gpu.txt"
failed=0
step() {  # step SECONDS LOG COMMAND...
    local limit=$1 log=$2; shift 2
    timeout "$limit" "$@" 2>&1 | tee "$out/$log" || { echo "FAILED ($limit s limit): $*"; failed=1; }
}
# The AOT compile checks need no GPU and take minutes of one core: CI runs them, not the lent GPU.
step 170 tests.log python3 -m pytest -q -x -p no:cacheprovider tests/kernels tests/models/test_layers.py \
    --ignore=tests/kernels/test_triton_aot.py
step 140 bench-attention.log python3 -m kzoo bench attention --out "$out"
step 80 bench-rational.log python3 -m kzoo bench rational --out "$out"
step 55 bench-models.log python3 -m kzoo bench models --out "$out"
step 90 bench-hmar.log python3 -m kzoo bench hmar --out "$out"
step 55 bench-normal.log python3 -m kzoo bench normal --out "$out"
exit $failed
