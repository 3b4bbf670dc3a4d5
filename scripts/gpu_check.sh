#!/usr/bin/env bash
# GPU check of the Triton backend, in one short run (< 400 s) on an H100/H200:
#   1. in parallel (compiling is CPU-bound; the machine has 16 cores):
#      - scripts/compile_check.py, full form: every kernel variant the package launches, for sm_90;
#      - the kernel tests, the CUDA-graph and act_dtype tests and every other `gpu` test, on CUDA
#        (pytest -n 4 --timeout 90; the GEMM tuner off: one config; a test sweeps every candidate);
#      - scripts/gpu_warm_cache.py: the GEMM binaries the benchmarks and the tower will ask for;
#   2. bench/bench_gpu_kernels.py alone on the GPU (tuner on, its cache kept with the results):
#      ceilings, every GEMM config x layout, the tuned GEMM vs peers, the small kernels, ViT-B-32
#      end to end (eager, CUDA graphs, open_clip fp16), early-exit classify with its sync count;
#   3. a summary table (scripts/gpu_summary.py).
#
# Wheels the GPU image lacks (it has torch + triton, no open_clip, no package index), fetched once on
# a machine with an index, from the repository root:
#   bash ../shared/gpu-wheels.sh pytest-xdist pytest-timeout execnet     # -> .whl/ (git-ignored)
# then on the GPU machine, from the repository root (with the device tool: carry [".whl"]):
#   bash scripts/gpu_check.sh
#
# Results: $OUT (else /tmp/gpu-check-out) gets exactly two files, summary.txt and gpu-check.tar.gz
# (logs, JUnit XML, bench.jsonl, compile_check.txt, the tune cache). GPU_CHECK_BUDGET (default 380 s)
# bounds the whole run; GPU_CHECK_PHASES (default "compile tests bench") picks phases to rerun.
# GPU_CHECK_DRY_RUN=1 rehearses the script on CPU (interpreter, tiny selection): no figure means anything.
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

RESULTS="${OUT:-/tmp/gpu-check-out}"
WORK="$(mktemp -d /tmp/gpu-check.XXXXXX)"
mkdir -p "$RESULTS"
PY="${PYTHON:-python3}"
PHASES="${GPU_CHECK_PHASES:-compile tests bench}"
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET:-380}))
DRY="${GPU_CHECK_DRY_RUN:-0}"
export LRA_TRITON_TUNE_CACHE="$WORK/gemm-tune.json"
if [[ "$DRY" == 1 ]]; then
    export TRITON_INTERPRET=1 LRA_BENCH_DEVICE=cpu
    echo "DRY RUN on CPU: the Triton interpreter, a tiny selection; no figure below means anything"
else
    unset TRITON_INTERPRET # compiled kernels on the GPU
fi

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "note: no .whl/*.whl here; open_clip, pytest-xdist, pytest-timeout must already be importable"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

"$PY" - << 'EOF' 2>&1 | tee "$WORK/preflight.log"
import importlib
import os
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
if not torch.cuda.is_available() and os.environ.get("GPU_CHECK_DRY_RUN") != "1":
    raise SystemExit("no CUDA device: this script is for the GPU machine (CPU checks: pytest tests)")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    gib = p.total_memory / 2**30
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {gib:.0f} GiB")
for name in ("triton", "pytest", "xdist", "pytest_timeout", "pytest_benchmark", "open_clip", "numpy", "safetensors"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name:<17} {getattr(mod, '__version__', 'ok')}")
    except Exception as err:
        print(f"  {name:<17} MISSING ({type(err).__name__}: {err})")
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 |
    tee -a "$WORK/preflight.log" || true

overall=0
PYTEST=("$PY" -m pytest -q -rfE -p no:cacheprovider)
"$PY" -c "import xdist" 2> /dev/null && PYTEST+=(-n 4) || echo "note: no pytest-xdist: tests run in one process"
"$PY" -c "import pytest_timeout" 2> /dev/null && PYTEST+=(--timeout 90) || echo "note: no pytest-timeout"
TESTS=(tests/lra_kernels/kernels/test_layernorm_quant.py tests/lra_kernels/kernels/test_int8_gemm.py tests/lra_kernels/kernels/test_exit_head.py
    tests/lra_kernels/kernels/test_gate_features.py tests/lra_kernels/kernels/test_tuning.py tests/lra_kernels/ops/test_triton_ops.py
    tests/lra_kernels/test_cuda_graphs.py tests/lra_kernels/test_act_dtype.py)
CC_ARGS=(--jobs 6)
BENCH_SELECT=()
if [[ "$DRY" == 1 ]]; then
    TESTS=(tests/lra_kernels/kernels/test_tuning.py tests/lra_kernels/test_cuda_graphs.py)
    CC_ARGS=(--quick --jobs 2)
    BENCH_SELECT=(-k "ceilings or int8_gemm or heads")
