#!/usr/bin/env bash
# Every GPU check in one pass, for a GPU lent for minutes (the device tool's machine has torch,
# triton, timm and pytest-xdist, so kzoo runs from the tree): the five benchmarks, then the kernel
# and layer tests on CUDA. Benchmarks go first because their numbers are what only a GPU gives;
# each step has its own time limit, and the attention benchmark writes its JSON after every row.
#   bash bench/gpu_check.sh     # under 10 minutes (the step limits add up to 590 s)
# Logs, JSON and PNG results land in bench/results, or, where $OUT is set (the device tool, which
# brings back at most 8 files), packed into $OUT/gpu_check.tar.gz beside the summary
# $OUT/gpu_check.txt. The exit status is non-zero if any step failed or ran out of its time.
set -uo pipefail
if [[ -n "${OUT:-}" ]]; then out=$(mktemp -d); else out=bench/results; fi
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
summary=$out/gpu_check.txt
pack() {
    [[ -n "${OUT:-}" ]] || return 0
    cp "$summary" "$OUT/" 2>/dev/null
    tar czf "$OUT/gpu_check.tar.gz" -C "$out" .
}
trap pack EXIT
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" \
    2>&1 | tee "$summary" || exit 1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>/dev/null | tee -a "$summary"
failed=0
step() {  # step SECONDS LOG COMMAND...
    local limit=$1 log=$2 began=$SECONDS status; shift 2
    timeout "$limit" "$@" 2>&1 | tee "$out/$log"
    status=${PIPESTATUS[0]}
    [[ $status == 0 ]] || failed=1
    echo "$log: exit $status after $((SECONDS - began)) s of $limit" | tee -a "$summary"
}
step 150 bench-attention.log python3 -m kzoo bench attention --out "$out"
step 45 bench-rational.log python3 -m kzoo bench rational --out "$out"
step 55 bench-models.log python3 -m kzoo bench models --out "$out"
step 85 bench-hmar.log python3 -m kzoo bench hmar --out "$out"
step 45 bench-normal.log python3 -m kzoo bench normal --out "$out"
# Triton compiles each test's kernels on first use: eight workers compile side by side (on the
# H200, 8 workers passed 555 tests in 150 s). The AOT compile checks need no GPU: CI runs them.
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
step 210 tests.log python3 -m pytest -q -p no:cacheprovider $workers --durations=15 tests/kernels \
    tests/models/test_layers.py --ignore=tests/kernels/test_triton_aot.py
exit $failed
