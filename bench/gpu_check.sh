#!/usr/bin/env bash
# Every GPU check in one pass, for a GPU lent for minutes (the device tool's machine has torch,
# triton, timm and pytest-xdist, so kzoo runs from the tree): the five benchmarks and the host
# profile, then the kernel and layer tests on CUDA. Benchmarks go first because their numbers are what only a GPU gives;
# each step has its own time limit, and the attention benchmark writes its JSON after every row.
#   bash bench/gpu_check.sh                              # every step, in under 600 s
#   bash bench/gpu_check.sh rational host models tests   # the steps named, in this script's order
# The tests get what is left of 590 s (at least 60), so they run longest when fewer steps are named.
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
chosen=" ${*:-rational host models attention hmar normal tests} "
step() {  # step NAME SECONDS COMMAND...: run COMMAND, logged to NAME.log, if NAME was chosen
    local name=$1 limit=$2 began=$SECONDS status; shift 2
    [[ $chosen == *" $name "* ]] || return 0
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    status=${PIPESTATUS[0]}
    [[ $status == 0 ]] || failed=1
    echo "$name: exit $status after $((SECONDS - began)) s of $limit" | tee -a "$summary"
}
step rational 70 python3 -m kzoo bench rational --out "$out"
step host 40 python3 bench/host_profile.py --out "$out"
step models 55 python3 -m kzoo bench models --out "$out"
step attention 200 python3 -m kzoo bench attention --out "$out"
step hmar 75 python3 -m kzoo bench hmar --out "$out"
step normal 40 python3 -m kzoo bench normal --out "$out"
# Triton compiles each test's kernels on first use: eight workers compile side by side (on the
# H200, 8 workers passed 555 tests in 150 s). The AOT compile checks need no GPU: CI runs them.
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
step tests $((SECONDS < 530 ? 590 - SECONDS : 60)) python3 -m pytest -q -p no:cacheprovider $workers --durations=15 tests/kernels \
    tests/models/test_layers.py --ignore=tests/kernels/test_triton_aot.py
exit $failed