fi
SUMMARY_TESTS=()

budget_for() { # budget_for WANTED: seconds left for a phase (0 when spent)
    local left=$((DEADLINE - SECONDS - 15))
    ((left < 20)) && left=0
    ((${1} < left)) && left=$1
    echo "$left"
}

finish() { # finish LABEL RC T0: report a job's exit status
    local label=$1 rc=$2 t0=$3
    ((rc == 5)) && rc=0 # pytest: nothing selected is fine
    ((rc == 124 || rc == 137)) && echo "    (timed out)"
    echo "=== $label: exit $rc after $((SECONDS - t0))s" | tee -a "$WORK/$label.log"
    ((rc != 0)) && overall=1
    return 0
}

budget=$(budget_for 170)
labels=() pids=()
t0=$SECONDS
if [[ " $PHASES " == *" compile "* ]]; then
    timeout --kill-after=10 "$budget" "$PY" scripts/compile_check.py "${CC_ARGS[@]}" > "$WORK/compile_check.txt" 2>&1 &
    labels+=(compile_check) pids+=($!)
fi
if [[ " $PHASES " == *" tests "* ]]; then
    echo "=== tests, compile check and cache warm-up, in parallel (at most ${budget}s)"
    ignores=()
    for f in "${TESTS[@]}"; do ignores+=(--ignore="$f"); done
    (
        end=$((SECONDS + budget))
        rc=0
        env LRA_TRITON_AUTOTUNE=0 timeout --kill-after=10 "$budget" "${PYTEST[@]}" "${TESTS[@]}" \
            --junitxml="$WORK/kernel-tests.xml" || rc=$?
        ((rc == 0 || rc == 1)) || exit $rc # failures are reported; the other tests still run
        left=$((end - SECONDS))
        if [[ "$DRY" != 1 ]] && ((left > 10)); then
            env LRA_TRITON_AUTOTUNE=0 timeout --kill-after=10 "$left" "${PYTEST[@]}" tests -m gpu "${ignores[@]}" \
                --junitxml="$WORK/other-gpu-tests.xml" || rc=$((rc ? rc : $?))
        fi
        exit $rc
    ) > "$WORK/tests.log" 2>&1 &
    labels+=(tests) pids+=($!)
    SUMMARY_TESTS+=("kernel, graph, act_dtype tests=$WORK/kernel-tests.xml" "other gpu tests=$WORK/other-gpu-tests.xml")
    if [[ "$DRY" != 1 ]]; then
        timeout --kill-after=10 "$budget" "$PY" scripts/gpu_warm_cache.py --workers 6 > "$WORK/warm-cache.log" 2>&1 &
        labels+=(warm-cache) pids+=($!)
    fi
fi
for i in "${!pids[@]}"; do
    rc=0
    wait "${pids[$i]}" || rc=$?
    [[ "${labels[$i]}" == compile_check ]] && log="$WORK/compile_check.txt" || log="$WORK/${labels[$i]}.log"
    tail -n 3 "$log" | sed "s/^/    /"
    finish "${labels[$i]}" "$rc" "$t0"
done

if [[ " $PHASES " == *" bench "* ]]; then
    budget=$(budget_for 220)
    if ((budget == 0)); then
        echo "=== bench: skipped, the time budget is spent"
        overall=1
    else
        echo "=== bench (at most ${budget}s)"
        bench_json=()
        if "$PY" -c "import pytest_benchmark" 2> /dev/null; then
            bench_json=(--benchmark-json="$WORK/bench.json" --benchmark-columns=min,median,rounds)
        fi
        t0=$SECONDS rc=0
        set +e
        env LRA_GPU_BENCH_JSONL="$WORK/bench.jsonl" timeout --kill-after=10 "$budget" "$PY" -m pytest -q -rfE \
            -p no:cacheprovider bench/bench_gpu_kernels.py "${BENCH_SELECT[@]}" "${bench_json[@]}" \
            --junitxml="$WORK/bench.xml" > "$WORK/bench.log" 2>&1
        rc=$?
        set -e
        tail -n 5 "$WORK/bench.log" | sed "s/^/    /"
        finish bench "$rc" "$t0"
    fi
    SUMMARY_TESTS+=("benchmarks ran=$WORK/bench.xml")
fi

echo
"$PY" scripts/gpu_summary.py --bench "$WORK/bench.jsonl" --compile-check "$WORK/compile_check.txt" \
    --out "$RESULTS/summary.txt" --tests "${SUMMARY_TESTS[@]}" || overall=1
cp "$RESULTS/summary.txt" "$WORK/"
tar -czf "$RESULTS/gpu-check.tar.gz" -C "$WORK" .
rm -rf "$WORK"
echo "(results in $RESULTS: summary.txt, gpu-check.tar.gz; exit $overall after ${SECONDS}s)"
exit $overall
