#!/usr/bin/env bash
# GPU check of the Triton backend, in one short run on a CUDA machine:
#   1. in parallel (compiling is CPU-bound, the machine has cores to spare):
#      - each kernel test file (tests/test_kernel_*.py, tests/test_triton_backend.py) on CUDA
#        tensors, with the INT8 GEMM autotuner off (one config; a test sweeps every candidate);
#      - every other test marked `gpu`;
#      - scripts/gpu_warm_cache.py: the autotuner's candidate binaries for the benchmarked shapes;
#   2. the GPU benchmarks (bench/bench_gpu_kernels.py, autotuner on), alone on the GPU;
#   3. a summary table (scripts/gpu_summary.py).
#
# Usage, from the repository root (torch + triton present, no internet needed):
#   ../shared/gpu-wheels.sh            # on a machine with a package index: wheels into .whl/
#   scripts/gpu_check.sh               # on the GPU machine (installs .whl/*.whl into /tmp/site)
#
# Results go to $OUT when set (else /tmp/gpu-check-out): summary.txt, bench.jsonl, bench.json,
# JUnit XML and a log per job. The whole run stays within GPU_CHECK_BUDGET seconds (default
# 540). GPU_CHECK_PHASES (default "tests bench") picks phases to rerun.
# GPU_CHECK_DRY_RUN=1: rehearse the whole script on CPU (Triton interpreter, tiny benchmark shapes).
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

RESULTS="${OUT:-/tmp/gpu-check-out}"
mkdir -p "$RESULTS"
PY="${PYTHON:-python3}"
PHASES="${GPU_CHECK_PHASES:-tests bench}"
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET:-540}))
if [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 ]]; then
    export TRITON_INTERPRET=1 LRA_BENCH_DEVICE=cpu
    echo "DRY RUN on CPU: the Triton interpreter, tiny shapes; no figure below means anything"
else
    unset TRITON_INTERPRET # compiled kernels on the GPU
fi

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "note: no .whl/*.whl here; open_clip must already be importable (../shared/gpu-wheels.sh fetches it)"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

"$PY" - << 'EOF' 2>&1 | tee "$RESULTS/preflight.log"
import importlib
import os
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
if not torch.cuda.is_available() and os.environ.get("GPU_CHECK_DRY_RUN") != "1":
    raise SystemExit("no CUDA device: this script is for the GPU machine (CPU checks: pytest tests)")
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for name in ("triton", "pytest", "pytest_benchmark", "open_clip", "numpy", "safetensors", "torchao"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name:<17} {getattr(mod, '__version__', 'ok')}")
    except Exception as err:
        print(f"  {name:<17} MISSING ({type(err).__name__}: {err})")
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$RESULTS/preflight.log" || true

overall=0
PYTEST=("$PY" -m pytest -q -rfE -p no:cacheprovider)
KERNEL_TESTS=(tests/test_kernel_layernorm_quant.py tests/test_kernel_int8_gemm.py tests/test_kernel_exit_head.py
    tests/test_kernel_gate_features.py tests/test_triton_backend.py)
SUMMARY_TESTS=()

budget_for() { # budget_for WANTED: seconds left for a phase (0 when spent)
    local left=$((DEADLINE - SECONDS - 20))
    ((left < 30)) && left=0
    ((${1} < left)) && left=$1
    echo "$left"
}

finish() { # finish LABEL RC T0: report a job's exit status
    local label=$1 rc=$2 t0=$3
    ((rc == 5)) && rc=0 # pytest: nothing selected (no other gpu-marked tests) is fine
    ((rc == 124 || rc == 137)) && echo "    (timed out)"
    echo "=== $label: exit $rc after $((SECONDS - t0))s" | tee -a "$RESULTS/$label.log"
    ((rc != 0)) && overall=1
    return 0
}

if [[ " $PHASES " == *" tests "* ]]; then
    budget=$(budget_for 240)
    if ((budget == 0)); then
        echo "=== tests: skipped, the time budget is spent"
        overall=1
    else
        echo "=== tests and cache warm-up, in parallel (at most ${budget}s)"
        labels=() pids=()
        t0=$SECONDS
        for f in "${KERNEL_TESTS[@]}"; do
            label=$(basename "$f" .py)
            env LRA_TRITON_AUTOTUNE=0 timeout --kill-after=10 "$budget" "${PYTEST[@]}" "$f" \
                --junitxml="$RESULTS/$label.xml" > "$RESULTS/$label.log" 2>&1 &
            labels+=("$label") pids+=($!)
            SUMMARY_TESTS+=("$label=$RESULTS/$label.xml")
        done
        ignores=()
        for f in "${KERNEL_TESTS[@]}"; do ignores+=(--ignore="$f"); done
        timeout --kill-after=10 "$budget" "${PYTEST[@]}" tests -m gpu "${ignores[@]}" \
            --junitxml="$RESULTS/other-gpu-tests.xml" > "$RESULTS/other-gpu-tests.log" 2>&1 &
        labels+=(other-gpu-tests) pids+=($!)
        SUMMARY_TESTS+=("other gpu tests=$RESULTS/other-gpu-tests.xml")
        if [[ "${GPU_CHECK_DRY_RUN:-0}" != 1 ]]; then
            timeout --kill-after=10 "$budget" "$PY" scripts/gpu_warm_cache.py > "$RESULTS/warm-cache.log" 2>&1 &
            labels+=(warm-cache) pids+=($!)
        fi
        for i in "${!pids[@]}"; do
            rc=0
            wait "${pids[$i]}" || rc=$?
            tail -n 4 "$RESULTS/${labels[$i]}.log" | sed "s/^/    /"
            finish "${labels[$i]}" "$rc" "$t0"
        done
    fi
fi

if [[ " $PHASES " == *" bench "* ]]; then
    budget=$(budget_for 300)
    rm -f "$RESULTS/bench.jsonl"
    if ((budget == 0)); then
        echo "=== bench: skipped, the time budget is spent"
        overall=1
    else
        echo "=== bench (at most ${budget}s)"
        bench_json=()
        if "$PY" -c "import pytest_benchmark" 2> /dev/null; then
            bench_json=(--benchmark-json="$RESULTS/bench.json" --benchmark-columns=min,median,rounds)
        fi
        t0=$SECONDS rc=0
        set +e
        env LRA_GPU_BENCH_JSONL="$RESULTS/bench.jsonl" timeout --kill-after=10 "$budget" "${PYTEST[@]}" \
            bench/bench_gpu_kernels.py "${bench_json[@]}" --junitxml="$RESULTS/bench.xml" 2>&1 | tee "$RESULTS/bench.log"
        rc=${PIPESTATUS[0]}
        set -e
        finish bench "$rc" "$t0"
    fi
    SUMMARY_TESTS+=("benchmarks ran=$RESULTS/bench.xml")
fi

echo
"$PY" scripts/gpu_summary.py --bench "$RESULTS/bench.jsonl" --out "$RESULTS/summary.txt" --tests "${SUMMARY_TESTS[@]}" || overall=1
echo "(results in $RESULTS)"
exit $overall
